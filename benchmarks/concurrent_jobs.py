"""Many `--vram auto` jobs on one GPU at once, through the host-wide ledger (GPU only; not a test).

    OUT=/some/dir python benchmarks/concurrent_jobs.py --jobs 4,8          # the H200/H100 measurement
    python benchmarks/concurrent_jobs.py --tiny --device cpu --quick --jobs 2 --out /tmp/cj   # the script itself

For each N in --jobs: start N jobs, --stagger seconds apart (default 2), each its own process running
`run_job` with `--vram auto`, 20 views x 768 px, full-size architectures with random weights
(RunOptions(full_random=True)), 10 steps, 100 remeshing iterations (the issue's setting). Every 50 ms
the parent samples NVML's used memory of the card and the sum of the ledger's reservations (and
NVML used + what is reserved but not yet allocated: what the ledger treats as taken). Per job it
records outcome, exit code, plan, waits, re-plans and wall time.

Checks (printed, and in the JSON's `checks`): every job finished, and the reservations never
exceeded the card. Writes $OUT/concurrent_jobs.json (GPU name, torch version, date) and
$OUT/concurrent_jobs.png; the JSON is rewritten after each round, so a cut-short run keeps what it has.
Budget: on an H100/H200 a round of 4 takes about 3 min and a round of 8 about 4-5 min (one job alone:
~130 s); --round-timeout (default 420 s) stops a round's leftovers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.probe import GpuInfo, default_probe  # noqa: E402

GiB = 2**30
SAMPLE_S = 0.05


# --- one job (a child process of the benchmark) ------------------------------------------------------
def run_one_job(args: argparse.Namespace) -> int:
    from orchestrator.job import RunOptions, run_job

    overrides = {"mesh_iters": args.mesh_iters} if not args.tiny else {}
    opts = RunOptions(vram="auto", gpu=args.gpu, views=args.views, resolution=args.resolution, steps=args.steps,
                      thg_interval=3, max_retries=3, quiet=True, device=args.device, tiny=args.tiny,
                      full_random=not args.tiny, wait_for_vram_s=args.wait_for_vram,
                      overrides=tuple(overrides.items()))  # fmt: skip
    report = run_job(args.one[0], args.one[1], opts)
    print(f"exit {report.exit_code}: {report.message}", flush=True)
    return report.exit_code


# --- the parent: start N, sample, collect ------------------------------------------------------------
class Sampler(threading.Thread):
    """NVML used, the ledger's reservations, and NVML used + outstanding claims, every SAMPLE_S."""

    def __init__(self, gpu: GpuInfo, t0: float) -> None:
        super().__init__(daemon=True)
        self.probe = default_probe("cuda")
        self.ledger = Ledger(probe=self.probe)
        self.gpu = gpu
        self.t0 = t0
        self.rows: list[tuple[float, int, int, int, int]] = []  # t, nvml used, reserved, taken, n entries
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                g = next(x for x in self.probe.gpus() if x.uuid == self.gpu.uuid)
                v = self.ledger.view(g)
                reserved = sum(h.reservation.nbytes for h in v.holdings if h.alive)
                taken = g.total - v.available()
                self.rows.append((round(time.monotonic() - self.t0, 3), g.used, reserved, taken, len(v.holdings)))
            except Exception as exc:  # a missed sample is not a failed benchmark
                print(f"sample failed: {exc}", file=sys.stderr)
            self.stop.wait(SAMPLE_S)


def run_round(n: int, args: argparse.Namespace, gpu: GpuInfo, photos: Path) -> dict[str, Any]:
    work = args.work / f"round_{n}"
    shutil.rmtree(work, ignore_errors=True)  # a warm machine must not resume an old run
    work.mkdir(parents=True)
    t0 = time.monotonic()
    sampler = Sampler(gpu, t0)
    sampler.start()
    jobs = []
    for i in range(n):
        out = work / f"job_{i:02d}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(photos), str(out), *child_args(args)]
        log = open(work / f"job_{i:02d}.log", "w")  # noqa: SIM115 - closed below
        jobs.append({"i": i, "out": out, "log": log, "start": time.monotonic() - t0,
                     "proc": subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                              start_new_session=True)})  # fmt: skip
        if i < n - 1:
            time.sleep(args.stagger)
    deadline = t0 + args.round_timeout
    for j in jobs:
        try:
            j["proc"].wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(j["proc"].pid, signal.SIGTERM)  # the job stops its stage and writes run.json
            try:
                j["proc"].wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(j["proc"].pid, signal.SIGKILL)
                j["proc"].wait()
            j["timed_out"] = True
        j["end"] = time.monotonic() - t0
        j["log"].close()
    time.sleep(0.5)
    sampler.stop.set()
    sampler.join(5)
    rows = sampler.rows
    results = [summarise(j) for j in jobs]
    max_reserved = max((r[2] for r in rows), default=0)
    return {
        "jobs": n, "stagger_s": args.stagger, "wall_s": round(max(j["end"] for j in jobs), 2),
        "all_finished": all(r["exit_code"] == 0 for r in results),
        "n_ok": sum(r["exit_code"] == 0 for r in results),
        "max_reserved_bytes": max_reserved, "max_nvml_used_bytes": max((r[1] for r in rows), default=0),
        "max_taken_bytes": max((r[3] for r in rows), default=0), "max_entries": max((r[4] for r in rows), default=0),
        "reservations_within_card": max_reserved <= gpu.total,
        "per_job": results, "samples": rows,
    }  # fmt: skip


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--gpu", args.gpu, "--views", str(args.views), "--resolution", str(args.resolution), "--steps",
           str(args.steps), "--mesh-iters", str(args.mesh_iters), "--device", args.device,
           "--wait-for-vram", str(args.wait_for_vram)]  # fmt: skip
    return out + (["--tiny"] if args.tiny else [])


def summarise(j: dict[str, Any]) -> dict[str, Any]:
    code = j["proc"].returncode
    row: dict[str, Any] = {"job": j["i"], "exit_code": code, "timed_out": j.get("timed_out", False),
                           "start_s": round(j["start"], 2), "end_s": round(j["end"], 2),
                           "wall_s": round(j["end"] - j["start"], 2)}  # fmt: skip
    run_json = j["out"] / "run.json"
    if run_json.is_file():
        rec = json.loads(run_json.read_text())
        row.update({
            "ok": rec["ok"], "message": rec["message"], "plan": rec["plan_label"],
            "views": rec["plan"]["views"], "resolution": rec["plan"]["resolution"], "budget": rec["budget"]["source"],
            "degradations": rec["degradations"], "replans": [r["reason"] for r in rec["replans"]],
            "waits": [{k: w[k] for k in ("stage", "seconds", "kind", "outcome", "holders")} for w in rec["waits"]],
            "wait_s": round(sum(w["seconds"] for w in rec["waits"]), 2),
            "stages": [[a["stage"], a["outcome"], round(a["started_s"], 2), round(a["wall_s"], 2), a["reserved_bytes"],
                        a["measured_gpu_bytes"]] for a in rec["attempts"] if a["outcome"] != "skipped"],
        })  # fmt: skip
    else:
        tail = (j["out"].parent / f"job_{j['i']:02d}.log").read_text().strip().splitlines()[-1:]
        row.update({"ok": False, "message": tail[0] if tail else "no output"})
    return row


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    fig, axes = plt.subplots(2, len(rounds), figsize=(7 * len(rounds), 8), squeeze=False)
    total = result["meta"]["gpu_total_bytes"] / GiB
    for k, rd in enumerate(rounds):
        labelled: set[str] = set()
        ax = axes[0, k]
        s = rd["samples"]
        t = [r[0] for r in s]
        ax.plot(t, [r[1] / GiB for r in s], label="NVML used")
        ax.plot(t, [r[2] / GiB for r in s], label="sum of ledger reservations")
        ax.plot(t, [r[3] / GiB for r in s], label="taken (NVML used + reserved, not yet allocated)", alpha=0.6)
        ax.axhline(total, color="red", label="card")
        ax.set_title(f"{rd['jobs']} jobs, {rd['n_ok']}/{rd['jobs']} finished, {rd['wall_s']:.0f} s", fontsize=10)
        ax.set_xlabel("s")
        ax.set_ylabel("GiB")
        ax.legend(fontsize=7)
        ax = axes[1, k]
        colours: dict[str, Any] = {}
        for row in rd["per_job"]:
            y = row["job"]
            ax.barh(y, row["wall_s"], left=row["start_s"], color="#eee", edgecolor="k")
            for stage, outcome, start, wall, _, _ in row.get("stages", []):
                c = colours.setdefault(stage, plt.cm.tab10(len(colours) % 10))
                ax.barh(y, wall, left=row["start_s"] + start, height=0.5, color=c, edgecolor="white", linewidth=0.5,
                        hatch="" if outcome == "ok" else "xx", label=stage if stage not in labelled else None)  # fmt: skip
                labelled.add(stage)
            label = f"{row.get('views', '?')}v {row.get('resolution', '?')} px, waited {row.get('wait_s', 0):.0f} s"
            ax.text(row["end_s"] + 1, y, label, va="center", fontsize=7)
        ax.set_yticks([row["job"] for row in rd["per_job"]])
        ax.set_xlabel("s since the round started (coloured: stages, hatched: failed; grey: the job process)")
        ax.set_ylabel("job")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def meta(args: argparse.Namespace, gpu: GpuInfo) -> dict[str, Any]:
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"gpu": gpu.name, "gpu_uuid": gpu.uuid, "gpu_total_bytes": gpu.total, "torch": torch_version,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "views": args.views, "resolution": args.resolution,
            "steps": args.steps, "mesh_iters": args.mesh_iters, "tiny": args.tiny, "device": args.device,
            "stagger_s": args.stagger, "wait_for_vram_s": args.wait_for_vram, "sample_s": SAMPLE_S}  # fmt: skip


def warm_up(args: argparse.Namespace) -> None:
    """Page torch in and build nvdiffrast once, so no round is charged for the machine's first use."""
    if args.device == "cpu":
        return
    code = ("import torch; torch.zeros(1, device='cuda'); "
            "from up2you.render.nvdiffrast_backend import load_nvdiffrast; load_nvdiffrast()")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="4,8", help="comma list: job counts, one round each")
    ap.add_argument("--stagger", type=float, default=2.0, help="seconds between job starts")
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mesh-iters", type=int, default=100)
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (with --tiny: tests the script)")
    ap.add_argument("--tiny", action="store_true", help="tiny random weights (the CPU check of this script)")
    ap.add_argument("--quick", action="store_true", help="with --tiny: 6 views x 256 px, 2 steps")
    ap.add_argument("--wait-for-vram", type=float, default=0.0, help="each job's --wait-for-vram (foreign memory)")
    ap.add_argument("--round-timeout", type=float, default=420.0, help="stop a round's jobs after this many s")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/up2you-concurrent"), help="job folders (GBs each)")
    ap.add_argument("--one", nargs=2, type=Path, metavar=("PHOTOS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.views, args.resolution, args.steps = 6, 256, 2
    if args.one:
        return run_one_job(args)
    if args.device == "cpu" and not os.environ.get("UP2YOU_SIMULATED_GPUS"):
        ap.error("--device cpu needs simulated GPUs: set UP2YOU_SIMULATED_GPUS (see orchestrator/probe.py)")
    from orchestrator.calibrate import write_photos

    probe = default_probe(args.device)
    assert probe is not None
    gpu = next((g for g in probe.gpus() if str(g.index) == args.gpu), None)
    if gpu is None:
        ap.error(f"--gpu {args.gpu}: no such GPU")
    counts = [int(x) for x in args.jobs.split(",") if x.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    photos = write_photos(args.work / "photos")
    warm_up(args)
    result: dict[str, Any] = {"meta": meta(args, gpu), "rounds": []}
    for n in counts:
        print(f"round: {n} jobs, {args.stagger} s apart ...", flush=True)
        rd = run_round(n, args, gpu, photos)
        result["rounds"].append(rd)
        result["checks"] = {f"{r['jobs']}_jobs": {"all_finished": r["all_finished"],
                                                  "reservations_within_card": r["reservations_within_card"]}
                            for r in result["rounds"]}  # fmt: skip
        (args.out / "concurrent_jobs.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"  {rd['n_ok']}/{n} finished in {rd['wall_s']:.0f} s; max reserved {rd['max_reserved_bytes'] / GiB:.1f} "
              f"GiB, max NVML used {rd['max_nvml_used_bytes'] / GiB:.1f} GiB of {gpu.total / GiB:.1f} GiB "
              f"({'within' if rd['reservations_within_card'] else 'ABOVE'} the card)")  # fmt: skip
        for row in rd["per_job"]:
            print(f"  job {row['job']}: exit {row['exit_code']}, {row.get('plan', '-')}, waited {row.get('wait_s', 0)} s, "
                  f"{row['wall_s']:.0f} s" + (f" — {row['message']}" if row["exit_code"] else ""))  # fmt: skip
    plot(result, args.out / "concurrent_jobs.png")
    print(f"wrote {args.out / 'concurrent_jobs.json'} and {args.out / 'concurrent_jobs.png'}")
    ok = all(r["all_finished"] and r["reservations_within_card"] for r in result["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
