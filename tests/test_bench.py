"""`dgemma bench` on the tiny preset: the result's structure, positive timings and FLOP counts, and agreement with
the reference (fp32 token-identical, bf16 logits within the stated tolerance). transformers is the oracle here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dgemma import bench

pytest.importorskip("transformers")

MODE_KEYS = {"impl", "dtype", "rng", "name", "wall_s", "first_step_s", "step_s", "prefill_s", "tokens", "tokens_per_forward",
             "tokens_per_s_stated", "tokens_per_s_measured", "step_gflops", "fraction_of_peak",
             "speedup_vs_reference", "valid"}


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine a second OpenMP thread mostly waits for a descheduled partner.
    r = bench.run_bench("tiny", dtypes="float32,bfloat16", steps=3, prompt_len=16, seed=0, threads=1,
                        repeats=3, min_time_s=0.3, peak_budget_s=0.05)
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
        assert m["runs"] >= 3 and len(m["step_s_all"]) == m["runs"]
        assert 1 <= m["tokens"] <= 32 and m["tokens_per_forward"] == pytest.approx(m["tokens"] / 3)
        assert m["tokens_per_s_stated"] == pytest.approx(16 / m["step_s"])
        if m["impl"] == "dgemma":
            assert m["internal"]["denoise_s"] > 0 and m["internal"]["prefill_s"] > 0
            assert m["speedup_vs_reference"] > 0


def test_flops_and_peak(result):
    fl = result["flops"]
    assert fl["denoise_step"] > fl["denoise_step_first"] > 0 and fl["prefill"] > 0
    assert fl["denoise_step_breakdown"]["total"] == fl["denoise_step"]
    assert all(v > 0 for v in fl["denoise_step_breakdown"].values())
    for d in ("float32", "bfloat16"):
        pk = result["peak"][d]
        assert pk["gflops"] > 0 and all(g["gflops"] > 0 for g in pk["gemms"])
    for m in result["modes"]:
        assert m["step_gflops"] > 0 and m["fraction_of_peak"] > 0


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


def test_memory(result):
    mem = result["memory"]
    assert mem["peak_rss_mib"] > 0
    sm = mem["sampler"]
    assert sm["vocab"] == 262144 and sm["canvas"] == 256 and sm["logits_tensor_mib"] == 256
    for name in ("fast_fp32", "fast_bf16", "reference_rng"):
        assert sm[name]["peak_extra_mib"] is not None and sm[name]["peak_extra_mib"] >= 0
        assert sm[name]["multiple_of_logits"] == pytest.approx(sm[name]["peak_extra_mib"] / 256)
        assert sm[name]["seconds"] > 0
    assert sm["fast_fp32"]["persistent_mib"] == 256 and sm["fast_bf16"]["persistent_mib"] == 128
    # The reference path keeps several full [1, 256, V] fp32 temporaries; the chunked fast sampler none.
    assert sm["reference_rng"]["multiple_of_logits"] > 1
    assert sm["fast_fp32"]["multiple_of_logits"] < 0.5 and sm["fast_bf16"]["multiple_of_logits"] < 0.5


def test_render(result, capsys):
    bench.render(result)
    out = capsys.readouterr().out
    assert "dgemma bench" in out and "reference float32" in out and "agreement" in out
    assert bench.summary_markdown(result).count("\n") == 1 + len(result["modes"])


def test_random_model_matches_checkpoint(tmp_path):
    from dgemma import load_model
    from dgemma.presets import write_random_checkpoint

    ck = write_random_checkpoint(tmp_path / "ck", "tiny", seed=3)
    a, b = bench.random_model("tiny", "float32", seed=3), load_model(ck)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.generation_config == b.generation_config
    assert bench.random_model("tiny", "bfloat16", seed=3).dtype == torch.bfloat16


def test_reference_absent_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    r = bench.run_bench("tiny", dtypes="float32", steps=2, prompt_len=8, repeats=1, min_time_s=0, threads=1,
                        peak_budget_s=0.01, measure_sampler_memory=False)
    assert r["reference"]["ran"] is False and r["agreement"] == {}
    assert any("transformers" in n for n in r["notes"])
    assert [m["impl"] for m in r["modes"]] == ["dgemma", "dgemma"]
    assert all(m["speedup_vs_reference"] is None for m in r["modes"])
    assert "sampler" not in r["memory"]


def test_flops_count_by_hand():
    cfg = bench.model_config("tiny")  # hidden 64, 4 layers (3 sliding, 1 full), vocab 262, canvas 32
    c, h, v, i = 32, 64, 262, 128
    fl = bench.decoder_flops(cfg, cached=100)
    assert fl["lm_head"] == 2 * c * h * v and fl["sc_soft_embed"] == 2 * c * v * h
    assert fl["sc_mlp"] == 2 * 3 * c * h * i and fl["dense_mlp"] == 4 * 2 * 3 * c * h * i
    assert fl["experts"] == 4 * 2 * 3 * c * 2 * 32 * h and fl["router"] == 4 * 2 * c * h * 4
    # sliding: 4 heads x 16, 2 KV heads, q/k/v/o; full: 4 heads x 32, 1 KV head, no v_proj
    assert fl["attn_proj"] == 3 * 2 * c * h * (64 + 2 * 32 + 64) + 2 * c * h * (128 + 32 + 128)
    # sliding layers see min(100, 64 - 1) cached keys + the canvas; the full layer all 100 + canvas
    assert fl["attn_scores"] == 3 * 2 * 2 * c * 4 * (63 + c) * 16 + 2 * 2 * c * 4 * (100 + c) * 32
    no_sc = bench.decoder_flops(cfg, cached=100, self_conditioning=False)
    assert no_sc["total"] == fl["total"] - fl["sc_soft_embed"] - fl["sc_mlp"]


def test_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "bench", "--preset", "tiny", "--steps", "2",
                        "--no-reference", "--json-out", str(out), "--threads", "1", "--repeats", "1",
                        "--min-time-s", "0", "--no-sampler-memory"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["preset"] == "tiny" and r["reference"]["ran"] is False
    assert [m["name"] for m in r["modes"]] == ["dgemma float32 rng=reference", "dgemma float32 rng=fast",
                                               "dgemma bfloat16 rng=fast"]
    assert "dgemma bench" in p.stdout and "reference not requested" in p.stdout
    assert r["settings"]["threads"] == 1 and "sampler" not in r["memory"]
