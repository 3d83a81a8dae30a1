"""`dgemma batch` on many prompts: in-process vs Ray Data (same output), and resume after a SIGKILL.

    python benchmarks/batch_scale_out.py --n 200 --json-out benchmarks/results/batch_scale_out.json

Prompts are held-out 9x9 Sudoku puzzles for the bundled model; every third line carries its own seed, the others
get derived ones. Steps:
1. in-process, --max-batch 8 (timed);
2. Ray Data on a local cluster of --ray-cpus CPUs with --actors actors, --max-batch 5 (timed; another batch size
   on purpose): the output must equal step 1's byte for byte;
3. the CLI in a subprocess, killed with SIGKILL once a third of the lines are written, then rerun: the output must
   equal step 1's.
Prints one JSON object (CPU model, counts, times, and the checks' results).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dgemma.batch import BatchOptions, run_batch
from dgemma.hardware import cpu_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import default_model_path


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for k, (puzzle, _) in enumerate(sudoku.generate_many(n, seed=77)):
            row = {"id": k, "prompt": sudoku.legacy_prompt_text(puzzle)}
            if k % 3 == 0:
                row["seed"] = 10_000 + k
            f.write(json.dumps(row) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    model = str(default_model_path())
    result: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "n": args.n, "model": "bundled 9x9 Sudoku"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inp = tmp / "in.jsonl"
        write_prompts(inp, args.n)

        t0 = time.perf_counter()
        run_batch(BatchOptions(str(inp), str(tmp / "local.jsonl"), model, max_batch=8, threads=args.threads,
                               progress=False))
        result["in_process_s"] = round(time.perf_counter() - t0, 2)
        local = (tmp / "local.jsonl").read_bytes()

        t0 = time.perf_counter()
        run_batch(BatchOptions(str(inp), str(tmp / "ray.jsonl"), model, max_batch=5, threads=args.threads,
                               progress=False, ray=True, actors=args.actors, actor_cpus=1,
                               ray_init={"num_cpus": args.ray_cpus, "include_dashboard": False,
                                         "object_store_memory": 200 * 1024**2, "log_to_driver": False}))
        result["ray_s"] = round(time.perf_counter() - t0, 2)
        result["ray_actors"] = args.actors
        result["ray_equals_in_process"] = (tmp / "ray.jsonl").read_bytes() == local

        out = tmp / "killed.jsonl"
        cmd = [sys.executable, "-m", "dgemma.cli", "batch", "--input", str(inp), "--output", str(out), "--model",
               model, "--max-batch", "8", "--threads", str(args.threads), "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < args.n // 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result["killed_after_lines"] = out.read_bytes().count(b"\n")
        resumed = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        result["resumed_wrote"] = resumed["written"]
        result["resumed_equals_in_process"] = out.read_bytes() == local
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["ray_equals_in_process"] and result["resumed_equals_in_process"] else 1


if __name__ == "__main__":
    sys.exit(main())
