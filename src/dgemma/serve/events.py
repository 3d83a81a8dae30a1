"""What the engine tells a request's handler, as typed events (the worker thread emits them; the OpenAI adapter
turns them into response bodies and SSE chunks). `wire()` is the event's `dgemma` extension object in a stream."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def finite_or_none(values: list[float], digits: int = 4) -> list[float | None]:
    """Rounded floats for JSON, with None where a value is not finite (NaN is not JSON)."""
    return [round(x, digits) if math.isfinite(x) else None for x in values]


@dataclass
class TokenLogprob:
    """A returned token's log-probability under the final denoising step's distribution at its position (the
    temperature-scaled distribution the sampler drew from), and the most probable alternatives there."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most probable first


@dataclass
class Draft:
    """The canvas after one denoising step (only for jobs that asked for drafts)."""

    canvas_index: int
    step: int
    ids: list[int]
    tokens: list[str]
    accepted: list[bool]
    entropy: list[float | None]
    finished: bool

    def wire(self) -> dict[str, Any]:
        return {"event": "draft", "canvas_index": self.canvas_index, "step": self.step, "ids": self.ids,
                "tokens": self.tokens, "accepted": self.accepted, "entropy": self.entropy, "finished": self.finished}


@dataclass
class Commit:
    """New tokens were committed (a canvas, or one autoregressive token): `text` is the newly safe text."""

    text: str
    ids: list[int]  # the whole committed canvas (diffusion, pad included) or the one token
    tokens: list[str]
    canvas_index: int | None = None  # diffusion
    steps: int | None = None  # diffusion: passes this canvas took
    forwards: int | None = None  # autoregressive: passes so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the returned tokens in this commit, if asked

    def wire(self) -> dict[str, Any]:
        if self.canvas_index is None:
            return {"event": "token", "forwards": self.forwards, "ids": self.ids, "tokens": self.tokens}
        return {"event": "commit", "canvas_index": self.canvas_index, "ids": self.ids, "tokens": self.tokens,
                "steps": self.steps}


@dataclass
class Text:
    """Held-back text released at the end (no new tokens)."""

    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    text: str
    ids: list[int]
    prompt_tokens: int
    forward_passes: int
    tokens_per_forward: float
    steps: list[int]
    seed: int
    decoder: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens restored from the prefix cache (None: no cache)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


@dataclass
class Error:
    message: str
    status: int = 500
    code: str | None = None


Event = Draft | Commit | Text | Done | Error
