"""Corrections learned from out-of-memory failures, kept per GPU model and budget table.

When a stage runs out of memory its prediction was too low. The runner raises that stage's
estimate (a multiplicative factor on the table's allocator prediction) and stores the factor in
`~/.cache/up2you-budget/corrections.json` (or `$UP2YOU_CACHE_DIR`), so the next run on the same
kind of GPU plans with it from the start. Factors only grow; a new table version starts afresh.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from stages.jobfs import write_bytes
from up2you.buildcache import cache_dir

OOM_GROWTH = 1.15  # a failed stage's new estimate: at least this much above what it failed at


class Corrections:
    """Per-stage factors for one (GPU model, budget table) pair, backed by a small JSON file."""

    def __init__(self, gpu_model: str, table_id: str, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "corrections.json"
        self.gpu_model = gpu_model
        self.table_id = table_id
        self._all = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # absent or corrupt: start afresh rather than fail a run
            return {}

    def _mine(self) -> dict[str, Any]:
        return self._all.get(self.gpu_model, {}).get(self.table_id, {})

    def factor(self, stage: str) -> float:
        return float(self._mine().get(stage, {}).get("factor", 1.0))

    def factors(self) -> dict[str, float]:
        return {s: float(v["factor"]) for s, v in self._mine().items()}

    def learn(self, stage: str, factor: float, reason: str) -> float:
        """Raise `stage`'s factor to at least `factor`, persist it, and return the factor now in force."""
        if factor <= self.factor(stage):
            return self.factor(stage)
        new = factor
        entry = {"factor": round(new, 4), "reason": reason,
                 "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        self._all.setdefault(self.gpu_model, {}).setdefault(self.table_id, {})[stage] = entry
        try:
            write_bytes(self.path, (json.dumps(self._all, indent=1) + "\n").encode())
        except OSError:
            pass  # an unwritable cache costs the next run a retry, not this run
        return new


def oom_factor(predicted_allocator: int, current_factor: float, failed_cap: int, measured_allocator: int | None) -> float:
    """The factor that lifts a stage's raw prediction above what it failed at.

    `failed_cap` is the allocator budget the stage ran out of; `measured_allocator` the peak NVML
    saw minus the CUDA context (when known). The new estimate is at least OOM_GROWTH times the larger.
    """
    floor = max(failed_cap, measured_allocator or 0) * OOM_GROWTH
    return max(current_factor * OOM_GROWTH, floor / max(predicted_allocator, 1))
