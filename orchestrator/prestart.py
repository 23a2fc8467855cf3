"""Which stage processes to start ahead, and how much of each stage's start-up stayed on the clock.

A pre-started stage imports, prepares (weights into host memory) and waits for `go`; it touches CUDA
only after `go`, which the runner sends only once the stage before it has exited. So any number of
stages may wait at once without holding GPU memory: the limit is host memory. `pick_prestarts` takes
upcoming stages in pipeline order while their host footprints fit psutil's available memory, less a
reserve and less what the processes already alive are still expected to grow.

Footprints: the host RSS peaks measured per stage by the H100 calibration (profile full-random;
`benchmarks/results/calibration/h100_2026-11-22_measurements.json`, `rss_peak`, the maximum over the
grid), plus, for a run that reads files, the bytes of the checkpoint files the stage loads. Both
over-state what a waiting process holds (a peak, not the footprint before `go`), which errs safe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from stages.spec import StageSpec
from up2you import checkpoints

GiB = 2**30
HOST_RESERVE = 2 * GiB  # host memory no pre-start may take: the OS, the orchestrator, page cache for I/O
DEFAULT_FOOTPRINT = 1 * GiB  # a stage without a measurement: torch and its libraries imported
# rss_peak per stage, max over the calibration grid (apose: without the one-time nvdiffrast build, whose
# compiler processes measured 11.8 GB); rounded up to 10 MiB
MEASURED_RSS_PEAK: dict[str, int] = {
    "segment": 720 * 2**20, "features": 2150 * 2**20, "apose": 1620 * 2**20, "weights": 1420 * 2**20,
    "rgb": 6740 * 2**20, "normal": 5860 * 2**20, "mesh": 1760 * 2**20, "video": 1760 * 2**20,
}  # fmt: skip
HOST_EXPANSION = {"birefnet": 2}  # stored fp16, run in fp32 (as upstream): twice its file in host memory
AHEAD_ENV = "UP2YOU_PRESTART_AHEAD"  # at most this many stages waiting ahead (default: default_ahead())


def default_ahead() -> int:
    """One waiting stage per core beyond the one the running stage needs (importing burns a core):
    on 2 cores only the next stage, on 16 as many as memory holds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def configured_ahead() -> int:
    """How many stages the runner pre-starts ahead: $UP2YOU_PRESTART_AHEAD, else `default_ahead`."""
    raw = os.environ.get(AHEAD_ENV, "").strip()
    return int(raw) if raw.isdigit() else default_ahead()


def available_host_memory() -> int:
    """What psutil says can be allocated now without swapping (page cache counts as available)."""
    return int(psutil.virtual_memory().available)


def checkpoint_bytes(spec: StageSpec, weights_dir: str) -> int:
    """Host bytes of the files a stage loads from `--weights` once loaded (0 for a file that is absent)."""
    total = 0
    for key in spec.checkpoints:
        path = checkpoints.resolve(weights_dir, key)
        files: Iterable[Path] = path.rglob("*") if path.is_dir() else [path]
        total += sum(f.stat().st_size for f in files if f.is_file()) * HOST_EXPANSION.get(key, 1)
    return total


def host_footprint(spec: StageSpec, profile: str, weights_dir: str) -> int:
    """Host bytes a stage process may hold: its measured RSS peak, plus its files when it reads any."""
    base = MEASURED_RSS_PEAK.get(spec.name, DEFAULT_FOOTPRINT)
    return base + (checkpoint_bytes(spec, weights_dir) if profile == "real" and weights_dir else 0)


def pick_prestarts(
    upcoming: Sequence[tuple[str, int]], available: int, reserve: int = HOST_RESERVE, minimum: int = 1,
    maximum: int | None = None,
) -> list[str]:  # fmt: skip
    """The longest prefix of `upcoming` ((stage, footprint) in run order) whose footprints fit in
    `available - reserve`; at least `minimum` stages (the next stage is always pre-started, as it
    would start a moment later anyway), at most `maximum`."""
    room = available - reserve
    picked: list[str] = []
    for name, footprint in upcoming:
        if maximum is not None and len(picked) >= maximum:
            break
        if footprint > room and len(picked) >= minimum:
            break
        picked.append(name)
        room -= footprint
    return picked


def pending_growth(rss_and_footprints: Iterable[tuple[int, int]]) -> int:
    """How much more the live stage processes may still take: footprint minus RSS now, per process."""
    return sum(max(0, footprint - rss) for rss, footprint in rss_and_footprints)


def startup_report(attempts: Sequence[Any], manifests: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage (last attempt that ran): start-up hidden behind earlier stages, and start-up NOT hidden.

    not hidden = waiting after `go` for the process to finish importing and preparing (ready after
    `go`) + the child's set-up between `go` and its work (request, CUDA context, memory cap).
    """
    out: dict[str, dict[str, float]] = {}
    for a in attempts:
        if a.outcome == "skipped":
            continue
        timings = (manifests.get(a.stage) or {}).get("timings", {})
        waited = max(0.0, a.ready_s - a.started_s) if a.ready_s is not None else 0.0
        setup = float(timings.get("setup_s", 0.0))
        out[a.stage] = {
            "hidden_s": round(a.hidden_startup_s, 3), "waited_for_prepare_s": round(waited, 3),
            "setup_after_go_s": round(setup, 3), "not_hidden_s": round(waited + setup, 3),
            "import_s": round(float(timings.get("import_s", 0.0)), 3),
            "prepare_s": round(float(timings.get("prepare_s", 0.0)), 3),
        }  # fmt: skip
    return out
