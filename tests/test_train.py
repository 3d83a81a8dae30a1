"""`dgemma.train`: fine-tuning with the DiffusionGemma objective on a random tiny checkpoint (canvas of 16).

The data is a trivially learnable mapping ("copy abc" -> "abc"), so a minute fraction of a real run is enough to
see the loss fall. Covered: full fine-tuning (loss goes down, the output loads with its tokenizer and generation
config, weights move), LoRA (only the adapted matrices change, PEFT file layout and key names, base + adapter ==
merged output), resume from <out>/last, the objective itself (`losses`: finite, self-conditioning, noise rate, left
padding ignored by the AR loss), and bad input.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma.cli import main as cli_main
from dgemma.lora import load_adapter, merge_lora
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.train import Example, TrainConfig, TrainError, collate, finetune, load_examples, losses, lr_at

CANVAS = 16
LETTERS = "abcd"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def base(root) -> Path:
    return write_random_checkpoint(root / "base", "tiny", seed=0, canvas_length=CANVAS)


@pytest.fixture(scope="module")
def data(root) -> Path:
    rng = random.Random(0)
    path = root / "copy.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(100):
            s = "".join(rng.choice(LETTERS) for _ in range(3))
            f.write(json.dumps({"prompt": f"copy {s}", "response": s}) + "\n")
    return path


def config(base: Path, data: Path, out: Path, **kw) -> TrainConfig:
    kw = {"batch_size": 8, "lr": 3e-3, "warmup": 5, "progress": False, "log_every": 5, **kw}
    return TrainConfig(base=str(base), data=str(data), out=str(out), **kw)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def full_run(root, base, data) -> tuple[Path, dict]:
    out = root / "full"
    summary = finetune(config(base, data, out, steps=60))
    return out, summary


@pytest.fixture(scope="module")
def lora_run(root, base, data) -> Path:
    out = root / "lora"
    finetune(config(base, data, out, steps=8, warmup=2, lora_rank=4, log_every=4))
    return out


@pytest.fixture(scope="module")
def model(base):
    return dgemma.load_model(base)


# -- full fine-tuning -----------------------------------------------------------------------------------------------
def test_full_finetune_lowers_the_loss(full_run):
    out, summary = full_run
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(5, 61, 5))
    for r in log:
        assert {"loss", "ar_loss", "diffusion_loss", "lr", "grad_norm", "tokens_per_s", "examples_per_s"} <= set(r)
        assert r["examples"] == 8 * r["step"]
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "ar_loss", "diffusion_loss", "grad_norm"))
        assert r["loss"] == pytest.approx(r["ar_loss"] + r["diffusion_loss"], rel=1e-5)
    first = sum(r["loss"] for r in log[:2]) / 2
    last = sum(r["loss"] for r in log[-2:]) / 2
    assert last < 0.5 * first, (first, last)
    for k in ("ar_loss", "diffusion_loss"):
        assert sum(r[k] for r in log[-2:]) < 0.7 * sum(r[k] for r in log[:2]), k
    # Linear warmup, then cosine decay towards lr * min_lr_ratio (the logged lr is the one the step used).
    cfg = config(Path(), Path(), Path(), steps=60)
    assert [r["lr"] for r in log] == pytest.approx([lr_at(r["step"] - 1, cfg) for r in log])
    assert lr_at(0, cfg) == pytest.approx(3e-3 / 5) and lr_at(4, cfg) == pytest.approx(3e-3)
    assert 3e-4 < log[-1]["lr"] < 3.1e-4 and lr_at(60, cfg) == pytest.approx(3e-4)
    assert summary["steps"] == 60 and summary["out"] == str(out / "final")
    assert summary["loss"] == pytest.approx(log[-1]["loss"])


def test_full_finetune_output_loads(full_run, base):
    out, _ = full_run
    final = out / "final"
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json", "model.safetensors"):
        assert (final / name).is_file(), name
        if name in TOKENIZER_FILES or name == "generation_config.json":
            assert (final / name).read_text(encoding="utf-8") == (base / name).read_text(encoding="utf-8")
    assert not (final / "adapter").exists()
    assert json.loads((final / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    m, b = dgemma.load_model(final), dgemma.load_model(base)
    assert m.tokenizer is not None and m.tokenizer.encode("copy ab") == b.tokenizer.encode("copy ab")
    assert m.generation_config == b.generation_config
    tuned, orig = load_file(str(final / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(tuned) == set(orig)
    changed = [k for k in orig if not torch.equal(tuned[k], orig[k])]
    assert "model.decoder.embed_tokens.weight" in changed
    assert len(changed) > 0.8 * len(orig)
    assert all(torch.isfinite(t).all() for t in tuned.values())
    # <out>/last holds the end state too, with what --resume needs.
    assert (out / "last" / "trainer_state.json").is_file() and (out / "last" / "optimizer.safetensors").is_file()
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 60


def test_full_finetune_is_deterministic(root, base, data):
    a = finetune(config(base, data, root / "det_a", steps=3, log_every=1))
    b = finetune(config(base, data, root / "det_b", steps=3, log_every=1))
    assert [r["loss"] for r in read_log(root / "det_a")] == [r["loss"] for r in read_log(root / "det_b")]
    assert a["loss"] == b["loss"]
    wa = load_file(str(root / "det_a" / "final" / "model.safetensors"))
    wb = load_file(str(root / "det_b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# -- LoRA -----------------------------------------------------------------------------------------------------------
def test_lora_adapter_files(lora_run):
    adapter = lora_run / "final" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16.0
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    keys = set(tensors)
    # target_modules: one pattern naming exactly the adapted text modules (never the vision tower's linears).
    pattern = cfg["target_modules"]
    paths = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}
    assert isinstance(pattern, str) and all(re.fullmatch(pattern, p) for p in paths)
    assert {p.rsplit(".", 1)[1] for p in paths} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    for other in ("model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj",
                  "model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear",
                  "model.encoder.language_model.layers.0.self_attn.q_proj", "model.decoder.layers.0.router.proj"):
        assert not re.fullmatch(pattern, other), other
    for k in ("base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight",
              "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight",
              "base_model.model.model.decoder.layers.1.mlp.down_proj.lora_A.weight",
              "base_model.model.model.decoder.layers.3.self_attn.o_proj.lora_B.weight"):
        assert k in keys, k
    for k, t in tensors.items():
        assert k.startswith("base_model.model.model.decoder.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        assert (t.shape[0] if ".lora_A." in k else t.shape[1]) == 4, k
    # B starts at zero; training moved it.
    assert any(t.abs().max() > 0 for k, t in tensors.items() if ".lora_B." in k)


def test_lora_only_adapted_weights_change(lora_run, base):
    final = lora_run / "final"
    tuned, orig = load_file(str(final / "model.safetensors")), load_file(str(base / "model.safetensors"))
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    scale = cfg["lora_alpha"] / cfg["r"]
    assert set(tuned) == set(orig)
    adapted = 0
    for k, w in orig.items():
        prefix = "base_model.model." + k[: -len(".weight")] if k.endswith(".weight") else None
        if prefix is not None and f"{prefix}.lora_A.weight" in adapter:
            a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
            torch.testing.assert_close(tuned[k], w + (b @ a) * scale, rtol=0, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(tuned[k], w), f"{k} changed without an adapter"
    assert adapted == len(adapter) // 2
    assert any(not torch.equal(tuned[k], orig[k]) for k in orig)


def test_lora_base_plus_adapter_equals_final(lora_run, base):
    final = lora_run / "final"
    merged = dgemma.load_model(final)
    m = dgemma.load_model(base)
    load_adapter(m.module, final / "adapter")
    g = torch.Generator().manual_seed(0)
    prompt = torch.tensor([m.tokenizer.encode_chat([{"role": "user", "content": "copy abd"}])])
    canvas = torch.randint(0, m.config.vocab_size, (1, CANVAS), generator=g)
    with_adapter = m.canvas_logits(prompt, canvas)
    merge_lora(m.module)
    assert not any(".lora_" in n for n, _ in m.module.named_parameters())
    want = merged.canvas_logits(prompt, canvas)
    torch.testing.assert_close(m.canvas_logits(prompt, canvas), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_adapter, want, rtol=0, atol=1e-4)
    plain = dgemma.load_model(base).canvas_logits(prompt, canvas)
    assert (plain - want).abs().max() > 1e-4  # the adapter does something


def test_lora_is_deterministic_for_a_seed(root, base, data):
    torch.manual_seed(1)
    finetune(config(base, data, root / "lora_det_a", steps=2, lora_rank=4, log_every=1))
    torch.manual_seed(2)
    finetune(config(base, data, root / "lora_det_b", steps=2, lora_rank=4, log_every=1))
    a = load_file(str(root / "lora_det_a" / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "lora_det_b" / "final" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- resume ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_continues(root, base, data, lora_rank):
    out = root / f"resume_{lora_rank}"
    finetune(config(base, data, out, steps=10, save_every=5, log_every=1, lora_rank=lora_rank))
    state = json.loads((out / "last" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["step"] == 10
    before = read_log(out)
    assert [r["step"] for r in before] == list(range(1, 11))
    summary = finetune(config(base, data, out, steps=14, save_every=5, log_every=1, lora_rank=lora_rank,
                              resume=True))
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 15)), "resume must continue at step 11, not restart"
    assert summary["steps"] == 14 and log[-1]["step"] == 14
    assert json.loads((out / "last" / "trainer_state.json").read_text(encoding="utf-8"))["step"] == 14
    # The resumed run starts from the trained weights, not the base: its first loss continues the curve.
    assert log[10]["loss"] < before[0]["loss"] - 0.5 * (before[0]["loss"] - before[-1]["loss"])
    if lora_rank:
        assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_resume_without_state_starts_fresh(root, base, data):
    out = root / "resume_fresh"
    finetune(config(base, data, out, steps=2, log_every=1, resume=True))
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_resume_before_the_first_snapshot_starts_over_and_never_drops_a_longer_run(root, base, data):
    """A run killed after logging step 2 but before its first snapshot (step 2) was complete left only a log (and
    perhaps a half-written .last.partial): --resume redoes it from the base. A log past the first snapshot step
    with no snapshot is a run that got further and lost its state: refused, the log untouched."""
    straight = root / "first_snap_straight"
    finetune(config(base, data, straight, steps=4, save_every=2, log_every=1))
    out = root / "first_snap"
    out.mkdir()
    first = "".join(json.dumps(r) + "\n" for r in read_log(straight)[:2])
    (out / "train_log.jsonl").write_text(first + '{"step": 3, "lo', encoding="utf-8")  # a torn line counts for nothing
    (out / ".last.partial").mkdir()
    (out / ".last.partial" / "optimizer.safetensors").write_bytes(b"partial")
    finetune(config(base, data, out, steps=4, save_every=2, log_every=1, resume=True))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(straight)]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / ".last.partial").exists()

    lost = root / "lost_state"
    lost.mkdir()
    log = "".join(json.dumps(r) + "\n" for r in read_log(straight)[:3])  # step 3: past the snapshot at 2
    (lost / "train_log.jsonl").write_text(log, encoding="utf-8")
    with pytest.raises(TrainError, match=r"train_log\.jsonl: the log reaches step 3 .* no snapshot"):
        finetune(config(base, data, lost, steps=4, save_every=2, log_every=1, resume=True))
    assert (lost / "train_log.jsonl").read_text(encoding="utf-8") == log


def test_log_is_fresh_per_run_and_trimmed_on_resume(root, base, data):
    out = root / "log_trim"
    finetune(config(base, data, out, steps=3, log_every=1))
    kept = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainError, match="previous run"):  # a new run never overwrites an earlier one
        finetune(config(base, data, out, steps=2, log_every=1))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    # A log that ran past the saved state (a crash after step 4's checkpoint) is cut back before resuming.
    out = root / "log_trim2"
    finetune(config(base, data, out, steps=6, save_every=4, log_every=1))
    state_file = out / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert state["step"] == 6
    state_file.write_text(json.dumps({**state, "step": 4}), encoding="utf-8")
    before = read_log(out)
    finetune(config(base, data, out, steps=6, save_every=4, log_every=1, resume=True))
    after = read_log(out)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == before[:4] and after[4]["elapsed_s"] != before[4]["elapsed_s"]  # steps 5-6 were redone


# -- the objective --------------------------------------------------------------------------------------------------
def _batch(model, data: Path, n: int = 8):
    ex = load_examples(model, data, chat=True)[:n]
    pad = model.generation_config.pad_token_id
    return collate(ex, pad, model.device)


def _obj_cfg(**kw) -> TrainConfig:
    return TrainConfig(base="", data="", out="", **kw)


def test_load_examples_layout(model, data):
    ex = load_examples(model, data, chat=True)
    assert len(ex) == 100
    tok = model.tokenizer
    end, pad = tok.token_to_id("<end_of_turn>"), model.generation_config.pad_token_id
    first = json.loads(data.read_text(encoding="utf-8").splitlines()[0])
    assert ex[0].prompt == tok.encode_chat([{"role": "user", "content": first["prompt"]}])
    assert ex[0].response == tok.encode(first["response"]) + [end] + [pad] * (CANVAS - 4)
    assert all(len(e.response) % CANVAS == 0 for e in ex)
    plain = load_examples(model, data, chat=False)
    assert plain[0].prompt == tok.encode(first["prompt"])


@pytest.mark.parametrize("sc_prob", [0.0, 1.0])
def test_losses_finite_and_self_conditioning(base, data, sc_prob):
    m = dgemma.load_model(base)
    m.module.requires_grad_(True)
    ids, pads, p_len, r_len = _batch(m, data)
    ar, diff = losses(m.module, ids, pads, p_len, r_len, _obj_cfg(sc_prob=sc_prob), torch.Generator().manual_seed(0))
    assert ar.dim() == diff.dim() == 0
    assert torch.isfinite(ar) and torch.isfinite(diff)
    # A random model over a 262-token vocabulary: both losses near log(262) ~ 5.57.
    assert 3.0 < ar.item() < 8.0 and 3.0 < diff.item() < 8.0
    (ar + diff).backward()
    g = m.module.sc_mlp.gate_proj.weight.grad
    if sc_prob == 0.0:
        assert g is None or float(g.abs().max()) == 0.0  # no self-conditioning signal, no gradient
    else:
        assert g is not None and float(g.abs().max()) > 0.0
    assert m.module.embed_tokens.weight.grad is not None and torch.isfinite(m.module.embed_tokens.weight.grad).all()


def test_self_conditioning_changes_only_the_diffusion_loss(model, data):
    ids, pads, p_len, r_len = _batch(model, data)
    with torch.no_grad():
        ar0, d0 = losses(model.module, ids, pads, p_len, r_len, _obj_cfg(sc_prob=0.0), torch.Generator().manual_seed(3))
        ar1, d1 = losses(model.module, ids, pads, p_len, r_len, _obj_cfg(sc_prob=1.0), torch.Generator().manual_seed(3))
        ar2, d2 = losses(model.module, ids, pads, p_len, r_len, _obj_cfg(sc_prob=0.0), torch.Generator().manual_seed(3))
    assert torch.equal(ar0, ar1) and torch.equal(ar0, ar2)
    assert torch.equal(d0, d2)  # deterministic for a generator state
    assert not torch.equal(d0, d1)  # same noise, but the self-conditioning signal enters the decoder


def _noisy_canvases(model, data, monkeypatch, t_min: float, n: int, seed: int = 0):
    """Run `losses` and capture the decoder's input canvases next to the clean response block."""
    seen = []
    real = model.module.decode_hidden

    def spy(canvas, *args, **kwargs):
        seen.append(canvas.clone())
        return real(canvas, *args, **kwargs)

    monkeypatch.setattr(model.module, "decode_hidden", spy)
    ex = load_examples(model, data, chat=True)
    batch = (ex * (n // len(ex) + 1))[:n]
    ids, pads, p_len, r_len = collate(batch, model.generation_config.pad_token_id, model.device)
    with torch.no_grad():
        losses(model.module, ids, pads, p_len, r_len, _obj_cfg(sc_prob=0.0, t_min=t_min),
               torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    assert len(seen) == 1  # sc_prob 0: no self-conditioning pass
    assert r_len == CANVAS  # one response canvas, so the block is the response
    return seen[0], ids[:, p_len:p_len + CANVAS]


def test_noise_rate(model, data, monkeypatch):
    noisy, clean = _noisy_canvases(model, data, monkeypatch, t_min=0.999, n=16)
    assert noisy.shape == clean.shape == (16, CANVAS)
    assert noisy.min() >= 0 and noisy.max() < model.config.vocab_size
    # t ~ U(0.999, 1): each position is resampled uniformly from 262 tokens with probability >= 0.999.
    assert (noisy != clean).float().mean() > 0.95
    noisy, clean = _noisy_canvases(model, data, monkeypatch, t_min=1e-3, n=128)
    # t ~ U(0.001, 1): about half the positions are replaced on average.
    rate = float((noisy != clean).float().mean())
    assert 0.3 < rate < 0.7, rate
    per_row = (noisy != clean).float().mean(dim=1)
    assert per_row.max() - per_row.min() > 0.3  # t is drawn per example


def test_ar_loss_ignores_padding(model):
    """Prompts of different lengths (left padding) and responses of different lengths (right padding): the batch AR
    loss is the token-weighted mean of the rows' solo losses."""
    tok = model.tokenizer
    end, pad = tok.token_to_id("<end_of_turn>"), model.generation_config.pad_token_id

    def example(prompt: str, response: str) -> Example:
        r = tok.encode(response) + [end]
        return Example(tok.encode_chat([{"role": "user", "content": prompt}]), r + [pad] * (-len(r) % CANVAS))

    rows = [example("copy a", "a"), example("copy " + "abcd" * 6, "abcd" * 6), example("copy bd", "bd")]
    assert len({len(e.prompt) for e in rows}) == 3 and len({len(e.response) for e in rows}) == 2
    cfg = _obj_cfg(sc_prob=0.0)

    def ar_loss(batch):
        ids, pads, p_len, r_len = collate(batch, pad, model.device)
        with torch.no_grad():
            ar, diff = losses(model.module, ids, pads, p_len, r_len, cfg, torch.Generator().manual_seed(0))
        assert torch.isfinite(ar) and torch.isfinite(diff)
        return float(ar)

    solo = [ar_loss([e]) for e in rows]
    counts = [len(e.prompt) - 1 + sum(t != pad for t in e.response) for e in rows]
    want = sum(c * s for c, s in zip(counts, solo)) / sum(counts)
    assert ar_loss(rows) == pytest.approx(want, rel=1e-4)
    assert ar_loss(rows[::-1]) == pytest.approx(want, rel=1e-4)


def test_ar_targets(model):
    """"response" is the "all" loss restricted to the response's targets (their token-weighted mean); "none" skips
    the AR loss and encodes only the prompt, which leaves the diffusion loss as it was (the encoder is causal)."""
    tok = model.tokenizer
    end, pad = tok.token_to_id("<end_of_turn>"), model.generation_config.pad_token_id

    def example(prompt: str, response: str) -> Example:
        r = tok.encode(response) + [end]
        return Example(tok.encode(prompt), r + [pad] * (-len(r) % CANVAS))

    rows = [example("copy abc", "abc"), example("copy dcb", "dcb")]  # no left padding
    ids, pads, p_len, r_len = collate(rows, pad, model.device)

    def run(targets: str):
        with torch.no_grad():
            return losses(model.module, ids, pads, p_len, r_len, _obj_cfg(ar_targets=targets),
                          torch.Generator().manual_seed(0))

    ar_all, d_all = run("all")
    ar_resp, d_resp = run("response")
    ar_none, d_none = run("none")
    assert float(ar_none) == 0.0 and float(ar_resp) > 0
    assert torch.equal(d_all, d_resp)
    assert float(d_none) == pytest.approx(float(d_all), rel=1e-5)
    # The response-only loss from per-token losses of the full pass.
    with torch.no_grad():
        from dgemma.kv_cache import TrainingKVCache

        cache = TrainingKVCache(model.config, len(rows), model.device, model.dtype, pads)
        logits = model.module.lm_head(model.module.encode(ids, cache))[:, :-1]
        per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    real = ids[:, 1:] != pad
    prompt_part = per[:, :p_len - 1][real[:, :p_len - 1]]
    response_part = per[:, p_len - 1:][real[:, p_len - 1:]]
    assert float(ar_resp) == pytest.approx(float(response_part.mean()), rel=1e-4)
    assert float(ar_all) == pytest.approx(float(torch.cat([prompt_part, response_part]).mean()), rel=1e-4)


def test_ar_only_skips_the_decoder(model, monkeypatch):
    tok, pad = model.tokenizer, model.generation_config.pad_token_id
    ex = [Example(tok.encode("copy ab"), tok.encode("ab") + [1] + [pad] * (CANVAS - 3))]
    ids, pads, p_len, r_len = collate(ex, pad, model.device)
    monkeypatch.setattr(model.module, "decode_hidden", lambda *a, **k: pytest.fail("decoder ran"))
    with torch.no_grad():
        ar, diff = losses(model.module, ids, pads, p_len, r_len, _obj_cfg(diffusion_weight=0.0, ar_targets="response"),
                          torch.Generator().manual_seed(0))
    assert float(ar) > 0 and float(diff) == 0.0


# -- bad input ------------------------------------------------------------------------------------------------------
def test_missing_response_names_the_line(root, base):
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "copy a", "response": "a"}\n\n{"prompt": "copy b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:.*response"):
        finetune(config(base, bad, root / "bad_out", steps=1))
    assert not (root / "bad_out" / "final").exists()


@pytest.mark.parametrize("text,fragment", [
    ('{"prompt": "x", "response": "y"}\nnot json\n', ":2:"),
    ('{"prompt": 1, "response": "y"}\n', ":1:"),
    ('{"response": "y"}\n', ":1:"),
    ("\n\n", "no examples"),
])
def test_load_examples_errors(model, tmp_path, text, fragment):
    f = tmp_path / "d.jsonl"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=fragment):
        load_examples(model, f, chat=True)


@pytest.mark.parametrize("kw,fragment", [
    ({"steps": 0}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"sc_prob": 1.5}, "sc_prob"),
    ({"t_min": 0.0}, "t_min"),
    ({"t_min": 1.0}, "t_min"),
    ({"lr": 0.0}, "lr"),
    ({"lora_rank": -1}, "lora_rank"),
    ({"ar_targets": "prompt"}, "ar_targets"),
    ({"ar_targets": "none", "diffusion_weight": 0.0}, "nothing to train"),
])
def test_bad_config(root, base, data, kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        finetune(config(base, data, root / "never", **{"steps": 5, **kw}))
    assert not (root / "never").exists()


def test_cli_finetune_missing_data(root, base, capsys):
    missing = root / "no-such-data.jsonl"
    rc = cli_main(["finetune", "--model", str(base), "--data", str(missing), "--out", str(root / "cli_bad"),
                   "--lora-rank", "4", "--steps", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error") and "no-such-data.jsonl" in err
    assert "Traceback" not in err


def test_cli_finetune_lora(root, base, data, capsys):
    out = root / "cli_lora"
    rc = cli_main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--lora-rank", "2",
                   "--steps", "2", "--batch-size", "4", "--log-every", "1", "--no-chat"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["out"] == str(out / "final")
    assert json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_cli_finetune_stdout_is_only_json(root, base, data, capsys):
    rc = cli_main(["finetune", "--model", str(base), "--data", str(data), "--out", str(root / "cli_json"),
                   "--steps", "1", "--batch-size", "2"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1


# -- nothing lost: snapshots, resume and hostile data -----------------------------------------------------------------
def test_resume_refuses_an_incomplete_snapshot(root, base, data):
    """A kill inside the old snapshot write left weights without trainer_state.json: --resume refuses it (it used
    to restart silently from the base, trim the log and overwrite the snapshot)."""
    out = root / "torn"
    finetune(config(base, data, out, steps=2, save_every=1, log_every=1))
    (out / "last" / "trainer_state.json").unlink()
    kept = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainError, match="no complete snapshot"):
        finetune(config(base, data, out, steps=4, save_every=1, log_every=1, resume=True))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept


def test_a_kill_while_swapping_the_snapshot_resumes_from_the_complete_one(root, base, data):
    """The snapshot is written whole to .last.partial and swapped in; killed between the two renames, the run
    resumes from the complete directory left behind and ends where an uninterrupted run ends."""
    straight = root / "straight"
    finetune(config(base, data, straight, steps=4, save_every=2, log_every=1))
    out = root / "swapped"
    finetune(config(base, data, out, steps=4, save_every=2, log_every=1))
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # simulate the kill: the step-4 snapshot renamed to .last.partial, no `last`
    os.replace(out / "last", out / ".last.partial")
    finetune(config(base, data, out, steps=4, save_every=2, log_every=1, resume=True))
    assert (out / "last" / "trainer_state.json").is_file() and not (out / ".last.partial").exists()
    a = dgemma.load_model(straight / "final").module.state_dict()
    b = dgemma.load_model(out / "final").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["not json", "no rng", "short rng", "bad step", "optimizer garbage",
                                    "moment shape", "nan moment", "missing count"])
def test_corrupted_trainer_state_is_a_named_error(root, base, data, damage, tmp_path):
    out = tmp_path / "run"
    finetune(config(base, data, out, steps=1, save_every=1, log_every=1))
    last = out / "last"
    state_file, opt_file = last / "trainer_state.json", last / "optimizer.safetensors"
    state = json.loads(state_file.read_text())
    if damage == "not json":
        state_file.write_text("{")
    elif damage == "no rng":
        state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "rng"}))
    elif damage == "short rng":
        state_file.write_text(json.dumps({**state, "rng": [1, 2, 3]}))
    elif damage == "bad step":
        state_file.write_text(json.dumps({**state, "step": "x"}))
    elif damage == "optimizer garbage":
        opt_file.write_bytes(b"\x00" * 64)
    elif damage == "missing count":
        state_file.write_text(json.dumps({**state, "opt_step": {}}))
    else:
        tensors = load_file(str(opt_file))
        key = next(iter(tensors))
        tensors[key] = torch.zeros(3) if damage == "moment shape" else torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(opt_file))
    culprit = opt_file if damage in ("optimizer garbage", "moment shape", "nan moment") else state_file
    with pytest.raises(TrainError, match=str(culprit)):
        finetune(config(base, data, out, steps=2, save_every=1, log_every=1, resume=True))


@pytest.mark.parametrize("line,message", [
    (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b', "response": "x"}', "nested too deeply"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "not valid UTF-8"),
    (b'{"prompt": "a", "response": "' + b"y" * 20_000 + b'"}', "positions"),
    (b'{"prompt": "' + b"z" * 300_000 + b'", "response": "x"}', "limit is"),
], ids=["deep", "latin-1", "too many tokens", "too long"])
def test_hostile_training_lines_name_file_and_line(model, tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok", "response": "fine"}\n' + line + b"\n")
    with pytest.raises(ValueError, match=message) as e:
        load_examples(model, path, chat=True, max_line_chars=200_000)
    assert f"{path}:2" in str(e.value)
