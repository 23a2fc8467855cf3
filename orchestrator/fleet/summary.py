"""What a fleet leaves in OUT: summary.json, summary.csv (one row per subject) and fleet_timeline.png.

Each row comes from the subject's own run.json (plan, peak, wall time) where its job got that far,
and from the fleet's record otherwise (a subject that failed before its job started).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.report import write_json

COLUMNS = ("subject", "gpu", "plan", "wall_s", "peak_gib", "outcome", "exit_code", "message")
GiB = 2**30


@dataclass
class SubjectRecord:
    """One subject as the fleet saw it."""

    subject: str
    out_dir: Path
    outcome: str = "waiting"  # waiting | running | ok | failed | skipped | interrupted
    gpu: str = ""  # "GPU 0", "CPU", or where Ray ran it
    need_bytes: int = 0
    plan_label: str = ""
    exit_code: int | None = None
    message: str = ""
    started_s: float | None = None  # since the fleet started
    ended_s: float | None = None
    activity: str = ""  # what a running job is doing now (its stage), for the progress view
    extra: dict[str, Any] = field(default_factory=dict)


def read_run(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def peak_bytes(run: dict[str, Any]) -> int | None:
    """The job's highest measured peak over its stages (NVML per process; host RSS on a CPU run)."""
    peaks = [m.get("measured_gpu_bytes") or m.get("measured_rss_bytes") or 0
             for m in run.get("predicted_vs_measured", {}).values()]  # fmt: skip
    return max(peaks) if peaks and max(peaks) > 0 else None


def row(rec: SubjectRecord) -> dict[str, Any]:
    run = read_run(rec.out_dir) if rec.outcome in ("ok", "failed", "skipped", "interrupted") else None
    peak = peak_bytes(run) if run else None
    wall = run.get("wall_s") if run else None
    if wall is None and rec.started_s is not None and rec.ended_s is not None:
        wall = round(rec.ended_s - rec.started_s, 3)
    return {
        "subject": rec.subject, "gpu": rec.gpu, "plan": (run or {}).get("plan_label") or rec.plan_label,
        "wall_s": wall, "peak_gib": round(peak / GiB, 3) if peak else None, "peak_bytes": peak,
        "outcome": rec.outcome, "exit_code": rec.exit_code, "message": rec.message,
        "need_bytes": rec.need_bytes, "started_s": rec.started_s, "ended_s": rec.ended_s,
        "out_dir": str(rec.out_dir), **rec.extra,
    }  # fmt: skip


def write_summary(out: Path, records: Sequence[SubjectRecord], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.json (meta + every field) and summary.csv (COLUMNS); returns the rows."""
    rows = [row(r) for r in records]
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    write_json(out / "summary.json", {**meta, "counts": counts, "subjects": rows})
    tmp = out / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "summary.csv")
    return rows


def plot_fleet_timeline(path: Path, records: Sequence[SubjectRecord]) -> bool:
    """One panel per GPU: each subject's memory over fleet time (from its run.json samples), their sum and
    the card's total. Sample times are placed at the job's end minus its wall time (planning is inside)."""
    series: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    totals: dict[str, int] = {}
    for rec in records:
        run = read_run(rec.out_dir) if rec.ended_s is not None else None
        if not run or rec.ended_s is None:
            continue
        t0 = rec.ended_s - float(run.get("wall_s") or 0.0)
        ts: list[float] = []
        ys: list[float] = []
        for a in run.get("attempts", []):
            for t, gpu_b, rss_b in a.get("samples", []):
                ts.append(t0 + t)
                ys.append((gpu_b if gpu_b is not None else rss_b or 0) / GiB)
        if ts:
            series.setdefault(rec.gpu, []).append((rec.subject, ts, ys))
            gpu = (run.get("budget") or {}).get("gpu") or {}
            if gpu.get("total"):
                totals[rec.gpu] = int(gpu["total"])
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.2 * len(names)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names, strict=True):
        grid: dict[float, float] = {}
        for subject, ts, ys in series[name]:
            ax.plot(ts, ys, linewidth=1, label=subject)
            for key, mean in _bin_means(ts, ys).items():
                grid[key] = grid.get(key, 0.0) + mean
        if grid:
            xs = sorted(grid)
            ax.plot(xs, [grid[x] for x in xs], color="black", linewidth=1.5, label="sum (1 s bins)")
        if name in totals:
            ax.axhline(totals[name] / GiB, color="red", linestyle="--", label="GPU total")
        ax.set_ylabel("GiB")
        ax.set_title(f"{name}: memory per subject", fontsize=9)
        ax.legend(fontsize="x-small", ncol=4)
    axes[-1, 0].set_xlabel("seconds since the fleet started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _bin_means(ts: list[float], ys: list[float]) -> dict[float, float]:
    """One subject's mean memory per 1-s bin (so subjects sampled at different moments can be summed)."""
    sums: dict[float, list[float]] = {}
    for t, y in zip(ts, ys, strict=True):
        acc = sums.setdefault(float(round(t)), [0.0, 0.0])
        acc[0] += y
        acc[1] += 1
    return {k: a / n for k, (a, n) in sums.items()}
