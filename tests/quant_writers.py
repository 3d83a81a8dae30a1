"""Writers of the published quantized layouts, for tests. Written from the layout descriptions (DESIGN §6), not
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
