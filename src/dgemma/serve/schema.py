"""Request bodies of the OpenAI-compatible API (pydantic), with dgemma's extension fields.

Extension fields: `diffusion` (per-request sampler settings), `stream_drafts` (a draft event after every denoising
step), `decoder` ("diffusion" or "autoregressive": the same weights decoded left to right by the causal stack),
`structured_outputs` (`regex`, `json`, `choice`, `json_object`: vLLM's names) and `infill` (`template`: fixed text
with holes), `chat_template_kwargs` (e.g. `enable_thinking`); OpenAI's `response_format` (`json_object`,
`json_schema`), `tools` / `tool_choice`, `n`, `logprobs` / `top_logprobs` are honoured.
OpenAI fields dgemma does not implement are accepted and listed in the response's `dgemma.ignored`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from ..constraints import Constraint, ConstraintError
from ..requests import DiffusionSettings

# OpenAI fields that are valid but have no effect here (the diffusion sampler has its own temperature schedule).
IGNORED = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "user",
           "parallel_tool_calls",
           "stream_options", "best_of", "echo", "suffix", "metadata", "store", "service_tier", "modalities",
           "reasoning_effort", "prediction", "audio", "functions", "function_call", "web_search_options")

Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


# `json_object` / {"type": "json_object"}: an object of scalars, flat arrays and flat objects (a bounded depth keeps
# the automaton small; a deeper shape needs a json_schema).
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
JSON_OBJECT = {"type": "object", "additionalProperties": {"anyOf": [
    *_SCALAR["anyOf"], {"type": "array", "items": _SCALAR}, {"type": "object", "additionalProperties": _SCALAR}]}}


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | bool = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    regex: str | None = None
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    json_object: StrictBool | None = None


class Infill(BaseModel):
    """An infill template: a string with {{hole}}, {{hole:N}}, {{hole:MIN-MAX}}, {{hole:MIN-MAX:REGEX}} marks, or a
    list of fixed strings and hole objects ({"tokens"} or {"min_tokens", "max_tokens"}, optional "regex" or
    "json_schema")."""

    model_config = ConfigDict(extra="forbid")

    template: str | Annotated[list[str | dict[str, Any]], Field(min_length=1)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are reported back, never a crash

    model: str | None = None
    max_tokens: PositiveInt | None = None
    stream: StrictBool = False
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: PositiveInt = 1  # choices, from seeds seed, seed+1, ... (at most the server's --max-n)
    logprobs: StrictBool | Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    diffusion: DiffusionSettings | None = None
    stream_drafts: StrictBool = False
    decoder: Literal["diffusion", "autoregressive"] = "diffusion"
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    infill: Infill | None = None

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
        moot = ("diffusion", "stream_drafts", "logprobs", "top_logprobs") if self.decoder == "autoregressive" else ()
        return sorted(f for f in sent if f in IGNORED or f in moot or f in (self.model_extra or {}))

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def top_k(self) -> int | None:
        """None: no logprobs; k: each token's log-probability and the k most probable alternatives. Chat sends
        logprobs: true and top_logprobs: k; completions send logprobs: k."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        return self.logprobs

    def constraint(self) -> tuple[str, Constraint] | None:
        """(request field, Constraint) from response_format / structured_outputs / infill, None when unconstrained.
        Raises ConstraintError naming the problem."""
        found: list[tuple[str, Constraint]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", Constraint.json_schema(JSON_OBJECT)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ConstraintError('response_format of type "json_schema" needs a json_schema object')
            found.append(("response_format", Constraint.json_schema(rf.json_schema.schema_)))
        so = self.structured_outputs
        if so is not None:
            given = [k for k, v in (("regex", so.regex), ("json", so.json_), ("choice", so.choice),
                                    ("json_object", so.json_object or None)) if v is not None]
            if len(given) != 1:
                raise ConstraintError("structured_outputs takes exactly one of regex, json, choice, json_object "
                                      f"(got {', '.join(given) or 'none'})")
            kind = given[0]
            c = (Constraint.regex(so.regex) if kind == "regex" else Constraint.json_schema(so.json_)
                 if kind == "json" else Constraint.choice(so.choice) if kind == "choice"
                 else Constraint.json_schema(JSON_OBJECT))
            found.append((f"structured_outputs.{kind}", c))
        if self.infill is not None:
            found.append(("infill.template", Constraint.infill(self.infill.template)))
        if len(found) > 1:
            raise ConstraintError(f"one constraint per request (got {', '.join(f for f, _ in found)}); an infill "
                                  "hole takes its own regex or json_schema")
        return found[0] if found else None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str  # a data: URL (data:image/png;base64,...); remote URLs are refused, the server fetches nothing
    detail: str | None = None  # accepted, no effect (the checkpoint's soft-token budget decides)


class ImageURLPart(BaseModel):
    """OpenAI's image content part."""

    type: Literal["image_url"]
    image_url: ImageURL


class OtherPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object (none: no arguments)
    strict: StrictBool | None = None  # accepted: calls are always generated under the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class CallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImageURLPart | OtherPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call answered
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if not isinstance(part, TextPart):
                raise ValueError(f"content parts of type {part.type!r} are not supported (text and image_url only)")
        return "".join(p.text for p in self.content)

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type in ("image_url", "image") for p in self.content)

    def parts(self) -> str | list[dict[str, Any]]:
        """The content as a string or as plain part dicts (what dgemma.images.extract_images reads)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return [p.model_dump(exclude_none=True) for p in self.content]


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables of the chat template (enable_thinking)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    # A string, a one-string list, or token ids (one prompt per request).
    prompt: str | list[str] | list[StrictInt]
