"""Chaos on the GPU (issue 10, part 5; not a test): 20 runs, each with a foreign neighbour that grabs
30-97 % of the free memory at a random moment and holds it or gives it back.

    . benchmarks/gpu_env.sh && OUT=/tmp/chaos python benchmarks/chaos.py [--runs 20] [--gpus 0,1,2,3]
    python benchmarks/chaos.py --part 1/2 ...   then --part 2/2, then --merge a/chaos_part1.json b/chaos_part2.json
    python benchmarks/chaos.py --tiny --device cpu --runs 2     # the machinery, on a CPU (no real neighbour)

Design (and why):
- **One run per GPU at a time, all visible GPUs in parallel.** A neighbour's grab is a fact about a
  whole card: two runs sharing one card would both feel every grab, so a run's "stage it hit" would
  not be its own. 20 runs of ~40 s each do not fit 8 minutes one after another; on 4 GPUs they run in
  5 waves (about 4-5 minutes). On one GPU, split them: `--part K/3` runs every third of the same seeded
  schedule (about 6 minutes each, its own baseline first), and `--merge` joins the parts.
- **A 16 GiB card on an H200.** A filler process (another tenant) first takes all but `--card-gib`
  of each GPU, so that a grab of 30 % of what is free is felt by a 12 GB run, as it would be on a
  16 GB card; without it, on 141 GB, only grabs above ~90 % would matter.
- **Small plans, full-size models:** full-size architectures with random weights (profile
  full-random), 6 views x 512 px, 10 steps, 100 mesh iterations, `--vram 12GB`, `--wait-for-vram 10s`.
- **The moment:** a run's stage timeline comes from a first wave of neighbour-free baseline runs
  (one per GPU). Each chaos run picks "before the first stage" (1 in 9) or one of the 8 stages and a
  random point inside that stage's baseline interval; the neighbour (a separate Python process with
  its own CUDA context, allocating with torch) sleeps until then, reads the free memory and takes
  the drawn fraction of it. Half the neighbours hold it to the end, half give it back after 2-20 s.
- **Recorded per run:** the grab (fraction, bytes, when, held or for how long), the stage running at
  that moment, the re-plans (`run.json`), time lost against the same GPU's baseline, finished or
  not, whether any finished stage was recomputed (a stage with two successful attempts), and the
  run's own NVML peak against its cap (cap + CUDA context, per attempt: the cap is lowered by a
  re-plan), and the stages that ran on the CPU (`cpu_stages` in run.json).
- **The CPU is the last rung.** A neighbour may leave less than the smallest plan needs (even less than a
  CUDA context), and hold it to the end: no GPU plan can finish there. After `--wait-for-vram` the job
  runs that stage on the CPU (`--cpu-fallback auto`, the default: the same plan and key, so nothing is
  recomputed, only slower) and asks the GPU again for the next stage. "Finished" stays the criterion;
  the table counts the stages that took the CPU (`--cpu-fallback never` measures the old exit 75).
Writes $OUT/chaos.json (provenance, schedule, per-run rows, summary) and prints the table.
In --tiny --device cpu mode there is no GPU: the job runs on a simulated `--card-gib` card
($UP2YOU_SIMULATED_GPUS, its own ledger), the neighbour is a process listed in that card's file, holding the
drawn fraction of its free memory, and the stage it hits (when that stage's request appears) runs 1 s and
then gets an injected OOM (UP2YOU_FAULTS), so the schedule, admission, the re-plan path, the CPU fallback
and the table are exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.provenance import git_commit, torch_version  # noqa: E402

GiB = 2**30
STAGES = ("segment", "features", "apose", "weights", "rgb", "normal", "mesh", "video")
con = Console(width=180)

# Another tenant: takes all but `keep` bytes of the GPU, then waits to be killed.
FILLER = ("import sys, time, torch\n"
          "torch.cuda.init(); free, _ = torch.cuda.mem_get_info()\n"
          "x = torch.empty(max(0, free - int(sys.argv[1])), dtype=torch.uint8, device='cuda')\n"
          "print('filled', x.numel(), flush=True); time.sleep(86400)\n")  # fmt: skip
# The neighbour: `at` s after the job's start (the time the worker writes into T0_FILE; at < 0: at once,
# before the job starts) it takes `frac` of what is free, holds it for `hold` s (< 0: until killed)
# and prints what it did as JSON lines, with wall-clock times.
NEIGHBOUR = ("import json, os, sys, time, torch\n"
             "at, frac, hold = map(float, sys.argv[1:4]); t0_file = sys.argv[4]\n"
             "torch.cuda.init(); torch.empty(1, device='cuda')\n"
             "if at >= 0:\n"
             "    while not os.path.exists(t0_file):\n        time.sleep(0.01)\n"
             "    time.sleep(max(0.0, float(open(t0_file).read()) + at - time.time()))\n"
             "free, total = torch.cuda.mem_get_info(); want = int(free * frac)\n"
             "try:\n    x = torch.empty(want, dtype=torch.uint8, device='cuda'); got = want\n"
             "except torch.cuda.OutOfMemoryError:\n    x = None; got = 0\n"
             "print(json.dumps({'grab_at': time.time(), 'free_before': free, 'grabbed': got}), flush=True)\n"
             "if hold >= 0:\n    time.sleep(hold); del x; torch.cuda.empty_cache()\n"
             "    print(json.dumps({'released_at': time.time()}), flush=True)\n"
             "time.sleep(86400)\n")  # fmt: skip
T0_FILE = "job_t0"  # in the run's folder: wall-clock time at which the worker called run_job


@dataclass(frozen=True)
class Grab:
    """One neighbour's plan: when (seconds after the run starts), how much, for how long."""

    run: int
    gpu: str
    target: str  # "before" or the stage whose baseline interval the moment falls in
    at_s: float
    fraction: float
    hold_s: float  # < 0: held until the run ends


def schedule(n_runs: int, gpus: list[str], timelines: dict[str, dict[str, tuple[float, float]]],
             seed: int) -> list[Grab]:  # fmt: skip
    """Deterministic from the seed: the moment, the fraction (30-97 %) and hold-or-give-back for every run."""
    rng = random.Random(seed)
    grabs = []
    for i in range(n_runs):
        gpu = gpus[i % len(gpus)]
        target = "before" if rng.random() < 1 / 9 else rng.choice(STAGES)
        if target == "before":
            at = 0.0
        else:
            start, end = timelines[gpu][target]
            at = start + rng.random() * max(0.0, end - start)
        hold = -1.0 if rng.random() < 0.5 else round(rng.uniform(2.0, 20.0), 1)
        grabs.append(Grab(i, gpu, target, round(at, 2), round(rng.uniform(0.30, 0.97), 3), hold))
    return grabs


def stage_at(attempts: list[dict[str, Any]], t: float) -> str:
    """The stage that was running (started, not yet ended) t seconds into the run; 'before' / 'between'."""
    ran = [a for a in attempts if a["outcome"] != "skipped"]
    if not ran or t < ran[0]["started_s"]:
        return "before"
    for a in ran:
        if a["started_s"] <= t <= a["started_s"] + a["wall_s"]:
            return a["stage"]
    return "between" if t < ran[-1]["started_s"] + ran[-1]["wall_s"] else "after"


def recomputed(attempts: list[dict[str, Any]]) -> list[str]:
    """Stages that finished and then ran (successfully) again in the same run."""
    oks = [a["stage"] for a in attempts if a["outcome"] == "ok"]
    return sorted({s for s in oks if oks.count(s) > 1})


def cpu_stages(report: dict[str, Any]) -> list[str]:
    """The stages that finished on the CPU because no GPU plan fit what the neighbour left (run.json)."""
    return [c["stage"] for c in report.get("cpu_stages", []) if c.get("outcome") == "ok"]


def peak_vs_cap(attempts: list[dict[str, Any]], context_bytes: int) -> tuple[int, int, bool]:
    """The run's highest NVML peak, the cap it ran under then, and whether every attempt stayed under its cap."""
    rows = [(a.get("measured_gpu_bytes") or 0, (a.get("cap_bytes") or 0) + context_bytes) for a in attempts
            if a["outcome"] != "skipped" and a.get("cap_bytes")]  # fmt: skip
    if not rows:
        return 0, 0, True
    peak, cap = max(rows)
    return peak, cap, all(p <= c for p, c in rows)


def summarise(grab: Grab, report: dict[str, Any], wall: float, baseline_wall: float, neighbour: list[dict[str, Any]],
              context_bytes: int, t0: float | None) -> dict[str, Any]:  # fmt: skip
    attempts = report.get("attempts", [])
    took = next((n for n in neighbour if "grabbed" in n), {})
    grab_s = took["grab_at"] - t0 if took and t0 else None
    released = next((n["released_at"] - t0 for n in neighbour if "released_at" in n and t0), None)
    # the attempts count from the runner's start, which comes after planning (and, --tiny, writing weights)
    runner_t0 = report.get("attempts_t0_wall")
    hit_s = took["grab_at"] - runner_t0 if took and runner_t0 else grab_s
    hit = stage_at(attempts, hit_s if hit_s is not None else grab.at_s)
    ooms = [a["stage"] for a in attempts if a["outcome"] == "out of GPU memory"]
    peak, cap, under = peak_vs_cap(attempts, context_bytes)
    return {
        **asdict(grab), "grabbed_bytes": took.get("grabbed"), "free_before_bytes": took.get("free_before"),
        "grab_s": round(grab_s, 2) if grab_s is not None else None,
        "released_s": round(released, 2) if released is not None else None,
        "stage_hit": hit, "oom_stages": ooms, "replans": [f"{p['after_stage']}: {p['reason']} -> {p['after']}"
                                                          for p in report.get("replans", [])],
        "plan_final": report.get("plan_label"), "ok": bool(report.get("ok")), "exit_code": report.get("exit_code"),
        "message": report.get("message"), "wall_s": round(wall, 2), "time_lost_s": round(wall - baseline_wall, 2),
        "recomputed": recomputed(attempts), "cpu_stages": cpu_stages(report), "peak_nvml_bytes": peak, "cap_bytes": cap, "peak_within_cap": under,
    }  # fmt: skip


# --- running ------------------------------------------------------------------------------------------
def _job_cmd(photos: Path, out: Path, args: argparse.Namespace, gpu: str) -> list[str]:
    """The job as a worker process (`--worker`): full-random needs RunOptions, which the CLI does not expose."""
    spec = {"photos": str(photos), "out": str(out), "gpu": gpu, "tiny": args.tiny, "device": args.device,
            "vram": args.vram, "wait": args.wait_for_vram, "cpu_fallback": args.cpu_fallback}  # fmt: skip
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def worker(spec: dict[str, Any]) -> int:
    from orchestrator.job import JobError, RunOptions, run_job

    overrides = {"mesh_iters": 100} if not spec["tiny"] else {}
    gpu = "auto" if spec["gpu"] == "cpu" else spec["gpu"]  # --tiny: the one simulated card
    opts = RunOptions(vram=spec["vram"], gpu=gpu, views=6, resolution=None if spec["tiny"] else 512,
                      steps=None if spec["tiny"] else 10, thg_interval=3, max_retries=3,
                      wait_for_vram_s=float(spec["wait"]), device=spec["device"], tiny=spec["tiny"],
                      full_random=not spec["tiny"], overrides=tuple(overrides.items()), quiet=True,
                      cpu_fallback=spec.get("cpu_fallback", "auto") == "auto")  # fmt: skip
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / T0_FILE).write_text(repr(time.time()))
    try:
        report = run_job(spec["photos"], spec["out"], opts)
    except JobError as exc:
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["out"]) / "run.json").write_text(json.dumps({"ok": False, "exit_code": exc.exit_code,
                                                                "message": str(exc), "attempts": []}))  # fmt: skip
        return exc.exit_code
    return report.exit_code


def _gpu_env(gpu: str, uuid: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if uuid:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = uuid
    return env


def _simulated_card(path: Path, total: int, held: int) -> None:
    """The --tiny card: `held` bytes taken by a foreign process (this script's pid: alive, not ours)."""
    procs = [{"pid": os.getpid(), "used": held, "name": "chaos neighbour"}] if held else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [{"name": "Simulated chaos card", "uuid": f"GPU-chaos-{path.stem}",
                                         "total": total, "processes": procs}]}))  # fmt: skip
    tmp.replace(path)


def _simulated_neighbour(grab: Grab, card: Path, total: int, out: Path, stop: threading.Event,
                         lines: list[dict[str, Any]]) -> None:
    """--tiny: take `grab.fraction` of the simulated card when the target stage's request appears (at once for
    "before"), give it back after hold_s (< 0: keep it); the same JSON lines as the GPU neighbour."""
    request = out / "job" / grab.target / "request.msgpack"
    while grab.target != "before" and not request.exists() and not stop.wait(0.02):
        pass
    if stop.is_set():
        return
    held = int(total * grab.fraction)
    _simulated_card(card, total, held)
    lines.append({"grab_at": time.time(), "free_before": total, "grabbed": held})
    if grab.hold_s >= 0 and not stop.wait(grab.hold_s):
        _simulated_card(card, total, 0)
        lines.append({"released_at": time.time()})


def run_one(grab: Grab | None, photos: Path, work: Path, args: argparse.Namespace,
            uuids: dict[str, str]) -> tuple[dict[str, Any], float, list[dict[str, Any]], float | None]:
    """One job, with its neighbour when `grab` is given; returns (run.json, wall s, neighbour's lines, job t0)."""
    gpu = grab.gpu if grab else args.gpus[0]
    out = work / (f"run_{grab.run:02d}" if grab else f"baseline_gpu{gpu}")
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "UP2YOU_CACHE_DIR": str(out.parent / f"cache_{out.name}")}  # corrections learned per run
    neighbour = None
    first: list[dict[str, Any]] = []
    simulated: threading.Thread | None = None
    stop = threading.Event()
    if args.tiny:  # no GPU: a simulated card, its neighbour a listed process, the grab's OOM injected
        card, total = out.parent / f"card_{out.name}.json", int(args.card_gib * GiB)
        _simulated_card(card, total, 0)
        env.update(UP2YOU_SIMULATED_GPUS=str(card), UP2YOU_RUNTIME_DIR=str(out.parent / f"ledger_{out.name}"))
        if grab and grab.target != "before":
            env["UP2YOU_FAULTS"] = f"{grab.target}:sleep:1:1,{grab.target}:oom:1"
        if grab:
            simulated = threading.Thread(target=_simulated_neighbour, args=(grab, card, total, out, stop, first))
            simulated.start()
            if grab.target == "before":
                while not first and simulated.is_alive():  # the grab lands before the job starts planning
                    time.sleep(0.01)
    if grab and not args.tiny:
        at = -1.0 if grab.target == "before" else grab.at_s
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(at), str(grab.fraction), str(grab.hold_s),
                                      str(out / T0_FILE)], stdout=subprocess.PIPE, text=True,
                                     env=_gpu_env(gpu, uuids.get(gpu)))  # fmt: skip
        if at < 0:  # the grab lands before the job starts planning
            assert neighbour.stdout is not None
            first.append(json.loads(neighbour.stdout.readline()))
    t = time.monotonic()
    try:
        proc = subprocess.run(_job_cmd(photos, out, args, gpu), env=env, capture_output=True, text=True,
                              timeout=args.run_timeout or None)  # fmt: skip
        stopped = ""
    except subprocess.TimeoutExpired:  # the job is killed; its stages die with it (stages.lifeline)
        proc = subprocess.CompletedProcess([], -9, "", "")
        stopped = f"stopped by --run-timeout {args.run_timeout:g} s while still running"
    wall = time.monotonic() - t
    if simulated is not None:
        stop.set()
        simulated.join()
    lines = first
    if neighbour:
        neighbour.kill()
        stdout, _ = neighbour.communicate()
        lines += [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    report_path = out / "run.json"
    report = json.loads(report_path.read_text()) if report_path.exists() and not stopped else {
        "ok": False, "exit_code": proc.returncode, "message": stopped or (proc.stderr.strip().splitlines() or ["?"])[-1]}
    t0 = float((out / T0_FILE).read_text()) if (out / T0_FILE).exists() else None
    return report, wall, lines, t0


def replayed(path: Path, gpus: list[str]) -> tuple[dict[str, Any], list[Grab]]:
    """The grabs and baselines an earlier chaos JSON recorded, so a rerun meets exactly the same neighbour."""
    earlier = json.loads(path.read_text())
    fields = Grab.__dataclass_fields__
    grabs = [Grab(**{k: r[k] for k in fields}) for r in earlier["runs"] if r["gpu"] in gpus]
    base = {g: ({"ok": b["ok"], "plan_label": b["plan"], "replayed": True}, b["wall_s"], [], None)
            for g, b in earlier["meta"]["baselines"].items() if g in gpus}  # fmt: skip
    return base, grabs


def timeline(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {a["stage"]: (a["started_s"], a["started_s"] + a["wall_s"]) for a in report.get("attempts", [])
            if a["outcome"] == "ok"}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--gpus", default="", help="NVML indices (default: all)")
    ap.add_argument("--card-gib", type=float, default=16.0, help="free memory each GPU is left with by the filler")
    ap.add_argument("--vram", default="12GB")
    ap.add_argument("--wait-for-vram", type=float, default=10.0)
    ap.add_argument("--cpu-fallback", choices=("auto", "never"), default="auto",
                    help="the jobs' --cpu-fallback: auto runs a stage no GPU plan fits on the CPU; never exits 75")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--run-timeout", type=float, default=0.0, help="stop a run still going after this many s "
                    "(0: never): a row that says so instead of a lost session")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/chaos")))
    ap.add_argument("--part", default="", help="K/N: only the runs i with i %% N == K-1 of the seeded schedule")
    ap.add_argument("--only", default="", help="2,5: only these runs of the seeded schedule (a rerun of some, e.g. "
                    "under a newer version: --merge then keeps the newest row of each run and lists the older)")
    ap.add_argument("--merge", type=Path, nargs="+", help="chaos_part*.json files to join into chaos.json")
    ap.add_argument("--replay", type=Path, default=None, help="an earlier chaos JSON: rerun its rows (with --only, "
                    "those) with the very grabs it recorded, against its recorded baseline (no baseline run)")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.merge:
        return merge(args.merge, args.out)
    args.work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    from budgets.table import load_table
    from orchestrator.calibrate import write_photos

    table = load_table(None, "up2you")
    uuids: dict[str, str] = {}
    gpu_meta: list[dict[str, Any]] = []
    if args.device == "cuda":
        from orchestrator.probe import NvmlProbe

        found = NvmlProbe().gpus()
        chosen = [g for g in found if not args.gpus or str(g.index) in args.gpus.split(",")]
        args.gpus = [str(g.index) for g in chosen]
        uuids = {str(g.index): g.uuid for g in chosen}
        gpu_meta = [{"index": g.index, "name": g.name, "total_bytes": g.total, "free_bytes": g.free} for g in chosen]
    else:
        args.gpus = ["cpu"]
    photos = write_photos(args.work / "photos", 4)
    fillers = []
    if args.device == "cuda":
        for g in args.gpus:
            fillers.append(subprocess.Popen([sys.executable, "-c", FILLER, str(int(args.card_gib * GiB))],
                                            stdout=subprocess.PIPE, text=True, env=_gpu_env(g, uuids[g])))  # fmt: skip
        for f in fillers:
            assert f.stdout is not None
            con.print(f.stdout.readline().strip())
    t_all = time.monotonic()
    try:
        if args.replay:
            base, grabs = replayed(args.replay, args.gpus)
        else:
            baselines = _parallel([(None, g) for g in args.gpus], photos, args, uuids)
            base = {g: r for (g, r) in zip(args.gpus, baselines, strict=True)}
            grabs = schedule(args.runs, args.gpus, {g: timeline(r[0]) for g, r in base.items()}, args.seed)
        for g, (rep, wall, _, _) in base.items():
            con.print(f"baseline GPU {g}: {wall:.1f} s, ok={rep.get('ok')} {rep.get('plan_label')}")
        if args.part:
            k, n = (int(x) for x in args.part.split("/"))
            grabs = [g for g in grabs if g.run % n == k - 1]
        if args.only:
            keep = {int(x) for x in args.only.split(",")}
            grabs = [g for g in grabs if g.run in keep]
        results = _parallel([(gr, gr.gpu) for gr in grabs], photos, args, uuids)
        rows = [summarise(gr, rep, wall, base[gr.gpu][1], lines, table.context_bytes, t0)
                for gr, (rep, wall, lines, t0) in zip(grabs, results, strict=True)]  # fmt: skip
    finally:
        for f in fillers:
            f.kill()
            f.wait()
    summary = summarise_all(rows, time.monotonic() - t_all)
    tag = args.part or (f"runs {args.only}" if args.only else "all")
    if args.replay:
        tag += f" (replayed from {args.replay.name}: its grabs and baseline)"
    meta = {"part": tag, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "git": git_commit(), "gpus": gpu_meta, "card_gib": args.card_gib,
            "vram": args.vram, "wait_for_vram_s": args.wait_for_vram, "cpu_fallback": args.cpu_fallback,
            "seed": args.seed, "tiny": args.tiny,
            "device": args.device, "plan": "6 views, 512 px, 10 steps, THG 3, 100 mesh iterations, full-random",
            "table": f"{table.name}@v{table.version}", "torch": torch_version(), "python": sys.version.split()[0],
            "baselines": {g: {"wall_s": round(r[1], 2), "plan": r[0].get("plan_label"), "ok": r[0].get("ok")}
                          for g, r in base.items()}}  # fmt: skip
    name = (f"chaos_part{args.part.split('/')[0]}.json" if args.part else
            f"chaos_runs{'-'.join(args.only.split(','))}.json" if args.only else "chaos.json")  # fmt: skip
    return write(args.out / name, meta, rows, summary)


def summarise_all(rows: list[dict[str, Any]], total_s: float) -> dict[str, Any]:
    return {
        "runs": len(rows), "finished": sum(r["ok"] for r in rows),
        "any_recomputed": sum(bool(r["recomputed"]) for r in rows),
        "peak_within_cap": sum(r["peak_within_cap"] for r in rows),
        "replanned": sum(bool(r["replans"]) for r in rows),
        # the last rung: runs that finished with some stage on the CPU, and how many stages took it
        "ran_on_cpu": sum(bool(r.get("cpu_stages")) for r in rows),
        "cpu_stages": sum(len(r.get("cpu_stages", [])) for r in rows),
        "mean_time_lost_s": round(sum(r["time_lost_s"] for r in rows) / max(1, len(rows)), 2),
        "total_s": round(total_s, 1),
    }  # fmt: skip


def write(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1, default=str))
    print_table(rows)
    con.print(json.dumps(summary))
    con.print(f"wrote {path}")
    return 0 if summary["finished"] == len(rows) and not summary["any_recomputed"] else 1


def merge(parts: list[Path], out: Path) -> int:
    """Join --part results (same seed and settings) into one chaos.json, runs in schedule order."""
    loaded = sorted((json.loads(p.read_text()) for p in parts), key=lambda d: d["meta"]["date"])
    newest: dict[int, dict[str, Any]] = {}  # run -> its row, with when and at which commit it was measured
    superseded = []
    for d in loaded:  # oldest first: a run measured again (--only) keeps its newest row
        for r in d["runs"]:
            if r["run"] in newest:
                old = newest[r["run"]]
                superseded.append({k: old[k] for k in ("run", "ok", "exit_code", "message", "measured", "git")})
            newest[r["run"]] = {**r, "measured": d["meta"]["date"], "git": d["meta"].get("git")}
    rows = [r for _, r in sorted(newest.items())]
    meta = {**loaded[-1]["meta"], "part": "merged", "parts": [d["meta"] for d in loaded], "superseded": superseded}
    return write(out / "chaos.json", meta, rows, summarise_all(rows, sum(d["summary"]["total_s"] for d in loaded)))


def _parallel(jobs: list[tuple[Grab | None, str]], photos: Path, args: argparse.Namespace,
              uuids: dict[str, str]) -> list[Any]:
    """Run the jobs, one per GPU at a time, every GPU busy; results in the order given."""
    results: list[Any] = [None] * len(jobs)
    queues = {g: [i for i, (_, gg) in enumerate(jobs) if gg == g] for g in args.gpus}

    def lane(g: str) -> None:
        for i in queues[g]:
            grab = jobs[i][0]
            results[i] = run_one(grab, photos, args.work, _for_gpu(args, g), uuids)
            rep, wall, _, _ = results[i]
            con.print(f"run {grab.run if grab else 'baseline'} GPU {g}: {wall:.1f} s ok={rep.get('ok')} "
                      f"{rep.get('message', '')}", highlight=False)  # fmt: skip

    threads = [threading.Thread(target=lane, args=(g,)) for g in args.gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _for_gpu(args: argparse.Namespace, g: str) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    a.gpus = [g]
    return a


def print_table(rows: list[dict[str, Any]]) -> None:
    t = Table(title="chaos: a neighbour grabs 30-97 % of free memory at a random moment")
    for col in ("run", "gpu", "grab", "GiB", "at s", "held", "stage hit", "OOM in", "re-plan", "on CPU", "lost s",
                "ok", "recomputed", "peak/cap GiB"):  # fmt: skip
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(str(r["run"]), r["gpu"], f"{r['fraction'] * 100:.0f} %",
                  f"{(r['grabbed_bytes'] or 0) / GiB:.1f}", f"{r['grab_s'] or r['at_s']:.1f}",
                  "to the end" if r["hold_s"] < 0 else f"{r['hold_s']:.0f} s", r["stage_hit"],
                  ",".join(r["oom_stages"]) or "-", "; ".join(r["replans"])[:90] or "-",
                  ",".join(r.get("cpu_stages", [])) or "-", f"{r['time_lost_s']:+.1f}",
                  "yes" if r["ok"] else f"NO ({r['exit_code']})", ",".join(r["recomputed"]) or "none",
                  f"{r['peak_nvml_bytes'] / GiB:.2f}/{r['cap_bytes'] / GiB:.2f}" + ("" if r["peak_within_cap"] else " OVER"))  # fmt: skip
    con.print(t)


if __name__ == "__main__":
    sys.exit(main())
