"""One request preparation for serve, batch and the CLI: prompt ids, settings, constraint, images and seed become a
`PreparedRequest` (checked against the model and the entry point's caps, settings resolved once, constraint
compiled) or a `RequestError` naming the field at fault. The per-request diffusion settings' pydantic model is
derived here from their one declaration (`config.GenerationConfig`'s fields, `config.DIFFUSION_SETTINGS`).

Nothing here knows HTTP: the server maps `RequestError.param` to its 400s, batch to a line's error record.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, create_model

from .config import DIFFUSION_SETTINGS, ConfigError, GenerationConfig, Setting
from .constraints import CompileLimits, Constraint, ConstraintError, compile_constraint, fill_id
from .generate import check_prompt_ids, plan_canvases, resolve_settings
from .sampler import temperature

DECODERS = ("diffusion", "autoregressive")
SEED_LIMIT = 2**63
# The sampler divides logits by the schedule's temperatures in float32: below this they overflow float32 (NaN
# entropies, empty text at 1e-38) and are greedy in effect long before.
MIN_TEMPERATURE = 1e-6


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # JSON true/false would pass as 1.0/0.0 in pydantic's lax float mode
        raise ValueError("must be a number, not a boolean")
    return v


def _field_type(s: Setting) -> Any:
    if s.choices:
        return Annotated[Literal[s.choices], Field(description=s.help)]
    bounds = {"gt" if s.lo_open else "ge": s.lo, "le": s.hi}
    if s.kind is int:
        return Annotated[StrictInt, Field(**bounds, description=s.help)]
    return Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False, **bounds, description=s.help)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def overrides(self) -> dict[str, Any]:
        """The fields the request set (an explicit null disables a feature, as in generation_config.json)."""
        return self.model_dump(exclude_unset=True)


# Per-request denoising settings (names as in generation_config.json); unset fields keep the model's. Every field
# may be null on the wire: for a setting that cannot be off, GenerationConfig refuses the null with its name.
DiffusionSettings = create_model(
    "DiffusionSettings", __base__=_Settings, __doc__="Per-request denoising settings; unset ones keep the model's.",
    **{name: (_field_type(s) | None, None) for name, s in DIFFUSION_SETTINGS.items()})


class RequestError(ValueError):
    """A request the model cannot run; `param` names the field at fault (the HTTP / batch-line field name)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Caps:
    """An entry point's bounds on one request (None: none) and how its messages name them: `over` is formatted
    with the limit and the flag that sets it."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    tokens_field: str = "max_tokens"  # the request field max_new_tokens comes from
    over: str = "the limit of {limit} ({flag})"


@dataclass
class PreparedRequest:
    """A request ready to run: what `generate.stream` takes, checked and resolved once."""

    prompt_ids: list[int]
    max_new_tokens: int | None  # as asked (None: the model's default); the server's hard cap on returned tokens
    settings: dict[str, Any]  # the generation_config overrides as given (the grouping key is built from them)
    gen: GenerationConfig  # the model's generation_config with the overrides, resolved once
    seed: int
    decoder: str = "diffusion"
    constraint: Constraint | None = None
    images: dict[str, Any] | None = None  # preprocess_images output for the prompt's images (diffusion only)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one batched run. A request with images runs alone: the vision
        tower's batched arithmetic is not row-invariant, and a seeded request must give the same tokens alone or
        in a batch."""
        solo = id(self) if self.images is not None else None
        return (self.decoder, self.max_new_tokens, tuple(sorted(self.settings.items())), solo)

    def image_inputs(self) -> dict[str, Any]:
        """Keyword arguments of `generate.stream` for the images."""
        if self.images is None:
            return {}
        return {"pixel_values": self.images["pixel_values"], "image_position_ids": self.images["image_position_ids"]}


def check_ids(model, ids: Any, param: str = "prompt") -> list[int]:
    """A non-empty list of token ids in the model's vocabulary, or RequestError."""
    if not isinstance(ids, list):
        raise RequestError(f"{param} must be a list of integers", param)
    if not ids:
        raise RequestError("the prompt is empty", param)
    try:
        check_prompt_ids(ids, model.config.vocab_size)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e), param) from None
    return ids


def lowest_temperature(gen: GenerationConfig) -> float | None:
    """The smallest temperature of the schedule: its last step (n = 1; t_max > t_min, and float32 rounding is
    monotone, so no other step is lower)."""
    if gen.t_min is None or gen.t_max is None:
        return None
    return temperature(1, gen.max_denoising_steps, gen.t_min, gen.t_max).item()


def _check_settings(model, gen: GenerationConfig, prompt_len: int, decoder: str, settings: dict, caps: Caps) -> None:
    cfg = model.config
    new = gen.new_tokens(prompt_len)
    if caps.max_new_tokens is not None and new > caps.max_new_tokens:  # the entry point's bound comes first
        raise RequestError(f"{caps.tokens_field} {new} is over " +
                           caps.over.format(limit=caps.max_new_tokens, flag="--max-tokens"), caps.tokens_field)
    if decoder == "autoregressive" and prompt_len + new > cfg.max_position_embeddings:
        raise RequestError(f"prompt ({prompt_len} tokens) + {caps.tokens_field} ({new}) exceeds the model's "
                           f"{cfg.max_position_embeddings} positions", caps.tokens_field)
    if decoder == "diffusion":
        try:
            plan_canvases(cfg, gen, prompt_len)
        except ValueError as e:
            raise RequestError(str(e), "diffusion" if settings and "position" not in str(e) else caps.tokens_field
                               ) from None
    if decoder == "autoregressive":
        return
    cap = caps.max_denoising_steps
    if cap is not None and gen.max_denoising_steps > cap:
        raise RequestError(f"max_denoising_steps {gen.max_denoising_steps} is over " +
                           caps.over.format(limit=cap, flag="--max-denoising-steps"),
                           "diffusion.max_denoising_steps")
    t = lowest_temperature(gen)
    if t is not None and not t >= MIN_TEMPERATURE:
        raise RequestError(f"the temperature schedule (t_min {gen.t_min}, t_max {gen.t_max}, "
                           f"{gen.max_denoising_steps} steps) reaches {t:.3g} in float32; the minimum is "
                           f"{MIN_TEMPERATURE}", "diffusion.t_max")


def compile_for(model, constraint: Constraint, param: str) -> None:
    """Compile `constraint` for the model (cached; under its own limits) so a malformed or unsatisfiable one, or
    one past the compile limits, is refused before any work."""
    gen = resolve_settings(model, None, {})
    try:
        compile_constraint(constraint, model.tokenizer, model.config.vocab_size, gen.eos_ids, fill_id(gen))
    except ConstraintError as e:
        raise RequestError(f"{param}: {e}", param, "invalid_constraint") from None


def prepare(model, prompt_ids: Any, *, max_new_tokens: int | None = None, settings: dict[str, Any] | None = None,
            seed: int | None = None, decoder: str = "diffusion", constraint: tuple[str, Constraint] | None = None,
            images: dict[str, Any] | None = None, caps: Caps = Caps(),
            compile_limits: CompileLimits | None = None) -> PreparedRequest:
    """Check and resolve one request. `constraint`: (the field it came from, Constraint), compiled under
    `compile_limits` (the entry point's flags; they travel with the constraint to the generation). RequestError
    names the field at fault."""
    if decoder not in DECODERS:
        raise RequestError(f"decoder must be one of {DECODERS}, got {decoder!r}", "decoder")
    ids = check_ids(model, prompt_ids)
    if seed is None:
        seed = secrets.randbits(62)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RequestError("seed must be an integer in [0, 2**63)", "seed")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens <= 0):
        raise RequestError(f"{caps.tokens_field} must be a positive integer", caps.tokens_field)
    settings = dict(settings or {}) if decoder == "diffusion" else {}
    try:
        gen = resolve_settings(model, max_new_tokens, settings)
    except (ValueError, ConfigError) as e:
        raise RequestError(str(e), "diffusion" if settings else caps.tokens_field) from None
    _check_settings(model, gen, len(ids), decoder, settings, caps)
    if (constraint is not None or images is not None) and decoder != "diffusion":
        what = f"{constraint[0]} needs" if constraint is not None else "image input needs"
        raise RequestError(f"{what} the diffusion decoder", "decoder")
    if constraint is not None:
        constraint = (constraint[0], constraint[1].with_limits(compile_limits))
        compile_for(model, constraint[1], constraint[0])
    return PreparedRequest(ids, max_new_tokens, settings, gen, seed, decoder,
                           constraint[1] if constraint is not None else None, images)

