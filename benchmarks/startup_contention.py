"""Does pre-starting every stage at once slow the first stage's own start? (the GPU machine)

The runner starts the first stage (segment) and, right after, every later stage that host memory holds;
those import torch, diffusers and transformers at the same moment as segment, which is on the critical
path. This times segment's import (a fresh `python3 -c "import stages.segment"`) alone, then while K
other processes import what a diffusion stage imports, and writes startup_contention.json to $OUT.

    OUT=/some/dir python3 benchmarks/startup_contention.py [--others 7] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_commit  # noqa: E402

FIRST = "import stages.segment"
OTHER = "import stages.rgb, diffusers.models, transformers.models.clip"


def timed_import(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def with_others(k: int) -> float:
    others = [subprocess.Popen([sys.executable, "-c", OTHER]) for _ in range(k)]
    try:
        return timed_import(FIRST)
    finally:
        for p in others:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--others", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    timed_import(FIRST)  # warm the page cache: a user's second job starts from here too
    timed_import(OTHER)
    alone = [timed_import(FIRST) for _ in range(args.repeats)]
    crowded = [with_others(args.others) for _ in range(args.repeats)]
    other = [timed_import(OTHER) for _ in range(args.repeats)]
    result = {
        "date": time.strftime("%Y-%m-%d"), "git": git_commit(), "cpus": os.cpu_count(),
        "first_stage_import_alone_s": [round(x, 3) for x in alone],
        f"first_stage_import_with_{args.others}_others_s": [round(x, 3) for x in crowded],
        "diffusion_stage_import_alone_s": [round(x, 3) for x in other],
        "median_slowdown": round(statistics.median(crowded) / statistics.median(alone), 3),
    }  # fmt: skip
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup_contention.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
