"""Writers of the published quantized layouts, for tests. Written from the producers' published layout descriptions, not
from dgemma's readers: each takes a plain checkpoint (as the reference saves it) and writes

- the quantized checkpoint, exactly as its producer lays it out on disk, and
- its dequantized twin: the same checkpoint in the plain layout holding the weights that the format's own formula
  gives back (so the reference, loading the twin, computes what a correct reader of the quantized files computes).

Layouts: ModelOpt NVFP4 (experts only, per-expert keys, `hf_quant_config.json`), compressed-tensors NVFP4 and FP8
per-channel (per-expert keys, `quantization_config`), HF fine-grained FP8 (128x128 block scales, fused experts).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
DEC = "model.decoder."
ENC = "model.encoder.language_model."
# Linear layers of the text stack (the router projection is a Linear too, but producers keep it unquantized).
LINEAR = re.compile(r"model\.decoder\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                    r"|self_conditioning\.(gate|up|down)_proj)\.weight")
EXPERTS = re.compile(r"model\.decoder\.layers\.(\d+)\.experts\.(gate_up_proj|down_proj)")


# -- codes and scales, from the spec ----------------------------------------------------------------------------
def e2m1_values() -> torch.Tensor:
    """Value of each 4-bit code: bit 3 is the sign, bits 0-2 index E2M1."""
    return torch.tensor([(-1.0 if c & 8 else 1.0) * E2M1[c & 7] for c in range(16)], dtype=torch.float32)


def fp8_value(bits: int) -> float:
    """float8_e4m3fn from its bit pattern: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal
    (m/8 * 2^-6); S.1111.111 is NaN and there are no infinities."""
    sign = -1.0 if bits & 0x80 else 1.0
    exp, man = (bits >> 3) & 0xF, bits & 7
    if exp == 0xF and man == 7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def fp8_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.uint8).view(torch.float8_e4m3fn)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes [out, in] (0..15) -> uint8 [out, in/2], element 2k in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def quantize_nvfp4(w: torch.Tensor, global_scale: float | None = None):
    """w [out, in] -> (codes [out, in], block scales float8 [out, in/16], global scale fp32 multiplier such that
    value = e2m1[code] * scale * global). Round to nearest representable value."""
    w = w.float()
    out, inn = w.shape
    g = global_scale if global_scale is not None else float(w.abs().max()) / (6 * 448) or 1.0
    blocks = w.view(out, inn // 16, 16)
    scale = (blocks.abs().amax(-1) / 6 / g).clamp(min=2.0**-9).to(torch.float8_e4m3fn)
    target = blocks / (scale.float() * g).unsqueeze(-1)
    vals = e2m1_values()
    codes = (target.unsqueeze(-1) - vals).abs().argmin(-1).view(out, inn)
    return codes, scale, torch.tensor(g, dtype=torch.float32)


def dequant_nvfp4(codes: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor, divide: bool) -> torch.Tensor:
    """The formula: e2m1 * weight_scale * weight_scale_2 (ModelOpt) or / weight_global_scale (compressed-tensors),
    in fp32."""
    out, inn = codes.shape
    v = (e2m1_values()[codes.long()].view(out, inn // 16, 16) * scale.float().unsqueeze(-1)).view(out, inn)
    return v / gs if divide else v * gs


def quantize_fp8_channel(w: torch.Tensor, scale_dtype=torch.bfloat16):
    """Per output row: scale = amax / 448 (stored in the model dtype), q = fp8(w / scale)."""
    scale = (w.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1e-8).to(scale_dtype)
    q = (w.float() / scale.float()).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp8_block(w: torch.Tensor, block=(128, 128)):
    """w [..., out, in] -> q fp8 and scale_inv fp32 [..., ceil(out/b0), ceil(in/b1)] with w ~ q * scale_inv."""
    bo, bi = block
    out, inn = w.shape[-2:]
    nbo, nbi = -(-out // bo), -(-inn // bi)
    padded = torch.zeros(*w.shape[:-2], nbo * bo, nbi * bi)
    padded[..., :out, :inn] = w.float()
    blocks = padded.view(*w.shape[:-2], nbo, bo, nbi, bi)
    s = (blocks.abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-8)
    q = (blocks / s[..., :, None, :, None]).view(*w.shape[:-2], nbo * bo, nbi * bi)[..., :out, :inn]
    return q.to(torch.float8_e4m3fn), s.float()


def dequant_fp8_block(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """W[r, c] = q[r, c] * s[r // b0, c // b1]."""
    out, inn = q.shape[-2:]
    rows = torch.arange(out) // block[0]
    cols = torch.arange(inn) // block[1]
    return q.float() * s[..., rows, :][..., :, cols]


# -- checkpoints ----------------------------------------------------------------------------------------------
def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _split_experts(t: dict[str, torch.Tensor]):
    """Yield (layer, fused key, [(expert, proj, matrix)]) for every fused expert tensor."""
    for key in sorted(t):
        m = EXPERTS.fullmatch(key)
        if not m:
            continue
        layer, which = m.group(1), m.group(2)
        w = t[key]
        mats = []
        for e in range(w.shape[0]):
            if which == "gate_up_proj":
                i = w.shape[1] // 2
                mats += [(e, "gate_proj", w[e, :i]), (e, "up_proj", w[e, i:])]
            else:
                mats.append((e, "down_proj", w[e]))
        yield layer, key, mats


def _join(twin: dict[str, torch.Tensor], key: str, deq: dict[tuple[int, str], torch.Tensor]) -> None:
    """Put per-expert dequantized matrices back into the fused twin tensor `key`."""
    w = twin[key].clone()
    for (e, proj), m in deq.items():
        if proj == "gate_proj":
            w[e, : m.shape[0]] = m
        elif proj == "up_proj":
            w[e, w.shape[1] // 2:] = m
        else:
            w[e] = m
    twin[key] = w


def write_nvfp4(src: Path, dst: Path, twin: Path, producer: str = "modelopt", linears: bool = False,
                config_entry: bool = False) -> None:
    """ModelOpt (`weight`, `weight_scale`, `weight_scale_2` multiplier, `input_scale`; hf_quant_config.json) or
    compressed-tensors (`weight_packed`, `weight_scale`, `weight_global_scale` divisor, `input_global_scale`;
    quantization_config). Experts always (per-expert keys); other linear layers when `linears`."""
    t = load_file(str(src / "model.safetensors"))
    q, tw = dict(t), dict(t)
    modelopt = producer == "modelopt"

    def put(prefix: str, w: torch.Tensor, gs: float | None = None) -> torch.Tensor:
        codes, scale, g = quantize_nvfp4(w, gs)
        if modelopt:
            q[prefix + ".weight"] = pack_e2m1(codes)
            q[prefix + ".weight_scale"] = scale
            q[prefix + ".weight_scale_2"] = g.clone()
            q[prefix + ".input_scale"] = torch.tensor(1.0)
        else:
            q[prefix + ".weight_packed"] = pack_e2m1(codes)
            q[prefix + ".weight_scale"] = scale
            q[prefix + ".weight_global_scale"] = (1 / g).reshape(1)
            q[prefix + ".input_global_scale"] = torch.ones(1)
        gs_stored = g if modelopt else (1 / g)
        return dequant_nvfp4(codes, scale, gs_stored, divide=not modelopt)

    for layer, key, mats in _split_experts(t):
        del q[key]
        deq = {}
        shared: dict[int, float] = {}
        for e, proj, w in mats:
            prefix = f"{DEC}layers.{layer}.experts.{e}.{proj}"
            # gate and up of one expert share the global scale (ModelOpt writes them so)
            g = shared.get(e) if proj == "up_proj" else None
            deq[(e, proj)] = put(prefix, w, g)
            if proj == "gate_proj":
                shared[e] = float(q[prefix + (".weight_scale_2" if modelopt else ".weight_global_scale")].reshape(()))
                if not modelopt:
                    shared[e] = 1 / shared[e]
        _join(tw, key, deq)
    if linears:
        for key in sorted(t):
            if LINEAR.fullmatch(key):
                del q[key]
                tw[key] = put(key[: -len(".weight")], t[key])
    _copy_side_files(src, dst)
    _copy_side_files(src, twin)
    _save(q, dst / "model.safetensors")
    _save(tw, twin / "model.safetensors")
    if modelopt:
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.37.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ["lm_head", "model.encoder.vision_tower*", "*self_attn*", "*router*"]},
        }))
        if config_entry:
            _edit_config(dst, lambda c: c.update(quantization_config={
                "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                "exclude_modules": ["lm_head"]}))
    else:
        _edit_config(dst, lambda c: c.update(quantization_config={
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized",
                                          "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                      "group_size": 16, "symmetric": True, "dynamic": False},
                                          "input_activations": {"num_bits": 4, "type": "float",
                                                                "strategy": "tensor_group", "group_size": 16,
                                                                "dynamic": "local"}}},
            "ignore": ["lm_head", "re:.*router.*"]}))


def write_fp8_channel(src: Path, dst: Path, twin: Path) -> None:
    """compressed-tensors FP8-dynamic: every Linear (per-expert keys for the experts) as float8 `weight` with a
    bf16 `weight_scale [out, 1]`; routers and lm_head ignored."""
    t = load_file(str(src / "model.safetensors"))
    q, tw = dict(t), dict(t)

    def put(prefix: str, w: torch.Tensor) -> torch.Tensor:
        qw, s = quantize_fp8_channel(w)
        q[prefix + ".weight"], q[prefix + ".weight_scale"] = qw, s
        return qw.float() * s.float()

    for layer, key, mats in _split_experts(t):
        del q[key]
        _join(tw, key, {(e, proj): put(f"{DEC}layers.{layer}.experts.{e}.{proj}", w) for e, proj, w in mats})
    for key in sorted(t):
        if LINEAR.fullmatch(key):
            del q[key]
            tw[key] = put(key[: -len(".weight")], t[key])
    _copy_side_files(src, dst)
    _copy_side_files(src, twin)
    _save(q, dst / "model.safetensors")
    _save(tw, twin / "model.safetensors")
    _edit_config(dst, lambda c: c.update(quantization_config={
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                  "symmetric": True, "dynamic": False},
                                      "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                            "symmetric": True, "dynamic": True}}},
        "ignore": ["lm_head"] + [f"model.decoder.layers.{i}.router.proj" for i in range(64)]}))


def write_fp8_block(src: Path, dst: Path, twin: Path, block=(128, 128)) -> None:
    """HF fine-grained FP8: every Linear as float8 `weight` + fp32 `weight_scale_inv` per block; fused experts keep
    [E, 2I, H] / [E, H, I] with `gate_up_proj_scale_inv` / `down_proj_scale_inv`."""
    t = load_file(str(src / "model.safetensors"))
    q, tw = dict(t), dict(t)
    for key in sorted(t):
        if LINEAR.fullmatch(key):
            qw, s = quantize_fp8_block(t[key], block)
            q[key], q[key[: -len(".weight")] + ".weight_scale_inv"] = qw, s
            tw[key] = dequant_fp8_block(qw, s, block)
        elif EXPERTS.fullmatch(key):
            qw, s = quantize_fp8_block(t[key], block)
            q[key], q[key + "_scale_inv"] = qw, s
            tw[key] = dequant_fp8_block(qw, s, block)
    _copy_side_files(src, dst)
    _copy_side_files(src, twin)
    _save(q, dst / "model.safetensors")
    _save(tw, twin / "model.safetensors")
    _edit_config(dst, lambda c: c.update(quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head"]}))


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


# -- GGUF (llama.cpp `diffusion-gemma` conversion) ----------------------------------------------------------------
# HF key (after model.decoder.) -> GGUF tensor name, from the conversion's tensor table.
GGUF_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
               "self_conditioning.gate_proj.weight": "self_cond_gate.weight",
               "self_conditioning.up_proj.weight": "self_cond_up.weight",
               "self_conditioning.down_proj.weight": "self_cond_down.weight"}
GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight",
              "post_attention_layernorm.weight": "post_attention_norm.weight",
              "pre_feedforward_layernorm.weight": "ffn_norm.weight",
              "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
              "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
              "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
              "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "router.proj.weight": "ffn_gate_inp.weight",
              "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
              "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
              "layer_scalar": "layer_output_scale.weight"}

# fp16 positions (byte offsets in a block) of the scale fields of each block type, per the ggml block structs
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2),
              "IQ4_NL": (0,), "IQ3_S": (0,), "Q4_0": (0,)}


def random_blocks(qtype_name: str, rows_shape: tuple[int, ...], n_values: int, seed: int) -> np.ndarray:
    """Raw bytes of valid blocks of a GGUF quant type: random payload, finite small fp16 scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(rows_shape)) * (n_values // block)
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype_name]:
        d = (rng.uniform(0.002, 0.02, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        if off == 2 and qtype_name in ("Q4_K", "Q5_K"):  # dmin: keep it positive like the quantizer does
            d = np.abs(d)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*rows_shape, n_values // block * size)


def write_gguf(src: Path, dst: Path, twin: Path, types: dict[str, str], gen: dict | None = None,
               tokenizer: dict | None = None) -> None:
    """A GGUF of the plain checkpoint `src` with the given quant type per GGUF tensor suffix (e.g.
    {"ffn_gate_up_exps.weight": "Q4_K"}; others F32), K-quant blocks drawn at random (gguf-py cannot quantize
    them) and simple types quantized by gguf.quants.quantize; the twin holds gguf.quants.dequantize of every tensor."""
    import gguf

    cfg = json.loads((src / "config.json").read_text())
    tc = cfg["text_config"]
    t = load_file(str(src / "model.safetensors"))
    tw = dict(t)
    w = gguf.GGUFWriter(str(dst), "diffusion-gemma")
    a = "diffusion-gemma."
    n = tc["num_hidden_layers"]
    types_l = tc["layer_types"]
    full = next(v for i, v in sorted(tc["per_layer_config"].items()) if types_l[int(i)] == "full_attention")
    tc = {**tc, "global_head_dim": full["head_dim"], "num_global_key_value_heads": full["num_key_value_heads"],
          "final_logit_softcapping": tc.get("final_logit_softcapping") or 30.0}
    w.add_uint32(a + "block_count", n)
    w.add_uint32(a + "context_length", tc["max_position_embeddings"])
    w.add_uint32(a + "embedding_length", tc["hidden_size"])
    w.add_uint32(a + "feed_forward_length", tc["intermediate_size"])
    w.add_uint32(a + "attention.head_count", tc["num_attention_heads"])
    w.add_array(a + "attention.head_count_kv", [tc["num_key_value_heads"] if x == "sliding_attention"
                                               else tc["num_global_key_value_heads"] for x in types_l])
    w.add_uint32(a + "attention.key_length", tc["global_head_dim"])
    w.add_uint32(a + "attention.value_length", tc["global_head_dim"])
    w.add_uint32(a + "attention.key_length_swa", tc["head_dim"])
    w.add_uint32(a + "attention.value_length_swa", tc["head_dim"])
    w.add_uint32(a + "attention.sliding_window", tc["sliding_window"])
    w.add_array(a + "attention.sliding_window_pattern", [x == "sliding_attention" for x in types_l])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", tc["rms_norm_eps"])
    w.add_float32(a + "rope.freq_base", tc["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_float32(a + "rope.freq_base_swa", tc["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_uint32(a + "rope.dimension_count", tc["global_head_dim"])
    w.add_uint32(a + "rope.dimension_count_swa", tc["head_dim"])
    w.add_uint32(a + "expert_count", tc["num_experts"])
    w.add_uint32(a + "expert_used_count", tc["top_k_experts"])
    w.add_uint32(a + "expert_feed_forward_length", tc["moe_intermediate_size"])
    w.add_float32(a + "final_logit_softcapping", tc["final_logit_softcapping"])
    w.add_bool(a + "attention.causal", False)
    w.add_uint32("diffusion.canvas_length", cfg["canvas_length"])
    for key, value in (gen or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)("diffusion." + key, value)
    if tokenizer:
        w.add_string("tokenizer.ggml.model", tokenizer.get("model", "llama"))
        w.add_array("tokenizer.ggml.tokens", tokenizer["tokens"])
        w.add_array("tokenizer.ggml.scores", tokenizer["scores"])
        w.add_array("tokenizer.ggml.token_type", tokenizer["types"])
        for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "eot_token_id"):
            if k in tokenizer:
                w.add_uint32("tokenizer.ggml." + k, tokenizer[k])
        if "chat_template" in tokenizer:
            w.add_string("tokenizer.chat_template", tokenizer["chat_template"])
    # rope_freqs: 1 for the rotated pairs of a full layer (partial_rotary_factor), 1e30 for the rest
    hd = tc["global_head_dim"]
    rot = int(hd * tc["rope_parameters"]["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rot + [1e30] * (hd // 2 - rot), dtype=np.float32))
    seed = 0
    for key in sorted(t):
        if not (key.startswith(DEC) or (key.startswith(ENC) and key.endswith("layer_scalar"))):
            continue
        if key.startswith(ENC):
            layer = key[len(ENC):].split(".")[1]
            name = f"blk.{layer}.enc_layer_output_scale.weight"
        else:
            rest = key[len(DEC):]
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
            name = f"blk.{m.group(1)}.{GGUF_LAYER[m.group(2)]}" if m else GGUF_GLOBAL[rest]
        arr = t[key].float().numpy()
        qname = next((q for suffix, q in types.items() if name.endswith(suffix)), "F32")
        if qname == "F32":
            w.add_tensor(name, arr)
            continue
        qtype = gguf.GGMLQuantizationType[qname]
        if qname in ("Q8_0", "Q5_0", "Q5_1", "Q4_0"):
            raw = gguf.quants.quantize(arr, qtype)
        else:
            seed += 1
            raw = random_blocks(qname, arr.shape[:-1], arr.shape[-1], seed)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        tw[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy()).reshape(t[key].shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _copy_side_files(src, twin)
    _save(tw, twin / "model.safetensors")
