"""Checkpoint tensor names: dgemma's parameter names <-> the save_pretrained keys, in one place.

The decoder stack lives under `model.decoder.*` (self-conditioning under `model.decoder.self_conditioning.*`); the
encoder's text weights (`model.encoder.language_model.*`) are tied copies of the decoder's, except each layer's
`layer_scalar`; `lm_head.weight` is the tied embedding; the vision tower and projector live under
`model.encoder.vision_tower.*` / `model.encoder.embed_vision.*`.
"""

from __future__ import annotations

import re

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# self-conditioning: save_pretrained name under DECODER + "self_conditioning." -> dgemma parameter
SELF_CONDITIONING = {"pre_norm.weight": "sc_pre_norm.weight", "gate_proj.weight": "sc_mlp.gate_proj.weight",
                     "up_proj.weight": "sc_mlp.up_proj.weight", "down_proj.weight": "sc_mlp.down_proj.weight"}
_SC_KEY = {ours: theirs for theirs, ours in SELF_CONDITIONING.items()}
_ENCODER_SCALAR = re.compile(r"layers\.(\d+)\.layer_scalar")


def checkpoint_key(name: str) -> str:
    """dgemma parameter name -> save_pretrained key."""
    if name in _SC_KEY:
        return DECODER + "self_conditioning." + _SC_KEY[name]
    if name.endswith(".encoder_layer_scalar"):
        return ENCODER + name.replace("encoder_layer_scalar", "layer_scalar")
    return DECODER + name


def map_key(key: str) -> tuple[str, str | None]:
    """Checkpoint key -> (kind, dgemma parameter name). kind: 'main', 'tied' (duplicate of a main weight), 'vision',
    or 'unknown'."""
    if key.startswith(VISION):
        return "vision", None
    if key == "lm_head.weight":
        return "tied", "embed_tokens.weight"
    for prefix, kind in ((DECODER, "main"), (ENCODER, "tied")):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith("self_conditioning.") and kind == "main":
            name = SELF_CONDITIONING.get(rest[len("self_conditioning."):])
            return ("main", name) if name else ("unknown", None)
        m = _ENCODER_SCALAR.fullmatch(rest)
        if m and kind == "tied":  # the encoder's layer scalar is its own weight, not a tied copy
            return "main", f"layers.{m.group(1)}.encoder_layer_scalar"
        return kind, rest
    return "unknown", None
