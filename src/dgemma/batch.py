"""`dgemma batch`: offline generation over a JSONL file of prompts, in this process or over Ray Data.

Input, one JSON object per line: "prompt" (text), "messages" (chat turns, wrapped in the chat template) or
"prompt_ids" (token ids); optional "id" (echoed back), "seed", "max_new_tokens" (rounded up to whole canvases) and
"diffusion" (the server's per-request sampler settings). Blank lines are skipped.

Output, one JSON object per input line and in input order: {"line", "id", "text", "ids", "finish_reason", "seed",
"steps", "tokens_per_forward", "prompt_tokens"}, or {"line", "id", "error"} for a line that cannot run; an error
never stops the run. A line without a seed gets one derived from --seed and its line number, so every row is
seeded and reproducible: rows run in the "fast" sampler mode, where a row's tokens do not depend on its batch
neighbours, so the output is the same in-process or on Ray, in any batch size, fresh or resumed.

Resumable: the output is appended batch by batch (flushed and fsynced); a rerun keeps the complete lines already
written (a torn last line is cut off) and continues after the last line they cover.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .checkpoint.load import load_model
from .generate import generate
from .prefix_cache import PrefixCache
from .requests import Caps, DiffusionSettings, PreparedRequest, RequestError, check_ids
from .requests import prepare as prepare_request

SEED_MASK = (1 << 62) - 1
SIDECAR_SUFFIX = ".dgemma-batch.json"  # next to the output: which input and settings it belongs to
_ERROR_KEY = "__dgemma_line_error__"  # input_lines' stand-in for a line it could not decode


@dataclass(frozen=True)
class LineLimits:
    """Per-line bounds, checked before the line costs anything (a line over them gets an error record)."""

    max_line_chars: int = 1 << 20  # characters of one input line, before it is parsed or tokenized
    max_new_tokens: int = 4096  # a line's max_new_tokens (and the model's default) at most
    max_denoising_steps: int = 256  # a line's diffusion.max_denoising_steps (and the model's default) at most

    def validate(self) -> None:
        for name in ("max_line_chars", "max_new_tokens", "max_denoising_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class BatchOptions:
    input: str
    output: str
    model: str
    seed: int = 0  # base of the per-line seeds of lines that give none
    max_batch: int = 8  # prompts per batched generation (per actor with Ray)
    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch threads per process / actor
    progress: bool = True
    ray: bool = False
    ray_address: str | None = None  # None: a local cluster (or the one RAY_ADDRESS names)
    actors: int = 1  # model replicas on Ray, one model per actor
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    ray_init: dict[str, Any] = field(default_factory=dict)  # extra ray.init arguments (tests: small limits)
    limits: LineLimits = field(default_factory=LineLimits)
    prefix_cache_gib: float | None = None  # a PrefixCache of this budget per process / actor (None: no cache)

    def validate(self) -> None:
        self.limits.validate()
        if self.prefix_cache_gib is not None and not 0 <= self.prefix_cache_gib < math.inf:
            raise ValueError(f"--prefix-cache-gib must be a finite number >= 0, got {self.prefix_cache_gib}")
        if self.max_batch < 1 or self.actors < 1:
            raise ValueError("--max-batch and --actors must be at least 1")
        if self.actor_cpus < 0 or self.actor_gpus < 0:
            raise ValueError("--actor-cpus and --actor-gpus must be non-negative")
        if not 0 <= self.seed <= SEED_MASK:
            raise ValueError(f"--seed must be in [0, 2**62), got {self.seed}")
        if not Path(self.input).is_file():
            raise ValueError(f"--input {self.input}: no such file")
        out = Path(self.output)
        if out.resolve() == Path(self.input).resolve() or (out.exists() and os.path.samefile(self.input, out)):
            raise ValueError(f"--output {out} is the input file (or a link to it); choose another path")


def line_seed(base: int, line: int) -> int:
    """The seed of a line that gives none: distinct per line, fixed by --seed."""
    return (base * 1_000_003 + line) & SEED_MASK


class LineError(ValueError):
    """A problem with one input line (reported in the output, the run goes on)."""


@dataclass
class Task:
    line: int
    id: Any
    request: PreparedRequest  # tasks with equal request keys share a batched generation


def _prompt_ids(model, obj: dict) -> list[int]:
    tok = model.tokenizer
    given = [k for k in ("prompt", "messages", "prompt_ids") if k in obj]
    if len(given) != 1:
        raise LineError('give exactly one of "prompt", "messages" or "prompt_ids"')
    if "prompt_ids" in obj:
        try:
            return check_ids(model, obj["prompt_ids"], "prompt_ids")
        except RequestError as e:
            raise LineError(f'"prompt_ids": {e}') from None
    if tok is None:
        raise LineError('this model has no tokenizer; give "prompt_ids"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise LineError('"prompt" must be a string')
        return tok.encode(obj["prompt"])
    messages = obj["messages"]
    if tok.chat_template is None:
        raise LineError('this model has no chat template; give "prompt"')
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise LineError('"messages" must be a non-empty list of {"role": str, "content": str}')
    try:
        return tok.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
    except ValueError as e:
        raise LineError(str(e)) from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise LineError(f"number {text[:40]} is out of range (JSON numbers must be finite)")
    return value


def _no_constant(name: str):
    raise LineError(f"{name} is not JSON (numbers must be finite)")


def parse_line(text: str) -> Any:
    """One JSONL line as strict JSON: finite numbers only, a bounded nesting depth (Python's parser's)."""
    if text.startswith(_ERROR_KEY):
        raise LineError(text[len(_ERROR_KEY):].strip())
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise LineError("nested too deeply") from None
    except ValueError as e:
        if isinstance(e, LineError):
            raise
        raise LineError("not valid JSON") from None


def prepare(model, line: int, text: str, base_seed: int, limits: LineLimits | None = None) -> Task:
    """Parse and check one input line; raises LineError naming the problem."""
    limits = limits or LineLimits()
    if len(text) > limits.max_line_chars:
        raise LineError(f"the line has {len(text)} characters; the limit is {limits.max_line_chars} "
                        f"(--max-line-chars)")
    obj = parse_line(text)
    if not isinstance(obj, dict):
        raise LineError("expected a JSON object")
    known = {"id", "prompt", "messages", "prompt_ids", "seed", "max_new_tokens", "diffusion"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise LineError(f"unknown field(s) {unknown}; known: {sorted(known)}")
    ids = _prompt_ids(model, obj)
    if not ids:
        raise LineError("the prompt is empty")
    seed = obj.get("seed", line_seed(base_seed, line))
    if seed is None:
        raise LineError('"seed" must be an integer in [0, 2**63)')
    try:
        settings = DiffusionSettings.model_validate(obj.get("diffusion") or {}).overrides()
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise LineError(f"diffusion.{where}: {err.get('msg')}" if where else f"diffusion: {err.get('msg')}") from None
    caps = Caps(limits.max_new_tokens, limits.max_denoising_steps, "max_new_tokens")
    try:
        request = prepare_request(model, ids, max_new_tokens=obj.get("max_new_tokens"), settings=settings, seed=seed,
                                  caps=caps)
    except RequestError as e:
        raise LineError(f'"{e.param}": {e}' if e.param in ("seed", "max_new_tokens") else str(e)) from None
    return Task(line, obj.get("id"), request)


def _record(task: Task, result) -> dict:
    return {"line": task.line, "id": task.id, "text": result.text, "ids": result.ids,
            "finish_reason": result.finish_reason, "seed": task.request.seed, "steps": result.steps,
            "tokens_per_forward": result.tokens_per_forward, "prompt_tokens": len(task.request.prompt_ids)}


def _error(line: int, text: str, message: str, limits: LineLimits) -> dict:
    obj_id = None
    if len(text) <= limits.max_line_chars:
        try:
            obj = parse_line(text)
            obj_id = obj.get("id") if isinstance(obj, dict) else None
        except LineError:
            pass
    return {"line": line, "id": obj_id, "error": message}


def run_lines(model, lines: list[tuple[int, str]], base_seed: int, limits: LineLimits | None = None,
              prefix_cache=None) -> list[dict]:
    """Generate for a chunk of (line number, text) pairs; one output record per pair, in the same order. Lines with
    equal settings share one batched generation; `prefix_cache` (a PrefixCache) prefills shared prefixes once."""
    limits = limits or LineLimits()
    records: dict[int, dict] = {}
    groups: dict[tuple, list[Task]] = {}
    for line, text in lines:
        try:
            task = prepare(model, line, text, base_seed, limits)
        except LineError as e:
            records[line] = _error(line, text, str(e), limits)
            continue
        groups.setdefault(task.request.key, []).append(task)
    for tasks in groups.values():
        try:
            results = _generate(model, tasks, prefix_cache)
        except Exception:  # noqa: BLE001 - find the row at fault: rerun the group row by row
            results = []
            for task in tasks:
                try:
                    results.extend(_generate(model, [task], prefix_cache))
                except Exception as e:  # noqa: BLE001 - reported on the line, the run goes on
                    results.append(e)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                records[task.line] = {"line": task.line, "id": task.id, "error": f"{type(result).__name__}: {result}"}
            else:
                records[task.line] = _record(task, result)
    return [records[line] for line, _ in lines]


def _generate(model, tasks: list[Task], prefix_cache=None) -> list:
    results = generate(model, [t.request.prompt_ids for t in tasks], settings=tasks[0].request.gen,
                       seed=[t.request.seed for t in tasks], rng="fast", prefix_cache=prefix_cache)
    return results if isinstance(results, list) else [results]


# -- files ----------------------------------------------------------------------------------------------------------
def input_lines(path: Path, after: int = 0) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines after line `after`. A line that is not UTF-8 comes as a
    stand-in that `prepare` reports (nothing is silently replaced)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n <= after or not raw.strip():
                continue
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, f"{_ERROR_KEY} not valid UTF-8 (byte {e.start} of the line)"


def resume_point(path: Path) -> int:
    """The input line the complete output lines reach (0: none). A torn or unreadable tail is cut off, so the
    file holds only whole records before appending."""
    if not path.is_file():
        return 0
    done, keep = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                done = int(json.loads(raw)["line"])
            except (ValueError, KeyError, TypeError):
                break
            keep += len(raw)
    if keep != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done


def sidecar(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def _identity(opts: BatchOptions) -> dict[str, Any]:
    """What makes an output this run's: the input's content and the settings that decide every record."""
    digest = hashlib.sha256()
    with open(opts.input, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"format": "dgemma batch output", "input_sha256": digest.hexdigest(),
            "model": str(Path(opts.model).resolve()), "seed": opts.seed, "dtype": opts.dtype}


def claim_output(opts: BatchOptions) -> None:
    """Refuse an output that is not recognisably this command's own for this input, before anything is cut or
    appended: an existing non-empty file without the sidecar, or one whose sidecar names another input or other
    settings. A new output gets its sidecar (atomically) first."""
    outp, side = Path(opts.output), sidecar(Path(opts.output))
    ident = _identity(opts)
    if side.is_file():
        try:
            recorded = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{side}: unreadable ({e}); remove it and {outp} to start over") from None
        differ = [k for k, v in ident.items() if not isinstance(recorded, dict) or recorded.get(k) != v]
        if differ:
            raise ValueError(f"{outp} holds the output of another dgemma batch run ({', '.join(differ)} differ, "
                             f"see {side}); choose another --output, or remove both files to start over")
        return
    if outp.exists() and (not outp.is_file() or outp.stat().st_size > 0):
        raise ValueError(f"{outp} exists and is not a dgemma batch output (no {side.name} beside it); it is left "
                         f"untouched: choose another --output")
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(ident, indent=2) + "\n", encoding="utf-8")
    tmp.replace(side)


def _write(out, records: list[dict]) -> None:
    out.write("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records))
    out.flush()
    os.fsync(out.fileno())


def _chunks(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    for item in lines:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_batch(opts: BatchOptions) -> dict:
    """Run (or resume) a batch; returns a summary: lines done before, written now, errors among them."""
    opts.validate()
    inp, outp = Path(opts.input), Path(opts.output)
    outp.parent.mkdir(parents=True, exist_ok=True)
    claim_output(opts)
    resumed_at = resume_point(outp)
    total = before = 0
    for n, _ in input_lines(inp):
        total += 1
        before += n <= resumed_at
    pending = input_lines(inp, resumed_at)

    progress = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=not opts.progress)
    written = errors = 0
    with progress, open(outp, "a", encoding="utf-8") as out:
        bar = progress.add_task("batch", total=total, completed=before, errors=0)
        source = _ray_records(opts, pending) if opts.ray else _local_records(opts, pending)
        for records in source:
            _write(out, records)
            written += len(records)
            errors += sum("error" in r for r in records)
            progress.update(bar, advance=len(records), errors=errors)
    return {"lines": total, "resumed_after": before, "written": written, "errors": errors, "output": str(outp)}


def _local_records(opts: BatchOptions, pending) -> Iterator[list[dict]]:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = load_model(opts.model, dtype=opts.dtype, device=opts.device)
    cache = _prefix_cache(opts.prefix_cache_gib)
    for chunk in _chunks(pending, opts.max_batch):
        yield run_lines(model, chunk, opts.seed, opts.limits, cache)


def _prefix_cache(gib: float | None) -> PrefixCache | None:
    return None if gib is None else PrefixCache.from_gib(gib)


# -- Ray Data ----------------------------------------------------------------------------------------------------
class BatchWorker:
    """A Ray Data actor: loads one model, generates for batches of lines (columns "line" and "text")."""

    def __init__(self, model: str, dtype: str | None, device: str, threads: int, seed: int,
                 limits: LineLimits | None = None, prefix_cache_gib: float | None = None):
        torch.set_num_threads(threads)
        self.model = load_model(model, dtype=dtype, device=device)
        self.seed = seed
        self.limits = limits or LineLimits()
        self.prefix_cache = _prefix_cache(prefix_cache_gib)

    def __call__(self, batch: dict) -> dict:
        lines = [(int(n), str(t)) for n, t in zip(batch["line"], batch["text"], strict=True)]
        records = run_lines(self.model, lines, self.seed, self.limits, self.prefix_cache)
        return {"line": [r["line"] for r in records], "record": [json.dumps(r, ensure_ascii=False) for r in records]}


def _ray_records(opts: BatchOptions, pending) -> Iterator[list[dict]]:
    import ray  # optional (pip install dgemma[ray])

    items = [{"line": n, "text": t} for n, t in pending]
    if not items:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.ray_address, **opts.ray_init)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output in input order, streamed as batches finish
        ctx.enable_progress_bars = False  # dgemma's own bar counts lines
        threads = opts.threads or max(1, int(opts.actor_cpus))
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // opts.max_batch)))
        out = ds.map_batches(BatchWorker, batch_size=opts.max_batch, batch_format="numpy",
                             fn_constructor_kwargs={"model": opts.model, "dtype": opts.dtype, "device": opts.device,
                                                    "threads": threads, "seed": opts.seed,
                                                    "limits": opts.limits,
                                                    "prefix_cache_gib": opts.prefix_cache_gib},
                             concurrency=opts.actors, num_cpus=opts.actor_cpus,
                             num_gpus=opts.actor_gpus)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(r) for r in batch["record"]]
    finally:
        if started:
            ray.shutdown()
