"""Model and generation configuration, read from a checkpoint's config.json / generation_config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 256
SLIDING = "sliding_attention"
FULL = "full_attention"

# The reference's defaults (DiffusionGemmaTextConfig) for text_config keys a config.json may leave out. The three
# MoE keys default to None there, which no model can be built from: dgemma requires them.
SLIDING_PER_FULL = 5  # 5 sliding layers, then a full one
DEFAULT_ROPE: dict[str, dict[str, Any]] = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DEFAULT_GLOBAL_HEAD_DIM = 512  # head_dim of full layers in the flat layout (no per_layer_config)
TEXT_DEFAULTS: dict[str, int] = {
    "vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
}
IMAGE_TOKEN_DEFAULTS = {"image_token_id": 258_880, "boi_token_id": 255_999, "eoi_token_id": 258_882}  # top level
REQUIRED_KEYS = ("num_experts", "top_k_experts", "moe_intermediate_size")
SHAPE_KEYS = (*TEXT_DEFAULTS, *REQUIRED_KEYS)
# What per_layer_config may change per layer: the reference's attention reads these two from the layer's own config;
# every other module reads the global config (and refuses a per-layer value that differs from it).
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


def default_layer_types(num_layers: int) -> list[str]:
    """The 5:1 sliding/full pattern; the last layer is always full (the reference forces it)."""
    types = [FULL if (i + 1) % (SLIDING_PER_FULL + 1) == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return types


def padded_keys(overrides: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """per_layer_config as transformers saves it: index keys zero-padded to the widest ("05", ..., "29")."""
    width = len(str(max(overrides))) if overrides else 1
    return {f"{i:0{width}d}": v for i, v in sorted(overrides.items())}


class ConfigError(ValueError):
    """A config file is missing, malformed, or describes a model dgemma cannot run."""


@dataclass
class LayerSpec:
    """Attention shape of one layer; full layers differ from sliding ones (head_dim, KV heads, K-as-V)."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_type: str  # "default" or "proportional"
    partial_rotary_factor: float
    rope_factor: float = 1.0  # "proportional" divides its frequencies by rope_parameters' `factor`

    @property
    def sliding(self) -> bool:
        return self.kind == SLIDING

    @property
    def has_v_proj(self) -> bool:
        # Full layers reuse the K projection as V (attention_k_eq_v).
        return self.sliding


@dataclass
class ModelConfig:
    """The DiffusionGemma text stack. Field names follow the checkpoint's `text_config`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    layers: list[LayerSpec]  # per layer: kind, head_dim, KV heads, RoPE (text_config's head_dim etc. folded in)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131072
    canvas_length: int = 256
    eos_token_id: int | list[int] | None = 1
    torch_dtype: str | None = None
    # Image prompts: placeholder ids (top-level config keys), the raw vision_config, and whether each image's run
    # of tokens attends to itself bidirectionally in the prefill (text_config.use_bidirectional_attention "vision").
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    vision_config: dict[str, Any] | None = None
    vision_bidirectional: bool = False

    @property
    def num_params(self) -> int:
        """Parameters of the text stack (tied embedding counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        n = self.vocab_size * h + h  # embed + final norm
        n += 3 * h * i + h  # self-conditioning MLP + pre_norm
        for spec in self.layers:
            q = self.num_attention_heads * spec.head_dim
            kv = spec.num_kv_heads * spec.head_dim
            n += h * q + h * kv * (2 if spec.has_v_proj else 1) + q * h + 2 * spec.head_dim
            n += 3 * h * i  # dense MLP
            n += h * self.num_experts + h + self.num_experts  # router
            n += self.num_experts * 3 * self.moe_intermediate_size * h  # experts
            n += 7 * h + 1  # norms + layer_scalar
        return n

    @property
    def active_params(self) -> int:
        """Parameters touched per token (top-k of the experts)."""
        inactive = (self.num_experts - self.top_k_experts) * 3 * self.moe_intermediate_size * self.hidden_size
        return self.num_params - inactive * self.num_hidden_layers

    def decoder_flops(self, cached: int, canvas: int | None = None, self_conditioning: bool = True,
                      batch: int = 1) -> dict[str, int]:
        """FLOPs (2 x multiply-accumulates) of one denoising forward over a canvas, by component.

        Counted: every projection for the canvas tokens (q, k, v on sliding layers only since full layers reuse K
        as V, o), attention QK^T and PV over [cache ; canvas] keys (sliding layers see at most sliding_window - 1
        cached positions), the dense MLP (gate, up, down), the router, the top-k experts (gate_up + down per chosen
        expert), self-conditioning (softmax(logits) [C x V] @ [V x H] and its MLP, only when `self_conditioning`),
        and the tied lm_head. Not counted: norms, RoPE, softmaxes, GELU, the softcap and the sampler (elementwise,
        O(C x V))."""
        c = (canvas if canvas is not None else self.canvas_length) * batch
        h, i, v, nh = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_attention_heads
        mac = dict.fromkeys(("attn_proj", "attn_scores", "dense_mlp", "router", "experts", "sc_soft_embed",
                             "sc_mlp", "lm_head"), 0)
        for spec in self.layers:
            q, kv = nh * spec.head_dim, spec.num_kv_heads * spec.head_dim
            mac["attn_proj"] += c * h * (q + kv * (2 if spec.has_v_proj else 1)) + c * q * h
            keys = (min(cached, self.sliding_window - 1) if spec.sliding else cached) + c // batch
            mac["attn_scores"] += 2 * c * nh * keys * spec.head_dim  # QK^T and PV
            mac["dense_mlp"] += 3 * c * h * i
            mac["router"] += c * h * self.num_experts
            mac["experts"] += 3 * c * self.top_k_experts * self.moe_intermediate_size * h
        if self_conditioning:
            mac["sc_soft_embed"] = c * v * h
            mac["sc_mlp"] = 3 * c * h * i
        mac["lm_head"] = c * h * v
        out = {k: 2 * n for k, n in mac.items()}
        out["total"] = sum(out.values())
        return out

    def prefill_flops(self, length: int, batch: int = 1) -> int:
        """FLOPs of the encoder pass over a prompt: projections, dense MLP, router, top-k experts, and causal
        attention (query j sees j + 1 keys, at most sliding_window on sliding layers). No lm_head (prefill only
        fills the cache)."""
        h, i, nh = self.hidden_size, self.intermediate_size, self.num_attention_heads
        total = 0
        for spec in self.layers:
            q, kv = nh * spec.head_dim, spec.num_kv_heads * spec.head_dim
            total += length * h * (q + kv * (2 if spec.has_v_proj else 1)) + length * q * h
            w = self.sliding_window if spec.sliding else length
            keys = sum(min(j + 1, w) for j in range(length))
            total += 2 * nh * keys * spec.head_dim
            total += 3 * length * h * i + length * h * self.num_experts
            total += 3 * length * self.top_k_experts * self.moe_intermediate_size * h
        return 2 * total * batch

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read config.json as the reference's DiffusionGemmaConfig does: its defaults for absent keys, both
        layouts of the full layers' shapes (per_layer_config with padded or plain index keys, or the flat
        global_head_dim / num_global_key_value_heads), the 5:1 layer pattern when layer_types is absent, the last
        layer forced to full attention. What dgemma cannot run is a ConfigError naming the key."""
        model_type = raw.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; dgemma runs 'diffusion_gemma' checkpoints"
            )
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: 'text_config' is missing or not an object")
        vals = _shape_values(text, source)
        layer_types = _layer_types(text, vals["num_hidden_layers"], source)
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: text_config.use_bidirectional_attention='all' is not supported")
        if raw.get("tie_word_embeddings", True) is False:
            raise ConfigError(f"{source}: tie_word_embeddings=false is not supported (the encoder, decoder and "
                              f"lm_head would be separate weights; the release ties them)")
        if text.get("attention_bias"):
            raise ConfigError(f"{source}: text_config.attention_bias=true is not supported (the release has none)")
        rope = text.get("rope_parameters") or DEFAULT_ROPE
        overrides = _per_layer_overrides(text, vals, layer_types, source)
        layers = []
        for i, kind in enumerate(layer_types):
            ov = overrides.get(i, {})
            rp = rope.get(kind) if isinstance(rope, dict) else None
            if not isinstance(rp, dict) or rp.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"{source}: text_config.rope_parameters.{kind}: unsupported {rp!r}")
            spec = LayerSpec(
                kind=kind,
                head_dim=ov.get("head_dim", vals["head_dim"]),
                num_kv_heads=ov.get("num_key_value_heads", vals["num_key_value_heads"]),
                rope_theta=float(rp.get("rope_theta", 10_000.0)),
                rope_type=rp.get("rope_type", "default"),
                partial_rotary_factor=float(rp.get("partial_rotary_factor", 1.0)),
                rope_factor=float(rp.get("factor", 1.0)),
            )
            if vals["num_attention_heads"] % spec.num_kv_heads:
                raise ConfigError(
                    f"{source}: layer {i}: num_attention_heads {vals['num_attention_heads']} is not a multiple "
                    f"of its {spec.num_kv_heads} KV heads"
                )
            layers.append(spec)
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"{source}: text_config.hidden_activation {act!r} is not supported")
        canvas = raw.get("canvas_length", 256)
        if not isinstance(canvas, int) or isinstance(canvas, bool) or canvas <= 0:
            raise ConfigError(f"{source}: canvas_length must be a positive integer, got {canvas!r}")
        return cls(
            **{k: v for k, v in vals.items() if k not in ("num_key_value_heads", "head_dim")},
            sliding_window=_positive(text, "sliding_window", 512, source),
            layers=layers,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            max_position_embeddings=_positive(text, "max_position_embeddings", 131_072, source),
            canvas_length=canvas,
            eos_token_id=text.get("eos_token_id", 1),
            torch_dtype=raw.get("dtype", raw.get("torch_dtype")),
            **_image_fields(raw, source),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(Path(path)), source=str(path))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive(text: dict[str, Any], key: str, default: int, source: str, where: str = "text_config") -> int:
    v = text.get(key, default)
    if not _is_count(v):
        raise ConfigError(f"{source}: {where}.{key} must be a positive integer, got {v!r}")
    return v


def _shape_values(text: dict[str, Any], source: str) -> dict[str, int]:
    """The shape keys: the reference's default where one is absent; the MoE keys are required."""
    vals: dict[str, int] = {}
    for key in SHAPE_KEYS:
        if key not in TEXT_DEFAULTS and text.get(key) is None:
            raise ConfigError(f"{source}: text_config.{key} is missing (the model's shape has no default)")
        vals[key] = _positive(text, key, TEXT_DEFAULTS.get(key, 0), source)
    if vals["top_k_experts"] > vals["num_experts"]:
        raise ConfigError(f"{source}: text_config.top_k_experts ({vals['top_k_experts']}) > num_experts "
                          f"({vals['num_experts']})")
    return vals


def _layer_types(text: dict[str, Any], n_layers: int, source: str) -> list[str]:
    layer_types = text.get("layer_types")
    if layer_types is None:
        return default_layer_types(n_layers)
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(
            t not in (SLIDING, FULL) for t in layer_types):
        raise ConfigError(f"{source}: text_config.layer_types must list {n_layers} of {SLIDING!r}/{FULL!r}")
    return [*layer_types[:-1], FULL]  # the reference forces the last layer to full attention


def _per_layer_overrides(text: dict[str, Any], vals: dict[str, int], layer_types: list[str],
                         source: str) -> dict[int, dict[str, int]]:
    """Layer index -> the attention shape keys that differ from the global ones, as the reference resolves them.

    Without a `per_layer_config` key (the flat layout) every full layer gets head_dim = global_head_dim (default
    512) and, when num_global_key_value_heads is set, that many KV heads. With one (the layout transformers >= 5.15
    saves: keys are layer indices, zero-padded to the widest, "05"), it is used as given and global_head_dim is
    ignored; null is no overrides. Overrides equal to the global value are dropped; what remains must be the same
    for every layer of a kind (the reference's RoPE is built per kind and refuses otherwise)."""
    if "per_layer_config" not in text:
        name = "text_config.global_head_dim"
        head = text.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)
        if not _is_count(head):
            raise ConfigError(f"{source}: {name} must be a positive integer, got {head!r}")
        flat = {"head_dim": head}
        if text.get("num_global_key_value_heads") is not None:
            flat["num_key_value_heads"] = _positive(text, "num_global_key_value_heads", 0, source)
        raw = {str(i): flat for i, t in enumerate(layer_types) if t == FULL}
    else:
        raw = text["per_layer_config"] or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: text_config.per_layer_config must be an object of layer index -> "
                              f"overrides, got {type(raw).__name__}")
    out: dict[int, dict[str, int]] = {}
    for key, ov in raw.items():
        where = f"text_config.per_layer_config[{key!r}]"
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {where}: keys must be layer indices (\"5\" or \"05\")") from None
        if not 0 <= index < len(layer_types):
            raise ConfigError(f"{source}: {where}: layer {index} is outside [0, {len(layer_types)})")
        if not isinstance(ov, dict):
            raise ConfigError(f"{source}: {where} must be an object, got {type(ov).__name__}")
        kept = {}
        for name, value in ov.items():
            if name in PER_LAYER_KEYS:
                if not _is_count(value):
                    raise ConfigError(f"{source}: {where}.{name} must be a positive integer, got {value!r}")
                if value != vals[name]:
                    kept[name] = value
            elif name == "skip" or text.get(name, TEXT_DEFAULTS.get(name)) != value:
                raise ConfigError(f"{source}: {where}.{name}: only {' and '.join(PER_LAYER_KEYS)} may differ per "
                                  f"layer (the reference refuses a per-layer {name})")
        out[index] = kept  # a repeated index ("5" and "05"): the later one wins, as in the reference
    for kind in (SLIDING, FULL):
        seen = {i: out.get(i, {}) for i, t in enumerate(layer_types) if t == kind}
        if len({tuple(sorted(v.items())) for v in seen.values()}) > 1:
            first = next(iter(seen))
            odd = next(i for i, v in seen.items() if v != seen[first])
            raise ConfigError(f"{source}: text_config.per_layer_config: {kind} layers {first} and {odd} differ "
                              f"({seen[first]} vs {seen[odd]}); the reference needs one shape per layer kind")
    return {i: v for i, v in out.items() if v}


def _image_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The image-prompt part of config.json (all None when the checkpoint has no vision_config)."""
    vision = raw.get("vision_config")
    if vision is None:
        return {}
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: 'vision_config' must be an object")
    ids = {}
    for key, default in IMAGE_TOKEN_DEFAULTS.items():
        v = raw.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{source}: {key} must be a token id when vision_config is present, got {v!r}")
        ids[key] = v
    bidir = (raw.get("text_config") or {}).get("use_bidirectional_attention") == "vision"
    return {**ids, "vision_config": vision, "vision_bidirectional": bidir}


@dataclass(frozen=True)
class StepCachePolicy:
    """Reuse across denoising steps (`step_cache`): a canvas position whose accepted token stayed the same for
    `settle` steps in a row is settled; the next passes compute only the other positions (their queries, K/V, MLP
    and experts, and their LM-head rows), attending to the settled positions' K/V from the pass that last computed
    them, and reuse the settled positions' logits. Every `refresh`-th step (and each canvas's first) computes every
    position again. `sc_top_k`: the self-conditioning input of every pass is built from each position's k most
    likely tokens of the last step (the rest of the mass at the mean embedding) instead of a [V x H] product."""

    settle: int
    refresh: int
    sc_top_k: int | None = None


# "fast" is the recommended trade (benchmarks/step_cache.py: speed and Sudoku solve rate against "off"): a full pass
# every third step kept both Sudoku models within one point (-0.7 each) where every second step kept them within 0.5;
# "fastest" refreshes every fourth step and builds the self-conditioning input from the top 32 tokens: more speed, more
# quality lost (the top-k input is close where distributions are peaked, far where they are broad).
STEP_CACHE: dict[str, StepCachePolicy | None] = {"off": None, "fast": StepCachePolicy(settle=2, refresh=3),
                                                 "fastest": StepCachePolicy(settle=2, refresh=4, sc_top_k=32)}
STEP_CACHE_POLICIES = tuple(STEP_CACHE)


@dataclass(frozen=True)
class Setting:
    """One per-request diffusion setting: its type, range and meaning. A value outside the range is refused by
    every entry point (Python API, CLI, HTTP, batch) with the same bounds; null disables a nullable one."""

    kind: type  # int, float or str (one of `choices`)
    lo: float
    hi: float
    help: str
    lo_open: bool = False  # lo itself is excluded
    nullable: bool = False
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> None:
        if value is None:
            if not self.nullable:
                raise ValueError(f"{name} must be set (it has no 'off' value)")
            return
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return
        ok_type = (isinstance(value, int) if self.kind is int else isinstance(value, (int, float)) and
                   math.isfinite(value)) and not isinstance(value, bool)
        low_ok = ok_type and (value > self.lo if self.lo_open else value >= self.lo)
        if not (low_ok and value <= self.hi):
            what = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{name} must be {what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}], "
                             f"got {value!r}")


def _setting(default: Any, kind: type, lo: float, hi: float, help: str, *, lo_open: bool = False,
             nullable: bool = False) -> Any:
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, lo, hi, help, lo_open, nullable)})


def _choice(default: str, choices: tuple[str, ...], help: str) -> Any:
    return dataclasses.field(default=default, metadata={"setting": Setting(str, 0, 0, help, choices=choices)})


@dataclass
class GenerationConfig:
    """Sampler settings; names follow generation_config.json (entropy_bound flattens sampler_config)."""

    max_new_tokens: int | None = None  # None: up to max_length when that is set, else DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # prompt + generated tokens
    # The per-request diffusion settings: declared here once; the CLI flags, the HTTP schema and the batch line
    # format are derived from these fields (see DIFFUSION_SETTINGS).
    max_denoising_steps: int = _setting(48, int, 1, 1024, "denoising passes per canvas at most")
    entropy_bound: float = _setting(0.1, float, 0, 1e6, "accept the lowest-entropy positions while their summed "
                                    "entropy (less the largest) stays within this bound", lo_open=True)
    t_min: float | None = _setting(0.4, float, 0, 100, "temperature at the last step (null: no schedule)",
                                   nullable=True)
    t_max: float | None = _setting(0.8, float, 0, 100, "temperature at the first step (null: no schedule)",
                                   lo_open=True, nullable=True)
    stability_threshold: int | None = _setting(1, int, 0, 1024, "stop a canvas once its argmax is unchanged for "
                                               "this many steps and it is confident (null: never)", nullable=True)
    confidence_threshold: float | None = _setting(0.005, float, 0, 1e6, "the mean entropy under which a canvas "
                                                  "counts as confident (null: never stop early)", lo_open=True,
                                                  nullable=True)
    step_cache: str = _choice("off", STEP_CACHE_POLICIES, "reuse work across denoising steps for positions whose "
                              "token has settled: off (exact), fast, fastest (see docs/design.md)")
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "generation_config.json") -> GenerationConfig:
        """Unset (null) fields keep the reference's global defaults."""
        cfg = cls()
        sampler = raw.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            cfg.entropy_bound = sampler["entropy_bound"]
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key in names and value is not None:
                setattr(cfg, key, value)
        try:
            cfg.validate()
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with per-call overrides applied (None disables an optional feature, as in the reference)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        new = dataclasses.replace(self, **overrides)
        new.validate()
        return new

    def validate(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens <= 0):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length <= 0):
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name, setting in DIFFUSION_SETTINGS.items():
            setting.check(name, getattr(self, name))
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"t_max must be > t_min, got t_max={self.t_max} t_min={self.t_min}")
        if (self.t_min is None) != (self.t_max is None):
            raise ValueError("t_min and t_max must be set together (or both None to disable the temperature schedule)")
        if self.t_min is not None and self.t_min + (self.t_max - self.t_min) / self.max_denoising_steps <= 0:
            raise ValueError("the temperature schedule reaches 0; raise t_min")
        eos = self.eos_token_id
        if eos is not None and not (is_int(eos) or (isinstance(eos, list) and eos and all(is_int(e) for e in eos))):
            raise ValueError(f"eos_token_id must be an integer or a non-empty list of integers, got {eos!r}")
        if self.pad_token_id is not None and not is_int(self.pad_token_id):
            raise ValueError(f"pad_token_id must be an integer, got {self.pad_token_id!r}")

    def new_tokens(self, prompt_len: int) -> int:
        """Tokens to generate after a prompt: max_new_tokens when set (it takes precedence, as in the reference),
        else what max_length leaves, else the default."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return self.max_length - prompt_len if self.max_length else DEFAULT_MAX_NEW_TOKENS

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DIFFUSION_SETTINGS: dict[str, Setting] = {
    f.name: f.metadata["setting"] for f in dataclasses.fields(GenerationConfig) if "setting" in f.metadata}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def generation_config_dict(**overrides: Any) -> dict[str, Any]:
    """The generation_config.json dgemma writes for random and trained checkpoints (the release's settings)."""
    gen = {
        "max_new_tokens": 256, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        "eos_token_id": [1, 5], "pad_token_id": 0, "bos_token_id": 2,
    }
    if "entropy_bound" in overrides:
        gen["sampler_config"]["entropy_bound"] = overrides.pop("entropy_bound")
    gen.update(overrides)
    return gen
