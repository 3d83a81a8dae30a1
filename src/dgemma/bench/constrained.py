"""`dgemma bench --constrained`: the cost of constrained decoding per denoising step, measured in one run.

On a preset's random weights (default small-moe: V = 32000, canvas 256) with a BPE tokenizer of the model's
vocabulary size trained here on this Python's standard library sources (no download), one canvas is denoised for a
fixed number of steps with adaptive stopping off, unconstrained and under a realistic JSON schema; the ratio of the
steady-state step times (steps 2..N, best of several interleaved runs) is the overhead, and beside it the median of
each run's ratio (robust to a slow spell of a shared machine that hits one run of a pair). Also reported: the
schema's compile time (cold, then cached), the automaton's size, and the DP's own time per step on random
distributions at V = 262144 with a synthetic vocabulary of that size (the real Gemma vocabulary's size).
"""

from __future__ import annotations

import glob
import json
import os
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HF

from ..constraints.compile import Constraint, compile_constraint
from ..constraints.dp import best_canvas, class_scores
from ..constraints.vocab import byte_level_decoder
from ..generate import Draft, stream
from ..presets import random_model
from ..tokenizer import BYTE_SPECIALS, Tokenizer
from .run import machine_info

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "[a-z]+@[a-z]+\\.com"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                      "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "score", "active"],
    "additionalProperties": False,
}


def trained_tokenizer(vocab_size: int, max_bytes: int = 6 << 20) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the byte tokenizer's specials first) trained on stdlib sources."""
    files, size = [], 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        files.append(f)
        size += os.path.getsize(f)
        if size > max_bytes:
            break
    tok = HF(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BYTE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    return Tokenizer(tok, {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>"})


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """`vocab_size` tokens: the specials, the 256 bytes, then random 2-12 character strings drawn from text-like
    characters (a stand-in for a large real vocabulary's size and piece lengths)."""
    to_char = {b: c for c, b in byte_level_decoder().items()}
    rng = random.Random(seed)
    chars = "etaoinshrdlucmfwypvbgkjqxz ETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,;:!?\"'{}[]()-_/\\\n\t"
    pieces: dict[str, int] = {t: i for i, t in enumerate(BYTE_SPECIALS)}
    for b in range(256):
        pieces.setdefault(to_char[b], len(pieces))
    while len(pieces) < vocab_size:
        s = "".join(rng.choice(chars) for _ in range(rng.choice([2, 3, 3, 4, 4, 5, 6, 7, 8, 10, 12])))
        pieces.setdefault("".join(to_char[b] for b in s.encode()), len(pieces))
    tok = HF(models.BPE(vocab=pieces, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    return Tokenizer(tok, {"eos_token": "<eos>", "pad_token": "<pad>"})


def _step_times(model, prompt, steps: int, seed: int, **kw) -> tuple[list[float], object]:
    stamps, text = [], None
    for ev in stream(model, prompt, max_new_tokens=model.config.canvas_length, seed=seed, max_denoising_steps=steps,
                     stability_threshold=None, confidence_threshold=None, **kw):
        if isinstance(ev, Draft):
            stamps.append(time.perf_counter())
        elif hasattr(ev, "results"):
            text = ev.results[0]
    return [b - a for a, b in zip(stamps, stamps[1:])], text


def run(preset: str = "small-moe", dtype: str = "bfloat16", steps: int = 8, repeats: int = 3, seed: int = 0,
        big_vocab: int = 262144, schema: dict | None = None) -> dict:
    """`schema`: the JSON schema to measure (default SCHEMA, a realistic user record)."""
    model = random_model(preset, dtype, seed=seed)
    cfg = model.config
    t0 = time.perf_counter()
    model.tokenizer = trained_tokenizer(cfg.vocab_size)
    tokenizer_s = time.perf_counter() - t0
    gen = model.generation_config
    fill = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_ids[0]
    constraint = Constraint.json_schema(SCHEMA if schema is None else schema)
    t0 = time.perf_counter()
    aut = compile_constraint(constraint, model.tokenizer, cfg.vocab_size, gen.eos_ids, fill)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_constraint(constraint, model.tokenizer, cfg.vocab_size, gen.eos_ids, fill)
    cached_s = time.perf_counter() - t0
    prompt = model.tokenizer.encode("Return the user record as JSON: name, age, email, tags, address, score.")
    prompt = (prompt * 8)[:64]
    best = {"plain": [], "json": []}
    text = None
    _step_times(model, prompt, 2, seed)  # warm-up
    _step_times(model, prompt, 2, seed, constraint=constraint)
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        best["plain"].append(min(_step_times(model, prompt, steps, seed)[0]))
        times, res = _step_times(model, prompt, steps, seed, constraint=constraint)
        best["json"].append(min(times))
        text = res.text
    plain, con = min(best["plain"]), min(best["json"])
    # each repeat's ratio, then the median: a slow spell of a shared machine that hits one run of a pair moves
    # one ratio, not the result (the ratio of the two minima is kept as "overhead")
    ratios = sorted(j / p for p, j in zip(best["plain"], best["json"]))
    out = {"preset": preset, "dtype": dtype, "vocab_size": cfg.vocab_size, "canvas_length": cfg.canvas_length,
           "steps": steps, "tokenizer_train_s": tokenizer_s, "compile_s": compile_s, "compile_cached_s": cached_s,
           "automaton": {"states": aut.n_states, "classes": aut.n_classes, "edges": int(aut.src.numel())},
           "step_s": {"unconstrained": plain, "json_schema": con}, "overhead": con / plain - 1,
           "overhead_median": (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2 - 1,
           "repeats_s": best,
           "output_valid_json": _is_json(text), "threads": torch.get_num_threads()}
    out["big_vocab"] = _dp_at(big_vocab, cfg.canvas_length, constraint, gen.eos_ids, fill, repeats)
    return out


def _is_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
        return True
    except ValueError:
        return False


def _dp_at(vocab: int, canvas: int, constraint: Constraint, eos_ids, fill: int, repeats: int) -> dict:
    """Compile time and DP time per step (class scores + Viterbi) at a synthetic vocabulary of `vocab` tokens."""
    tok = synthetic_tokenizer(vocab)
    t0 = time.perf_counter()
    aut = compile_constraint(constraint, tok, vocab, eos_ids, fill)
    compile_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(canvas, vocab, generator=g) * 3, dim=-1).to(torch.bfloat16)
    left = (canvas + 64 - torch.arange(canvas + 1)).clamp(min=0)
    scores_s, dp_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sc = class_scores(probs, aut)
        t1 = time.perf_counter()
        best_canvas(sc, aut, aut.start, left)
        scores_s.append(t1 - t0)
        dp_s.append(time.perf_counter() - t1)
    return {"vocab_size": vocab, "compile_s": compile_s, "class_scores_s": min(scores_s), "viterbi_s": min(dp_s),
            "automaton": {"states": aut.n_states, "classes": aut.n_classes, "edges": int(aut.src.numel())}}


def cli_run(args) -> int:
    """`dgemma bench --constrained`: one line per dtype, then the full result as JSON (also to --json-out)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    for dtype in [d for d in args.dtypes.replace(" ", "").split(",") if d]:
        schema = json.loads(Path(args.schema).read_text(encoding="utf-8")) if args.schema else None
        r = run(args.preset, dtype, steps=args.steps, repeats=args.repeats, seed=args.seed, schema=schema)
        results.append(r)
        s, big = r["step_s"], r["big_vocab"]
        print(f"{r['preset']} {dtype}: step {s['unconstrained'] * 1e3:.1f} ms unconstrained, "
              f"{s['json_schema'] * 1e3:.1f} ms with the JSON schema ({r['overhead'] * 100:+.1f}%; median of the "
              f"{len(r['repeats_s']['plain'])} runs' ratios {r['overhead_median'] * 100:+.1f}%); compile "
              f"{r['compile_s']:.2f} s ({r['automaton']['states']} states, {r['automaton']['classes']} classes, "
              f"{r['automaton']['edges']} edges); at V={big['vocab_size']}: compile {big['compile_s']:.1f} s, "
              f"DP {(big['class_scores_s'] + big['viterbi_s']) * 1e3:.0f} ms/step")
    out = {"machine": machine_info(torch.device("cpu")), "results": results}
    text = json.dumps(out, indent=2)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0
