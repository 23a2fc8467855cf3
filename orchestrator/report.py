"""What a finished (or failed) job leaves in OUT: run.json, vram_timeline.png and the deliverables."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.runner import Attempt
from stages.jobfs import JobDir, write_bytes

# (stage, file in the stage folder, name in OUT); view images are matched by pattern.
DELIVERABLES = (("mesh", "mesh.obj", "mesh.obj"), ("mesh", "mesh.glb", "mesh.glb"),
                ("video", "turntable.mp4", "turntable.mp4"), ("video", "normals.mp4", "normals.mp4"),
                ("video", "contact_sheet.png", "contact_sheet.png"))  # fmt: skip
VIEW_IMAGES = (("rgb", "view_*.png"), ("normal", "normal_*.png"))


def collect_deliverables(job: JobDir, out: Path) -> list[str]:
    """Put the deliverables that exist into OUT (views into OUT/views/); return their paths relative to OUT."""
    copied = []
    for stage, name, dest in DELIVERABLES:
        src = job.path(stage, name)
        if src.is_file():
            _link_or_copy(src, out / dest)
            copied.append(dest)
    for stage, pattern in VIEW_IMAGES:
        for src in sorted(job.stage_dir(stage).glob(pattern)):
            (out / "views").mkdir(exist_ok=True)
            _link_or_copy(src, out / "views" / src.name)
            copied.append(f"views/{src.name}")
    return copied


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (instant; the job's files are only ever replaced, never written in place), else a copy
    (another file system, or one without links). What was at `dst` before is replaced."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_bytes(path, (json.dumps(record, indent=1, default=str) + "\n").encode())


def _import_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def warm_up_plotting() -> threading.Thread:
    """Import matplotlib in a thread while the stages run (the orchestrator only polls then): the import was
    most of the timeline plot's cost (0.71 s of it on the 2-core CPU machine), paid after the last stage."""
    thread = threading.Thread(target=_import_pyplot, name="import-matplotlib", daemon=True)
    thread.start()
    return thread


def plot_timeline(path: Path, attempts: Sequence[Attempt], budget_bytes: int, cap_bytes: int | None) -> bool:
    """Per-stage memory samples over time with the budget (and allocator cap) drawn; False if nothing to plot."""
    ran = [a for a in attempts if a.samples]
    if not ran:
        return False
    plt = _import_pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    gib = 2**30
    on_gpu = any(s.gpu_bytes is not None for a in ran for s in a.samples)
    for a in ran:
        t = [s.t for s in a.samples]
        y = [(s.gpu_bytes if on_gpu else s.rss_bytes) or 0 for s in a.samples]
        label = f"{a.stage} #{a.attempt}" + ("" if a.outcome == "ok" else f" ({a.outcome})")
        ax.plot(t, [v / gib for v in y], label=label)
        if a.predicted_bytes:
            ax.hlines(a.predicted_bytes / gib, t[0], t[-1], linestyles="dotted", colors="gray")
    ax.axhline(budget_bytes / gib, color="red", label="budget")
    if cap_bytes:
        ax.axhline(cap_bytes / gib, color="orange", linestyle="--", label="allocator cap")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("GiB " + ("(NVML, per process)" if on_gpu else "(host RSS: CPU run)"))
    ax.set_title("memory per stage (dotted: predicted)")
    ax.legend(fontsize="small", ncol=2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.11, top=0.93)  # fixed: tight_layout took half the plot's time
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
