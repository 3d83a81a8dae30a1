"""Draw the seeded sample of JSONSchemaBench committed beside this script (sample.json).

Reads a local git snapshot of github.com/guidance-ai/jsonschemabench (no network here):
    python benchmarks/jsonschemabench/draw.py --git-dir /path/to/jsonschemabench/.git
Per subset: the files of data/<subset>/ sorted by name, schemas over MAX_BYTES left out (to keep the committed file
small; how many is recorded), then `random.Random(SEED).sample(..., PER_SUBSET)`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

SUBSETS = ("Glaiveai2K", "Github_easy", "Github_medium", "Github_hard", "Kubernetes", "Snowplow", "WashingtonPost",
           "JsonSchemaStore")
SEED = 28
PER_SUBSET = 16
MAX_BYTES = 100_000


def git(git_dir: str, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--git-dir", required=True)
    ap.add_argument("--out", default=str(Path(__file__).with_name("sample.json")))
    a = ap.parse_args()
    commit = git(a.git_dir, "rev-parse", "HEAD").decode().strip()
    out = {"source": "https://github.com/guidance-ai/jsonschemabench", "commit": commit,
           "licence": "no LICENSE file at this commit; the README says the schemas were curated from "
                      "json-schema-corpus (sdbs-uni-p), GlaiveAI function-calling-v2 and kubernetes-json-schema "
                      "(instrumenta); each schema keeps the terms of its source",
           "seed": SEED, "per_subset": PER_SUBSET, "max_bytes": MAX_BYTES, "subsets": {}}
    for subset in SUBSETS:
        rows = [(meta.split(), path) for meta, path in (line.split("\t", 1) for line in git(
            a.git_dir, "ls-tree", "-r", "-l", "HEAD", f"data/{subset}/").decode().splitlines())]
        # a size of "BAD": the snapshot lacks that blob (the collection's largest files); counted as too large
        files = sorted((path, meta[2], int(meta[3]) if meta[3].isdigit() else 1 << 62) for meta, path in rows)
        small = [f for f in files if f[2] <= MAX_BYTES]
        pick = random.Random(f"{SEED}:{subset}").sample(small, PER_SUBSET)
        schemas = {}
        for path, blob, _ in sorted(pick):
            doc = json.loads(git(a.git_dir, "cat-file", "blob", blob))
            schemas[Path(path).stem] = doc
        out["subsets"][subset] = {"files": len(files), "over_max_bytes": len(files) - len(small),
                                  "schemas": schemas}
    Path(a.out).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(a.out, Path(a.out).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
