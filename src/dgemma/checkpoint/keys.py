"""Checkpoint tensor names in one place: dgemma's parameter names <-> save_pretrained keys; GGUF names -> dgemma's.

The decoder stack lives under `model.decoder.*` (self-conditioning under `model.decoder.self_conditioning.*`); the
encoder's text weights (`model.encoder.language_model.*`) are tied copies of the decoder's, except each layer's
`layer_scalar`; `lm_head.weight` is the tied embedding; the vision tower and projector live under
`model.encoder.vision_tower.*` / `model.encoder.embed_vision.*`. GGUF files name tensors as llama.cpp's converter does
(`blk.N.attn_q.weight`, ...).
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


# GGUF tensor names (llama.cpp's diffusion-gemma converter) -> dgemma parameter names; the experts' stacked
# tensors are read as a group by the GGUF reader.
GGUF_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "self_cond_pre_norm.weight": "sc_pre_norm.weight",
    "self_cond_gate.weight": "sc_mlp.gate_proj.weight",
    "self_cond_up.weight": "sc_mlp.up_proj.weight",
    "self_cond_down.weight": "sc_mlp.down_proj.weight",
}
GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "layer_output_scale.weight": "layer_scalar",
    "enc_layer_output_scale.weight": "encoder_layer_scalar",
}


def gguf_param(name: str) -> str | None:
    """GGUF tensor name -> dgemma parameter name (None: not a parameter: experts, rope_freqs, untied output)."""
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in GGUF_LAYER:
        return f"layers.{m.group(1)}.{GGUF_LAYER[m.group(2)]}"
    return None
