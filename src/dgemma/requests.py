"""What serve, batch and the CLI share when they take a request: the per-request diffusion settings as a pydantic
model derived from their one declaration (`config.GenerationConfig`'s fields, `config.DIFFUSION_SETTINGS`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, create_model

from .config import DIFFUSION_SETTINGS, Setting


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # JSON true/false would pass as 1.0/0.0 in pydantic's lax float mode
        raise ValueError("must be a number, not a boolean")
    return v


def Number(**bounds: float) -> Any:  # noqa: N802 (a type alias with bounds)
    """A finite number (an integer is fine, a boolean is not) within `bounds` (pydantic's gt/ge/le)."""
    return Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False, **bounds)]


def _field_type(s: Setting) -> Any:
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
