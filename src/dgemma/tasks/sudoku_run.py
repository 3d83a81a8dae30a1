"""Solving and evaluating Sudoku with a DiffusionGemma checkpoint (`dgemma sudoku solve|eval`)."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from ..generate import resolve_settings
from . import sudoku

# The project's own Sudoku model ships inside the package once trained (scripts/train_sudoku.py --bundle).
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "sudoku"


def default_model_path() -> Path:
    if not (BUNDLED / "config.json").is_file():
        raise ValueError(f"no bundled Sudoku model at {BUNDLED}; pass --model DIR "
                         "(train one with scripts/train_sudoku.py)")
    return BUNDLED


def _prompt_ids(model, puzzle: str) -> list[int]:
    return model.tokenizer.encode(sudoku.prompt_text(puzzle))


def solve_batch(model, puzzles: list[str], seed: int = 0, batch_size: int = 16, on_event=None, **overrides) -> list[dict]:
    """Solve puzzles (81-char strings, 0 = blank); one result dict per puzzle."""
    out = []
    canvas = model.config.canvas_length
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        prompts = [_prompt_ids(model, p) for p in chunk]
        results = None
        for ev in model.stream(prompts, max_new_tokens=canvas, seed=seed + i, **overrides):
            if on_event is not None:
                on_event(ev, chunk)
            if type(ev).__name__ == "Done":
                results = ev.results
        for puzzle, res in zip(chunk, results):
            answer = sudoku.parse_answer(res.text or "")
            out.append({"puzzle": puzzle, "solution": answer, "steps": res.steps[0] if res.steps else 0,
                        "tokens_per_forward": res.tokens_per_forward})
    return out


def read_puzzle_file(path: Path) -> list[tuple[int, str | None, str | None]]:
    """(line number, puzzle or None, error or None) per non-empty line."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, sudoku.parse_grid(line), None))
        except ValueError as e:
            rows.append((n, None, str(e)))
    return rows


class GridView:
    """Terminal animation: the 9x9 grid as it denoises (givens bold, accepted cells green, re-noised dim)."""

    def __init__(self, model, console):
        from rich.live import Live

        self.model, self.console = model, console
        self.live = Live(console=console, auto_refresh=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)
        return False

    def __call__(self, ev, puzzles) -> None:
        from rich.text import Text

        if type(ev).__name__ != "Draft":
            return
        tok, puzzle = self.model.tokenizer, puzzles[0]
        text = Text(f"step {ev.step}\n")
        for cell in range(81):
            tid = int(ev.canvas[0, cell])
            ch = tok.decode([tid], skip_special_tokens=False) if tok else "?"
            ch = ch if len(ch) == 1 and ch.isdigit() else "·"
            if puzzle[cell] != "0":
                text.append(puzzle[cell] + " ", style="bold")
            elif bool(ev.accepted[0, cell]):
                text.append(ch + " ", style="bold green")
            else:
                text.append(ch + " ", style="dim red")
            if cell % 9 == 8:
                text.append("\n")
        self.live.update(text, refresh=True)


def cmd_solve(args) -> int:
    from ..checkpoint import load_model

    rows = read_puzzle_file(Path(args.file))  # before the (slower) model load
    model = load_model(args.model or default_model_path(), device=args.device)
    puzzles = [p for _, p, _ in rows if p is not None]
    animate = not args.json and sys.stdout.isatty()
    if animate:
        from rich.console import Console

        solved = []
        with GridView(model, Console()) as view:
            for i, p in enumerate(puzzles):  # the seeds --json uses too (puzzle i: seed + i)
                solved += solve_batch(model, [p], seed=args.seed + i, on_event=view)
    else:
        solved = solve_batch(model, puzzles, seed=args.seed)
    it = iter(solved)
    for n, puzzle, error in rows:
        if error is not None:
            rec = {"line": n, "error": error}
        else:
            rec = next(it)
        if args.json:
            print(json.dumps(rec))
        elif error is not None:
            print(f"line {n}: error: {error}")
        else:
            print(sudoku.format_grid(rec["solution"]) if len(rec["solution"]) == 81 else rec["solution"])
            ok = sudoku.check(rec["puzzle"], rec["solution"])["solved"]
            print(f"[{'solved' if ok else 'not solved'}; {rec['steps']} steps, "
                  f"{rec['tokens_per_forward']:.1f} tokens/forward]\n")
    return 0


def solve_ar(model, puzzles: list[str]) -> list[dict]:
    """The autoregressive baseline: greedy left-to-right decoding with the causal stack, one token per pass."""
    from ..ar import ar_generate

    out = []
    for p in puzzles:
        res = ar_generate(model, _prompt_ids(model, p), max_new_tokens=model.config.canvas_length)
        out.append({"puzzle": p, "solution": sudoku.parse_answer(res.text or ""), "steps": res.forwards,
                    "tokens_per_forward": 1.0})
    return out


def evaluate(model, n: int = 1000, seed: int = 424242, blanks=(30, 50), step_caps=(), batch_size: int = 32,
             autoregressive: bool = False, rng: str = "fast") -> dict:
    """Exact solve rate, cell accuracy, givens kept, steps and tokens/forward, overall and per blank bucket, on
    held-out generated puzzles (a seed range the training script never uses). `autoregressive` decodes left to
    right with the causal stack instead (the AR baseline); `rng` picks the diffusion sampler's random stream."""
    pairs = sudoku.generate_many(n, seed=seed, blanks=blanks)
    puzzles = [p for p, _ in pairs]

    def run(**overrides) -> dict:
        t0 = time.perf_counter()
        if autoregressive:
            res = solve_ar(model, puzzles)
        else:
            res = solve_batch(model, puzzles, batch_size=batch_size, rng=rng, **overrides)
        stats, buckets = _score(pairs, res), defaultdict(list)
        for (p, s), r in zip(pairs, res):
            buckets[sudoku.bucket(sudoku.blank_count(p))].append(((p, s), r))
        stats["buckets"] = {k: _score([x for x, _ in v], [y for _, y in v]) for k, v in sorted(buckets.items())}
        stats["seconds"] = time.perf_counter() - t0
        return stats

    out = {"n": n, "seed": seed, "blanks": list(blanks), "decoding": "autoregressive" if autoregressive else "diffusion",
           "default": run()}
    if not autoregressive:
        out["rng"] = rng
        out["default_steps"] = resolve_settings(model, None, {}).max_denoising_steps  # the cap of the "default" row
    out["step_caps"] = {} if autoregressive else {str(cap): run(max_denoising_steps=cap) for cap in step_caps}
    return out


def _score(pairs, results) -> dict:
    checks = [sudoku.check(p, r["solution"], s) for (p, s), r in zip(pairs, results)]
    n = max(1, len(checks))
    return {
        "solve_rate": sum(c["solved"] for c in checks) / n,
        "cell_accuracy": sum(c["n_correct"] for c in checks) / max(1, sum(c["n_blank"] for c in checks)),
        "givens_kept": sum(c["givens_kept"] for c in checks) / n,
        "mean_steps": sum(r["steps"] for r in results) / n,
        "tokens_per_forward": sum(r["tokens_per_forward"] for r in results) / n,
        "count": len(checks),
    }


def cmd_eval(args) -> int:
    from ..checkpoint import load_model

    model = load_model(args.model or default_model_path(), device=args.device)
    caps = [int(c) for c in args.step_caps.split(",") if c] if args.step_caps else []
    result = evaluate(model, n=args.n, seed=args.seed, step_caps=caps, autoregressive=args.ar)
    result["model"] = str(args.model or default_model_path())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    d = result["default"]
    print(f"solve rate {d['solve_rate']:.1%}  cell accuracy {d['cell_accuracy']:.1%}  givens kept "
          f"{d['givens_kept']:.1%}  mean steps {d['mean_steps']:.1f}  tokens/forward {d['tokens_per_forward']:.1f}")
    for k, b in d["buckets"].items():
        print(f"  blanks {k}: solve {b['solve_rate']:.1%}, cells {b['cell_accuracy']:.1%}, steps {b['mean_steps']:.1f}"
              f" (n={b['count']})")
    for cap, s in result["step_caps"].items():
        print(f"  step cap {cap}: solve {s['solve_rate']:.1%}, cells {s['cell_accuracy']:.1%}")
    return 0

