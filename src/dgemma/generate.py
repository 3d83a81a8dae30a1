"""Block-autoregressive generation: prefill -> (canvas init -> denoise steps -> commit) per canvas.

`stream()` yields a `Draft` after every denoising step and a `Commit` per canvas, then a final `Done`;
`generate()` runs the stream and returns per-prompt `GenerationResult`s.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import STEP_CACHE, GenerationConfig
from .constraints import Constraint, constrain
from .numerics import row_invariant
from .prefix_cache import PrefixCache, prefill
from .sampler import CanvasSampler, FastSampler, ReferenceSampler, StableAndConfident, accept_mask, temperature
from .vision import prompt_images

RNG_MODES = ("fast", "reference")

class NonFiniteError(ValueError):
    """The model produced NaN or infinite logits (broken weights, or activations that overflow their dtype)."""


# A rule check on a denoising step, for any task: verifier(tokens [B, C], positions [B, C] bool) -> reject [B, C]
# bool, the positions among `positions` whose token breaks a rule given the rest of `positions` (and whatever the
# verifier knows, e.g. the prompt). The loop calls it with each step's samples and the positions the entropy bound
# would accept (rejected ones are re-noised instead), and with the argmax canvas and every position (a row that
# breaks a rule does not stop early). Tokens outside `positions` are noise and carry no meaning.
Verifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    # With stream(logprobs=k): each committed id's log-probability under its position's final-step distribution
    # [batch, canvas], and that distribution's k most probable ids and their log-probabilities ([batch, canvas, k]).
    logprobs: torch.Tensor | None = None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None
    cached_tokens: list[int] | None = None  # with stream(prefix_cache=...): per row, prompt tokens restored from it


@dataclass
class GenerationResult:
    ids: list[int]  # generated ids after the prompt, up to and including EOS, no pad
    tokens_per_forward: float
    steps: list[int]  # denoising passes per canvas
    seed: int
    finish_reason: str  # "eos" or "length"
    timings: dict[str, float] = field(default_factory=dict)
    text: str | None = None
    cached_tokens: int | None = None  # prompt tokens restored from a PrefixCache (None: no cache was passed)

    @property
    def forwards(self) -> int:
        return sum(self.steps)

    def to_dict(self) -> dict:
        d = {"ids": self.ids, "tokens_per_forward": self.tokens_per_forward, "steps": self.steps,
             "seed": self.seed, "finish_reason": self.finish_reason, "timings": self.timings}
        if self.text is not None:
            d["text"] = self.text
        if self.cached_tokens is not None:
            d["cached_tokens"] = self.cached_tokens
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
        check_prompt_ids(r, vocab)
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device), single


def check_prompt_ids(ids, vocab: int) -> None:
    """Prompt ids must be integers in [0, vocab): TypeError / ValueError naming the first that is not (the one check
    behind generate, the server and batch)."""
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"prompt ids must be integers, got {x!r}")
        if not 0 <= x < vocab:
            raise ValueError(f"token id {x} is outside the vocabulary [0, {vocab})")


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
    constraint=None,
    regex: str | None = None,
    json_schema=None,
    choice: list[str] | None = None,
    template=None,
    images=None,
    pixel_values: torch.Tensor | None = None,
    image_position_ids: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    max_soft_tokens: int | None = None,
    verifier: Verifier | None = None,
    settings: GenerationConfig | None = None,
    logprobs: int | None = None,
    prefix_cache: PrefixCache | None = None,
    **overrides,
) -> Iterator[Draft | Commit | Done]:
    """Run generation, yielding events. Settings: generation_config names as keyword overrides of the model's
    generation_config, or `settings`, a finished GenerationConfig (an entry point that resolved them once).

    rng="fast" (default): per-row generators and a fused inverse-CDF sampler. rng="reference": draws exactly as
    the reference's generate after torch.manual_seed(seed) (token-identical in fp32).
    Image prompts: `images` (PIL images, paths or bytes, in prompt order) or their processor outputs
    `pixel_values` + `image_position_ids`; the prompt holds begin-of-image, N image tokens, end-of-image per image.
    `verifier(tokens, accepted) -> reject`: a rule check on each step's proposal (see `Verifier`); the positions it
    rejects are re-noised instead of accepted, and a row whose argmax canvas it rejects does not stop early.
    `logprobs=k` (0 or more): each Commit carries its ids' log-probabilities and the top k (see Commit).
    `prefix_cache`: a PrefixCache; prompt blocks it holds are restored instead of prefilled (see prefix_cache.py),
    and each result reports its `cached_tokens`."""
    cfg = model.config
    if settings is not None and (overrides or max_new_tokens is not None):
        raise ValueError("pass settings= or generation overrides (max_new_tokens included), not both")
    gen = settings if settings is not None else resolve_settings(model, max_new_tokens, overrides)
    if rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else 0
    prompt, pad, _ = _as_batch(prompt_ids, cfg.vocab_size, pad_id, model.device)
    seeds = _seeds(seed, prompt.shape[0], rng)
    t0 = time.perf_counter()
    with torch.inference_mode():  # the vision tower runs here, once
        images = prompt_images(model, prompt, images, pixel_values, image_position_ids, mm_token_type_ids,
                               max_soft_tokens)
    vision_s = time.perf_counter() - t0
    reuse = STEP_CACHE[gen.step_cache] is not None
    sampler = (FastSampler(model.module, seeds, reuse) if rng == "fast" else
               ReferenceSampler(model.module, seeds[0], reuse))
    sampler = _constrained(model, gen, sampler, prompt, constraint, regex, json_schema, choice, template)
    if verifier is not None and not callable(verifier):
        raise TypeError(f"verifier must be callable, got {type(verifier).__name__}")
    own = sampler.verifier  # a constraint's own rule check (JSON-schema keywords: constraints/)
    if own is not None:
        verifier = own if verifier is None else (lambda t, p, a=verifier, b=own: a(t, p) | b(t, p))
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise ValueError(f"logprobs must be a non-negative integer or None, got {logprobs!r}")
    if prefix_cache is not None and not isinstance(prefix_cache, PrefixCache):
        raise TypeError(f"prefix_cache must be a dgemma.PrefixCache, got {type(prefix_cache).__name__}")
    return _run(model, prompt, pad, gen, sampler, seeds, images, vision_s, verifier, logprobs, prefix_cache)


def token_logprobs(sampler: CanvasSampler, ids: torch.Tensor, k: int):
    """Log-probabilities of `ids` [B, C] under each row's final-step distribution (`sampler.ranking`, the
    temperature-scaled one it drew from), floored at float32's smallest normal so they stay finite, and the top k."""
    tiny = torch.finfo(torch.float32).tiny
    probs = sampler.ranking_is_probs
    rows = []
    for b in range(ids.shape[0]):
        dist = sampler.ranking(b).float()
        logp = torch.log(dist.clamp_min(tiny)) if probs else torch.log_softmax(dist, dim=-1)
        rows.append(logp.clamp_min(math.log(tiny)))
    logp = torch.stack(rows)
    chosen = logp.gather(-1, ids[..., None].to(logp.device)).squeeze(-1).cpu()
    top = logp.topk(k, dim=-1) if k else None
    return chosen, None if top is None else (top.values.cpu(), top.indices.cpu())


def _constrained(model, gen, sampler, prompt, constraint, regex, json_schema, choice, template):
    """The sampler wrapped for constrained / infill decoding (see constraints/), or itself when none is asked.
    `constraint`: a constraints.Constraint, or one per prompt (None for an unconstrained row)."""
    forms = (regex, json_schema, choice, template)
    if constraint is None and all(f is None for f in forms):
        return sampler

    if constraint is None:
        constraint = Constraint.from_args(regex, json_schema, choice, template)
    elif any(f is not None for f in forms):
        raise ValueError("pass constraint= or one of regex / json_schema / choice / template, not both")
    return constrain(sampler, model, gen, prompt.shape[0], gen.new_tokens(prompt.shape[1]), constraint)


def plan_canvases(cfg, gen: GenerationConfig, prompt_len: int) -> int:
    """Number of canvases for a prompt; errors when the prompt leaves no room."""
    max_new = gen.new_tokens(prompt_len)
    if max_new <= 0:
        raise ValueError(f"max_length {gen.max_length} leaves no room after a {prompt_len}-token prompt")
    n = math.ceil(max_new / cfg.canvas_length)
    if prompt_len + n * cfg.canvas_length > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + {n} canvas(es) of {cfg.canvas_length} exceeds the model's "
            f"{cfg.max_position_embeddings} positions"
        )
    return n


def _run(model, prompt, pad, gen, sampler: CanvasSampler, seeds, images=None,
         vision_s: float = 0.0, verifier: Verifier | None = None, logprobs: int | None = None,
         prefix_cache: PrefixCache | None = None) -> Iterator[Draft | Commit | Done]:
    # The contexts are re-entered around each resume of the generator, so they never leak to the consumer.
    gen_iter = _loop(model, prompt, pad, gen, sampler, seeds, images, vision_s, verifier, logprobs, prefix_cache)
    while True:
        with torch.inference_mode(), row_invariant(sampler.row_invariant):
            try:
                event = next(gen_iter)
            except StopIteration:
                return
        yield event


def _loop(model, prompt, pad, gen, sampler: CanvasSampler, seeds, images=None,
          vision_s: float = 0.0, verifier: Verifier | None = None, logprobs: int | None = None,
          prefix_cache: PrefixCache | None = None) -> Iterator[Draft | Commit | Done]:
    """prefill -> per canvas: denoise steps -> commit (the canvas is encoded into the cache before the next)."""
    batch, prompt_len = prompt.shape
    n_canvases = plan_canvases(model.config, gen, prompt_len)
    timings = {"prefill_s": 0.0, "commit_s": 0.0, "denoise_s": 0.0}
    if images is not None:
        timings["vision_s"] = vision_s
    t_start = time.perf_counter()
    cache = model.module.new_cache(batch, prompt_len + (n_canvases - 1) * model.config.canvas_length, pad)
    cached = prefill(model.module, prompt, pad, cache, images, prefix_cache)  # no cache: model.module.encode
    timings["prefill_s"] = time.perf_counter() - t_start

    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)  # rows that produced EOS
    passes = torch.zeros(batch, dtype=torch.int32, device=model.device)
    committed: list[torch.Tensor] = []
    steps: list[list[int]] = []
    for ci in range(n_canvases):
        if ci > 0:
            t0 = time.perf_counter()
            model.module.encode(committed[-1], cache)
            timings["commit_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        argmax, canvas_passes = yield from _denoise(model, cache, gen, sampler, finished, ci, verifier)
        timings["denoise_s"] += time.perf_counter() - t0
        passes += canvas_passes
        ids, finished = commit_canvas(argmax, finished, gen)
        sampler.on_commit(ids, finished)
        committed.append(ids)
        steps.append(canvas_passes.tolist())
        lp = token_logprobs(sampler, ids, logprobs) if logprobs is not None else (None, None)
        yield Commit(ci, ids.cpu(), steps[-1], finished.cpu(), *lp,
                     cached_tokens=list(cached) if prefix_cache is not None else None)
        if bool(finished.all()):
            break
    timings["total_s"] = time.perf_counter() - t_start
    results = _results(model, torch.cat(committed, dim=1), steps, passes, finished, gen, seeds, timings)
    if prefix_cache is not None:
        for r, n in zip(results, cached):
            r.cached_tokens = n
    yield Done(results)


def _denoise(model, cache, gen: GenerationConfig, sampler: CanvasSampler, finished: torch.Tensor, ci: int,
             verifier: Verifier | None = None):
    """Denoise one canvas, yielding a Draft per step. Returns (argmax canvas, decoder passes per row)."""
    stopper = StableAndConfident.from_config(gen)
    policy = STEP_CACHE[gen.step_cache]
    stopped = torch.zeros_like(finished)  # rows whose denoising stopped early (stable and confident)
    canvas = argmax = sampler.init_canvas(sampler.live(stopped, finished))
    passes = torch.zeros(finished.shape[0], dtype=torch.int32, device=finished.device)
    streak = torch.zeros(canvas.shape, dtype=torch.int32, device=canvas.device)  # steps each token stayed accepted
    n = gen.max_denoising_steps
    for i, remaining in enumerate(range(n, 0, -1)):
        live = sampler.live(stopped, finished)
        passes += ~(stopped | finished)
        temp = temperature(remaining, n, gen.t_min, gen.t_max) if gen.t_min is not None else None
        positions = None
        if policy is not None and i % policy.refresh:
            positions = unsettled_positions(streak < policy.settle)
        hidden = model.module.decode_hidden(canvas, cache, **sampler.self_conditioning(), positions=positions,
                                            sc_top_k=None if policy is None else policy.sc_top_k)
        # The final hidden states are normed, so with finite weights (checked at load) finite hidden states mean
        # finite logits; checking them costs B x C x H, not B x C x V.
        if not bool(torch.isfinite(hidden[live]).all()):
            raise NonFiniteError(f"the model's logits are not finite (canvas {ci}, step {i + 1}, {model.dtype}): its "
                                 f"weights or the activations are out of range")
        step = sampler.step(hidden, canvas, live, temp, positions=positions)
        accepted = accept_mask(step.entropy, gen.entropy_bound)
        if verifier is not None:  # what breaks a rule is re-noised, not accepted
            accepted = accepted & ~_checked(verifier, step.sampled, accepted)
        # accepted positions keep their sample, the rest are re-noised; rows that are not live keep their state
        new = torch.where(live[:, None], torch.where(accepted, step.sampled, step.noise), canvas)
        if policy is not None:
            streak = torch.where(accepted & (new == canvas), streak + 1, torch.where(accepted, 1, 0))
        canvas = new
        argmax = torch.where(live[:, None], step.argmax, argmax)
        if stopper is not None:
            stop = stopper(argmax, step.entropy.mean(dim=-1))
            if verifier is not None:  # a canvas that breaks a rule keeps denoising
                stop = stop & ~_checked(verifier, argmax, torch.ones_like(accepted)).any(dim=-1)
            stopped = stopped | stop
        yield Draft(ci, i + 1, remaining, canvas.cpu(), argmax.cpu(), accepted.cpu(), step.entropy.float().cpu(),
                    stopped.cpu())
        if not bool(sampler.live(stopped, finished).any()):
            break
    return argmax, passes


def unsettled_positions(active: torch.Tensor) -> torch.Tensor:
    """[B, C] bool -> [B, A] positions for a step-cache pass, A the most any row has: each row's active positions
    first, the rest filled with its first one (recomputed twice, identically), so a row's pass does not depend on
    its batch neighbours. A row with none recomputes position 0."""
    counts = active.sum(dim=1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]
    k = torch.arange(width, device=active.device)[None]
    return torch.where(k < counts[:, None], order, order[:, :1])


def _checked(verifier: Verifier, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The verifier's rejections among `positions`, checked for shape and type."""
    reject = verifier(tokens, positions)
    if not isinstance(reject, torch.Tensor) or reject.dtype != torch.bool or reject.shape != tokens.shape:
        raise TypeError(f"a verifier must return a bool tensor of shape {list(tokens.shape)}, got "
                        f"{getattr(reject, 'dtype', type(reject).__name__)} {list(getattr(reject, 'shape', []))}")
    return reject.to(tokens.device) & positions


def commit_canvas(argmax: torch.Tensor, finished: torch.Tensor, gen: GenerationConfig):
    """The ids a canvas commits and the rows finished after it. With a pad id, rows that had finished commit only
    pad, and in a row that ends here everything after its first EOS becomes pad (the EOS itself stays)."""
    ids = argmax.clone()
    eos = torch.tensor(gen.eos_ids, dtype=torch.long, device=ids.device) if gen.eos_ids else None
    has_eos = torch.isin(ids, eos).any(dim=-1) if eos is not None else torch.zeros_like(finished)
    if gen.pad_token_id is not None and bool((finished | has_eos).any()):
        ids[finished] = gen.pad_token_id
        if eos is not None:
            is_eos = torch.isin(ids, eos)
            ids[is_eos.cumsum(dim=-1) - is_eos.int() > 0] = gen.pad_token_id  # after the first EOS
    return ids, finished | has_eos


def _results(model, out, steps, passes, finished, gen: GenerationConfig, seeds, timings) -> list[GenerationResult]:
    results = []
    for b in range(out.shape[0]):
        row = out[b] if gen.pad_token_id is None else out[b][out[b] != gen.pad_token_id]
        ids = row.tolist()
        tpf = (torch.tensor(len(ids)) / passes[b].cpu()).item()
        t = dict(timings, tokens_per_s=len(ids) / timings["total_s"] if timings["total_s"] > 0 else 0.0)
        text = model.tokenizer.decode(ids) if model.tokenizer is not None else None
        # rows that stopped earlier still ran (batched) canvases; only their own steps count
        results.append(GenerationResult(ids, tpf, [s[b] for s in steps if s[b] > 0], seeds[min(b, len(seeds) - 1)],
                                        "eos" if bool(finished[b]) else "length", t, text))
    return results


def generate(model, prompt_ids, *, max_new_tokens: int | None = None, seed: int | None = None, **kwargs):
    """Generate for one prompt (returns a GenerationResult) or a batch (returns a list)."""
    _, _, single = _as_batch(prompt_ids, model.config.vocab_size, 0, torch.device("cpu"))
    results: list[GenerationResult] = []
    for event in stream(model, prompt_ids, max_new_tokens=max_new_tokens, seed=seed, **kwargs):
        if isinstance(event, Done):
            results = event.results
    return results[0] if single else results
