"""Where a stage process's import time goes, by package (run on the GPU machine: its imports are slower).

Each stage imports torch and its libraries before it can prepare; for rgb/normal that chain is longer
than the stages before them, so part of it stays on the clock. This runs `python -X importtime` in a
fresh process for each import set, `--repeats` times (the first run may compile bytecode or read cold
pages; later ones are what a user's second job pays), and writes import_profile.json to $OUT: wall
seconds per run, and for the last run the self time per top-level package and the costliest modules
(cumulative).

    OUT=/some/dir python3 benchmarks/import_profile.py [--repeats 3] [--sets diffusion,diffusion-not-lean]

`diffusion` imports as rgb's `prepare` does (up2you.diffusion.lean_imports first); `diffusion-not-lean` the
same with UP2YOU_LEAN_IMPORTS=0.
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

_DIFFUSION = ("import stages.rgb; from up2you.diffusion.lean_imports import lean_imports; lean_imports(); "
              "from diffusers import AutoencoderKL, UNet2DConditionModel, T2IAdapter; "
              "from transformers import CLIPTextModel, CLIPTokenizer")  # what rgb's prepare imports, in its order
IMPORT_SETS = {  # name -> (code, UP2YOU_LEAN_IMPORTS)
    "segment": ("import stages.segment", "1"),
    "mesh": ("import stages.mesh", "1"),
    "diffusion": (_DIFFUSION, "1"),
    "diffusion-not-lean": (_DIFFUSION, "0"),  # every package __init__ and optional package, as before
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


def profile(code: str, lean: str = "1") -> tuple[float, list[tuple[str, float, float]]]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "UP2YOU_LEAN_IMPORTS": lean})  # fmt: skip
    return time.perf_counter() - t, parse_importtime(done.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default=",".join(IMPORT_SETS), help="comma-separated: " + ", ".join(IMPORT_SETS))
    args = ap.parse_args()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "git": git_commit(), "cpus": os.cpu_count(),
                                 "python": sys.version.split()[0], "sets": {}}  # fmt: skip
    names = args.sets.split(",")
    walls: dict[str, list[float]] = {n: [] for n in names}
    rows: dict[str, list[tuple[str, float, float]]] = {}
    for _ in range(args.repeats):  # the sets take turns, so a slow moment of the machine is shared out
        for name in names:
            code, lean = IMPORT_SETS[name]
            wall, rows[name] = profile(code, lean)
            walls[name].append(round(wall, 3))
    for name in names:
        code, lean = IMPORT_SETS[name]
        costliest = sorted(rows[name], key=lambda r: -r[2])[:40]
        result["sets"][name] = {  # type: ignore[index]
            "code": code, "UP2YOU_LEAN_IMPORTS": lean, "wall_s": walls[name],
            "self_s_by_package": by_package(rows[name]),
            "costliest_cumulative_s": [[m, round(c, 3)] for m, _, c in costliest],
        }
        print(name, walls[name], by_package(rows[name], 8), flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "import_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
