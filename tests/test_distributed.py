"""`dgemma finetune` under `torchrun --nproc-per-node 2` (gloo on CPU) against single-process runs of a tiny random
checkpoint with the same global batch.

Stated tolerance: per-step losses within 1e-5 relative (the ranks' partial losses add up to the single-process
loss; only the summation order differs), and the trained weights' deviation from the single-process weights under
2% of the single-process update (Adam's normalised step magnifies rounding in near-zero gradients). Covered: DDP
with LoRA for 3 steps, then resumed single-process to step 6 (world size 2 -> 1); full fine-tuning for 3
single-process steps, then resumed under FSDP2 to step 6 (1 -> 2); both equal the uninterrupted single-process
runs; checkpoints have the single-process files, keys and shapes, and load with dgemma.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dgemma
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.train import TrainConfig, finetune

SRC = str(Path(dgemma.__file__).resolve().parents[1])
STEPS, HALF = 6, 3
# A constant learning rate after warmup: a run resumed at step 3 follows the uninterrupted run's schedule.
COMMON = {"batch_size": 8, "lr": 3e-3, "warmup": 2, "min_lr_ratio": 1.0, "log_every": 1, "seed": 5}
LOSS_RTOL = 1e-5
UPDATE_RTOL = 0.02


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def base(root) -> Path:
    return write_random_checkpoint(root / "base", "tiny", seed=0, canvas_length=16)


@pytest.fixture(scope="module")
def data(root) -> Path:
    rng = random.Random(0)
    path = root / "copy.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(64):  # responses of different lengths: the ranks' slices differ in AR targets
            s = "".join(rng.choice("abcd") for _ in range(rng.randint(2, 20)))
            f.write(json.dumps({"prompt": f"copy {s}", "response": s}) + "\n")
    return path


def single(base: Path, data: Path, out: Path, **kw) -> Path:
    finetune(TrainConfig(base=str(base), data=str(data), out=str(out), progress=False, **{**COMMON, **kw}))
    return out


def torchrun(base: Path, data: Path, out: Path, *flags: str) -> dict:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "dgemma.cli", "finetune", "--model", str(base), "--data", str(data), "--out", str(out), *args, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_same_run(got: Path, want: Path, base: Path) -> None:
    a, b = log(got), log(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "ar_loss", "diffusion_loss"):
            assert x[k] == pytest.approx(y[k], rel=LOSS_RTOL), (x["step"], k)
    assert sorted(os.listdir(got / "final")) == sorted(os.listdir(want / "final"))
    w_got, w_want = load_file(got / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    w_base = load_file(base / "model.safetensors")
    assert {k: v.shape for k, v in w_got.items()} == {k: v.shape for k, v in w_want.items()}
    moved = sum(float((w_want[k] - w_base[k]).norm() ** 2) for k in w_want) ** 0.5
    off = sum(float((w_got[k] - w_want[k]).norm() ** 2) for k in w_want) ** 0.5
    assert moved > 0 and off < UPDATE_RTOL * moved, (off, moved)
    dgemma.load_model(got / "final")  # loads like a single-process checkpoint


def test_ddp_lora_then_resume_single_process(root, base, data):
    want = single(base, data, root / "lora_single", steps=STEPS, lora_rank=4)
    out = root / "lora_ddp"
    summary = torchrun(base, data, out, f"--steps={HALF}", "--lora-rank=4", "--distributed=ddp")
    assert summary["world_size"] == 2 and summary["steps"] == HALF
    assert (out / "last" / "adapter" / "adapter_config.json").is_file()
    single(base, data, out, steps=STEPS, lora_rank=4, resume=True)  # world size 2 -> 1
    assert_same_run(out, want, base)
    a = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(want / "final" / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_single_then_resume_fsdp(root, base, data):
    want = single(base, data, root / "full_single", steps=STEPS)
    out = single(base, data, root / "full_fsdp", steps=HALF)
    summary = torchrun(base, data, out, f"--steps={STEPS}", "--resume", "--distributed=fsdp")  # 1 -> 2
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert_same_run(out, want, base)
    # The optimizer state was gathered to full tensors: it resumes anywhere.
    moments = load_file(out / "last" / "optimizer.safetensors")
    params = load_file(want / "last" / "optimizer.safetensors")
    assert {k: v.shape for k, v in moments.items()} == {k: v.shape for k, v in params.items()}


def test_batch_must_split_evenly(monkeypatch):
    from dgemma import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        distributed.setup("cpu", "ddp", 3)  # checked before joining a process group


def test_not_launched_is_single_process(monkeypatch):
    from dgemma import distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup("cpu", "fsdp", 8) is None
    with pytest.raises(ValueError, match="distributed must be one of"):
        TrainConfig(base="b", data="d", out="o", distributed="zero3").validate()
    assert torch.distributed.is_available()
