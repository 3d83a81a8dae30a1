"""Solving and evaluating Sudoku with a DiffusionGemma checkpoint (`dgemma sudoku solve|eval|demo`).

A Sudoku model carries a `task.json` (`sudoku.task_info`): the grid size and the prompt template. The bundled
models (one per grid size, `BUNDLED_MODELS`) ship inside the package; `solve` picks the one for each puzzle's size.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

from ..ar import ar_generate
from ..checkpoint.load import load_model
from ..display import LiveView
from ..generate import Verifier, resolve_settings
from . import sudoku

MODELS = Path(__file__).resolve().parent.parent / "models"
BUNDLED = MODELS / "sudoku"  # the 9x9 model (also `dgemma serve`'s default)
BUNDLED_MODELS = {9: BUNDLED, 6: MODELS / "sudoku6"}
DEMO_SEED = 2026  # demo puzzles: held-out seeds the training script never uses


def default_model_path(size: int = 9) -> Path:
    """The bundled model for an n x n grid (`ValueError` naming --model when there is none)."""
    path = BUNDLED if size == 9 else BUNDLED_MODELS.get(size)
    if path is None or not (path / "config.json").is_file():
        where = f" at {path}" if path is not None else ""
        raise ValueError(f"no bundled {size}x{size} Sudoku model{where}; pass --model DIR "
                         "(train one with scripts/train_sudoku.py)")
    return path


@dataclass(frozen=True)
class TaskSpec:
    """How a model frames a puzzle: the grid side and the prompt template (``{puzzle}`` is replaced)."""

    size: int
    template: str

    def prompt(self, puzzle: str) -> str:
        p = sudoku.parse_grid(puzzle, self.size)
        return self.template.replace("{puzzle}", p)


def task_spec(model) -> TaskSpec:
    """The model's `task.json` when it has one; otherwise the grid whose digits (plus an end token) fill its canvas
    (9x9 when none does) with `sudoku.prompt_text`'s layout."""
    source = model.source  # the checkpoint directory (load_model), or a "random:..." label
    info_file = Path(source) / "task.json" if isinstance(source, str) and source else None
    if info_file is not None and info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
            size = int(info.get("size", 9))
            template = info["prompt_template"]
            if not isinstance(template, str) or "{puzzle}" not in template:
                raise ValueError("prompt_template must be a string holding {puzzle}")
            sudoku.shape_of(size)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{info_file}: not a valid Sudoku task file ({e})") from None
        return TaskSpec(size, template)
    cells = model.config.canvas_length - 1
    size = sudoku.SHAPES[cells].n if cells in sudoku.SHAPES else 9
    return TaskSpec(size, sudoku.task_info(size)["prompt_template"])


def _prompt_ids(model, puzzle: str, spec: TaskSpec | None = None) -> list[int]:
    return model.tokenizer.encode((spec or task_spec(model)).prompt(puzzle))


def sudoku_verifier(model, puzzles: list[str]) -> Verifier:
    """The Sudoku rules as a denoising verifier for a batch of puzzles (row b of the canvas answers puzzles[b]):
    among the positions handed to it, a cell is rejected when it holds no digit, changes a given, or repeats a
    digit that its row, column or box already holds (counting the givens and the other positions handed in)."""
    spec = task_spec(model)
    n, cells = spec.size, spec.size * spec.size
    digit = torch.zeros(model.config.vocab_size, dtype=torch.long)  # token id -> digit (0: not a digit)
    for d in range(1, n + 1):
        ids = model.tokenizer.encode(str(d))
        if len(ids) != 1:
            raise ValueError(f"the tokenizer spells digit {d} as {len(ids)} tokens; the verifier needs one")
        digit[ids[0]] = d
    givens = torch.tensor([[int(ch) for ch in sudoku.parse_grid(p, n)] for p in puzzles], dtype=torch.long)
    groups = torch.tensor(sudoku.units(n), dtype=torch.long)  # [3n, n]
    of_cell = torch.stack([(groups == c).any(dim=1).nonzero().flatten() for c in range(cells)])  # [cells, 3]

    def verify(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = digit[tokens[:, :cells].cpu()]
        held = positions[:, :cells].cpu()
        given = givens > 0
        value = torch.where(given, givens, torch.where(held, d, 0))  # the grid as the step would leave it
        counts = torch.nn.functional.one_hot(value, n + 1)[:, groups].sum(dim=2)  # [B, 3n, n + 1]
        repeated = (counts[:, of_cell] > 1).any(dim=2)  # [B, cells, n + 1]: digit repeats in one of the cell's units
        clash = repeated.gather(2, value[:, :, None]).squeeze(2) & (value > 0)
        reject = held & ((d == 0) | (given & (d != givens)) | (~given & clash))
        out = torch.zeros_like(positions)
        out[:, :cells] = reject.to(positions.device)
        return out

    return verify


def solve_batch(model, puzzles: list[str], seed: int = 0, batch_size: int = 16, on_event=None,
                verify: bool = False, **overrides) -> list[dict]:
    """Solve puzzles (strings of the model's grid size, 0 = blank); one result dict per puzzle. Row i of the list
    is seeded with seed + i whatever the batching. `verify`: decode with `sudoku_verifier` (cells that break a
    rule are re-noised instead of accepted)."""
    out = []
    spec = task_spec(model)
    canvas = model.config.canvas_length
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        prompts = [_prompt_ids(model, p, spec) for p in chunk]
        results = None
        if verify:
            overrides["verifier"] = sudoku_verifier(model, chunk)
        for ev in model.stream(prompts, max_new_tokens=canvas, seed=seed + i, **overrides):
            if on_event is not None:
                on_event(ev, chunk)
            if type(ev).__name__ == "Done":
                results = ev.results
        for puzzle, res in zip(chunk, results):
            answer = sudoku.parse_answer(res.text or "", spec.size)
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


def grid_text(puzzle: str, cells: list[str], accepted: list[bool] | None = None, title: str = ""):
    """A rich Text of the grid: givens bold, accepted cells green, the rest dim red; box rules between bands and
    stacks."""
    shape = sudoku.shape_of(puzzle)
    n, br, bc = shape.n, shape.box_rows, shape.box_cols
    text = Text(f"{title}\n" if title else "")
    for r in range(n):
        for c in range(n):
            i = r * n + c
            if c and c % bc == 0:
                text.append("| ", style="dim")
            if puzzle[i] != "0":
                text.append(puzzle[i] + " ", style="bold")
            elif accepted is None or accepted[i]:
                text.append(cells[i] + " ", style="bold green")
            else:
                text.append(cells[i] + " ", style="dim red")
        text.append("\n")
        if r % br == br - 1 and r < n - 1:
            text.append("+".join("-" * (2 * bc + (0 if k in (0, n - bc) else 1)) for k in range(0, n, bc)) + "\n",
                        style="dim")
    return text


class GridView(LiveView):
    """Terminal animation: the grid as it denoises (givens bold, accepted cells green, re-noised dim)."""

    def __init__(self, model, console, title: str = "", delay: float = 0.0):
        super().__init__(console)
        self.model, self.console, self.title, self.delay = model, console, title, delay

    def __call__(self, ev, puzzles) -> None:
        if type(ev).__name__ != "Draft":
            return
        tok, puzzle = self.model.tokenizer, puzzles[0]
        cells = []
        for cell in range(len(puzzle)):
            ch = tok.decode([int(ev.canvas[0, cell])], skip_special_tokens=False) if tok else "?"
            cells.append(ch if len(ch) == 1 and ch.isdigit() else "·")
        accepted = [bool(ev.accepted[0, cell]) for cell in range(len(puzzle))]
        title = f"{self.title}step {ev.step}"
        self.live.update(grid_text(puzzle, cells, accepted, title), refresh=True)
        if self.delay:
            time.sleep(self.delay)


def _load(args, size: int, cache: dict):
    """The model for a grid size: --model for every size when given, else the bundled one (loaded once)."""
    key = "model" if args.model else size
    if key not in cache:
        cache[key] = load_model(args.model or default_model_path(size), device=args.device)
    return cache[key]


def cmd_solve(args) -> int:
    rows = read_puzzle_file(Path(args.file))  # before the (slower) model load
    models: dict = {}
    if args.model:
        spec = task_spec(_load(args, 9, models))
        for k, (n, p, err) in enumerate(rows):  # with one model, a puzzle of another size is that line's error
            if p is not None and len(p) != spec.size ** 2:
                rows[k] = (n, None, f"this model solves {spec.size}x{spec.size} puzzles ({spec.size ** 2} cells), "
                                    f"got {len(p)} cells")
    by_size: dict[int, list[int]] = defaultdict(list)  # grid side -> indexes into rows
    for k, (_, p, _) in enumerate(rows):
        if p is not None:
            by_size[sudoku.shape_of(p).n].append(k)
    animate = not args.json and sys.stdout.isatty()
    results: dict[int, dict] = {}
    for size, ks in by_size.items():
        model = _load(args, size, models)
        puzzles = [rows[k][1] for k in ks]
        if animate:
            solved = []
            with GridView(model, Console()) as view:
                for i, p in enumerate(puzzles):  # the seeds --json uses too (puzzle i of a size: seed + i)
                    solved += solve_batch(model, [p], seed=args.seed + i, on_event=view, verify=args.verify)
        else:
            solved = solve_batch(model, puzzles, seed=args.seed, verify=args.verify)
        results.update(zip(ks, solved))
    for k, (n, puzzle, error) in enumerate(rows):
        rec = {"line": n, "error": error} if error is not None else results[k]
        if args.json:
            print(json.dumps(rec))
        elif error is not None:
            print(f"line {n}: error: {error}")
        else:
            sol = rec["solution"]
            print(sudoku.format_grid(sol, rules=True) if len(sol) == len(puzzle) else sol)
            ok = sudoku.check(rec["puzzle"], sol)["solved"]
            print(f"[{'solved' if ok else 'not solved'}; {rec['steps']} steps, "
                  f"{rec['tokens_per_forward']:.1f} tokens/forward]\n")
    return 0


def demo_puzzles() -> list[tuple[str, str]]:
    """The demo's puzzles: a 6x6 and a 9x9 one from the easier half of the blank range, from held-out seeds."""
    six = sudoku.generate_many(1, seed=DEMO_SEED, blanks=(12, 14), size=6)[0]
    nine = sudoku.generate_many(1, seed=DEMO_SEED, blanks=(30, 34), size=9)[0]
    return [six, nine]


def held_out_text(model) -> str:
    """What the model's task.json says it solves on held-out puzzles (so the demo's one puzzle is read in context)."""
    source = model.source
    try:
        held = json.loads((Path(source) / "task.json").read_text(encoding="utf-8"))["held_out"]
        return (f", which solves {100 * held['solved']:.1f}% of {held['puzzles']} held-out puzzles "
                f"({held['blanks'][0]}-{held['blanks'][1]} blanks)")
    except (OSError, TypeError, KeyError, IndexError, ValueError):
        return ""


def cmd_demo(args) -> int:
    """Solve a 6x6 and a 9x9 puzzle with the bundled models, animating the grid as it denoises."""
    console = Console()
    animate = console.is_terminal and not args.no_animation
    models: dict = {}
    for puzzle, solution in demo_puzzles():
        size = sudoku.shape_of(puzzle).n
        model = _load(args, size, models)
        blanks = puzzle.count("0")
        console.print(f"[bold]{size}x{size} puzzle[/bold] ({blanks} blanks), model {default_model_path(size).name}"
                      f"{held_out_text(model)}:")
        console.print(grid_text(puzzle, ["." if ch == "0" else ch for ch in puzzle]))
        if animate:
            with GridView(model, console, title=f"{size}x{size} denoising: ", delay=args.delay) as view:
                rec = solve_batch(model, [puzzle], seed=args.seed, on_event=view)[0]
        else:
            rec = solve_batch(model, [puzzle], seed=args.seed)[0]
        answer = rec["solution"]
        result = sudoku.check(puzzle, answer, solution)
        if len(answer) == len(puzzle):
            console.print(grid_text(puzzle, list(answer), title="answer:"))
        else:
            console.print("answer: (the model did not write a full grid)")
        verdict = "[bold green]solved[/bold green]" if result["solved"] else "[bold red]not solved[/bold red]"
        console.print(f"{verdict}: {result['n_correct']}/{blanks} blanks right in {rec['steps']} denoising steps "
                      f"({rec['tokens_per_forward']:.1f} tokens per forward pass)\n")
    return 0


def solve_ar(model, puzzles: list[str]) -> list[dict]:
    """The autoregressive baseline: greedy left-to-right decoding with the causal stack, one token per pass."""
    spec = task_spec(model)
    out = []
    for p in puzzles:
        res = ar_generate(model, _prompt_ids(model, p, spec), max_new_tokens=model.config.canvas_length)
        out.append({"puzzle": p, "solution": sudoku.parse_answer(res.text or "", spec.size), "steps": res.forwards,
                    "tokens_per_forward": 1.0})
    return out


def evaluate(model, n: int = 1000, seed: int = 424242, blanks=None, step_caps=(), batch_size: int = 32,
             autoregressive: bool = False, rng: str = "fast", verify: bool = False) -> dict:
    """Exact solve rate, cell accuracy, givens kept, steps and tokens/forward, overall and per blank bucket, on
    held-out generated puzzles of the model's grid size (a seed range the training script never uses; blanks:
    `sudoku.default_blanks`). `autoregressive` decodes left to right with the causal stack instead (the AR
    baseline); `rng` picks the diffusion sampler's random stream; `verify` adds a "verified" entry: the same
    puzzles decoded with `sudoku_verifier` (the model alone stays the "default" entry)."""
    size = task_spec(model).size
    blanks = tuple(blanks) if blanks is not None else sudoku.default_blanks(size)
    pairs = sudoku.generate_many(n, seed=seed, blanks=blanks, size=size)
    puzzles = [p for p, _ in pairs]
    edges = sudoku.bucket_edges(size)

    def run(**overrides) -> dict:
        t0 = time.perf_counter()
        if autoregressive:
            res = solve_ar(model, puzzles)
        else:
            res = solve_batch(model, puzzles, batch_size=batch_size, rng=rng, **overrides)
        stats, buckets = score(pairs, res), defaultdict(list)
        for (p, s), r in zip(pairs, res):
            buckets[sudoku.bucket(sudoku.blank_count(p), edges)].append(((p, s), r))
        stats["buckets"] = {k: score([x for x, _ in v], [y for _, y in v]) for k, v in sorted(buckets.items())}
        stats["seconds"] = time.perf_counter() - t0
        return stats

    out = {"n": n, "seed": seed, "size": size, "blanks": list(blanks),
           "decoding": "autoregressive" if autoregressive else "diffusion", "default": run()}
    if not autoregressive:
        out["rng"] = rng
        out["default_steps"] = resolve_settings(model, None, {}).max_denoising_steps  # the cap of the "default" row
    out["step_caps"] = {} if autoregressive else {str(cap): run(max_denoising_steps=cap) for cap in step_caps}
    if verify and not autoregressive:
        out["verified"] = run(verify=True)
    return out


def score(pairs, results) -> dict:
    """Solve rate, blank-cell accuracy, givens kept, mean steps, blanks and tokens per forward pass of `results`
    (solve_batch rows) against `pairs` (puzzle, solution)."""
    checks = [sudoku.check(p, r["solution"], s) for (p, s), r in zip(pairs, results)]
    n = max(1, len(checks))
    return {
        "solve_rate": sum(c["solved"] for c in checks) / n,
        "cell_accuracy": sum(c["n_correct"] for c in checks) / max(1, sum(c["n_blank"] for c in checks)),
        "givens_kept": sum(c["givens_kept"] for c in checks) / n,
        "mean_steps": sum(r["steps"] for r in results) / n,
        "mean_blanks": sum(c["n_blank"] for c in checks) / n,
        "tokens_per_forward": sum(r["tokens_per_forward"] for r in results) / n,
        "count": len(checks),
    }


def cmd_eval(args) -> int:
    size = getattr(args, "size", None) or 9
    path = args.model or default_model_path(size)
    model = _load(args, size, {})
    caps = [int(c) for c in args.step_caps.split(",") if c] if args.step_caps else []
    result = evaluate(model, n=args.n, seed=args.seed, step_caps=caps, autoregressive=args.ar, verify=args.verify)
    result["model"] = str(path)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    d = result["default"]
    print(f"solve rate {d['solve_rate']:.1%}  cell accuracy {d['cell_accuracy']:.1%}  givens kept "
          f"{d['givens_kept']:.1%}  mean steps {d['mean_steps']:.1f} (mean blanks {d['mean_blanks']:.1f})  "
          f"tokens/forward {d['tokens_per_forward']:.1f}")
    for k, b in d["buckets"].items():
        print(f"  blanks {k}: solve {b['solve_rate']:.1%}, cells {b['cell_accuracy']:.1%}, steps {b['mean_steps']:.1f}"
              f" (n={b['count']})")
    for cap, s in result["step_caps"].items():
        print(f"  step cap {cap}: solve {s['solve_rate']:.1%}, cells {s['cell_accuracy']:.1%}")
    if "verified" in result:
        v = result["verified"]
        print(f"verified decoding: solve rate {v['solve_rate']:.1%}  cell accuracy {v['cell_accuracy']:.1%}  givens "
              f"kept {v['givens_kept']:.1%}  mean steps {v['mean_steps']:.1f}")
    return 0
