"""Where a stage process's import time goes, by package (run on the GPU machine: its imports are slower).

Each stage imports torch and its libraries before it can prepare; for rgb/normal that chain is longer
than the stages before them, so part of it stays on the clock. This runs `python -X importtime` in a
fresh process for each import set, `--repeats` times (the first run may compile bytecode or read cold
pages; later ones are what a user's second job pays), and writes import_profile.json to $OUT: wall
seconds per run, and for the last run the self time per top-level package and the costliest modules
(cumulative).

    OUT=/some/dir python3 benchmarks/import_profile.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_commit  # noqa: E402

IMPORT_SETS = {
    "segment": "import stages.segment",
    "mesh": "import stages.mesh",
    "diffusion": ("import stages.rgb; from diffusers import AutoencoderKL, UNet2DConditionModel; "
                  "from transformers import CLIPTextModel, CLIPTokenizer"),
}  # fmt: skip
_ROW = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def parse_importtime(text: str) -> list[tuple[str, float, float]]:
    """(module, self s, cumulative s) for every row of `-X importtime` output."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            rows.append((m.group(4), int(m.group(1)) / 1e6, int(m.group(2)) / 1e6))
    return rows


def by_package(rows: list[tuple[str, float, float]], top: int = 20) -> dict[str, float]:
    """Self time summed per top-level package, costliest first."""
    total: Counter[str] = Counter()
    for module, own, _ in rows:
        total[module.split(".")[0]] += own
    return {k: round(v, 3) for k, v in total.most_common(top)}


def profile(code: str) -> tuple[float, list[tuple[str, float, float]]]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return time.perf_counter() - t, parse_importtime(done.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "git": git_commit(), "cpus": os.cpu_count(),
                                 "python": sys.version.split()[0], "sets": {}}  # fmt: skip
    for name, code in IMPORT_SETS.items():
        walls, rows = [], []
        for _ in range(args.repeats):
            wall, rows = profile(code)
            walls.append(round(wall, 3))
        costliest = sorted(rows, key=lambda r: -r[2])[:40]
        result["sets"][name] = {  # type: ignore[index]
            "code": code, "wall_s": walls, "self_s_by_package": by_package(rows),
            "costliest_cumulative_s": [[m, round(c, 3)] for m, _, c in costliest],
        }
        print(name, walls, by_package(rows, 8), flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "import_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
