"""Write budgets/tables/up2you-v3.json: v2's memory terms unchanged, plus a `time` section fitted to the
committed H100 measurements (CPU only; no GPU needed: the measurements are in benchmarks/results/).

    python benchmarks/fit_time_table.py [--check]

The 2-step calibration grid (benchmarks/results/calibration/) pins the fixed terms; the 50-step whole
runs (benchmarks/results/h100_benchmark_*.json) pin the per-step, per-iteration and per-frame terms.
`--check` rewrites nothing and exits 1 if the shipped v3 differs from a fresh fit (the tests do this).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgets.table import TABLES_DIR  # noqa: E402
from budgets.timing_fit import fit_time_model, rows_from_benchmark, rows_from_calibration  # noqa: E402
from stages.spec import UP2YOU  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = RESULTS / "calibration" / "h100_2026-11-22_measurements.json"  # parts 1 and 2 together
BENCHMARKS = sorted(RESULTS.glob("h100_benchmark_*.json"))
SOURCE, TARGET = TABLES_DIR / "up2you-v2.json", TABLES_DIR / "up2you-v3.json"


def build() -> dict[str, Any]:
    """v2's JSON with version 3 and a fitted `time` section (memory terms copied as they are)."""
    v2 = json.loads(SOURCE.read_text())
    rows = rows_from_calibration(CALIBRATION)
    overheads: list[float] = []
    for path in BENCHMARKS:
        r, o = rows_from_benchmark(path)
        rows += r
        overheads += o
    prov = v2["provenance"]
    provenance = {
        "gpu": prov["gpu"], "torch": prov["torch"], "driver": prov["driver"], "date": "2026-11-22",
        "profile": prov["profile"] + " (weights built on meta and filled at random: start-up is that, not a read of "
                                     "the released files)",
        "dtype": "fp16", "photos": 4,
        "files": [str(p.relative_to(ROOT)) for p in (CALIBRATION, *BENCHMARKS)],
        "method": "benchmarks/fit_time_table.py: per stage and part (start-up = import + prepare; run = the "
                  "manifest's run_s), NNLS on the relative error over the 2-step calibration grid (2 steps, 20 "
                  "mesh iterations, 16 frames) and the 50-step whole runs (700 iterations, 64 frames); the fit "
                  "is checked against the same runs it was fitted on",
        "derived": "per-photo terms are not fitted (every measurement had 4 photos: their cost is inside the "
                   "constants); per-step terms were measured at 768 px only (12 and 20 views): 512 px scales "
                   "them by pixel count; sequential offload's per-call term comes from one 2-step point",
        "one_time": "the first apose on a machine also builds nvdiffrast (~28 s on the H100): those rows are "
                    "excluded (excluded_rows) and the build is not in any prediction",
    }  # fmt: skip
    time = fit_time_model(None, UP2YOU.names, rows, provenance, overheads)
    out = {**v2, "name": "up2you-calibrated", "version": 3,
           "provenance": {**prov, "time": "section `time` (v3): fitted by benchmarks/fit_time_table.py; "
                                          "memory terms are v2's, unchanged"}}  # fmt: skip
    out["time"] = time.to_dict()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped v3, write nothing")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        same = TARGET.is_file() and json.loads(TARGET.read_text()) == json.loads(text)
        print(f"{TARGET.name}: {'up to date' if same else 'differs from a fresh fit'}")
        return 0 if same else 1
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
