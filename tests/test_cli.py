"""End-to-end tests of the `dgemma` command line: the commands run as subprocesses on a random tiny checkpoint
written by `dgemma random-checkpoint`; the bad-input matrix also runs in-process through `dgemma.cli.main`.

Each subprocess pays for importing torch, so the independent commands are started together on a small thread pool
(module fixture `jobs`) and the tests only read their results. Only the contract test relies on the default random
stream; the other comparisons with the Python API name `--rng` explicitly, so that one mismatch of defaults shows
up in one test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import dgemma

PROMPT = [5, 17, 3]
PROMPT_ARG = "5,17,3"
FAST = ["--max-denoising-steps", "6"]  # keeps every generation short
TINY_VOCAB = 262
# Sampler settings away from the checkpoint's defaults (a random model's argmax never settles, so the confidence
# threshold alone does not stop early).
LOOSE = ["--confidence-threshold", "100", "--entropy-bound", "50", "--t-min", "0.1", "--t-max", "0.3"]
LOOSE_KW = dict(confidence_threshold=100.0, entropy_bound=50.0, t_min=0.1, t_max=0.3)
CONTRACT_KEYS = {"ids", "tokens_per_forward", "steps"}
STATS_KEYS = CONTRACT_KEYS | {"seed", "timings", "finish_reason", "text"}


def run_cli(*args, env: dict[str, str] | None = None, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (exe or [sys.executable, "-m", "dgemma.cli"]) + [str(a) for a in args]
    # One compute thread per subprocess: several run at once on a small machine, and torch's thread pools would
    # otherwise oversubscribe the cores (results do not depend on the thread count).
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=full_env,
                          timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_json(proc: subprocess.CompletedProcess) -> dict:
    """stdout must be exactly one JSON object (and nothing else)."""
    ok(proc)
    out = json.loads(proc.stdout)  # raises on any extra text
    assert isinstance(out, dict)
    assert proc.stdout.strip().count("\n") == 0, "expected the JSON object on a single line"
    return out


def one_json_multiline(proc: subprocess.CompletedProcess) -> dict:
    ok(proc)
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = ok(run_cli("random-checkpoint", out, "--preset", "tiny", "--seed", "0"))
    assert str(out) in proc.stdout
    return out


@pytest.fixture(scope="module")
def variants(ckpt, tmp_path_factory) -> dict[str, Path]:
    """Broken / reduced copies of the checkpoint."""
    root = tmp_path_factory.mktemp("variants")
    no_tok = root / "no_tokenizer"
    shutil.copytree(ckpt, no_tok)
    (no_tok / "tokenizer.json").unlink()
    bad_cfg = root / "bad_config"
    shutil.copytree(ckpt, bad_cfg)
    (bad_cfg / "config.json").write_text('{"model_type": "diffusion_gemma", "text_config": {', encoding="utf-8")
    no_hidden = root / "no_num_experts"  # valid JSON, a shape key without a default missing
    shutil.copytree(ckpt, no_hidden)
    cfg = json.loads((no_hidden / "config.json").read_text(encoding="utf-8"))
    del cfg["text_config"]["num_experts"]
    (no_hidden / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    no_template = root / "no_template"
    shutil.copytree(ckpt, no_template)
    (no_template / "chat_template.jinja").unlink()
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tok_cfg["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious\n", encoding="utf-8")
    return {"no_tokenizer": no_tok, "no_template": no_template, "bad_config": bad_cfg, "no_hidden": no_hidden,
            "occupied": occupied,
            "bf16": root / "bf16",
            "missing": root / "does-not-exist"}


def error_cases(ckpt: Path, v: dict[str, Path]) -> dict[str, tuple[list, str]]:
    """name -> (argv, a fragment the error message must contain)."""
    gen = ["generate", "--model", ckpt, "--prompt-ids"]
    return {
        "non_int_ids": ([*gen, "5,x"], "comma-separated integers"),
        "empty_ids": ([*gen, ","], "empty"),
        "ids_out_of_vocab": ([*gen, f"5,{TINY_VOCAB}"], "outside the vocabulary"),
        "negative_id": ([*gen, "5,-1"], "outside the vocabulary"),
        "zero_new_tokens": ([*gen, PROMPT_ARG, "--max-new-tokens", "0"], "max_new_tokens"),
        "zero_prefill_chunk": ([*gen, PROMPT_ARG, "--prefill-chunk", "0"], "--prefill-chunk"),
        "too_many_new_tokens": ([*gen, PROMPT_ARG, "--max-new-tokens", "100000"], "positions"),
        "negative_entropy_bound": ([*gen, PROMPT_ARG, "--entropy-bound", "-1"], "entropy_bound"),
        "t_max_below_t_min": ([*gen, PROMPT_ARG, "--t-min", "0.9", "--t-max", "0.5"], "t_max must be > t_min"),
        "zero_denoising_steps": ([*gen, PROMPT_ARG, "--max-denoising-steps", "0"], "max_denoising_steps"),
        "negative_seed": ([*gen, PROMPT_ARG, "--seed", "-1"], "seed"),
        "bad_rng": ([*gen, PROMPT_ARG, "--rng", "nope"], "rng"),
        "bad_dtype": ([*gen, PROMPT_ARG, "--dtype", "int8"], "int8"),
        "missing_dir": (["generate", "--model", v["missing"], "--prompt-ids", PROMPT_ARG], "does-not-exist"),
        "bad_config": (["generate", "--model", v["bad_config"], "--prompt-ids", PROMPT_ARG], "not valid JSON"),
        "prompt_without_tokenizer": (["generate", "--model", v["no_tokenizer"], "--prompt", "hi"], "--prompt-ids"),
        "empty_prompt": (["generate", "--model", ckpt, "--prompt", ""], "empty"),
        "chat_without_template": (["generate", "--model", v["no_template"], "--prompt", "hi", "--chat"],
                                  "no chat template"),
        "info_missing_dir": (["info", "--model", v["missing"]], "does-not-exist"),
        "info_bad_config": (["info", "--model", v["bad_config"]], "not valid JSON"),
        "missing_shape_key": (["generate", "--model", v["no_hidden"], "--prompt-ids", PROMPT_ARG],
                              "text_config.num_experts is missing"),
        "info_missing_shape_key": (["info", "--model", v["no_hidden"]], "text_config.num_experts is missing"),
        "random_bad_preset": (["random-checkpoint", v["missing"], "--preset", "huge"], "huge"),
    }


# Run end to end as well (exit status through the console entry, no traceback on stderr); the rest of the matrix
# runs in-process through dgemma.cli.main, which is the same code without the torch import per case.
SUBPROCESS_ERRORS = ["non_int_ids", "missing_dir"]  # argparse's exit, and main()'s return value


@pytest.fixture(scope="module")
def jobs(ckpt, variants):
    """Start every independent command at once; tests call .result() on the one they check."""
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    gen = ["generate", "--model", ckpt]
    futures: dict[str, Future] = {}

    def submit(name, *args, **kw):
        futures[name] = pool.submit(run_cli, *args, **kw)

    # The contract command, verbatim, then the same seed again (through the console script) and another seed.
    submit("contract", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "0", "--max-new-tokens", "64", "--json")
    script = shutil.which("dgemma")
    if script is not None:
        submit("contract_again", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "0", "--max-new-tokens", "64",
               "--json", exe=[script])
    submit("contract_seed1", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "1", "--max-new-tokens", "64", "--json")
    submit("stats", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "3", "--max-new-tokens", "64", "--json", "--stats",
           "--rng", "fast", *FAST)
    submit("text", *gen, "--prompt", "Hello there", "--seed", "0", "--max-new-tokens", "40", "--rng", "reference",
           *FAST)
    submit("chat", *gen, "--prompt", "Hello there", "--chat", "--seed", "0", "--max-new-tokens", "40",
           "--rng", "reference", *FAST)
    submit("canvas", *gen, "--prompt", "Hi", "--seed", "0", "--max-new-tokens", "32", "--show-canvas",
           "--max-denoising-steps", "4", env={"COLUMNS": "120", "TTY_COMPATIBLE": "1"})
    submit("steps3", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "0", "--max-new-tokens", "96", "--json",
           "--max-denoising-steps", "3", "--eos-token-id", "9999", "--rng", "reference", *LOOSE)
    submit("early_stop", *gen, "--prompt-ids", PROMPT_ARG, "--seed", "0", "--max-new-tokens", "64", "--json",
           "--max-denoising-steps", "8", "--stability-threshold", "0", "--confidence-threshold", "100",
           "--eos-token-id", "9998,9999", "--rng", "fast")
    submit("no_tok_ids", "generate", "--model", variants["no_tokenizer"], "--prompt-ids", PROMPT_ARG, "--seed", "0",
           "--max-new-tokens", "32", "--rng", "reference", *FAST)
    submit("info_text", "info", "--model", ckpt, env={"COLUMNS": "160"})
    submit("info_json", "info", "--model", ckpt, "--json")

    def bf16():
        made = run_cli("random-checkpoint", variants["bf16"], "--dtype", "bfloat16", "--seed", "1")
        if made.returncode != 0:
            return made, None
        return made, run_cli("generate", "--model", variants["bf16"], "--prompt-ids", PROMPT_ARG, "--seed", "0",
                             "--max-new-tokens", "32", "--json", "--stats", *FAST)

    futures["bf16"] = pool.submit(bf16)

    def refuse_then_force():
        before = snapshot(variants["occupied"])
        refused = run_cli("random-checkpoint", variants["occupied"])
        after_refusal = snapshot(variants["occupied"])
        forced = run_cli("random-checkpoint", variants["occupied"], "--force")
        return before, refused, after_refusal, forced

    futures["overwrite"] = pool.submit(refuse_then_force)

    for name, (argv, _) in error_cases(ckpt, variants).items():
        if name in SUBPROCESS_ERRORS:
            submit(f"err_{name}", *argv)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def model(ckpt):
    return dgemma.load_model(ckpt)


# -- generate --json: the contract -------------------------------------------------------------------------------
def test_json_contract_matches_python_api(jobs, model):
    out = one_json(jobs["contract"].result())
    assert set(out) == CONTRACT_KEYS
    assert isinstance(out["ids"], list) and out["ids"], out
    assert all(isinstance(t, int) and 0 <= t < TINY_VOCAB for t in out["ids"])
    assert isinstance(out["tokens_per_forward"], float) and out["tokens_per_forward"] > 0
    assert isinstance(out["steps"], list) and out["steps"]
    assert all(isinstance(s, int) and 1 <= s <= 48 for s in out["steps"])
    assert len(out["steps"]) <= 2  # 64 new tokens = two canvases of 32
    assert len(out["ids"]) <= 64

    ref = model.generate(PROMPT, max_new_tokens=64, seed=0)
    assert out == {"ids": ref.ids, "tokens_per_forward": ref.tokens_per_forward, "steps": ref.steps}
    assert out["tokens_per_forward"] == pytest.approx(len(out["ids"]) / sum(out["steps"]), rel=1e-6)


def test_same_seed_same_output_via_console_script(jobs):
    assert shutil.which("dgemma") is not None, "the `dgemma` console script is not installed"
    first = one_json(jobs["contract"].result())
    again = one_json(jobs["contract_again"].result())
    assert again == first


def test_different_seed_different_output(jobs):
    first = one_json(jobs["contract"].result())
    other = one_json(jobs["contract_seed1"].result())
    assert set(other) == CONTRACT_KEYS
    assert other != first


def test_json_stats(jobs, model):
    out = one_json(jobs["stats"].result())
    assert set(out) == STATS_KEYS
    assert out["seed"] == 3
    assert out["finish_reason"] in ("eos", "length")
    assert {"prefill_s", "denoise_s", "commit_s", "total_s", "tokens_per_s"} <= set(out["timings"])
    assert all(isinstance(v, float) and v >= 0 for v in out["timings"].values())
    assert isinstance(out["text"], str)
    assert out["text"] == model.tokenizer.decode(out["ids"])
    ref = model.generate(PROMPT, max_new_tokens=64, seed=3, max_denoising_steps=6, rng="fast")
    assert (out["ids"], out["steps"], out["tokens_per_forward"]) == (ref.ids, ref.steps, ref.tokens_per_forward)
    assert out["finish_reason"] == ref.finish_reason
    if out["finish_reason"] == "eos":
        assert out["ids"][-1] in (1, 5) and not {1, 5} & set(out["ids"][:-1])
    else:
        assert not {1, 5} & set(out["ids"]) and len(out["steps"]) == 2


# -- generate: text output -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("job, chat", [("text", False), ("chat", True)])
def test_text_prompt(jobs, model, job, chat):
    proc = ok(jobs[job].result())
    tok = model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Hello there"}]) if chat else tok.encode("Hello there")
    ref = model.generate(prompt, max_new_tokens=40, seed=0, max_denoising_steps=6, rng="reference")
    assert proc.stdout == ref.text + "\n"
    stats = [line for line in proc.stderr.splitlines() if line.startswith("[") and "tokens/forward" in line]
    assert len(stats) == 1, proc.stderr
    assert f"[{len(ref.ids)} tokens, {len(ref.steps)} canvas(es), steps {ref.steps}," in stats[0]
    assert stats[0].endswith("seed 0]")


def test_chat_changes_the_prompt(model):
    tok = model.tokenizer
    plain = tok.encode("Hello there")
    chat = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    assert chat != plain
    assert chat[0] == tok.token_to_id("<bos>")
    assert tok.decode(chat, skip_special_tokens=False).endswith("<start_of_turn>model\n")


def test_ids_only_checkpoint_prints_ids(jobs, model):
    proc = ok(jobs["no_tok_ids"].result())
    ref = model.generate(PROMPT, max_new_tokens=32, seed=0, max_denoising_steps=6, rng="reference")
    assert proc.stdout == " ".join(map(str, ref.ids)) + "\n"
    assert "tokens/forward" in proc.stderr


def test_show_canvas(jobs):
    # TTY_COMPATIBLE makes rich draw the live panel as it would on a terminal, one frame per denoising step.
    proc = ok(jobs["canvas"].result())
    out = proc.stdout
    steps = re.search(r"steps \[(\d+)\]", proc.stderr)
    assert steps, proc.stderr
    n = int(steps.group(1))
    assert 1 <= n <= 4
    for k in range(1, n + 1):
        assert f"canvas 1 · step {k} · accepted " in out, out
    assert f"canvas 1 committed after {n} steps" in out
    assert "green: accepted" in out  # the panel's legend


# -- generate: per-call settings -----------------------------------------------------------------------------------
def test_max_denoising_steps_bounds_steps(jobs):
    out = one_json(jobs["steps3"].result())
    assert len(out["steps"]) == 3  # no EOS id can occur, so all 96 tokens = 3 canvases run
    assert all(1 <= s <= 3 for s in out["steps"]), out["steps"]
    # (generated pad ids, id 0, are dropped from `ids`, so there may be fewer than 96)
    assert 80 < len(out["ids"]) <= 96 and 0 not in out["ids"]


def test_sampler_flags_reach_the_sampler(jobs, model):
    # The run with --max-denoising-steps/--eos-token-id/--rng and the LOOSE settings is exactly the Python API's
    # with the same overrides, and differs from the run without the LOOSE settings.
    out = one_json(jobs["steps3"].result())
    kw = dict(max_new_tokens=96, seed=0, max_denoising_steps=3, eos_token_id=9999, rng="reference")
    ref = model.generate(PROMPT, **LOOSE_KW, **kw)
    assert out == {"ids": ref.ids, "tokens_per_forward": ref.tokens_per_forward, "steps": ref.steps}
    plain = model.generate(PROMPT, **kw)
    assert plain.ids != ref.ids


def test_early_stop_thresholds_shorten_steps(jobs, model):
    # Every canvas counts as stable and its mean entropy (at most ln 262) is under 100: each stops after one step.
    out = one_json(jobs["early_stop"].result())
    assert out["steps"] == [1, 1], out["steps"]
    assert out["tokens_per_forward"] == pytest.approx(len(out["ids"]) / 2, rel=1e-6)
    ref = model.generate(PROMPT, max_new_tokens=64, seed=0, max_denoising_steps=8, stability_threshold=0,
                         confidence_threshold=100.0, eos_token_id=[9998, 9999], rng="fast")
    assert out == {"ids": ref.ids, "tokens_per_forward": ref.tokens_per_forward, "steps": ref.steps}
    capped = model.generate(PROMPT, max_new_tokens=64, seed=0, max_denoising_steps=8, eos_token_id=9999, rng="fast")
    assert capped.steps == [8, 8]  # the defaults run to the cap on this random model


# -- bfloat16 ------------------------------------------------------------------------------------------------------
def test_bfloat16_checkpoint_generates(jobs, variants):
    made, gen = jobs["bf16"].result()
    ok(made)
    cfg = json.loads((variants["bf16"] / "config.json").read_text(encoding="utf-8"))
    assert cfg["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(variants["bf16"] / "model.safetensors"), framework="pt") as f:
        key = next(iter(f.keys()))
        assert f.get_slice(key).get_dtype() == "BF16"
    out = one_json(gen)
    assert set(out) == STATS_KEYS
    assert out["ids"] and all(0 <= t < TINY_VOCAB for t in out["ids"])
    assert all(1 <= s <= 6 for s in out["steps"])


# -- info ----------------------------------------------------------------------------------------------------------
def test_info_json(jobs, model):
    info = one_json_multiline(jobs["info_json"].result())
    assert info["parameters"] > 0
    assert 0 < info["active_parameters_per_token"] < info["parameters"]  # top-2 of 4 experts
    # The text stack, with the tied embedding counted once; the encoder's per-layer scalars are not counted.
    own = sum(p.numel() for name, p in model.module.named_parameters() if not name.endswith("encoder_layer_scalar"))
    assert info["parameters"] == own
    assert info["stored_text_parameters"] == sum(p.numel() for p in model.module.parameters())
    assert info["stored_vision_parameters"] == 0
    assert info["vocab_size"] == TINY_VOCAB and info["num_layers"] == 4 and info["canvas_length"] == 32
    types = [layer["type"] for layer in info["layers"]]
    assert types == ["sliding_attention"] * 3 + ["full_attention"]
    assert [layer["head_dim"] for layer in info["layers"]] == [16, 16, 16, 32]
    assert [layer["v_proj"] for layer in info["layers"]] == [True, True, True, False]
    assert info["experts"] == {"num_experts": 4, "top_k": 2, "moe_intermediate_size": 32,
                               "dense_intermediate_size": 128}
    n = info["parameters"]
    assert info["bytes"]["float32"] == 4 * n
    assert info["bytes"]["bfloat16"] == 2 * n
    assert info["bytes"]["fp8"] == n
    assert info["bytes"]["nvfp4"] == int(n * (0.5 + 1 / 16))  # 4-bit values + one fp8 scale per 16
    assert info["stored_dtypes"] == {"F32": info["stored_text_parameters"]}
    gen = info["generation_config"]
    assert gen["max_denoising_steps"] == 48 and gen["entropy_bound"] == 0.1
    assert gen["t_min"] == 0.4 and gen["t_max"] == 0.8 and gen["eos_token_id"] == [1, 5]
    assert info["tokenizer"] is True


def test_info_text(jobs):
    proc = ok(jobs["info_text"].result())
    out = proc.stdout
    assert "parameters" in out
    assert "MoE: 4 experts, top-2" in out
    assert "sliding" in out and "full" in out
    assert "float32" in out and "bfloat16" in out and "fp8" in out and "nvfp4" in out
    assert "max_denoising_steps=48" in out
    assert "tokenizer: yes" in out


# -- random-checkpoint ---------------------------------------------------------------------------------------------
def test_random_checkpoint_files(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja"}
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_random_checkpoint_refuses_then_forces(jobs, variants):
    before, refused, after_refusal, forced = jobs["overwrite"].result()
    assert refused.returncode == 2, refused
    assert "dgemma: error:" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert after_refusal == before  # untouched
    ok(forced)
    names = {p.name for p in variants["occupied"].iterdir()}
    assert "keep.txt" not in names and {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert dgemma.load_model(variants["occupied"]).config.vocab_size == TINY_VOCAB


# -- errors --------------------------------------------------------------------------------------------------------
def check_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr
    assert fragment in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("name", SUBPROCESS_ERRORS)
def test_bad_input_subprocess(jobs, ckpt, variants, name):
    check_error(jobs[f"err_{name}"].result(), error_cases(ckpt, variants)[name][1])


def run_main(argv) -> subprocess.CompletedProcess:
    from dgemma.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


ALL_ERRORS = sorted(error_cases(Path("ckpt"), {k: Path(k) for k in ("missing", "bad_config", "no_tokenizer",
                                                                       "no_template", "no_hidden")}))
ARGPARSE_ERRORS = {"non_int_ids", "empty_ids", "random_bad_preset"}
EITHER_FORMAT = {"bad_rng"}  # an argparse choice or a ValueError from generate, both fine


@pytest.mark.parametrize("name", ALL_ERRORS)
def test_bad_input(ckpt, variants, name):
    argv, fragment = error_cases(ckpt, variants)[name]
    proc = run_main(argv)
    check_error(proc, fragment)
    argparse_format = "usage: dgemma" in proc.stderr and ": error: argument " in proc.stderr
    if name in ARGPARSE_ERRORS:  # argparse's own format: usage, then "dgemma <command>: error: ..."
        assert argparse_format, proc.stderr
    elif name not in EITHER_FORMAT or not argparse_format:
        assert proc.stderr.startswith("dgemma: error: "), proc.stderr
    assert proc.stderr.count("\n") <= 1 or "usage:" in proc.stderr  # one line, or argparse's usage + line
