"""`dgemma bench` on the tiny preset: the result's structure, positive timings and FLOP counts, agreement with the
reference (fp32 token-identical, bf16 logits within the stated tolerance), one table in two renderings; the memory
instrument of benchmarks/memory.py against known allocations. transformers is the oracle here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma.bench import run as bench
from dgemma.config import ModelConfig
from dgemma.bench.run import BenchOptions
from dgemma.presets import preset_config, random_model
from dgemma.checkpoint.write import write_random_checkpoint

pytest.importorskip("transformers")

MODE_KEYS = {"impl", "dtype", "rng", "name", "wall_s", "first_step_s", "step_s", "prefill_s", "tokens",
             "tokens_per_forward", "tokens_per_s_stated", "tokens_per_s_measured", "step_gflops", "fraction_of_peak",
             "speedup_vs_reference", "valid"}


def _load_memory_script():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine a second OpenMP thread mostly waits for a descheduled partner. The tiny
    # preset keeps bf16 cheap even where bf16 matmuls are slow (no native bf16).
    r = bench.run_bench(BenchOptions(preset="tiny", dtypes="float32,bfloat16", steps=3, prompt_len=16, seed=0,
                                     threads=1, repeats=3, min_time_s=0.3, peak_budget_s=0.05))
    assert torch.get_num_threads() == threads  # restored
    json.dumps(r)  # JSON-serialisable
    return r


def test_structure(result):
    for key in ("preset", "config", "settings", "machine", "flops", "reference", "weights", "modes", "agreement",
                "peak", "memory", "notes"):
        assert key in result, key
    assert result["preset"] == "tiny" and result["reference"]["ran"] is True
    assert result["settings"]["steps"] == 3 and result["settings"]["dtypes"] == ["float32", "bfloat16"]
    names = [(m["impl"], m["dtype"], m["rng"]) for m in result["modes"]]
    assert names == [("reference", "float32", "torch.manual_seed"), ("dgemma", "float32", "reference"),
                     ("dgemma", "float32", "fast"), ("reference", "bfloat16", "torch.manual_seed"),
                     ("dgemma", "bfloat16", "fast")]
    for m in result["modes"]:
        assert MODE_KEYS <= set(m), MODE_KEYS - set(m)


def test_timings_positive(result):
    for m in result["modes"]:
        assert m["wall_s"] > 0 and m["first_step_s"] > 0, m["name"]
        assert m["step_s"] > 0 and m["prefill_s"] > 0, m["name"]
        assert m["wall_s"] > m["prefill_s"] + 2 * m["step_s"]
        assert m["runs"] >= 3 and len(m["step_s_all"]) == m["runs"] and m["step_s"] == min(m["step_s_all"])
        assert 1 <= m["tokens"] <= 32 and m["tokens_per_forward"] == pytest.approx(m["tokens"] / 3)
        assert m["tokens_per_s_stated"] == pytest.approx(16 / m["step_s"])
        if m["impl"] == "dgemma":
            assert m["internal"]["denoise_s"] > 0 and m["internal"]["prefill_s"] > 0
            ref = next(r for r in result["modes"] if r["impl"] == "reference" and r["dtype"] == m["dtype"])
            assert m["speedup_vs_reference"] == pytest.approx(ref["step_s"] / m["step_s"])


def test_flops_and_peak(result):
    cfg = preset_config("tiny")
    fl = result["flops"]
    assert fl["denoise_step"] == cfg.decoder_flops(16)["total"] and fl["prefill"] == cfg.prefill_flops(16)
    assert fl["denoise_step"] > fl["denoise_step_first"] > 0 and fl["prefill"] > 0
    assert fl["denoise_step_breakdown"]["total"] == fl["denoise_step"]
    assert all(v > 0 for v in fl["denoise_step_breakdown"].values())
    for d in ("float32", "bfloat16"):
        pk = result["peak"][d]
        assert pk["gflops"] == max(g["gflops"] for g in pk["gemms"]) > 0
        assert all(g["gflops"] == pytest.approx(2 * g["m"] * g["k"] * g["n"] / g["seconds"] / 1e9)
                   for g in pk["gemms"])
    for m in result["modes"]:
        assert m["step_gflops"] == pytest.approx(fl["denoise_step"] / m["step_s"] / 1e9)
        assert m["fraction_of_peak"] == pytest.approx(m["step_gflops"] / result["peak"][m["dtype"]]["gflops"])


def test_agreement(result):
    tok = result["agreement"]["float32"]["tokens"]
    assert tok["token_identical"] is True and tok["first_mismatch"] is None and tok["compared"] >= 1
    lg32 = result["agreement"]["float32"]["logits"]
    assert lg32["within_tolerance"] and lg32["max_abs_diff"] <= bench.FP32_MAX_TOL
    lg = result["agreement"]["bfloat16"]["logits"]
    assert lg["finite"] and math.isfinite(lg["max_abs_diff"]) and math.isfinite(lg["mean_abs_diff"])
    assert lg["tolerance"] == {"max_abs_diff": bench.BF16_MAX_TOL, "mean_abs_diff": bench.BF16_MEAN_TOL}
    assert lg["max_abs_diff"] <= bench.BF16_MAX_TOL and lg["mean_abs_diff"] <= bench.BF16_MEAN_TOL
    assert lg["within_tolerance"]


def test_peak_rss(result):
    # At least the loaded torch (well over 50 MiB), and no more than the process's peak now.
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 50 < result["memory"]["peak_rss_mib"] <= now


def test_one_table(result, capsys):
    from rich.console import Console

    headers, rows = bench.speed_table(result)
    assert len(rows) == len(result["modes"]) and all(len(r) == len(headers) for r in rows)
    bench.render(result, Console(width=400, force_terminal=False))
    out = capsys.readouterr().out
    assert "dgemma bench" in out and "agreement" in out
    for row in rows:
        assert row[0] in out and row[2] in out  # mode and step ms


def test_random_model_matches_checkpoint(tmp_path):
    from dgemma import load_model

    ck = write_random_checkpoint(tmp_path / "ck", "tiny", seed=3)
    for dtype in ("float32", "bfloat16"):
        a, b = random_model("tiny", dtype, seed=3), load_model(ck, dtype=dtype)
        sa, sb = a.module.state_dict(), b.module.state_dict()
        assert a.dtype == getattr(torch, dtype)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.generation_config == b.generation_config
    # A bf16 checkpoint holds the same draws, rounded.
    ck16 = write_random_checkpoint(tmp_path / "ck16", "tiny", seed=3, dtype="bfloat16")
    sa, sb = (random_model("tiny", "bfloat16", seed=3).module.state_dict(),
              load_model(ck16, dtype="bfloat16").module.state_dict())
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_options_are_checked():
    for bad in (dict(preset="nope"), dict(steps=1), dict(prompt_len=0), dict(repeats=0), dict(threads=0),
                dict(dtypes="float16"), dict(dtypes="")):
        with pytest.raises(ValueError):
            BenchOptions(**bad).validate()
    assert BenchOptions(dtypes="bfloat16, float32,bfloat16").torch_dtypes() == [torch.bfloat16, torch.float32]


def test_reference_absent_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    r = bench.run_bench(BenchOptions(preset="tiny", dtypes="float32", steps=2, prompt_len=8, repeats=1,
                                     min_time_s=0, threads=1, peak_budget_s=0.01))
    assert r["reference"]["ran"] is False and r["agreement"] == {}
    assert any("transformers" in n for n in r["notes"])
    assert [m["impl"] for m in r["modes"]] == ["dgemma", "dgemma"]
    assert all(m["speedup_vs_reference"] is None for m in r["modes"])


def test_flops_count_by_hand():
    cfg = preset_config("tiny")  # hidden 64, 4 layers (3 sliding, 1 full), vocab 262, canvas 32
    c, h, v, i = 32, 64, 262, 128
    fl = cfg.decoder_flops(cached=100)
    assert fl["lm_head"] == 2 * c * h * v and fl["sc_soft_embed"] == 2 * c * v * h
    assert fl["sc_mlp"] == 2 * 3 * c * h * i and fl["dense_mlp"] == 4 * 2 * 3 * c * h * i
    assert fl["experts"] == 4 * 2 * 3 * c * 2 * 32 * h and fl["router"] == 4 * 2 * c * h * 4
    # sliding: 4 heads x 16, 2 KV heads, q/k/v/o; full: 4 heads x 32, 1 KV head, no v_proj
    assert fl["attn_proj"] == 3 * 2 * c * h * (64 + 2 * 32 + 64) + 2 * c * h * (128 + 32 + 128)
    # sliding layers see min(100, 64 - 1) cached keys + the canvas; the full layer all 100 + canvas
    assert fl["attn_scores"] == 3 * 2 * 2 * c * 4 * (63 + c) * 16 + 2 * 2 * c * 4 * (100 + c) * 32
    no_sc = cfg.decoder_flops(cached=100, self_conditioning=False)
    assert no_sc["total"] == fl["total"] - fl["sc_soft_embed"] - fl["sc_mlp"]
    # Prefill of 3 tokens (inside every window): the canvas' weight FLOPs without the head and self-conditioning,
    # and 1 + 2 + 3 causal keys.
    weights = fl["attn_proj"] + fl["dense_mlp"] + fl["router"] + fl["experts"]
    keys = 2 * 2 * 4 * (1 + 2 + 3) * (3 * 16 + 32)
    assert cfg.prefill_flops(3) == weights * 3 // c + keys


def test_memory_instrument():
    """benchmarks/memory.py: its peak-memory block sees a known allocation, and the chunked fast sampler's
    temporaries stay far below the reference ops' full-vocabulary tensors."""
    mem = _load_memory_script()
    with mem.PeakMemory() as pm:
        x = torch.ones(16 << 20)  # 64 MiB, touched
        del x
    assert 63 <= pm.extra_mib <= 72
    with mem.PeakMemory() as pm:
        pass
    assert pm.extra_mib < 4
    # the model's canvas (logits 128 MiB): the fast sampler's temporaries are a few chunks of positions (~12-15 MiB
    # at two to four positions per chunk), whatever the canvas
    r = mem.sampler_memory(vocab=131072, canvas=256)
    assert r["logits_tensor_mib"] == 128
    assert r["fast_fp32"]["self_conditioning_mib"] == 128 and r["fast_bf16"]["self_conditioning_mib"] == 64
    # The reference's ops make several full [1, C, V] fp32 tensors (softcap, temperature, softmax, entropy).
    assert r["reference_rng"]["multiple_of_logits"] > 2
    assert r["fast_fp32"]["multiple_of_logits"] < 0.5 and r["fast_bf16"]["multiple_of_logits"] < 0.5


def test_cli_smoke(tmp_path):
    """The command end to end, fp32 only (cheap on any CPU; the bf16 modes run in the fixture above)."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "bench", "--preset", "tiny", "--steps", "2",
                        "--dtypes", "float32", "--no-reference", "--json-out", str(out), "--threads", "1",
                        "--repeats", "1", "--min-time-s", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["preset"] == "tiny" and r["reference"]["ran"] is False
    assert [m["name"] for m in r["modes"]] == ["dgemma float32 rng=reference", "dgemma float32 rng=fast"]
    assert "dgemma bench" in p.stdout and "reference not requested" in p.stdout
    assert r["settings"]["threads"] == 1 and r["settings"]["dtypes"] == ["float32"]


def test_quantized_bench_counts_each_flop_once(tmp_path):
    """`dgemma bench --quantize` reads the model's own config.json and records one step's FLOPs once (the
    breakdown's total, not the total added to its parts)."""
    from dgemma.bench import fullsize as fullbench

    out = tmp_path / "r.json"
    args = argparse.Namespace(quantize="int4", preset="tiny", model_dir=str(tmp_path / "m"), seed=0, threads=None,
                              device="cpu", prompt_len=8, steps=2, tokens_per_forward=16.0, json_out=str(out),
                              routing="spread")
    assert fullbench.run(args) == 0
    r = json.loads(out.read_text())
    assert r["routing"] == "spread"
    cfg = ModelConfig.from_file(tmp_path / "m" / "config.json")
    assert r["counted_flops_per_step"] == cfg.decoder_flops(8, cfg.canvas_length)["total"]
    assert r["achieved_gflops"] == pytest.approx(r["counted_flops_per_step"] / r["step_s"] / 1e9)
    # the roofline uses the higher of the peaks measured before and after the timed steps
    assert len(r["matmul_peak_gflops_before_after"]) == 2
    assert r["matmul_peak_gflops"] == max(r["matmul_peak_gflops_before_after"])
    assert r["roofline_step_s"] == pytest.approx(r["roofline_flops_per_step"] / (r["matmul_peak_gflops"] * 1e9))
    # a left-to-right token's bytes, counted again through safetensors' own reader: every tensor whole (the tied
    # table included) but the experts', of which the top-k share
    from safetensors import safe_open

    want, tensors = 0.0, 0
    for f in (tmp_path / "m").glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                share = cfg.top_k_experts / cfg.num_experts if ".experts." in key else 1.0
                want, tensors = want + t.numel() * t.element_size() * share, tensors + 1
    # each tensor's share is rounded down to whole bytes
    assert 0 < fullbench.token_weight_bytes(tmp_path / "m", cfg) == pytest.approx(want, abs=tensors)
    assert fullbench.token_weight_bytes(tmp_path / "m", cfg) < fullbench.weight_bytes(tmp_path / "m")


def test_spread_routing_draws_distinct_experts_from_the_routers_probabilities_and_restores_it():
    """Inside `spread_routing` every token goes to top_k distinct experts drawn at random (so a canvas reaches every
    expert, as a trained model's balanced router spreads it), weighted by the router's own probabilities at them;
    the same seed draws the same experts; outside the block the router is the model's own again."""
    from dgemma.bench.measure import routed, spread_routing
    from dgemma.model import Router

    model = random_model("small-moe", "float32", seed=0)  # 16 experts, top 4
    cfg = model.config
    router = next(m for m in model.module.modules() if isinstance(m, Router))
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        own_w, own_idx = router(x)
        with spread_routing(model, seed=5):
            w, idx = router(x)
        with spread_routing(model, seed=5):
            w2, idx2 = router(x)
        again_w, again_idx = router(x)
        probs = torch.softmax(router.proj(router.norm(x) * router.scale * router.root), dim=-1, dtype=torch.float32)
    assert idx.shape == own_idx.shape == (256, cfg.top_k_experts)
    assert all(len(set(row)) == cfg.top_k_experts for row in idx.tolist())
    counts = torch.bincount(idx.flatten(), minlength=cfg.num_experts)
    mean = 256 * cfg.top_k_experts / cfg.num_experts  # 64 rows per expert
    assert int(counts.min()) > mean / 2 and int(counts.max()) < mean * 3 / 2
    expected = probs.gather(-1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * router.per_expert_scale[idx]
    torch.testing.assert_close(w, expected)
    assert torch.equal(idx, idx2) and torch.equal(w, w2)
    assert torch.equal(again_idx, own_idx) and torch.equal(again_w, own_w)
    assert "forward" not in vars(router)
    with torch.inference_mode():
        with routed(model, "own"):  # the checkpoint's router (a trained checkpoint)
            assert torch.equal(router(x)[1], own_idx)
        with routed(model, "spread", seed=5):
            assert torch.equal(router(x)[1], idx)
    with pytest.raises(ValueError, match="routing must be one of"):
        routed(model, "balanced")
