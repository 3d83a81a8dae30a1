"""The full-size (26B-A4B) runs behind the README's full-size table, each under `/usr/bin/time -v`.

    python benchmarks/reference_config.py /tmp/fullsize/reference          # config.json as transformers saves it
    python benchmarks/fullsize.py --root /tmp/fullsize --schemes nvfp4,int4 --threads 1,2

For each scheme: writes `ROOT/SCHEME` from the reference's config.json when absent (`dgemma random-checkpoint
--config ... --quantize SCHEME --dtype bfloat16`), runs the generate contract (`dgemma generate --prompt-ids
2,105,2364 --max-denoising-steps 2 --json --stats`) and `dgemma bench --quantize SCHEME` per thread count, and writes
`benchmarks/results/fullsize_SCHEME_generate.json` and `fullsize_SCHEME_bench[_Nthreads].json` with the command, the
peak RSS and wall time that `time -v` measured. Pause other jobs first: the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def timed(cmd: list[str], threads: int) -> tuple[str, dict]:
    """Run `cmd` under /usr/bin/time -v with `threads` OpenMP threads; (stdout, time's figures)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    return p.stdout, {"command": f"OMP_NUM_THREADS={threads} /usr/bin/time -v {' '.join(cmd)}",
                      "time_v_max_rss_kib": rss, "peak_rss_gib": rss / 2**20, "time_v_elapsed": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/fullsize")
    ap.add_argument("--schemes", default="nvfp4,int4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (a machine's runs kept apart)")
    args = ap.parse_args()
    root = Path(args.root)
    config = root / "reference" / "config.json"
    if not config.is_file():
        sys.exit(f"{config}: run benchmarks/reference_config.py {root / 'reference'} first")
    threads = [int(t) for t in args.threads.split(",")]
    for scheme in args.schemes.split(","):
        model = root / scheme
        if not (model / "config.json").is_file():
            subprocess.run(["dgemma", "random-checkpoint", str(model), "--config", str(config), "--quantize", scheme,
                            "--dtype", "bfloat16"], check=True)
        if not args.skip_generate:
            out, fig = timed(["dgemma", "generate", "--model", str(model), "--prompt-ids", "2,105,2364",
                              "--max-denoising-steps", "2", "--json", "--stats"], max(threads))
            res = json.loads(out)
            record = {**fig, "threads": max(threads), "checkpoint": f"dgemma random-checkpoint {model} --config "
                      f"{config} --quantize {scheme} --dtype bfloat16", "steps": res.get("steps"),
                      "n_ids": len(res["ids"]), "timings": res.get("timings")}
            (RESULTS / f"fullsize_{scheme}_generate{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"{scheme} generate: peak RSS {fig['peak_rss_gib']:.2f} GiB, wall {fig['time_v_elapsed']}")
        for t in threads:
            name = f"fullsize_{scheme}_bench{'' if t == 1 else f'_{t}threads'}{args.tag}.json"
            tmp = RESULTS / f".{name}"
            _, fig = timed(["dgemma", "bench", "--preset", "26b-a4b", "--quantize", scheme, "--model-dir", str(model),
                            "--steps", "2", "--prompt-len", "8", "--threads", str(t), "--json-out", str(tmp)], t)
            record = {**json.loads(tmp.read_text()), **fig}
            tmp.unlink()
            (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
            print(f"{scheme} bench, {t} thread(s): {record['step_s']:.2f} s/step, "
                  f"{record['achieved_gflops']:.0f} GFLOP/s of {record['matmul_peak_gflops']:.0f} peak, "
                  f"peak RSS {fig['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
