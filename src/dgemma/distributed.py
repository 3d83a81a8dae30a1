"""Data-parallel fine-tuning under `torchrun`: DDP (every rank holds the model) or FSDP2 (`fully_shard`: parameters,
gradients and optimizer state sharded across ranks, each decoder layer gathered only while it runs).

Every rank draws the same global batch and the same noise (one generator, one seed) and computes its contiguous
slice of the rows; the per-rank losses are normalised by the global batch's counts, so they add up to the
single-process loss and the summed gradient is the single-process gradient (up to floating-point summation
order). Checkpoints are written by rank 0 in the single-process layout (full tensors, LoRA folded in, the PEFT
adapter and the optimizer moments as full tensors), so they load anywhere and resume under any world size.

gloo on CPU, NCCL on CUDA (one GPU per rank: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    strategy: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of the global batch."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: list[torch.Tensor]) -> list[float]:
        """Sum scalars over ranks (one collective)."""
        t = torch.stack([v.detach().float().reshape(()) for v in values]).to(self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, strategy: str, batch_size: int) -> Context | None:
    """Join the process group torchrun describes; None when not launched with several processes."""
    if not launched():
        return None
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {world}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Context(rank, world, local, dev, strategy)


def teardown(ctx: Context | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The training objective as a module, so DDP's and FSDP's hooks run around it: forward -> (ar, diffusion)."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def wrap(ctx: Context, model: nn.Module, fn) -> nn.Module:
    """DDP or FSDP2 around the objective `fn(model, ...)`; the model's parameters stay reachable as `.model`."""
    # torch.distributed's wrappers are imported where used: not every torch build has them (they are optional)
    module = LossModule(model, fn)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # A parameter that no rank used this step (self-conditioning when no row drew it) keeps no gradient, as in
        # a single-process run; DDP must look for those.
        return DistributedDataParallel(module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:  # one unit per decoder layer: gathered for its forward/backward, then freed
        fully_shard(layer)
    fully_shard(module)  # the rest: embeddings (tied head), norms, self-conditioning MLP, vision tower
    return module


def inner(wrapped: nn.Module) -> nn.Module:
    """The model inside a wrapper from `wrap`."""
    return wrapped.module.model if hasattr(wrapped, "module") else wrapped.model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_norm(t: torch.Tensor) -> float:
    return float(_full(t))


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `param` (sharded when `param` is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After loading full moments into `opt.state` (train._load_state), lay them out like their parameters."""
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                st[k] = shard_like(p, st[k])


def full_copy(ctx: Context, model: nn.Module, load_plain) -> nn.Module | None:
    """Rank 0: a plain (unsharded) model with the trained weights, for the single-process checkpoint writer;
    None on other ranks. Every rank must call it (FSDP gathers shards collectively). `load_plain()` builds an
    untrained model of the same structure (LoRA wrappers included)."""
    if ctx.strategy == "ddp":
        return model if ctx.main else None
    full = {name: _full(p.detach()).cpu() for name, p in model.named_parameters()}
    if not ctx.main:
        return None
    plain = load_plain()
    mine = dict(plain.named_parameters())
    if set(mine) != set(full):
        raise RuntimeError(f"parameter names differ between the sharded and the plain model: "
                           f"{sorted(set(mine) ^ set(full))[:4]}")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(full[name])
    return plain


def full_optimizer(ctx: Context, opt: torch.optim.Optimizer, names: dict, plain: nn.Module | None):
    """The optimizer state keyed by the plain model's parameters (full moments), shaped for train._save_state;
    None on ranks other than 0. Collective under FSDP."""
    state = {}
    for p, name in names.items():
        st = opt.state.get(p)
        if st is None:
            continue
        state[name] = {"step": st["step"], **{k: _full(st[k].detach()).cpu() for k in ("exp_avg", "exp_avg_sq")
                                              if k in st}}
    if plain is None:
        return None, None
    by_name = dict(plain.named_parameters())
    plain_names = {by_name[n]: n for n in names.values()}
    return SimpleNamespace(state={by_name[n]: st for n, st in state.items()}), plain_names


def gathered(ctx: Context, model: nn.Module, opt: torch.optim.Optimizer, names: dict, load_plain):
    """(model, optimizer-like, parameter names) for the single-process checkpoint writers on rank 0, full tensors
    throughout; (None, None, None) on other ranks. Collective under FSDP."""
    if ctx.strategy == "ddp":  # every rank holds the whole model and optimizer state
        return (model, opt, names) if ctx.main else (None, None, None)
    plain = full_copy(ctx, model, load_plain)
    state, plain_names = full_optimizer(ctx, opt, names, plain)
    return plain, state, plain_names
