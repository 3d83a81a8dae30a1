"""`dgemma batch`: offline generation over a JSONL of prompts with the bundled Sudoku model.

Covered: ordered output with one record per non-blank line, per-line errors that do not stop the run, seeded rows
equal to a solo `generate`, the same output in any batch size, resume after the process is killed (SIGKILL, plus a
torn last line), and the same output on Ray Data (a local 2-CPU cluster, 2 actors) as in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dgemma
from dgemma.batch import SIDECAR_SUFFIX, BatchOptions, LineLimits, line_seed, resume_point, run_batch
from dgemma.generate import generate
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import default_model_path

MODEL = str(default_model_path())
SRC = str(Path(dgemma.__file__).resolve().parents[1])
BAD = {  # input line -> a word the error names
    '{"prompt": 5}': "prompt",
    "{not json": "JSON",
    '{"prompt": "x", "temperature": 1}': "unknown",
    '{"prompt_ids": [1, 99999]}': "vocabulary",
    '{"prompt": "x", "diffusion": {"t_max": -1}}': "t_max",
    '{"prompt": ""}': "empty",
    '{"prompt": "x", "seed": -3}': "seed",
    '{"prompt": "x", "prompt_ids": [3]}': "exactly one",
    '{"prompt_ids": [5], "max_new_tokens": 100000}': "max_new_tokens 100000 is over the limit of 4096",
    '{"prompt_ids": [5], "max_new_tokens": 4000}': "positions",
}


def puzzles(n: int, seed: int = 3) -> list[str]:
    return [p for p, _ in sudoku.generate_many(n, seed=seed)]


def write_input(path: Path, n: int, bad: bool = True, extra: dict | None = None) -> Path:
    lines = []
    for k, p in enumerate(puzzles(n)):
        row = {"id": f"p{k}", "prompt": sudoku.legacy_prompt_text(p), **(extra or {})}
        if k % 3 == 0:
            row["seed"] = 1000 + k
        lines.append(json.dumps(row))
    if bad:
        lines[2:2] = list(BAD)
        lines.insert(5, "")  # blank lines are skipped
        lines.append(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}], "seed": 7}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> Path:
    return write_input(tmp_path_factory.mktemp("batch") / "in.jsonl", 8)


@pytest.fixture(scope="module")
def local(inp) -> list[dict]:
    out = inp.with_name("local.jsonl")
    summary = run_batch(BatchOptions(str(inp), str(out), MODEL, seed=11, max_batch=4, progress=False))
    assert summary["written"] == summary["lines"] == 8 + len(BAD) + 1 and summary["errors"] == len(BAD)
    return read(out)


def test_ordered_output_and_per_line_errors(inp, local):
    texts = inp.read_text(encoding="utf-8").splitlines()
    numbers = [n for n, t in enumerate(texts, 1) if t.strip()]
    assert [r["line"] for r in local] == numbers
    for r in local:
        source = texts[r["line"] - 1]
        if source in BAD:
            assert BAD[source] in r["error"], (source, r["error"])
        else:
            assert "error" not in r and r["id"] == json.loads(source)["id"]
            assert isinstance(r["text"], str) and r["ids"] and r["finish_reason"] in ("eos", "length")
            given = json.loads(source).get("seed")
            assert r["seed"] == (given if given is not None else line_seed(11, r["line"]))


def test_seeded_rows_equal_solo_generation(inp, local):
    model = dgemma.load_model(MODEL)
    texts = inp.read_text(encoding="utf-8").splitlines()
    for r in [r for r in local if "error" not in r][:3]:
        src = json.loads(texts[r["line"] - 1])
        ids = model.tokenizer.encode(src["prompt"]) if "prompt" in src else None
        if ids is None:
            continue
        solo = generate(model, ids, seed=r["seed"], rng="fast")
        assert solo.ids == r["ids"] and solo.steps == r["steps"]


def test_resume_after_kill(tmp_path):
    # Slow rows (every denoising step of 32 runs) so the process is killed mid-run.
    inp = write_input(tmp_path / "in.jsonl", 8, bad=False,
                      extra={"diffusion": {"max_denoising_steps": 32, "stability_threshold": 1024}})
    whole = tmp_path / "whole.jsonl"
    run_batch(BatchOptions(str(inp), str(whole), MODEL, max_batch=2, progress=False))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "dgemma.cli", "batch", "--input", str(inp), "--output", str(out), "--model", MODEL,
           "--max-batch", "2", "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done = out.read_bytes().count(b"\n")
    assert 2 <= done < 8, "the run should have been killed part-way"
    with open(out, "ab") as f:
        f.write(b'{"line": 99, "te')  # a torn last record
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["written"] == 8 - done and summary["resumed_after"] == done
    assert read(out) == read(whole)
    assert resume_point(out) == read(whole)[-1]["line"]  # a finished output resumes to nothing
    again = run_batch(BatchOptions(str(inp), str(out), MODEL, max_batch=2, progress=False))
    assert again["written"] == 0 and read(out) == read(whole)


def test_bad_options(tmp_path, inp):
    with pytest.raises(ValueError, match="no such file"):
        run_batch(BatchOptions(str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"), MODEL))
    with pytest.raises(ValueError, match="is the input file"):
        run_batch(BatchOptions(str(inp), str(inp), MODEL))
    with pytest.raises(ValueError, match="max-batch"):
        run_batch(BatchOptions(str(inp), str(tmp_path / "o.jsonl"), MODEL, max_batch=0))


def test_ray_data_matches_in_process(inp, local, tmp_path):
    """Another batch size too (5, in-process 4): rows do not depend on their batch neighbours."""
    pytest.importorskip("ray")
    out = tmp_path / "ray.jsonl"
    opts = BatchOptions(str(inp), str(out), MODEL, seed=11, max_batch=5, progress=False, ray=True, actors=2,
                        actor_cpus=1, threads=1,
                        ray_init={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 * 1024**2,
                                  "log_to_driver": False, "configure_logging": False})
    summary = run_batch(opts)
    assert summary["written"] == len(local)
    assert read(out) == local


# -- nothing lost: outputs that are not this run's, and hostile lines ------------------------------------------------
def _lines(tmp_path, *lines: str | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def test_an_unrelated_existing_output_is_never_touched(tmp_path):
    inp = _lines(tmp_path, '{"prompt_ids": [1, 2, 3], "max_new_tokens": 4}')
    precious = tmp_path / "precious.jsonl"
    precious.write_text("my own notes\n{not json\n")
    before = precious.read_bytes()
    with pytest.raises(ValueError, match="not a dgemma batch output"):
        run_batch(BatchOptions(str(inp), str(precious), MODEL, progress=False))
    assert precious.read_bytes() == before
    assert not (tmp_path / ("precious.jsonl" + SIDECAR_SUFFIX)).exists()


def test_a_hard_link_to_the_input_is_refused(tmp_path):
    inp = _lines(tmp_path, '{"prompt_ids": [1, 2, 3], "max_new_tokens": 4}')
    link = tmp_path / "link.jsonl"
    os.link(inp, link)
    before = inp.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        run_batch(BatchOptions(str(inp), str(link), MODEL, progress=False))
    assert inp.read_bytes() == before


def test_an_output_of_another_input_is_not_trusted(tmp_path):
    a = _lines(tmp_path, '{"prompt_ids": [1, 2, 3], "max_new_tokens": 4}', name="a.jsonl")
    b = _lines(tmp_path, '{"prompt_ids": [4, 5, 6], "max_new_tokens": 4}', name="b.jsonl")
    out = tmp_path / "out.jsonl"
    assert run_batch(BatchOptions(str(a), str(out), MODEL, progress=False))["written"] == 1
    done = out.read_bytes()
    with pytest.raises(ValueError, match="input_sha256"):
        run_batch(BatchOptions(str(b), str(out), MODEL, progress=False))
    with pytest.raises(ValueError, match="seed"):
        run_batch(BatchOptions(str(a), str(out), MODEL, seed=5, progress=False))
    assert out.read_bytes() == done
    # the same input and settings: recognised as done, nothing rewritten
    assert run_batch(BatchOptions(str(a), str(out), MODEL, progress=False))["written"] == 0
    assert out.read_bytes() == done


def test_hostile_lines_get_error_records_and_the_run_goes_on(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    inp = _lines(tmp_path,
                 '{"prompt": ' + deep + "}",
                 b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
                 '{"id": 1e400, "prompt_ids": [1, 2]}',
                 '{"id": NaN, "prompt_ids": [1, 2]}',
                 '{"prompt": "' + "x" * 5000 + '"}',
                 '{"prompt_ids": [1, 2], "max_new_tokens": 600}',
                 '{"prompt_ids": [1, 2], "diffusion": {"max_denoising_steps": 1024}}',
                 '{"id": "ok", "prompt_ids": [1, 2], "max_new_tokens": 4}')
    out = tmp_path / "out.jsonl"
    limits = LineLimits(max_line_chars=4096, max_new_tokens=512, max_denoising_steps=64)
    summary = run_batch(BatchOptions(str(inp), str(out), MODEL, progress=False, limits=limits))
    text = out.read_text(encoding="utf-8")
    def strict(name):
        raise AssertionError(f"{name} written to the output")
    recs = [json.loads(x, parse_constant=strict) for x in text.splitlines()]
    assert [r["line"] for r in recs] == list(range(1, 9)) and summary["errors"] == 7
    errors = [r.get("error", "") for r in recs]
    assert "nested too deeply" in errors[0] or "limit is 4096" in errors[0]
    assert "not valid UTF-8" in errors[1]
    assert "finite" in errors[2] and "finite" in errors[3]
    assert "--max-line-chars" in errors[4]
    assert "--max-tokens" in errors[5] and "--max-denoising-steps" in errors[6]
    assert recs[7]["id"] == "ok" and "error" not in recs[7]


def test_deep_nesting_within_the_character_limit(tmp_path):
    inp = _lines(tmp_path, "[" * 5000 + "]" * 5000, '{"prompt_ids": [1, 2], "max_new_tokens": 4}')
    out = tmp_path / "out.jsonl"
    run_batch(BatchOptions(str(inp), str(out), MODEL, progress=False))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0]["error"] == "nested too deeply" and "error" not in recs[1]
