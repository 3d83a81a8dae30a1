"""Coverage of dgemma's JSON-schema constraints on the committed JSONSchemaBench sample (sample.json, drawn by
draw.py): per schema, compile (refusals recorded by keyword), generate with a random tiny model (2 seeds,
max_new_tokens 1024) and validate every output with `jsonschema` (format checking on).

    python benchmarks/jsonschemabench/run.py [--subset NAME ...] [--name SCHEMA ...] [--limit N] [--steps N]
                                             [--out results.json]

Prints per subset: compiled %, outputs valid %, refusals by keyword; writes the per-schema records and the summary
to results.json next to this script. The committed results.json is the contract's settings (the model's default
denoising steps); results-steps8.json is the same sample with `--steps 8`.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import sys
import time
from pathlib import Path

import jsonschema

import dgemma
from dgemma.constraints import Constraint, ConstraintError, compile_constraint, fill_id
from dgemma.presets import random_model
from dgemma.tokenizer import build_byte_tokenizer

HERE = Path(__file__).parent
SEEDS = (0, 1)
MAX_NEW_TOKENS = 1024


LIMITS = (("automaton states", "limit: states"), ("s to compile", "limit: time"), ("MB to compile", "limit: memory"),
          ("regex of", "limit: regex size"), ("subschemas", "limit: subschemas"))


def keyword_of(message: str) -> str:
    """The keyword a refusal names, or which compile limit it hit."""
    m = re.search(r"keyword '([^']+)'", message)
    if m:
        return m.group(1)
    return next((name for text, name in LIMITS if text in message), "other: " + message[:80])


def validate(schema: dict, text: str) -> str | None:
    """None when `text` is a JSON instance of `schema` (formats checked), else why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    cls = jsonschema.validators.validator_for(schema)
    err = jsonschema.exceptions.best_match(cls(schema, format_checker=jsonschema.FormatChecker()).iter_errors(value))
    return None if err is None else f"{err.message[:200]} at {list(err.absolute_path)}"


def run_one(model, name: str, schema: dict, seeds=SEEDS, steps: int | None = None) -> dict:
    rec: dict = {"name": name}
    t0 = time.perf_counter()
    gen = model.generation_config
    try:
        c = Constraint.json_schema(schema)
        aut = compile_constraint(c, model.tokenizer, model.config.vocab_size, gen.eos_ids, fill_id(gen))
    except ConstraintError as e:
        rec.update(compiled=False, refusal=str(e)[:300], keyword=keyword_of(str(e)),
                   compile_s=round(time.perf_counter() - t0, 3))
        return rec
    rec.update(compiled=True, compile_s=round(time.perf_counter() - t0, 3), states=aut.n_states,
               classes=aut.n_classes, min_tokens=aut.min_tokens, fits=aut.min_tokens <= MAX_NEW_TOKENS, outputs=[])
    prompt = model.tokenizer.encode("JSON:")
    for seed in seeds:
        t0 = time.perf_counter()
        extra = {} if steps is None else {"max_denoising_steps": steps}
        r = model.generate(prompt, constraint=c, seed=seed, max_new_tokens=MAX_NEW_TOKENS, **extra)
        why = validate(schema, r.text) if r.finish_reason == "eos" else \
            "finish_reason length" + ("" if rec["fits"] else f" (no valid output fits: the shortest is "
                                      f"{aut.min_tokens} tokens, EOS included)")
        rec["outputs"].append({"seed": seed, "finish_reason": r.finish_reason, "valid": why is None,
                               "why": why, "tokens": len(r.ids), "gen_s": round(time.perf_counter() - t0, 2),
                               "text": r.text[:300]})
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", action="append")
    ap.add_argument("--name", action="append", help="only the schemas of these names (e.g. to rerun one)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--compile-only", action="store_true", help="compile, generate nothing")
    ap.add_argument("--steps", type=int, help="max_denoising_steps (default: the model's, 48); a random model "
                    "never stops early, so fewer steps make the run shorter, and give the verifier fewer chances")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    a = ap.parse_args()
    t0, c0 = time.perf_counter(), time.process_time()
    sample = json.loads((HERE / "sample.json").read_text())
    model = random_model("tiny")
    if model.tokenizer is None:  # a random model has no tokenizer of its own: the byte tokenizer (V = 262)
        model.tokenizer = build_byte_tokenizer()
    results = {"sample": {k: sample[k] for k in ("source", "commit", "seed", "per_subset", "max_bytes")},
               "model": "dgemma.presets.random_model('tiny')", "seeds": list(SEEDS),
               "max_new_tokens": MAX_NEW_TOKENS,
               "max_denoising_steps": a.steps or model.generation_config.max_denoising_steps,
               "command": "python benchmarks/jsonschemabench/run.py " + " ".join(sys.argv[1:]),
               "machine": platform.processor() or platform.machine(),
               "dgemma": getattr(dgemma, "__version__", "?"), "subsets": {}}
    for subset, block in sample["subsets"].items():
        if a.subset and subset not in a.subset:
            continue
        recs = []
        for name, schema in list(block["schemas"].items())[:a.limit]:
            if a.name and name not in a.name:
                continue
            rec = run_one(model, name, schema, () if a.compile_only else SEEDS, a.steps)
            recs.append(rec)
            outs = rec.get("outputs", [])
            print(f"{subset:16} {name[:40]:40} " + (
                f"compiled {rec['compile_s']:6.2f}s {rec['states']:6} states  valid "
                f"{sum(o['valid'] for o in outs)}/{len(outs)}  " + " ".join(
                    str(o['why'])[:60] for o in outs if not o['valid'])
                if rec["compiled"] else f"refused: {rec['refusal'][:110]}"), flush=True)
        if not recs:
            continue
        outs = [o for r in recs for o in r.get("outputs", [])]
        results["subsets"][subset] = {
            "schemas": len(recs), "compiled": sum(r["compiled"] for r in recs),
            "compiled_pct": round(100 * sum(r["compiled"] for r in recs) / max(len(recs), 1), 1),
            "outputs": len(outs), "valid": sum(o["valid"] for o in outs),
            "outputs_that_fit": sum(len(r["outputs"]) for r in recs if r.get("fits")),
            "valid_pct": round(100 * sum(o["valid"] for o in outs) / max(len(outs), 1), 1),
            "refusals": dict(collections.Counter(r["keyword"] for r in recs if not r["compiled"])),
            "records": recs}
    print(f"\n{'subset':16} {'schemas':>7} {'compiled':>9} {'valid':>12} {'fit':>5}  refusals")
    for subset, s in results["subsets"].items():
        print(f"{subset:16} {s['schemas']:7} {s['compiled_pct']:8.1f}% {s['valid']:5}/{s['outputs']:<4} "
              f"{s['valid_pct']:5.1f}% {s['outputs_that_fit']:5}  {s['refusals']}")
    pct = [s["compiled_pct"] for s in results["subsets"].values()]
    results["mean_compiled_pct"] = round(sum(pct) / max(len(pct), 1), 1)
    results["wall_s"] = round(time.perf_counter() - t0)  # this process; a shared machine's load included
    results["cpu_s"] = round(time.process_time() - c0)  # (compile children not included)
    print(f"mean compiled per subset: {results['mean_compiled_pct']}%")
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
