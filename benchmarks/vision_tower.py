"""The vision tower's time per image at the real shapes, batched over images (the same as `dgemma bench --vision`;
this script also takes --layers and --max-soft-tokens). See dgemma/bench/vision.py for what is measured.

    OMP_NUM_THREADS=2 python benchmarks/vision_tower.py --images 1,2 --dtypes bfloat16,float32 --repeats 0 \
        --threads 2 --json-out benchmarks/results/vision_tower_cpu.json
"""

from __future__ import annotations

import argparse

from dgemma.bench.vision import cli_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="1,2", help="batch sizes (images per tower call), comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-soft-tokens", type=int, default=280)
    ap.add_argument("--layers", type=int, default=27, help="encoder layers (27 = the real tower)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls after the warm-up (0: the warm-up counts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", default=None)
    return cli_run(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
