"""Constrained and infill canvases: outputs guaranteed to match a regex, a JSON schema, a choice list or an infill
template, decoded the diffusion way (a DP over whole canvases, not a left-to-right mask).

`Constraint` says what the output must be; `compile_constraint` turns it into a `TokenAutomaton` over the model's
vocabulary (cached); `ConstrainedSampler` wraps a sampler strategy; `constrain` does both for `generate.stream`.
"""

from __future__ import annotations

from .automaton import TokenAutomaton
from .compile import Constraint, compile_constraint
from .errors import ConstraintError
from .sampler import ConstrainedSampler
from .schema import CompileLimits
from .template import Hole, Template

__all__ = ["CompileLimits", "Constraint", "ConstraintError", "ConstrainedSampler", "Hole", "Template",
           "TokenAutomaton", "compile_constraint", "constrain", "fill_id"]


def fill_id(gen) -> int:
    """The token after EOS: pad when the model has one, else the first EOS."""
    return gen.pad_token_id if gen.pad_token_id is not None else gen.eos_ids[0]


def automata(model, gen, constraint, batch: int) -> list[TokenAutomaton | None]:
    """One automaton (or None) per row from a Constraint or a per-row list of Constraint / None."""
    rows = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * batch
    if len(rows) != batch:
        raise ConstraintError(f"got {len(rows)} constraints for {batch} prompts")
    out = []
    for c in rows:
        if c is not None and not isinstance(c, Constraint):
            raise ConstraintError(f"constraint must be a Constraint or None, got {type(c).__name__}")
        out.append(None if c is None else compile_constraint(c, model.tokenizer, model.config.vocab_size,
                                                             gen.eos_ids, fill_id(gen)))
    return out


def constrain(sampler, model, gen, batch: int, budget: int, constraint) -> ConstrainedSampler:
    """Wrap `sampler` so each row's output satisfies its constraint within `budget` new tokens (EOS included)."""
    return ConstrainedSampler(sampler, automata(model, gen, constraint, batch), budget)
