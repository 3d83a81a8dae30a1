"""Fine-tuning with the DiffusionGemma objective (full or LoRA) on a JSONL of {"prompt", "response"} pairs.

Per batch (the DiffusionGemma fine-tuning objective):
- encoder: one causal pass over the clean prompt + response, autoregressive cross-entropy (weight `ar_weight`)
  over the targets `ar_targets` names: "all" (prompt and response), "response" (the head runs on response
  positions only: a prompt that is random, such as a puzzle's givens, is noise to predict) or "none" (no AR loss;
  the encoder then runs only over what the decoder attends to);
- decoder: one canvas of the response, each position replaced by a uniform random token with probability
  t ~ U(t_min, 1), attending to the encoder's cache up to that canvas; unweighted cross-entropy over the canvas
  (weight `diffusion_weight`);
- self-conditioning with probability `sc_prob` per example: a no-grad decoder pass supplies the logits.
AdamW, linear warmup then cosine decay to lr * min_lr_ratio, gradient clipping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from . import distributed
from .checkpoint.keys import checkpoint_key
from .checkpoint.load import load_model
from .checkpoint.write import write_checkpoint
from .config import read_json
from .hardware import resolve_device
from .kv_cache import TrainingKVCache
from .lora import apply_lora, load_adapter, lora_modules, lora_parts, save_adapter
from .model import DiffusionGemma
from .pipeline import Pipeline
from .vision import CHECKPOINT_PREFIX as VISION_PREFIX

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class TrainError(ValueError):
    """A fine-tuning run cannot start or continue; the message names the file or directory at fault."""


@dataclass
class TrainConfig:
    base: str  # checkpoint directory to start from
    data: str  # JSONL with "prompt" and "response"
    out: str  # output directory (checkpoints, adapter, log)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1.5e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.95, 0.99)
    weight_decay: float = 0.0
    clip: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "text"  # LoRA on "text", "vision" (the vision tower) or "both"
    freeze_router: bool = False
    sc_prob: float = 0.5
    t_min: float = 1e-3
    ar_weight: float = 1.0
    ar_targets: str = "all"  # "all", "response" or "none" (see the module docstring)
    diffusion_weight: float = 1.0
    chat: bool = True  # wrap prompts in the checkpoint's chat template when it has one
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    max_line_chars: int = 1 << 20  # characters per training-data line, checked before it is parsed
    device: str = "cpu"
    dtype: str = "float32"
    resume: bool = False
    progress: bool = True
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); see distributed.py

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_line_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.sc_prob <= 1 or not 0 < self.t_min < 1:
            raise ValueError("sc_prob must be in [0, 1] and t_min in (0, 1)")
        if self.lr <= 0 or self.warmup < 0 or self.lora_rank < 0:
            raise ValueError("lr must be positive; warmup and lora_rank non-negative")
        if lora_parts(self.lora_targets) == ("vision",):
            raise ValueError("lora_targets 'vision': the training data are text-only, so the vision tower gets no "
                             "gradient; choose 'text' or 'both'")
        if self.ar_targets not in ("all", "response", "none"):
            raise ValueError(f"ar_targets must be 'all', 'response' or 'none', got {self.ar_targets!r}")
        if self.ar_targets == "none" and self.diffusion_weight == 0:
            raise ValueError("ar_targets='none' with diffusion_weight=0 leaves nothing to train")
        if self.distributed not in distributed.STRATEGIES:
            raise ValueError(f"distributed must be one of {distributed.STRATEGIES}, got {self.distributed!r}")


@dataclass
class Example:
    prompt: list[int]
    response: list[int]  # response + end token, padded with pad to whole canvases


def load_examples(model: Pipeline, path: Path, chat: bool, max_line_chars: int = 1 << 20) -> list[Example]:
    """The training examples of a JSONL file; a line that cannot be used is a ValueError naming file and line."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source}: fine-tuning from text needs tokenizer.json")
    cfg, gen = model.config, model.generation_config
    use_chat = chat and tok.chat_template is not None
    end = tok.token_to_id("<end_of_turn>") if use_chat else None
    if end is None:
        end = gen.eos_ids[0] if gen.eos_ids else cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 1
    pad = gen.pad_token_id if gen.pad_token_id is not None else 0
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if len(raw) > max_line_chars * 4:  # even all-ASCII it is over the limit: not decoded, not parsed
                raise ValueError(f"{where}: the line has {len(raw)} bytes; the limit is {max_line_chars} characters")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            if len(line) > max_line_chars:
                raise ValueError(f"{where}: the line has {len(line)} characters; the limit is {max_line_chars}")
            try:
                row = json.loads(line)
                prompt, response = row["prompt"], row["response"]
                if not isinstance(prompt, str) or not isinstance(response, str):
                    raise TypeError("prompt and response must be strings")
            except RecursionError:
                raise ValueError(f"{where}: nested too deeply") from None
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: expected a JSON object with string 'prompt' and 'response' ({e})") from None
            p_ids = tok.encode_chat([{"role": "user", "content": prompt}]) if use_chat else tok.encode(prompt)
            r_ids = tok.encode(response) + [end]
            c = cfg.canvas_length
            r_ids += [pad] * (-len(r_ids) % c)
            if len(p_ids) + len(r_ids) > cfg.max_position_embeddings:
                raise ValueError(f"{where}: {len(p_ids)} prompt + {len(r_ids)} response tokens (whole canvases) "
                                 f"exceed the model's {cfg.max_position_embeddings} positions")
            examples.append(Example(p_ids, r_ids))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def collate(batch: list[Example], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Left-pad prompts, right-pad responses; returns (ids [B, P + R], prompt pad [B], P, R)."""
    p_len = max(len(e.prompt) for e in batch)
    r_len = max(len(e.response) for e in batch)
    rows = [[pad] * (p_len - len(e.prompt)) + e.prompt + e.response + [pad] * (r_len - len(e.response)) for e in batch]
    pads = torch.tensor([p_len - len(e.prompt) for e in batch])
    return torch.tensor(rows, device=device), pads, p_len, r_len


def losses(model: DiffusionGemma, ids: torch.Tensor, pads: torch.Tensor, p_len: int, r_len: int,
           cfg: TrainConfig, gen: torch.Generator, rows: slice | None = None,
           pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(autoregressive loss, diffusion loss) for one batch; a loss whose weight is 0 is not computed (0.0).

    `rows` (data parallel): run the model on these rows only. The random draws still cover the whole batch and
    both losses are normalised by the whole batch's counts, so the slices' losses add up to the whole batch's.
    `pad_id`: the generation config's pad token (tail padding of the responses)."""
    mc = model.config
    b, dev = ids.shape[0], ids.device
    sub = rows if rows is not None else slice(None)
    c = mc.canvas_length
    block = int(torch.randint(0, r_len // c, (1,), generator=gen))
    need_ar = cfg.ar_targets != "none" and cfg.ar_weight != 0
    zero = torch.zeros((), device=dev)
    mine = ids[sub]
    cache = TrainingKVCache(mc, mine.shape[0], dev, model.dtype, pads[sub])
    # Without an AR loss the encoder only has to cover what the decoder attends to.
    hidden = model.encode(mine if need_ar else mine[:, :p_len + block * c], cache)
    ar = zero
    if need_ar:
        # Predict token i+1 from position i, over real (non left-pad, non tail-pad) targets.
        first = 1 if cfg.ar_targets == "all" else p_len  # first target slot
        logits = model.lm_head(hidden[:, first - 1:-1])
        target = ids[:, first:].clone()
        slot = torch.arange(first, ids.shape[1], device=dev)
        target[(slot[None, :] <= pads.to(dev)[:, None]) | (target == pad_id) & (slot[None, :] >= p_len)] = -100
        if rows is None:
            ar = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        else:
            ar = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[sub].reshape(-1), ignore_index=-100,
                                 reduction="sum") / (target != -100).sum().clamp(min=1)
    if cfg.diffusion_weight == 0:
        return ar, zero

    clean = ids[:, p_len + block * c:p_len + (block + 1) * c]
    t = cfg.t_min + (1 - cfg.t_min) * torch.rand(b, 1, generator=gen)
    noisy = torch.where(torch.rand(b, c, generator=gen) < t, torch.randint(0, mc.vocab_size, (b, c), generator=gen),
                        clean.cpu()).to(dev)
    view = cache.prefix(p_len + block * c)
    sc_mask = (torch.rand(b, generator=gen) < cfg.sc_prob).to(dev)
    run_sc = bool(sc_mask.any())  # decided for the whole batch: every slice takes the same path
    clean, noisy, sc_mask = clean[sub], noisy[sub], sc_mask[sub]
    sc_logits = None
    if run_sc:
        with torch.no_grad():
            sc_logits = model.decode(noisy, view).detach()
    out = model.lm_head(model.decode_hidden(noisy, view, sc_logits, sc_mask=sc_mask if sc_logits is not None else None))
    if rows is None:
        diff = F.cross_entropy(out.reshape(-1, out.shape[-1]), clean.reshape(-1))
    else:
        diff = F.cross_entropy(out.reshape(-1, out.shape[-1]), clean.reshape(-1), reduction="sum") / (b * c)
    return ar, diff


def state_dict_for_save(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """Model weights under checkpoint names (LoRA adapters folded in, without touching the live model)."""
    mods = lora_modules(model)
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or name.startswith("vision."):
            continue
        key_name = name.replace(".base.weight", ".weight")
        mod = mods.get(key_name[: -len(".weight")])
        tensor = mod.merged_weight() if mod is not None else p
        out[checkpoint_key(key_name)] = tensor.detach()
    if model.vision is not None:  # parameters and buffers (standardisation, clip ranges), under their own keys
        out.update({VISION_PREFIX + k: t.detach() for k, t in model.vision.state_dict().items()})
    return out


def save_checkpoint(model: DiffusionGemma, base: Path, out: Path, config: TrainConfig) -> None:
    extra = {}
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            extra[name] = (base / name).read_text(encoding="utf-8")
    cfg_json = read_json(base / "config.json")
    cfg_json["dtype"] = config.dtype
    gen_file = base / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else None
    write_checkpoint(out, cfg_json, state_dict_for_save(model), gen, None, extra, overwrite=True)
    if lora_modules(model):
        save_adapter(model, out / "adapter", str(base))


def _trim_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    if step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    tmp.replace(path)


def _logged_elapsed(path: Path) -> float:
    """The training time recorded by the last entry of a log (0 for a fresh one)."""
    if not path.is_file():
        return 0.0
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError, IndexError):
        return float(json.loads(lines[-1])["elapsed_s"])
    return 0.0


def _last_logged_step(path: Path) -> int:
    """The highest step a log records (0 when it has none); unreadable lines count as nothing."""
    top = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError, ValueError):
            top = max(top, int(json.loads(line)["step"]))
    return top


def _save_state(out: Path, step: int, opt: torch.optim.Optimizer, names: dict, gen: torch.Generator,
                cfg: TrainConfig) -> None:
    """Optimizer moments as safetensors plus a JSON state: resumable without pickle."""
    tensors = {}
    for p, name in names.items():
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{name}.{k}"] = st[k].detach().cpu().contiguous()
    tmp = out / "optimizer.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "optimizer.safetensors")
    state = {"step": step, "rng": gen.get_state().tolist(), "config": dataclasses.asdict(cfg),
             "opt_step": {name: float(opt.state[p]["step"]) for p, name in names.items() if p in opt.state}}
    (out / "trainer_state.json.tmp").write_text(json.dumps(state), encoding="utf-8")
    (out / "trainer_state.json.tmp").replace(out / "trainer_state.json")


def _load_state(out: Path, opt: torch.optim.Optimizer, names: dict, gen: torch.Generator) -> int:
    """The step, optimizer moments and RNG state of snapshot `out`; any fault is a TrainError naming the file."""
    state_file, opt_file = out / "trainer_state.json", out / "optimizer.safetensors"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step, rng, opt_steps = int(state["step"]), state["rng"], state["opt_step"]
        if step < 0 or not isinstance(rng, list) or not isinstance(opt_steps, dict):
            raise ValueError("step, rng or opt_step has the wrong type")
        gen.set_state(torch.tensor(rng, dtype=torch.uint8))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, RecursionError) as e:
        raise TrainError(f"{state_file}: not a usable trainer state ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(opt_file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise TrainError(f"{opt_file}: not a readable optimizer state ({type(e).__name__}: {e})") from None
    for p, name in names.items():
        if f"{name}.exp_avg" not in tensors:
            continue
        moments = [tensors.get(f"{name}.{k}") for k in ("exp_avg", "exp_avg_sq")]
        if any(m is None or m.shape != p.shape for m in moments):
            raise TrainError(f"{opt_file}: the moments of {name} are missing or not of shape {list(p.shape)}")
        if any(not bool(torch.isfinite(m).all()) for m in moments) or bool((moments[1] < 0).any()):
            raise TrainError(f"{opt_file}: the moments of {name} hold NaN, infinite or negative values")
        try:
            count = float(opt_steps[name])
        except (KeyError, TypeError, ValueError):
            raise TrainError(f"{state_file}: opt_step has no count for {name}") from None
        if not math.isfinite(count) or count < 1:
            raise TrainError(f"{state_file}: opt_step[{name!r}] = {count} is not a step count")
        opt.state[p] = {"step": torch.tensor(count), "exp_avg": moments[0].to(p.device),
                        "exp_avg_sq": moments[1].to(p.device)}
    return step


def _resume_point(out: Path, resume: bool, first_snapshot: int) -> Path | None:
    """The snapshot to continue from, or None for a fresh run. A snapshot counts only when complete (its
    trainer_state.json is written last); `last` may be missing only if a run died while swapping it, and then the
    complete directory it left is used. A run killed before its first snapshot (step `first_snapshot`) was complete
    leaves only log lines up to that step, which a rerun redoes exactly: --resume starts it over. A fresh run never
    overwrites a previous run's snapshot or log, and --resume never silently drops a run that got further."""
    complete = [d for d in (out / "last", out / ".last.partial", out / ".last.old")
                if (d / "trainer_state.json").is_file()]
    log = out / "train_log.jsonl"
    logged = log.is_file() and log.stat().st_size > 0
    earlier = (out / "last").exists() or complete or logged
    if not resume:
        if earlier:
            raise TrainError(f"{out} holds a previous run (snapshot or log); pass --resume to continue it, or "
                             f"choose another output directory")
        return None
    if complete:
        return complete[0]
    if (out / "last").exists():
        raise TrainError(f"{out / 'last'}: no complete snapshot to resume from (no trainer_state.json); the run "
                         f"cannot continue from it: move the directory away to start over")
    reached = _last_logged_step(log) if logged else 0
    if reached > first_snapshot:  # a step is logged before its snapshot is written
        raise TrainError(f"{log}: the log reaches step {reached} but {out} holds no snapshot to resume from (none "
                         f"is complete); move the directory away to start over")
    return None  # nothing there yet, or a run that died before its first snapshot: start from the base


def finetune(cfg: TrainConfig) -> dict:
    """Run fine-tuning; returns a summary. Writes <out>/final (HF layout), <out>/train_log.jsonl and, with
    LoRA, <out>/final/adapter (PEFT layout)."""
    cfg.validate()
    out, base = Path(cfg.out), Path(cfg.base)
    ctx = distributed.setup(cfg.device, cfg.distributed, cfg.batch_size)  # None unless under torchrun
    device = ctx.device if ctx else resolve_device(cfg.device)
    main = ctx is None or ctx.main  # the rank that logs and writes
    resume_from = _resume_point(out, cfg.resume, min(cfg.save_every or cfg.steps, cfg.steps))
    start_dir = resume_from or base
    if resume_from is not None and cfg.lora_rank:
        start_dir = base  # LoRA resumes from the base weights plus the saved adapter
    pipe = load_model(start_dir, dtype=cfg.dtype, device=device)
    examples = load_examples(pipe, Path(cfg.data), cfg.chat, cfg.max_line_chars)
    model = pipe.module
    if cfg.lora_rank and resume_from is not None and (resume_from / "adapter").is_dir():
        load_adapter(model, resume_from / "adapter")
    elif cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, generator=torch.Generator().manual_seed(cfg.seed),
                   parts=cfg.lora_targets)
    else:
        model.requires_grad_(True)
        if model.vision is not None:  # text-only training data: the tower gets no gradient
            model.vision.requires_grad_(False)
    if cfg.freeze_router:
        for layer in model.layers:
            layer.router.requires_grad_(False)
    model.train()
    objective = distributed.wrap(ctx, model, losses) if ctx else None  # FSDP replaces the parameters
    params = {p: n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        step = _load_state(resume_from, opt, params, gen)
        if ctx:
            distributed.shard_optimizer_state(opt)
    log_path = out / "train_log.jsonl"
    if main:
        _trim_log(log_path, step)  # a fresh run starts a fresh log; a resumed one drops entries it will redo
    pad = pipe.generation_config.pad_token_id if pipe.generation_config.pad_token_id is not None else 0


    progress = Progress(TextColumn("[bold]finetune"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                        TimeRemainingColumn(), console=Console(stderr=True), disable=not (cfg.progress and main))
    t0, tokens, seen, last = time.perf_counter(), 0, 0, {}
    elapsed_before = _logged_elapsed(log_path)  # a resumed run's clock continues
    # No row_invariant(): padding small GEMMs buys batch-independent inference, not better training, and its
    # padded expert matmuls cost time.
    with progress, open(log_path if main else os.devnull, "a", encoding="utf-8") as log:
        task = progress.add_task("train", total=cfg.steps, completed=step, loss=float("nan"), tps=0.0)
        while step < cfg.steps:
            pick = random.Random(cfg.seed * 1_000_003 + step)  # per step: a resumed run sees the same batches
            batch = [examples[pick.randrange(len(examples))] for _ in range(cfg.batch_size)]
            ids, pads, p_len, r_len = collate(batch, pad, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            if ctx:
                ar, diff = objective(ids, pads, p_len, r_len, cfg, gen, rows=ctx.rows(cfg.batch_size), pad_id=pad)
            else:
                ar, diff = losses(model, ids, pads, p_len, r_len, cfg, gen, pad_id=pad)
            loss = cfg.ar_weight * ar + cfg.diffusion_weight * diff
            values = ctx.sum([loss, ar, diff]) if ctx else [loss.item(), ar.item(), diff.item()]
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"loss became {values[0]} at step {step}")
            opt.zero_grad(set_to_none=True)
            # DDP and FSDP average gradients over ranks; the slices' losses are parts of a sum
            (loss * ctx.world if ctx else loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params), cfg.clip)
            opt.step()
            step += 1
            tokens += int(ids.numel())
            seen += ids.shape[0]
            elapsed = time.perf_counter() - t0
            last = {"step": step, "loss": values[0], "ar_loss": values[1], "diffusion_loss": values[2],
                    "lr": opt.param_groups[0]["lr"], "grad_norm": distributed.full_norm(grad_norm),
                    "tokens_per_s": tokens / elapsed,
                    "examples_per_s": seen / elapsed, "examples": step * cfg.batch_size,
                    "elapsed_s": elapsed_before + elapsed}
            progress.update(task, completed=step, loss=last["loss"], tps=last["tokens_per_s"])
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write(json.dumps(last) + "\n")
                log.flush()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _snapshot(model, base, out, cfg, step, opt, params, gen, ctx)
    plain = _snapshot(model, base, out, cfg, step, opt, params, gen, ctx)
    if plain is not None:
        save_checkpoint(plain, base, out / "final", cfg)
    world = ctx.world if ctx else 1
    if ctx:
        ctx.barrier()
        distributed.teardown(ctx)
    return {"steps": step, **last, "world_size": world, "out": str(out / "final")}


def _snapshot(model, base, out, cfg, step, opt, params, gen, ctx=None) -> DiffusionGemma | None:
    """<out>/last: a loadable checkpoint plus optimizer and RNG state for --resume, complete before it becomes
    visible: written to <out>/.last.partial (trainer_state.json last), then swapped in. Distributed: every rank
    calls it, rank 0 writes full tensors. Returns the (plain) model that was written, None on other ranks."""
    if ctx:
        model, opt, params = distributed.gathered(ctx, model, opt, params, lambda: _plain_model(base, cfg))
        if model is None:
            return None
    last, partial, old = out / "last", out / ".last.partial", out / ".last.old"
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(model, base, partial, cfg)
    _save_state(partial, step, opt, params, gen, cfg)
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        os.replace(last, old)  # a kill from here to the next line leaves two complete snapshots, no `last`
    os.replace(partial, last)
    shutil.rmtree(old, ignore_errors=True)
    return model


def _plain_model(base: Path, cfg: TrainConfig) -> DiffusionGemma:
    """An unsharded model on the CPU with the trained model's structure (LoRA wrappers too)."""
    model = load_model(base, dtype=cfg.dtype, device="cpu").module
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parts=cfg.lora_targets)
    return model

