"""scripts/average_checkpoints.py: the averaged checkpoint holds the mean of the inputs' weights and loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dgemma.checkpoint.load import load_model
from dgemma.checkpoint.write import write_random_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "average_checkpoints.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_average_of_three(tmp_path):
    srcs = [write_random_checkpoint(tmp_path / f"c{i}", "tiny", seed=i) for i in range(3)]
    out = tmp_path / "avg"
    p = run(str(out), *map(str, srcs))
    assert p.returncode == 0, p.stderr
    states = [load_file(str(s / "model.safetensors")) for s in srcs]
    avg = load_file(str(out / "model.safetensors"))
    assert avg.keys() == states[0].keys()
    for k, v in avg.items():
        assert torch.allclose(v, (states[0][k] + states[1][k] + states[2][k]) / 3, atol=1e-6), k
    assert not torch.equal(avg["model.decoder.embed_tokens.weight"],
                           states[0]["model.decoder.embed_tokens.weight"])
    load_model(out).generate([5, 6, 7], max_new_tokens=4, seed=0)
    assert run(str(out), *map(str, srcs)).returncode != 0  # exists: refused without --force
    assert run(str(out), *map(str, srcs), "--force").returncode == 0


def test_mismatched_checkpoints_are_refused(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", "tiny", seed=0)
    b = write_random_checkpoint(tmp_path / "b", "tiny", seed=0, hidden_size=32)
    p = run(str(tmp_path / "avg"), str(a), str(b))
    assert p.returncode != 0 and "differ" in p.stderr
    assert not (tmp_path / "avg").exists()
