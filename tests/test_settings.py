"""The diffusion settings and the server limits are declared once; every entry point derives from the declaration."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from dgemma.cli import GEN_FLAGS, build_parser
from dgemma.config import DIFFUSION_SETTINGS, GenerationConfig
from dgemma.limits import ConnectionLimits, Limits
from dgemma.requests import DiffusionSettings


def test_one_declaration_of_the_diffusion_settings():
    assert set(DIFFUSION_SETTINGS) == {"max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                       "stability_threshold", "confidence_threshold", "step_cache"}
    assert {name for name, _ in GEN_FLAGS.values()} == set(DIFFUSION_SETTINGS)
    assert set(DiffusionSettings.model_fields) == set(DIFFUSION_SETTINGS)
    assert {f.name for f in dataclasses.fields(GenerationConfig)} >= set(DIFFUSION_SETTINGS)


NUMERIC = sorted(n for n, s in DIFFUSION_SETTINGS.items() if not s.choices)
CHOICES = sorted(n for n, s in DIFFUSION_SETTINGS.items() if s.choices)


@pytest.mark.parametrize("name", CHOICES)
def test_choices_agree_everywhere(name):
    """Every declared choice is accepted by the HTTP/batch schema, GenerationConfig and the CLI; others by none."""
    s = DIFFUSION_SETTINGS[name]
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    flag = next(a for a in gen._actions if a.dest == name)
    assert tuple(flag.choices) == s.choices
    for v in s.choices:
        DiffusionSettings.model_validate({name: v})
        GenerationConfig().replace(**{name: v})
    for v in ("OFF", "", 1, True, None):
        with pytest.raises(ValidationError):
            DiffusionSettings.model_validate({name: v}) if v is not None else DiffusionSettings.model_validate(
                {name: "nope"})
        with pytest.raises(ValueError, match=name):
            GenerationConfig().replace(**{name: v})


@pytest.mark.parametrize("name", NUMERIC)
def test_bounds_agree_everywhere(name):
    """Just inside the declared range is accepted by the HTTP/batch schema and by GenerationConfig; just outside is
    refused by both."""
    s = DIFFUSION_SETTINGS[name]
    base = GenerationConfig(t_min=None, t_max=None) if name in ("t_min", "t_max") else GenerationConfig()
    step = 1 if s.kind is int else 1e-3
    inside = [s.lo + step if s.lo_open else s.lo, s.hi]
    outside = [s.lo if s.lo_open else s.lo - step, s.hi + step]
    for v in inside:
        DiffusionSettings.model_validate({name: v})
        if name not in ("t_min", "t_max"):  # those two are checked as a pair below
            base.replace(**{name: v})
    for v in outside:
        with pytest.raises(ValidationError):
            DiffusionSettings.model_validate({name: v})
        with pytest.raises(ValueError, match=name):
            base.replace(**{name: v})
    with pytest.raises(ValidationError):
        DiffusionSettings.model_validate({name: True})  # a boolean is not a number


def test_schedule_pair():
    assert GenerationConfig().replace(t_min=0.0, t_max=100.0).t_max == 100.0
    with pytest.raises(ValueError, match="t_max must be > t_min"):
        GenerationConfig().replace(t_min=0.5, t_max=0.5)


def test_cli_flags_come_from_the_declarations():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(Limits):
        assert f.name in dests and dests[f.name].default == f.default and dests[f.name].type is f.metadata["kind"]
    for f in dataclasses.fields(ConnectionLimits):
        assert (f.name in dests) == ("help" in f.metadata)
    gen = parser._subparsers._group_actions[0].choices["generate"]
    assert {a.dest for a in gen._actions} >= set(DIFFUSION_SETTINGS)


def test_limits_validate():
    Limits().validate()
    with pytest.raises(ValueError, match="--max-batch must be positive"):
        Limits(max_batch=0).validate(lambda n: "--" + n.replace("_", "-"))
    with pytest.raises(ValueError, match="request_timeout"):
        Limits(request_timeout=-1.0).validate()


def test_stream_takes_a_finished_settings_object():
    """An entry point resolves the settings once and hands the object down; mixing it with overrides is refused."""
    from dgemma.generate import resolve_settings
    from dgemma.presets import random_model

    model = random_model("tiny", seed=1, canvas_length=8)
    gen = resolve_settings(model, 8, {"max_denoising_steps": 3, "entropy_bound": 0.5})
    a = model.generate([5, 6, 7], seed=2, settings=gen)
    b = model.generate([5, 6, 7], seed=2, max_new_tokens=8, max_denoising_steps=3, entropy_bound=0.5)
    assert a.ids == b.ids and a.steps == b.steps and max(a.steps) <= 3
    with pytest.raises(ValueError, match="not both"):
        model.generate([5, 6, 7], seed=2, settings=gen, max_denoising_steps=4)
