"""Request bodies of the OpenAI-compatible API (pydantic), with dgemma's extension fields.

Extension fields: `diffusion` (per-request sampler settings), `stream_drafts` (a draft event after every denoising
step), `decoder` ("diffusion" or "autoregressive": the same weights decoded left to right by the causal stack).
OpenAI fields dgemma does not implement are accepted and listed in the response's `dgemma.ignored`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator

# OpenAI fields that are valid but have no effect here (the diffusion sampler has its own temperature schedule).
IGNORED = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
           "top_logprobs", "user", "tools", "tool_choice", "parallel_tool_calls", "response_format",
           "stream_options", "best_of", "echo", "suffix", "metadata", "store", "service_tier", "modalities",
           "reasoning_effort", "prediction", "audio", "functions", "function_call", "web_search_options")

Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # JSON true/false would pass as 1.0/0.0 in pydantic's lax float mode
        raise ValueError("must be a number, not a boolean")
    return v


def Number(**bounds: float) -> Any:  # noqa: N802 (a type alias with bounds)
    """A finite number (an integer is fine, a boolean is not) within `bounds` (pydantic's gt/ge/le)."""
    return Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False, **bounds)]


class DiffusionSettings(BaseModel):
    """Per-request denoising settings (names as in generation_config.json); unset fields keep the model's."""

    model_config = ConfigDict(extra="forbid")

    max_denoising_steps: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    entropy_bound: Number(gt=0, le=1e6) | None = None
    t_min: Number(ge=0, le=100) | None = None
    t_max: Number(gt=0, le=100) | None = None
    stability_threshold: Annotated[StrictInt, Field(ge=0, le=1024)] | None = None
    confidence_threshold: Number(gt=0, le=1e6) | None = None

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)  # an explicit null disables a feature, as in generation_config


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are reported back, never a crash

    model: str | None = None
    max_tokens: PositiveInt | None = None
    stream: StrictBool = False
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    diffusion: DiffusionSettings | None = None
    stream_drafts: StrictBool = False
    decoder: Literal["diffusion", "autoregressive"] = "diffusion"

    # Known OpenAI fields without effect (typed loosely so any client value passes).
    temperature: float | None = None
    top_p: float | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must hold 1 to 256 characters")
        return stops

    def ignored(self) -> list[str]:
        """Fields the request set that dgemma accepts but does not act on."""
        sent = set(self.model_fields_set) | set(self.model_extra or {})
        moot = ("diffusion", "stream_drafts") if self.decoder == "autoregressive" else ()
        return sorted(f for f in sent if f in IGNORED or f in moot or f in (self.model_extra or {}))

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | OtherPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if not isinstance(part, TextPart):
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    # A string, a one-string list, or token ids (one prompt per request).
    prompt: str | list[str] | list[StrictInt]
