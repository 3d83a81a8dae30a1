"""The `dgemma` command line."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from rich.console import Console

from . import info
from .batch import BatchOptions, LineLimits, run_batch
from .bench import constrained as bench_constrained
from .bench import fullsize as bench_fullsize
from .bench import run as bench_run
from .bench import vision as bench_vision
from .bench.measure import ROUTINGS
from .checkpoint.load import load_model
from .checkpoint.quantize import quantize_checkpoint, random_quantized_checkpoint
from .checkpoint.write import write_random_checkpoint
from .config import DIFFUSION_SETTINGS, ConfigError, read_json
from .constraints import CompileLimits, Constraint
from .display import CanvasView
from .generate import Commit, Done, Draft, stream
from .images import chat_prompt, text_prompt
from .limits import ConnectionLimits, Limits
from .presets import PRESETS
from .quant.qtensor import QuantError
from .requests import Caps, prepare
from .serve import create_app, make_server
from .tasks import sudoku_run
from .tasks.sudoku_run import default_model_path
from .tokenizer import IncrementalText
from .train import TrainConfig, finetune

# TrainConfig fields that `dgemma finetune` takes as --flags (type and default from the dataclass)
TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip", "lora_rank", "lora_alpha",
               "sc_prob", "t_min", "ar_weight", "diffusion_weight", "save_every", "log_every", "seed", "max_line_chars")
# flag -> (generation_config name, type), derived from the one declaration of the diffusion settings
GEN_FLAGS = {"--" + name.replace("_", "-"): (name, s.kind) for name, s in DIFFUSION_SETTINGS.items()}


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def _eos(text: str) -> int | list[int]:
    ids = _ids(text)
    return ids[0] if len(ids) == 1 else ids


def _text_arg(value: str) -> str:
    """A flag's text, or a file's contents for @PATH."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def constraint_args(args) -> dict:
    """--regex / --json-schema / --choice / --template as keywords of generate.stream."""
    out = {}
    if args.regex is not None:
        out["regex"] = _text_arg(args.regex)
    if args.json_schema is not None:
        out["json_schema"] = _text_arg(args.json_schema)
    if args.choice:
        out["choice"] = args.choice
    if args.template is not None:
        out["template"] = _text_arg(args.template)
    return out


def add_compile_flags(parser) -> None:
    """--compile-seconds / --compile-memory-mb / --compile-states, derived from `CompileLimits`' fields."""
    for f in fields(CompileLimits):
        if "help" in f.metadata:
            m = f.metadata
            parser.add_argument(CompileLimits.flag_name(f.name), dest="compile_" + f.name, type=m["kind"],
                                default=None, help=f"{m['help']}; past it the constraint is refused, naming the part "
                                f"of the schema that makes most of it (default: ${m['env']}, else {m['default']:g})")


def compile_limits(args) -> CompileLimits:
    """The compile-limit flags (unset ones: CompileLimits' defaults), checked."""
    given = {f.name: getattr(args, "compile_" + f.name, None) for f in fields(CompileLimits)}
    limits = CompileLimits(**{k: v for k, v in given.items() if v is not None})
    limits.validate()
    return limits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="Run and inspect DiffusionGemma block-diffusion models.")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (or ids) from a prompt")
    g.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json)")
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids, e.g. 5,17,3")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template as a user turn")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable, in order; animated images: the first frame). With "
                   "--chat the images open the user turn; in a raw --prompt each <|image|> marks the next image's "
                   "place (none: the images go first); with --prompt-ids the ids must already hold begin-of-image, "
                   "N image tokens and end-of-image per image")
    g.add_argument("--max-soft-tokens", type=int, default=None, choices=(70, 140, 280, 560, 1120),
                   help="soft tokens per image (default: the checkpoint's processor config, else 280)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="rounded up to whole canvases")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--rng", default="fast", choices=["fast", "reference"],
                   help="fast (default): fused sampler, per-row streams; reference: draws exactly as transformers")
    g.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per encoder pass (default 1024; memory grows with chunk x prompt)")
    for flag, (name, typ) in GEN_FLAGS.items():
        g.add_argument(flag, type=typ, default=None, choices=DIFFUSION_SETTINGS[name].choices or None,
                       help=f"{DIFFUSION_SETTINGS[name].help} (default: the model's)")
    g.add_argument("--eos-token-id", type=_eos, default=None, help="EOS id(s), comma-separated")
    con = g.add_mutually_exclusive_group()
    con.add_argument("--regex", default=None, help="the output fully matches this regex (@FILE: read it from a file)")
    con.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="the output is JSON valid under this schema (JSON text, or @FILE)")
    con.add_argument("--choice", action="append", default=None, metavar="TEXT",
                     help="the output is one of these (repeat the flag per choice)")
    con.add_argument("--template", default=None,
                     help="infill: fixed text with holes {{hole}}, {{hole:N}}, {{hole:MIN-MAX}}, "
                     "{{hole:MIN-MAX:REGEX}} (N in tokens; @FILE: read it from a file)")
    add_compile_flags(g)
    g.add_argument("--json", action="store_true", help='print {"ids", "tokens_per_forward", "steps"} as JSON')
    g.add_argument("--stats", action="store_true", help="with --json: add seed, timings, finish reason and text")
    g.add_argument("--show-canvas", action="store_true", help="watch the canvas denoise live")

    i = sub.add_parser("info", help="describe a checkpoint: parameters, layers, experts, bytes per dtype")
    i.add_argument("--model", required=True)
    i.add_argument("--json", action="store_true")

    r = sub.add_parser("random-checkpoint", help="write a random DiffusionGemma checkpoint with a byte tokenizer")
    r.add_argument("out", help="output directory (must not exist or be empty, unless --force)")

    r.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--std", type=float, default=0.02, help="weight init standard deviation")
    r.add_argument("--config", default=None, help="use this config.json (e.g. one transformers saved) instead of "
                                                  "the preset's")
    r.add_argument("--force", action="store_true", help="replace an existing directory")
    r.add_argument("--quantize", default=None, choices=["int8", "int4", "fp8", "nvfp4"],
                   help="write the weights directly in this quantized layout (no dense copy is built)")
    r.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64 or 128; default 64)")

    qz = sub.add_parser("quantize", help="quantize a checkpoint, streaming tensor by tensor")
    qz.add_argument("input", help="plain (fp32/bf16/fp16) checkpoint directory")
    qz.add_argument("output", help="output directory (must not exist or be empty, unless --force)")
    qz.add_argument("--scheme", required=True, choices=["int8", "int4", "fp8", "nvfp4"],
                    help="int8/int4: dgemma's layout; fp8: compressed-tensors per channel; nvfp4: ModelOpt, experts")
    qz.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64 or 128; default 64)")
    qz.add_argument("--force", action="store_true", help="replace an existing directory")
    qz.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="benchmark dgemma against the transformers reference on random weights")
    b.add_argument("--preset", default="small-moe", choices=sorted(PRESETS))
    b.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    b.add_argument("--steps", type=int, default=8, help="denoising steps per canvas, fixed (>= 2; default 8)")
    b.add_argument("--prompt-len", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    b.add_argument("--json-out", default=None, help="also write the full result as JSON to this file")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per mode at least, best counts (default 3)")
    b.add_argument("--min-time-s", type=float, default=1.0,
                   help="keep repeating a mode until this many seconds are spent on it (default 1)")
    b.add_argument("--tokens-per-forward", type=float, default=16.0,
                   help="tokens per decoder pass for the stated tokens/s (default 16, the real model's)")
    b.add_argument("--quantize", default=None, choices=["int8", "int4", "fp8", "nvfp4"],
                   help="time one quantized model of the preset (written under --model-dir) against the roofline")
    b.add_argument("--model-dir", default=None, help="with --quantize: where the checkpoint is (written if absent)")
    b.add_argument("--routing", default="spread", choices=ROUTINGS,
                   help="with --quantize: spread (default) sends each token to experts drawn at random, as a trained "
                   "model's balanced router spreads a canvas (a random checkpoint's own router sends most of it to a "
                   "few experts); own keeps the checkpoint's router (a trained checkpoint)")
    b.add_argument("--constrained", action="store_true",
                   help="measure constrained decoding instead: step time with a realistic JSON schema vs unconstrained")
    b.add_argument("--schema", default=None, metavar="FILE",
                   help="with --constrained: the JSON schema to measure (default: a realistic user record)")
    b.add_argument("--vision", action="store_true",
                   help="time the vision tower per image instead, at the real shapes (d 1152, 27 layers, 2520 "
                   "patches); --images, --dtypes, --repeats (0: one call), --threads, --device, --json-out")
    b.add_argument("--images", default="1,2", help="with --vision: images per tower call, comma-separated")
    f = sub.add_parser("finetune", help="fine-tune with the DiffusionGemma objective (full or LoRA)")
    f.add_argument("--model", required=True, help="base checkpoint directory")
    f.add_argument("--data", required=True, help='JSONL with {"prompt": ..., "response": ...} per line')
    f.add_argument("--out", required=True, help="output directory (final/, last/, train_log.jsonl)")

    defaults = TrainConfig(base="", data="", out="")
    for name in TRAIN_FLAGS:
        value = getattr(defaults, name)
        f.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    f.add_argument("--lora-targets", default="text", choices=["text", "vision", "both"],
                   help="with --lora-rank: adapters on the text stack (default) or on it and the vision tower "
                   "('both'; the tower's adapters stay zero on text-only data, and 'vision' alone is refused)")
    f.add_argument("--freeze-router", action="store_true")
    f.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    f.add_argument("--resume", action="store_true", help="continue from <out>/last")
    f.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP (default) or FSDP2 fully_shard (parameters, gradients and optimizer "
                   "state sharded)")
    s = sub.add_parser("sudoku", help="solve or evaluate Sudoku with a DiffusionGemma model")
    ssub = s.add_subparsers(dest="sudoku_command", required=True)
    so = ssub.add_parser("solve", help="solve puzzles from a file (16, 36 or 81 chars per line, 0 or . for blanks)")
    so.add_argument("--file", required=True)
    so.add_argument("--model", default=None,
                    help="checkpoint directory (default: the bundled Sudoku model for each puzzle's size)")
    so.add_argument("--json", action="store_true", help="one JSON object per line")
    so.add_argument("--seed", type=int, default=0)
    so.add_argument("--verify", action="store_true",
                    help="verifier-guided decoding: cells that break a rule are re-noised instead of accepted")
    so.add_argument("--device", default="cpu")
    ev = ssub.add_parser("eval", help="solve rate etc. on held-out generated puzzles")
    ev.add_argument("--model", default=None)
    ev.add_argument("--size", type=int, default=None, choices=(4, 6, 9),
                    help="grid side of the bundled model to evaluate (default 9; a --model's task.json decides)")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=424242)
    ev.add_argument("--step-caps", default="", help="comma-separated max_denoising_steps values to sweep")
    ev.add_argument("--out", default=None, help="write the results JSON here")
    ev.add_argument("--ar", action="store_true", help="decode left to right with the causal stack (AR baseline)")
    ev.add_argument("--verify", action="store_true", help="also measure verifier-guided decoding (beside the model "
                    "alone)")
    ev.add_argument("--device", default="cpu")
    de = ssub.add_parser("demo", help="solve a 6x6 and a 9x9 puzzle with the bundled models, animated")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--delay", type=float, default=0.15, help="seconds to show each denoising step")
    de.add_argument("--no-animation", action="store_true", help="print only the puzzles and answers")
    de.add_argument("--device", default="cpu")
    de.set_defaults(model=None)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a live canvas visualizer")
    sv.add_argument("--model", default=None, help="checkpoint directory (default: the bundled 9x9 Sudoku model, "
                    "with the bundled 6x6 one under /models/sudoku6)")
    sv.add_argument("--extra-model", action="append", default=[], metavar="DIR",
                    help="serve another checkpoint too, at /models/<its directory name>/v1/... (repeatable)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes (also: the "
                    "DGEMMA_API_KEY environment variable, --api-key-file)")
    sv.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host name clients may use besides the bound address (repeatable; '*': any)")
    sv.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    sv.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    sv.add_argument("--device", default="cpu")
    for f in [*fields(Limits), *(f for f in fields(ConnectionLimits) if "help" in f.metadata)]:
        sv.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["kind"], default=f.default,
                        help=f.metadata["help"])
    add_compile_flags(sv)
    ray_flags = sv.add_argument_group("Ray Serve (needs dgemma[ray])")
    ray_flags.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas each with a model")
    ray_flags.add_argument("--replicas", type=int, default=1, help="replicas (with --ray; default 1)")
    ray_flags.add_argument("--min-replicas", type=int, default=None,
                           help="autoscaling lower bound (with --max-replicas)")
    ray_flags.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    ray_flags.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    ray_flags.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica (default 0)")
    ray_flags.add_argument("--ray-address", default=None,
                           help="cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    ray_flags.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)")
    bt = sub.add_parser("batch", help="generate for a JSONL file of prompts (resumable, ordered; --ray: Ray Data)")
    bt.add_argument("--input", required=True, help='JSONL: {"prompt" | "messages" | "prompt_ids", "id", "seed", '
                    '"max_new_tokens", "diffusion"} per line')
    bt.add_argument("--output", required=True, help="JSONL, one record per input line in order (appended to: resumes)")
    bt.add_argument("--model", default=None, help="checkpoint directory (default: the bundled Sudoku model)")
    bt.add_argument("--seed", type=int, default=0, help="base of the seeds of lines without one (default 0)")
    bt.add_argument("--max-batch", type=int, default=8, help="prompts per batched generation (default 8)")
    bt.add_argument("--dtype", default=None)
    bt.add_argument("--device", default="cpu")
    bt.add_argument("--threads", type=int, default=None, help="torch threads per process or actor")
    bt.add_argument("--max-line-chars", type=int, default=1 << 20,
                    help="characters per input line, checked before parsing (default 1048576)")
    bt.add_argument("--max-tokens", type=int, default=4096, help="a line's max_new_tokens at most (default 4096)")
    bt.add_argument("--max-denoising-steps", type=int, default=256,
                    help="a line's diffusion.max_denoising_steps at most (default 256)")
    bt.add_argument("--prefix-cache-gib", type=float, default=None,
                    help="keep prefilled prompt blocks (e.g. a shared system prompt) in a cache of this many GiB "
                         "per process or actor and reuse them; tokens do not depend on what it holds")
    bt.add_argument("--no-progress", action="store_true")
    bt.add_argument("--ray", action="store_true", help="run on a Ray cluster with Ray Data (needs dgemma[ray])")
    bt.add_argument("--ray-address", default=None, help="cluster to join (default: $RAY_ADDRESS, else local)")
    bt.add_argument("--actors", type=int, default=1, help="model actors on Ray (default 1)")
    bt.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    bt.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        print(f"dgemma: error: unknown --log-level {args.log_level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="dgemma: %(message)s", stream=sys.stderr)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "random-checkpoint":
            return cmd_random(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "batch":
            return cmd_batch(args)
        if args.command == "sudoku":
            run = {"solve": sudoku_run.cmd_solve, "eval": sudoku_run.cmd_eval, "demo": sudoku_run.cmd_demo}
            return run[args.sudoku_command](args)
    except (ValueError, TypeError, OSError, ConfigError) as e:  # OSError: missing/unreadable files
        if args.debug:
            raise
        print(f"dgemma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a genuine bug: one line, the traceback on request
        if args.debug:
            raise
        where = e.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        site = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where is not None else ""
        print(f"dgemma: internal error: {type(e).__name__}: {e}{site} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 1


def cmd_generate(args) -> int:
    compile_limits(args)  # bad flags are refused before the model loads
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.prefill_chunk is not None:
        if args.prefill_chunk <= 0:
            raise ValueError(f"--prefill-chunk must be a positive integer, got {args.prefill_chunk}")
        model.module.prefill_chunk = args.prefill_chunk
    tok = model.tokenizer
    images, raw_images = None, {}  # preprocessed images / image files for a --prompt-ids prompt
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer.json; use --prompt-ids")
        if args.image:
            if args.chat:
                parts = [*({"type": "image", "path": p} for p in args.image), {"type": "text", "text": args.prompt}]
                built = chat_prompt(model, [{"role": "user", "content": parts}], max_soft_tokens=args.max_soft_tokens)
            else:
                built = text_prompt(model, args.prompt, args.image, max_soft_tokens=args.max_soft_tokens)
            prompt, images = built.ids, built.images
        else:
            prompt = (tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat
                      else tok.encode(args.prompt))
    else:
        prompt = args.prompt_ids
        if args.image:
            raw_images = {"images": args.image, "max_soft_tokens": args.max_soft_tokens}
    overrides = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in GEN_FLAGS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.eos_token_id is not None:
        overrides["eos_token_id"] = args.eos_token_id
    forms = constraint_args(args)
    constraint = Constraint.from_args(**forms)
    req = prepare(model, prompt, max_new_tokens=args.max_new_tokens, settings=overrides, seed=args.seed,
                  constraint=("--" + next(iter(forms)).replace("_", "-"), constraint) if constraint else None,
                  images=images, caps=Caps(tokens_field="max_new_tokens"), compile_limits=compile_limits(args))
    events = stream(model, req.prompt_ids, settings=req.gen, seed=req.seed, rng=args.rng, constraint=req.constraint,
                    **req.image_inputs(), **raw_images)

    view = None
    if args.show_canvas:


        # With --json the live view goes to stderr so stdout stays one JSON object.
        view = CanvasView(tok, console=Console(stderr=args.json))
    result = None
    pad = req.gen.pad_token_id
    # Decode everything so far and print the new part: a character split across two canvases is printed whole.
    shown = IncrementalText(tok.decode) if tok is not None else None
    with view if view is not None else contextlib.nullcontext():
        for ev in events:
            if isinstance(ev, Draft) and view is not None:
                view.draft(ev)
            elif isinstance(ev, Commit):
                if view is not None:
                    view.commit(ev)
                elif not args.json and shown is not None:
                    sys.stdout.write(shown.push([t for t in ev.ids[0].tolist() if t != pad]))
                    sys.stdout.flush()
            elif isinstance(ev, Done):
                result = ev.results[0]
    if args.json:
        out = {"ids": result.ids, "tokens_per_forward": result.tokens_per_forward, "steps": result.steps}
        if args.stats:
            out.update(seed=result.seed, finish_reason=result.finish_reason, timings=result.timings, text=result.text)
        print(json.dumps(out))
    else:
        if tok is None:
            print(" ".join(map(str, result.ids)))
        elif view is not None:
            print(result.text)
        else:
            print(shown.flush())
        t = result.timings
        print(f"[{len(result.ids)} tokens, {len(result.steps)} canvas(es), steps {result.steps}, "
              f"{result.tokens_per_forward:.2f} tokens/forward, {t['total_s']:.2f}s, seed {result.seed}]",
              file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    summary = info.describe(Path(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        info.render(summary)
    return 0


def cmd_random(args) -> int:
    config = read_json(Path(args.config)) if args.config else None
    name = args.config or args.preset
    if args.quantize:
        out = random_quantized_checkpoint(args.out, args.preset, args.quantize, seed=args.seed, dtype=args.dtype,
                                          std=args.std, group=args.group_size, overwrite=args.force,
                                          progress=sys.stderr.isatty(), config=config)
        print(f"wrote random {name} checkpoint ({args.quantize}) to {out}")
        return 0
    out = write_random_checkpoint(args.out, args.preset, seed=args.seed, dtype=args.dtype, std=args.std,
                                  overwrite=args.force, config=config)
    print(f"wrote random {name} checkpoint to {out}")
    return 0


def cmd_quantize(args) -> int:
    try:
        out = quantize_checkpoint(args.input, args.output, args.scheme, group=args.group_size, overwrite=args.force,
                                  progress=not args.no_progress and sys.stderr.isatty())
    except QuantError as e:
        raise ValueError(str(e)) from None
    print(f"wrote {args.scheme} checkpoint to {out}")
    return 0


def cmd_bench(args) -> int:
    if args.quantize:
        return bench_fullsize.run(args)
    if args.constrained:
        return bench_constrained.cli_run(args)
    if args.vision:
        return bench_vision.cli_run(args)
    opts = bench_run.BenchOptions(preset=args.preset, dtypes=args.dtypes, steps=args.steps, prompt_len=args.prompt_len,
                        seed=args.seed, device=args.device, reference=not args.no_reference, threads=args.threads,
                        repeats=args.repeats, min_time_s=args.min_time_s, tokens_per_forward=args.tokens_per_forward)
    try:
        result = bench_run.run_bench(opts)
    except MemoryError as e:
        print(f"dgemma: error: {e}", file=sys.stderr)
        return 2
    if args.json_out:  # before the table, so a closed pipe (`| head`) cannot lose the results
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    bench_run.render(result)
    return 0


def cmd_finetune(args) -> int:
    cfg = TrainConfig(base=args.model, data=args.data, out=args.out, freeze_router=args.freeze_router,
                      chat=not args.no_chat, device=args.device, dtype=args.dtype, resume=args.resume,
                      distributed=args.distributed, lora_targets=args.lora_targets,
                      **{n: getattr(args, n) for n in TRAIN_FLAGS})
    summary = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary
        print(json.dumps(summary))
    return 0


def _api_key(args) -> str | None:
    """--api-key, else --api-key-file, else $DGEMMA_API_KEY (a key on the command line shows in the process list)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    key = args.api_key
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
    if key is None:
        key = os.environ.get("DGEMMA_API_KEY") or None
    return key


def cmd_serve(args) -> int:
    _limits(args).validate(_flag)
    compiling = compile_limits(args)
    for name in ("max_connections", "read_timeout", "keep_alive_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{_flag(name)} must be positive, got {getattr(args, name)!r}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    api_key = _api_key(args)
    path = Path(args.model) if args.model else default_model_path()
    if args.ray:
        return _serve_ray(args, path, api_key, compiling)
    extra = [Path(p) for p in args.extra_model] or ([] if args.model else [default_model_path(6)])
    names = [p.resolve().name for p in extra]
    if len(set(names)) != len(names):
        raise ValueError(f"--extra-model directories need distinct names, got {names}")
    model = load_model(path, dtype=args.dtype, device=args.device)
    limits = _limits(args)
    mounts = {p.resolve().name: create_app(load_model(p, dtype=args.dtype, device=args.device),
                                           model_name=p.resolve().name, model_dir=p, api_key=api_key, limits=limits,
                                           host=args.host, allowed_hosts=args.allowed_host,
                                           compile_limits=compiling) for p in extra}
    # With the bundled models, the visualizer opens on the 6x6 one (the one that solves).
    page_model = next(iter(mounts)) if mounts and not args.model and not args.extra_model else None
    app = create_app(model, model_name=args.served_model_name or path.resolve().name, model_dir=path,
                     api_key=api_key, limits=limits, host=args.host, allowed_hosts=args.allowed_host, mounts=mounts,
                     page_model=page_model, compile_limits=compiling)
    connections = ConnectionLimits(**_fields_from(args, ConnectionLimits))
    print(f"dgemma: serving {path} on http://{args.host}:{args.port}/ (API under /v1)", file=sys.stderr)
    for name, p in zip(mounts, extra):
        print(f"dgemma: serving {p} at /models/{name}/v1", file=sys.stderr)
    gc.freeze()  # startup objects (torch, the model) stay out of full collections: a big request cannot stall them
    make_server(app, args.host, args.port, connections).run()
    return 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields_from(args, cls) -> dict:
    """The dataclass `cls`'s flag-backed fields, read from parsed `args`."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata}


def _limits(args) -> Limits:
    """The serve flags' request limits (one server or every Ray replica)."""
    return Limits(**_fields_from(args, Limits))


def _serve_ray(args, path: Path, api_key: str | None, compiling: CompileLimits) -> int:
    from .serve.ray_serve import ReplicaSpec, ScaleSpec, serve_forever

    limits = _limits(args)
    spec = ReplicaSpec(model=str(path), dtype=args.dtype, device=args.device,
                       model_name=args.served_model_name or path.resolve().name, api_key=api_key, limits=limits,
                       host=args.host, allowed_hosts=tuple(args.allowed_host), compile_limits=compiling)
    scale = ScaleSpec(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      num_cpus=args.replica_cpus, num_gpus=args.replica_gpus)
    scale.validate()
    print(f"dgemma: serving {path} on Ray Serve ({args.replicas} replica(s)) at http://{args.host}:{args.port}/",
          file=sys.stderr)
    serve_forever(spec, scale, args.port, address=args.ray_address, num_cpus=args.ray_cpus)
    return 0


def cmd_batch(args) -> int:
    opts = BatchOptions(input=args.input, output=args.output, model=args.model or str(default_model_path()),
                        seed=args.seed, max_batch=args.max_batch, dtype=args.dtype, device=args.device,
                        threads=args.threads, progress=not args.no_progress and sys.stderr.isatty(), ray=args.ray,
                        ray_address=args.ray_address, actors=args.actors, actor_cpus=args.actor_cpus,
                        actor_gpus=args.actor_gpus, prefix_cache_gib=args.prefix_cache_gib,
                        limits=LineLimits(max_line_chars=args.max_line_chars, max_new_tokens=args.max_tokens,
                                          max_denoising_steps=args.max_denoising_steps))
    print(json.dumps(run_batch(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
