"""Block-autoregressive generation: prefill -> (canvas init -> denoise steps -> commit) per canvas.

`stream()` yields a `Draft` after every denoising step and a `Commit` per canvas, then a final `Done`;
`generate()` runs the stream and returns per-prompt `GenerationResult`s.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .sampler import ReferenceRNG, StableAndConfident, accept_mask, entropy, temperature

RNG_MODES = ("reference",)


@dataclass
class Draft:
    """State after one denoising step (tensors are [batch, canvas] on CPU)."""

    canvas_index: int
    step: int  # 1-based step within this canvas
    steps_remaining: int  # n in the temperature schedule (N..1)
    canvas: torch.Tensor  # next input canvas: accepted samples + re-noised positions
    argmax: torch.Tensor  # argmax of this step's logits (the current best guess)
    accepted: torch.Tensor  # bool, positions that kept their sample
    entropy: torch.Tensor  # per-position entropy of the temperature-scaled logits
    finished: torch.Tensor  # bool [batch], rows whose denoising has stopped


@dataclass
class Commit:
    canvas_index: int
    ids: torch.Tensor  # [batch, canvas] committed ids (pad after EOS / for finished rows)
    steps: list[int]  # denoising passes per row for this canvas
    finished: torch.Tensor  # bool [batch], rows that have produced EOS


@dataclass
class GenerationResult:
    ids: list[int]  # generated ids after the prompt, up to and including EOS, no pad
    tokens_per_forward: float
    steps: list[int]  # denoising passes per canvas
    seed: int
    finish_reason: str  # "eos" or "length"
    timings: dict[str, float] = field(default_factory=dict)
    text: str | None = None

    @property
    def forwards(self) -> int:
        return sum(self.steps)

    def to_dict(self) -> dict:
        d = {"ids": self.ids, "tokens_per_forward": self.tokens_per_forward, "steps": self.steps,
             "seed": self.seed, "finish_reason": self.finish_reason, "timings": self.timings}
        if self.text is not None:
            d["text"] = self.text
        return d


@dataclass
class Done:
    results: list[GenerationResult]


def _as_batch(prompt_ids, vocab: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Accept list[int], list[list[int]], 1-D or 2-D tensors; return ([B, L] LongTensor, single?)."""
    if isinstance(prompt_ids, torch.Tensor):
        t = prompt_ids
        single = t.dim() == 1 or (t.dim() == 2 and t.shape[0] == 1)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2:
            raise ValueError(f"prompt_ids must be 1-D or 2-D, got shape {list(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"prompt_ids must hold integer ids, got {t.dtype}")
    else:
        rows = list(prompt_ids)
        single = not rows or not isinstance(rows[0], (list, tuple))
        if single:
            rows = [rows]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError("prompts in one batch must have the same length")
        try:
            t = torch.tensor(rows, dtype=torch.long)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"prompt_ids must be integers ({e})") from None
        single = single or len(rows) == 1
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token")
    if int(t.min()) < 0 or int(t.max()) >= vocab:
        raise ValueError(f"prompt_ids hold ids outside the vocabulary [0, {vocab})")
    return t.to(device=device, dtype=torch.long), single


def resolve_settings(model, max_new_tokens: int | None, overrides: dict) -> GenerationConfig:
    base = model.generation_config or GenerationConfig()
    if max_new_tokens is not None:
        overrides = {**overrides, "max_new_tokens": max_new_tokens}
    return base.replace(**overrides)


def stream(
    model,
    prompt_ids,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    rng: str = "reference",
    **overrides,
) -> Iterator[Draft | Commit | Done]:
    """Run generation, yielding events. Settings: generation_config names as keyword overrides."""
    cfg = model.config
    gen = resolve_settings(model, max_new_tokens, overrides)
    if rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    if seed is None:
        seed = secrets.randbits(63)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    prompt, _ = _as_batch(prompt_ids, cfg.vocab_size, model.device)
    return _run(model, prompt, gen, seed)


@torch.inference_mode()
def _run(model, prompt: torch.Tensor, gen: GenerationConfig, seed: int) -> Iterator[Draft | Commit | Done]:
    cfg = model.config
    device = model.device
    batch, prompt_len = prompt.shape
    canvas_len, vocab = cfg.canvas_length, cfg.vocab_size
    # max_length only counts when max_new_tokens is left at its default (as in the reference).
    if gen.max_length and gen.max_new_tokens == 256:
        max_new = gen.max_length - prompt_len
        if max_new <= 0:
            raise ValueError(f"max_length {gen.max_length} leaves no room after a {prompt_len}-token prompt")
    else:
        max_new = gen.max_new_tokens
    n_canvases = math.ceil(max_new / canvas_len)
    if prompt_len + n_canvases * canvas_len > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + {n_canvases} canvas(es) of {canvas_len} exceeds the model's "
            f"{cfg.max_position_embeddings} positions"
        )
    rand = ReferenceRNG(seed, device)
    eos = torch.tensor(gen.eos_ids, device=device, dtype=torch.long) if gen.eos_ids else None
    stopper = (
        StableAndConfident(gen.stability_threshold, gen.confidence_threshold)
        if gen.stability_threshold is not None and gen.confidence_threshold is not None
        else None
    )
    timings = {"prefill_s": 0.0, "commit_s": 0.0, "denoise_s": 0.0}
    t_start = time.perf_counter()

    cache = model.new_cache(batch)
    model.encode(prompt, cache)
    timings["prefill_s"] = time.perf_counter() - t_start

    finished_seq = torch.zeros(batch, dtype=torch.bool, device=device)
    passes = torch.zeros(batch, dtype=torch.int32, device=device)
    committed: list[torch.Tensor] = []
    steps_per_canvas: list[list[int]] = []
    for ci in range(n_canvases):
        if ci > 0:
            t0 = time.perf_counter()
            model.encode(committed[-1], cache)
            timings["commit_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        canvas = rand.noise(batch, canvas_len, vocab, device)
        argmax = canvas
        sc_logits = None
        done_den = torch.zeros(batch, dtype=torch.bool, device=device)
        canvas_passes = torch.zeros(batch, dtype=torch.int32, device=device)
        if stopper is not None:
            stopper.history = None
        n_steps = gen.max_denoising_steps
        for i, step in enumerate(range(n_steps, 0, -1)):
            active = ~(done_den | finished_seq)
            passes += active
            canvas_passes += active
            logits = model.decode(canvas, cache, sc_logits)
            if gen.t_min is not None:
                logits = logits / temperature(step, n_steps, gen.t_min, gen.t_max)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            sampled = rand.sample(probs.view(-1, vocab)).view(batch, canvas_len)
            new_argmax = logits.argmax(dim=-1)
            h = entropy(logits)
            accepted = accept_mask(h, gen.entropy_bound)
            kept = torch.where(accepted, sampled, canvas)
            new_canvas = torch.where(accepted, kept, rand.noise(batch, canvas_len, vocab, device))
            if stopper is not None:
                mean_h = h.mean(dim=-1)
                if done_den.any():  # rows already stopped keep their state
                    new_argmax = torch.where(done_den[:, None], argmax, new_argmax)
                    new_canvas = torch.where(done_den[:, None], canvas, new_canvas)
                    logits = torch.where(done_den[:, None, None], sc_logits, logits)
                done_den = done_den | stopper(new_argmax, mean_h)
            sc_logits = logits.to(model.dtype)
            canvas, argmax = new_canvas, new_argmax
            yield Draft(ci, i + 1, step, canvas.cpu(), argmax.cpu(), accepted.cpu(), h.float().cpu(), done_den.cpu())
            if bool(done_den.all()):
                break
        timings["denoise_s"] += time.perf_counter() - t0

        commit = argmax.clone()
        has_eos = torch.isin(commit, eos).any(dim=-1) if eos is not None else torch.zeros_like(finished_seq)
        prev = finished_seq
        finished_seq = prev | has_eos
        if gen.pad_token_id is not None and bool(finished_seq.any()):
            commit[prev] = gen.pad_token_id
            if eos is not None and bool(has_eos.any()):
                is_eos = torch.isin(commit, eos)
                run = is_eos.cumsum(dim=-1)
                commit[(run > 0) & ~((run == 1) & is_eos)] = gen.pad_token_id
        committed.append(commit)
        steps_per_canvas.append(canvas_passes.tolist())
        yield Commit(ci, commit.cpu(), canvas_passes.tolist(), finished_seq.cpu())
        if bool(finished_seq.all()):
            break

    timings["total_s"] = time.perf_counter() - t_start
    out = torch.cat(committed, dim=1)
    results = []
    for b in range(batch):
        row = out[b]
        if gen.pad_token_id is not None:
            row = row[row != gen.pad_token_id]
        ids = row.tolist()
        tpf = (torch.tensor(len(ids)) / passes[b].cpu()).item()
        # Rows that stopped earlier still ran (batched) canvases; only their own steps count.
        steps = [s[b] for s in steps_per_canvas if s[b] > 0]
        t = dict(timings)
        t["tokens_per_s"] = len(ids) / t["total_s"] if t["total_s"] > 0 else 0.0
        reason = "eos" if bool(finished_seq[b]) else "length"
        text = model.tokenizer.decode(ids) if getattr(model, "tokenizer", None) is not None else None
        results.append(GenerationResult(ids, tpf, steps, seed, reason, t, text))
    yield Done(results)


def generate(model, prompt_ids, *, max_new_tokens: int | None = None, seed: int | None = None, **kwargs):
    """Generate for one prompt (returns a GenerationResult) or a batch (returns a list)."""
    prompt, single = _as_batch(prompt_ids, model.config.vocab_size, model.device)
    results: list[GenerationResult] = []
    for event in stream(model, prompt, max_new_tokens=max_new_tokens, seed=seed, **kwargs):
        if isinstance(event, Done):
            results = event.results
    return results[0] if single else results
