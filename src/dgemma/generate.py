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
from .numerics import row_invariant
from .sampler import FastRNG, ReferenceRNG, StableAndConfident, accept_mask, entropy, fast_sample, temperature

RNG_MODES = ("fast", "reference")


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


def _as_batch(prompt_ids, vocab: int, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Accept list[int], list[list[int]] (lengths may differ), 1-D or 2-D tensors.
    Returns (left-padded [B, L] ids, pad counts [B], single prompt?)."""
    if isinstance(prompt_ids, torch.Tensor):
        t = prompt_ids
        if t.dim() not in (1, 2):
            raise ValueError(f"prompt_ids must be 1-D or 2-D, got shape {list(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"prompt_ids must hold integer ids, got {t.dtype}")
        single = t.dim() == 1 or t.shape[0] == 1
        rows = t.reshape(-1, t.shape[-1]).tolist()
    else:
        rows = list(prompt_ids)
        single = not rows or not isinstance(rows[0], (list, tuple, torch.Tensor))
        rows = [rows] if single else [list(r) for r in rows]
        single = single or len(rows) == 1
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    for r in rows:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"prompt ids must be integers, got {x!r}")
            if not 0 <= x < vocab:
                raise ValueError(f"prompt id {x} is outside the vocabulary [0, {vocab})")
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device), single


def resolve_settings(model, max_new_tokens: int | None, overrides: dict) -> GenerationConfig:
    base = model.generation_config or GenerationConfig()
    if max_new_tokens is not None:
        overrides = {**overrides, "max_new_tokens": max_new_tokens}
    return base.replace(**overrides)


def _seeds(seed, batch: int, rng: str) -> list[int]:
    """One seed per row. An int seeds row i with seed + i in "fast" mode (so a row reproduces solo with that
    seed); "reference" mode uses one stream for the batch, like the reference."""
    if seed is None:
        seed = secrets.randbits(62)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
        if rng == "reference" and batch > 1:
            raise ValueError('rng="reference" takes one integer seed for the whole batch')
    else:
        seeds = [seed + i for i in range(batch)] if rng == "fast" else [seed]
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {s!r}")
    return seeds


def stream(
    model,
    prompt_ids,
    *,
    max_new_tokens: int | None = None,
    seed: int | list[int] | None = None,
    rng: str = "fast",
    **overrides,
) -> Iterator[Draft | Commit | Done]:
    """Run generation, yielding events. Settings: generation_config names as keyword overrides.

    rng="fast" (default): per-row generators and a fused inverse-CDF sampler. rng="reference": draws exactly as
    the reference's generate after torch.manual_seed(seed) (token-identical in fp32)."""
    cfg = model.config
    gen = resolve_settings(model, max_new_tokens, overrides)
    if rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else 0
    prompt, pad, _ = _as_batch(prompt_ids, cfg.vocab_size, pad_id, model.device)
    seeds = _seeds(seed, prompt.shape[0], rng)
    return _run(model, prompt, pad, gen, seeds, rng)


def _plan(cfg, gen: GenerationConfig, prompt_len: int) -> int:
    """Number of canvases (max_length counts only when max_new_tokens is left at 256, as in the reference)."""
    if gen.max_length and gen.max_new_tokens == 256:
        max_new = gen.max_length - prompt_len
        if max_new <= 0:
            raise ValueError(f"max_length {gen.max_length} leaves no room after a {prompt_len}-token prompt")
    else:
        max_new = gen.max_new_tokens
    n = math.ceil(max_new / cfg.canvas_length)
    if prompt_len + n * cfg.canvas_length > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + {n} canvas(es) of {cfg.canvas_length} exceeds the model's "
            f"{cfg.max_position_embeddings} positions"
        )
    return n


def _run(model, prompt: torch.Tensor, pad: torch.Tensor, gen: GenerationConfig, seeds: list[int],
         rng: str) -> Iterator[Draft | Commit | Done]:
    # Fast mode makes each row's arithmetic independent of its batch neighbours; reference mode matches the
    # reference bit for bit instead. The context is re-entered around each resume of the generator.
    gen_iter = _loop(model, prompt, pad, gen, seeds, rng)
    while True:
        with torch.inference_mode(), row_invariant(rng == "fast"):
            try:
                event = next(gen_iter)
            except StopIteration:
                return
        yield event


def _loop(model, prompt: torch.Tensor, pad: torch.Tensor, gen: GenerationConfig, seeds: list[int],
          rng: str) -> Iterator[Draft | Commit | Done]:
    cfg = model.config
    device = model.device
    batch, prompt_len = prompt.shape
    canvas_len, vocab = cfg.canvas_length, cfg.vocab_size
    n_canvases = _plan(cfg, gen, prompt_len)
    fast = rng == "fast"
    rand = FastRNG(seeds, device) if fast else ReferenceRNG(seeds[0], device)
    eos = torch.tensor(gen.eos_ids, device=device, dtype=torch.long) if gen.eos_ids else None
    stopper = (
        StableAndConfident(gen.stability_threshold, gen.confidence_threshold)
        if gen.stability_threshold is not None and gen.confidence_threshold is not None
        else None
    )
    all_rows = list(range(batch))
    timings = {"prefill_s": 0.0, "commit_s": 0.0, "denoise_s": 0.0}
    t_start = time.perf_counter()

    cache = model.new_cache(batch, prompt_len + (n_canvases - 1) * canvas_len, pad)
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
        active_rows = [b for b in all_rows if not finished_seq[b]] if fast else all_rows
        canvas = torch.zeros(batch, canvas_len, dtype=torch.long, device=device)
        if fast:
            canvas[active_rows] = rand.noise_rows(active_rows, canvas_len, vocab)
        else:
            canvas = rand.noise(batch, canvas_len, vocab, device)
        argmax = canvas
        sc_logits = sc_probs = None
        done_den = torch.zeros(batch, dtype=torch.bool, device=device)
        canvas_passes = torch.zeros(batch, dtype=torch.int32, device=device)
        if stopper is not None:
            stopper.history = None
        n_steps = gen.max_denoising_steps
        for i, step in enumerate(range(n_steps, 0, -1)):
            active = ~(done_den | finished_seq)
            passes += active
            canvas_passes += active
            temp = temperature(step, n_steps, gen.t_min, gen.t_max) if gen.t_min is not None else None
            hidden = model.decode_hidden(canvas, cache, sc_logits, sc_probs if i > 0 else None)
            if fast:
                if sc_probs is None:
                    sc_probs = hidden.new_zeros(batch, canvas_len, vocab)
                sampled, new_argmax, h, noise = _fast_step(model, hidden, canvas, active, temp, rand, sc_probs)
            else:
                sampled, new_argmax, h, logits = _reference_step(model, hidden, temp, rand)
                noise = None
            accepted = accept_mask(h, gen.entropy_bound)
            if noise is None:  # the reference draws its re-noise ids after the samples, for every row
                noise = rand.noise(batch, canvas_len, vocab, device)
            new_canvas = torch.where(accepted, sampled, noise)  # accepted positions keep their sample
            # Rows already stopped keep their state (the fast path never touched them).
            frozen = done_den | finished_seq if fast else done_den
            if bool(frozen.any()):
                new_argmax = torch.where(frozen[:, None], argmax, new_argmax)
                new_canvas = torch.where(frozen[:, None], canvas, new_canvas)
                if not fast:
                    logits = torch.where(frozen[:, None, None], sc_logits, logits)
            if stopper is not None:
                done_den = done_den | stopper(new_argmax, h.mean(dim=-1))
            if not fast:
                sc_logits = logits.to(model.dtype)
                del logits
            canvas, argmax = new_canvas, new_argmax
            yield Draft(ci, i + 1, step, canvas.cpu(), argmax.cpu(), accepted.cpu(), h.float().cpu(), done_den.cpu())
            if bool(done_den.all()) or (fast and bool((done_den | finished_seq).all())):
                break
        timings["denoise_s"] += time.perf_counter() - t0
        del sc_logits, sc_probs

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
        results.append(GenerationResult(ids, tpf, steps, seeds[min(b, len(seeds) - 1)], reason, t, text))
    yield Done(results)


def _fast_step(model, hidden, canvas, active, temp, rand: FastRNG, sc_probs):
    """Fused sampler on the raw head output; softmax(processed logits) goes straight into the self-conditioning
    buffer (rows that stopped keep theirs), so no fp32 [B, C, V] temporary is made. Draws only for active rows."""
    batch, canvas_len = canvas.shape
    raw = model.lm_head_raw(hidden)
    live = [b for b, on in enumerate(active.tolist()) if on]
    u = torch.zeros(batch, canvas_len, dtype=torch.float64, device=canvas.device)
    u[live] = rand.uniform_rows(live, canvas_len)
    sampled, argmax, h = fast_sample(raw, model.config.final_logit_softcapping, temp, u, active, sc_probs)
    noise = canvas.clone()
    noise[live] = rand.noise_rows(live, canvas_len, raw.shape[-1])
    return sampled, argmax, h, noise


def _reference_step(model, hidden, temp, rand: ReferenceRNG):
    """The reference's ops in its order: softcapped fp32 logits, temperature, softmax, multinomial, argmax,
    Categorical entropy. Returns the processed logits too (the next step's self-conditioning input)."""
    logits = model.lm_head(hidden)
    if temp is not None:
        logits = logits / temp
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    batch, canvas_len, vocab = logits.shape
    sampled = rand.sample(probs.view(-1, vocab)).view(batch, canvas_len)
    del probs
    return sampled, logits.argmax(dim=-1), entropy(logits), logits


def generate(model, prompt_ids, *, max_new_tokens: int | None = None, seed: int | None = None, **kwargs):
    """Generate for one prompt (returns a GenerationResult) or a batch (returns a list)."""
    _, _, single = _as_batch(prompt_ids, model.config.vocab_size, 0, torch.device("cpu"))
    results: list[GenerationResult] = []
    for event in stream(model, prompt_ids, max_new_tokens=max_new_tokens, seed=seed, **kwargs):
        if isinstance(event, Done):
            results = event.results
    return results[0] if single else results
