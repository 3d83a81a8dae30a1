"""Fault injection: `dgemma batch` and `dgemma finetune` killed (SIGKILL) at random points, and inside the snapshot
write, then rerun: nothing lost, nothing duplicated, the same result as an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.checkpoint.write import write_random_checkpoint

TRAIN = ["--steps", "8", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", "2", "--log-every",
         "1"]


def _dgemma(*args: str) -> list[str]:
    return [sys.executable, "-m", "dgemma.cli", *args]


def _killed_after(cmd: list[str], seconds: float) -> bool:
    """Run `cmd`, SIGKILL it after `seconds` unless it ended first; True when it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _killed_at_progress(cmd: list[str], out: Path, more: int) -> bool:
    """Run `cmd`, SIGKILL it as soon as `out` holds `more` lines beyond those it had at the start (a point in the
    run's progress, whatever the machine's speed or load; the kill lands while the next lines are computed or
    written); True when it was killed, False when it ended first."""
    start = _lines(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if _lines(out) >= start + more:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def _finish(cmd: list[str]) -> float:
    """Run `cmd` to completion; its wall time (kill times are drawn as fractions of it, on any machine)."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("kill") / "m", "tiny", seed=0, canvas_length=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("killdata") / "train.jsonl"
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"prompt": f"copy {rng.randrange(1000)}", "response": "abc"}) + "\n"
                            for _ in range(40)))
    return path


def test_batch_killed_at_random_points_reruns_to_the_same_file(model, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_ids": [5 + i, 6, 7], "max_new_tokens": 8 * (1 + i % 3)})
                           + "\n" for i in range(24)))
    common = ["--input", str(inp), "--model", str(model), "--max-batch", "2", "--no-progress"]
    want = tmp_path / "straight.jsonl"
    _finish(_dgemma("batch", *common, "--output", str(want)))
    out = tmp_path / "out.jsonl"
    rng = random.Random(1)
    # killed at points of progress, not of time: a time drawn from the straight run's can outlast a rerun on a
    # machine whose load changed between them
    kills = sum(_killed_at_progress(_dgemma("batch", *common, "--output", str(out)), out, rng.randint(1, 6))
                for _ in range(3))
    _finish(_dgemma("batch", *common, "--output", str(out)))
    assert out.read_bytes() == want.read_bytes()
    lines = [json.loads(x)["line"] for x in out.read_text().splitlines()]
    assert lines == sorted(set(lines)) and len(lines) == 24
    assert kills >= 1  # the test killed at least one run (else it proves nothing)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return dgemma.load_model(run / "final").module.state_dict()


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_finetune_killed_inside_the_snapshot_write_resumes_exactly(model, data, tmp_path):
    """The process dies after the optimizer state of the step-4 snapshot is written and before its trainer state
    (what a SIGKILL there does); the rerun with --resume continues from step 2 and ends as an unbroken run."""
    straight = tmp_path / "straight"
    _finish(_dgemma("finetune", "--model", str(model), "--data", str(data), "--out", str(straight), *TRAIN))
    run = tmp_path / "run"
    crash = ("import os, sys, dgemma.train as t\n"
             "orig = t._save_state\n"
             "def dying(out, step, *a, **k):\n"
             "    if step == 4:\n"
             "        (out / 'optimizer.safetensors').write_bytes(b'partial')\n"
             "        os._exit(9)\n"
             "    return orig(out, step, *a, **k)\n"
             "t._save_state = dying\n"
             "import dgemma.cli as c\n"
             "sys.exit(c.main(sys.argv[1:]))\n")
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(run), *TRAIN]
    died = subprocess.run([sys.executable, "-c", crash, *args], capture_output=True, text=True, timeout=600)
    assert died.returncode == 9
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 2  # the last complete one
    _finish(_dgemma(*args, "--resume"))
    assert _steps_logged(run) == list(range(1, 9))
    a, b = _final_weights(straight), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_killed_at_random_points_ends_as_an_unbroken_run(model, data, tmp_path):
    straight = tmp_path / "straight"
    took = _finish(_dgemma("finetune", "--model", str(model), "--data", str(data), "--out", str(straight), *TRAIN))
    run = tmp_path / "run"
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(run), *TRAIN]
    rng = random.Random(2)
    kills = 0
    for attempt in range(6):
        if attempt >= 3 and kills:
            break
        # kill times are fractions of the uninterrupted run's wall time; on a loaded machine a later run can be
        # faster than that one, so attempts after the third (only when nothing was killed yet) draw earlier times
        frac = rng.uniform(0.5, 0.95) if attempt < 3 else rng.uniform(0.1, 0.4)
        resume = ["--resume"] if run.exists() else []
        kills += _killed_after(_dgemma(*args, *resume), frac * took)
    _finish(_dgemma(*args, "--resume") if run.exists() else _dgemma(*args))
    assert _steps_logged(run) == list(range(1, 9))
    a, b = _final_weights(straight), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / ".last.partial").exists() and not (run / ".last.old").exists()
    assert kills >= 1
