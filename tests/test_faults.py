"""Nothing silent: corrupted weights are named at load, a model that yields non-finite logits stops with an error,
and the CLI turns any failure into one line (the traceback only with --debug)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dgemma
from dgemma import CheckpointError
from dgemma.cli import main as cli_main
from dgemma.generate import NonFiniteError
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.checkpoint.quantize import random_quantized_checkpoint

SCHEMES = ["int8", "int4", "fp8", "nvfp4"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {s: random_quantized_checkpoint(root / s, "tiny", s, seed=1, group=32, progress=False) for s in SCHEMES}


def _damaged(src: Path, dst: Path, value: float) -> tuple[Path, str]:
    """A copy of checkpoint `src` with one entry of its first floating-point scale tensor set to `value`."""
    import shutil

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
            meta = h.metadata()
        for key, t in tensors.items():  # input_scale is not used (activations stay unquantized)
            if "scale" not in key or "input_scale" in key or not t.is_floating_point():
                continue
            t = t.clone()
            t.view(-1)[0] = value
            stored = t.view(-1)[0].float().item()
            if value != value or math.isinf(value):
                held = stored != stored if value != value else stored == value
            else:
                held = abs(stored - value) <= 1e-2 * abs(value)
            if not held:
                continue  # this dtype cannot hold the value (float8: no infinity, 448 at most): damage another tensor
            tensors[key] = t
            save_file(tensors, str(f), metadata=meta)
            return dst, key
    raise AssertionError(f"{src}: no scale tensor")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_named_at_load(quantized, tmp_path, scheme, value):
    path, key = _damaged(quantized[scheme], tmp_path / "bad", value)
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:  # named at load
        dgemma.load_model(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_absurd_scales_are_refused_at_load(quantized, tmp_path, scheme):
    """-1e30 is finite, but no trained model has such a scale (it used to load and generate empty output)."""
    path, _ = _damaged(quantized[scheme], tmp_path / "bad", -1e30)
    with pytest.raises(CheckpointError, match="beyond"):
        dgemma.load_model(path)
    assert cli_main(["generate", "--model", str(path), "--prompt-ids", "5,6,7", "--json"]) == 2


def test_non_finite_logits_stop_generation_with_an_error(tmp_path):
    """Whatever the cause (here: activations pushed past float32 by a scaled embedding), non-finite logits end the
    generation with a named error instead of empty output."""
    model = dgemma.load_model(write_random_checkpoint(tmp_path / "m", "tiny", seed=0))
    with torch.no_grad():
        model.module.embed_tokens.weight[5].fill_(3e38)  # times sqrt(hidden): past float32
    with pytest.raises(NonFiniteError, match="not finite"):
        model.generate([5, 6, 7], max_new_tokens=8, seed=0, max_denoising_steps=2)


def test_dense_weights_with_nan_are_named(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    key = "model.decoder.layers.1.mlp.up_proj.weight"
    tensors[key][3, 4] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        dgemma.load_model(path)


def test_a_bug_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """A genuine bug (here: a config that makes a module fail in an unexpected way) is reported on one line with
    a hint; --debug shows the traceback."""
    code = ("import sys, dgemma.cli as c\n"
            "def boom(args): raise KeyError('the bug')\n"
            "c.cmd_info = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], capture_output=True, text=True)  # noqa: E731
    plain = run("info", "--model", str(tmp_path))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "internal error: KeyError" in plain.stderr and "--debug" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    debug = run("--debug", "info", "--model", str(tmp_path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def _sparse_checkpoint(tmp_path: Path, claim: int) -> Path:
    """A checkpoint whose safetensors file claims a `claim`-byte tensor (a sparse file: no disk used)."""
    import struct

    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    hdr = {"model.decoder.embed_tokens.weight": {"dtype": "F32", "shape": [claim // 4 // 64, 64],
                                                 "data_offsets": [0, claim]}}
    raw = json.dumps(hdr).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + claim)
    return path


def test_a_header_claiming_a_terabyte_is_an_error_not_a_crash(tmp_path, capsys):
    path = _sparse_checkpoint(tmp_path, 1 << 40)
    assert cli_main(["generate", "--model", str(path), "--prompt-ids", "1,2", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error:") and "model.safetensors" in err
    assert cli_main(["info", "--model", str(path)]) == 0  # info reads headers only: it describes what is claimed


def test_info_on_a_truncated_shard_names_it(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert cli_main(["info", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "past the end" in err


@pytest.mark.parametrize("scheme,group", [("int8", "x"), ("int4", "x"), ("int4", 48)])
def test_a_bad_group_size_names_the_field(quantized, tmp_path, scheme, group):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(quantized[scheme], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = group
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config.group_size") as e:
        dgemma.load_model(path)
    assert "config.json" in str(e.value)


def test_a_missing_quantized_tensor_is_blamed_on_the_weights_file(quantized, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(quantized["int4"], path)
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    key = next(k for k in tensors if "q_proj" in k and "scale" in k)
    del tensors[key]
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="missing") as e:
        dgemma.load_model(path)
    assert str(f) in str(e.value) and key in str(e.value)


def test_quantized_tensors_without_a_config_are_not_called_nvfp4_only(quantized, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(quantized["int4"], path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="int4") as e:
        dgemma.load_model(path)
    assert "quantization_config" in str(e.value)
