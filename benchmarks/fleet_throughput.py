"""Fleet throughput (GPU; not a test): the 8-subject queue, jobs per hour packed vs one at a time.

    . benchmarks/gpu_env.sh && wait_nvdiffrast
    OUT=/some/dir python benchmarks/fleet_throughput.py [--gpus 0|0,1] [--vram 12GB] [--modes packed,sequential]
    python benchmarks/fleet_throughput.py --tiny --device cpu --subjects 2 --sequential-subjects 1   # CPU check
    (split across two commands: --modes packed --out A, then --modes sequential --add A/fleet_throughput.json)

Each mode is a fresh fleet (`orchestrator.fleet.queue.run_fleet`, the local backend: one job process per
subject through the same CLI) over synthetic RGBA photos, with full-size architectures and random weights,
10 denoising steps and 100 remeshing iterations (as `run_benchmark.py --quick`):

  packed      --jobs-per-gpu auto: as many side by side as their plans fit (at most half the cores)
  sequential  --jobs-per-gpu 1: one job per GPU at a time; run on --sequential-subjects of the subjects
              only (one at a time is linear in the count, and all 8 would take ~9 minutes on an H200)

jobs/hour = finished subjects / makespan x 3600. Writes $OUT/fleet_throughput.json (provenance: GPUs,
torch, date, options; per mode the summary rows) and $OUT/fleet_timeline_<mode>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from benchmarks.provenance import git_commit, torch_version  # noqa: E402
from orchestrator.calibrate import write_photos  # noqa: E402
from orchestrator.fleet.queue import FleetOptions, parse_gpus, run_fleet  # noqa: E402
from orchestrator.fleet.subjects import detect_subjects  # noqa: E402
from orchestrator.job import RunOptions  # noqa: E402
from orchestrator.probe import NvmlProbe  # noqa: E402
from stages.spec import EXIT_INTERRUPTED  # noqa: E402

MODES = {"packed": None, "sequential": 1}  # --jobs-per-gpu
con = Console(stderr=True, width=160)


def make_subjects(root: Path, n: int) -> Path:
    for i in range(n):
        write_photos(root / f"subject_{i:02d}", n=3 + i % 3)
    return root


def run_mode(mode: str, args: argparse.Namespace, options: RunOptions) -> dict[str, Any]:
    n = args.subjects if mode == "packed" else min(args.subjects, args.sequential_subjects)
    work = args.work / mode
    shutil.rmtree(work, ignore_errors=True)  # a warm machine must not resume an earlier run
    root = make_subjects(work / "subjects", n)
    fleet = FleetOptions(gpus=parse_gpus(args.gpus), jobs_per_gpu=MODES[mode])
    t = time.monotonic()
    result = run_fleet(detect_subjects(root), work / "out", options, fleet, console=con, live=False)
    wall = time.monotonic() - t
    if result.exit_code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    ok = sum(r["outcome"] == "ok" for r in result.rows)
    timeline = work / "out" / "fleet_timeline.png"
    if timeline.exists():
        shutil.copy2(timeline, args.out / f"fleet_timeline_{mode}.png")
    return {"mode": mode, "jobs_per_gpu": MODES[mode] or "auto", "subjects": n, "finished": ok,
            "makespan_s": round(wall, 1), "jobs_per_hour": round(ok / wall * 3600, 2) if wall else None,
            "mean_job_wall_s": round(sum(r["wall_s"] or 0 for r in result.rows) / max(1, len(result.rows)), 1),
            "max_concurrent": _max_concurrent(result.rows), "rows": result.rows}  # fmt: skip


def _max_concurrent(rows: list[dict[str, Any]]) -> int:
    spans = [(r["started_s"], r["ended_s"]) for r in rows if r["started_s"] is not None and r["ended_s"] is not None]
    return max((sum(1 for s, e in spans if s <= t < e) for t, _ in spans), default=0)


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch_version(),
                            "git": git_commit(), "cpus": os.cpu_count(),
                            "vram": args.vram, "steps": args.steps, "mesh_iters": args.mesh_iters,
                            "tiny": args.tiny, "device": args.device, "gpus_option": args.gpus}  # fmt: skip
    if args.device != "cpu":
        selected = parse_gpus(args.gpus)
        meta["gpus"] = [{"index": g.index, "name": g.name, "total_bytes": g.total, "free_bytes": g.free}
                        for g in NvmlProbe().gpus() if selected is None or g.index in selected]  # fmt: skip
    return meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--sequential-subjects", type=int, default=3, help="subjects run in the one-at-a-time mode")
    ap.add_argument("--modes", default="packed,sequential")
    ap.add_argument("--gpus", default="all", help="all or 0,1")
    ap.add_argument("--vram", default="12GB", help="each job's --vram (auto: best plan, fewer side by side)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mesh-iters", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="tiny random weights (a check of the script)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    ap.add_argument("--add", type=Path, default=None,
                    help="an earlier fleet_throughput.json whose modes join this one (split runs across commands)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/up2you-fleet-bench"),
                    help="subjects and job folders (GBs at 20 views: keep them out of $OUT)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown modes {bad}; choose from {list(MODES)}")
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu needs --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = () if args.tiny else (("mesh_iters", args.mesh_iters),)
    options = RunOptions(vram=args.vram, steps=None if args.tiny else args.steps, thg_interval=3, max_retries=2,
                         device=args.device, tiny=args.tiny, full_random=not args.tiny, overrides=overrides)  # fmt: skip
    result: dict[str, Any] = {"meta": provenance(args), "modes": {}}
    if args.add:
        earlier = json.loads(args.add.read_text())
        result["modes"].update(earlier["modes"])
        result["meta"]["earlier"] = earlier["meta"]
    for mode in modes:
        con.print(f"[bold]{mode}[/bold]")
        result["modes"][mode] = run_mode(mode, args, options)
        r = result["modes"][mode]
        con.print(f"  {r['finished']}/{r['subjects']} finished in {r['makespan_s']} s: {r['jobs_per_hour']} jobs/hour, "
                  f"at most {r['max_concurrent']} at once")  # fmt: skip
    m = result["modes"]
    if "packed" in m and "sequential" in m and m["sequential"]["jobs_per_hour"]:
        result["packed_vs_sequential"] = round(m["packed"]["jobs_per_hour"] / m["sequential"]["jobs_per_hour"], 2)
        con.print(f"packed / one at a time: {result['packed_vs_sequential']}x jobs per hour")
    (args.out / "fleet_throughput.json").write_text(json.dumps(result, indent=1, default=str))
    con.print(f"wrote {args.out / 'fleet_throughput.json'}")
    return 0 if all(r["finished"] == r["subjects"] for r in m.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
