"""Where the next subject goes: pure decisions over a snapshot of the GPUs (no I/O, testable as is).

A subject's *need* is its plan's peak (the largest stage's predicted NVML-visible bytes plus margin):
stages run one at a time, so a job never holds more than that. Several jobs fit one GPU side by side
when their needs add up within its memory. The queue spreads: among the GPUs where the subject fits
now, it takes the one running the fewest of our jobs, then the one with the most headroom.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.probe import GpuInfo
from orchestrator.runner import AUTO_RESERVE


def auto_host_limit() -> int:
    """With --jobs-per-gpu auto, at most this many jobs on the host at once: half the CPU cores.

    Much of a job's time is CPU work (building models, imports, pre-start, the mesh's CPU parts), so
    jobs packed beyond the cores only queue for them.
    """
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class Slot:
    """One GPU (or, on a CPU run, the host) as the queue sees it at one moment."""

    index: int | None  # NVML index; None: a CPU run
    name: str
    total: int
    ideal: int  # what one more job could plan with if none of ours ran here (free, unreserved, ours given back)
    headroom: int  # what one more job can count on now: free and unreserved, less what ours will still take
    running: int  # our jobs on it now
    gpu: GpuInfo | None = None

    @property
    def label(self) -> str:
        return f"GPU {self.index}" if self.index is not None else "CPU"


def fits(need: int, slot: Slot, jobs_per_gpu: int | None) -> bool:
    """Whether a job needing `need` bytes can start on `slot` now (the job keeps AUTO_RESERVE unused)."""
    if jobs_per_gpu is not None and slot.running >= jobs_per_gpu:
        return False
    return need + AUTO_RESERVE <= slot.headroom


def choose_slot(needs: dict[int | None, int], slots: list[Slot], jobs_per_gpu: int | None) -> Slot | None:
    """The slot for a subject whose need on each slot is `needs[index]` (absent: cannot plan there now)."""
    ok = [s for s in slots if s.index in needs and fits(needs[s.index], s, jobs_per_gpu)]
    return min(ok, key=lambda s: (s.running, -s.headroom, s.index if s.index is not None else -1), default=None)


def take(slot: Slot, need: int) -> Slot:
    """The slot after a job needing `need` was placed on it (before the job reserved anything)."""
    return Slot(slot.index, slot.name, slot.total, slot.ideal, slot.headroom - need, slot.running + 1, slot.gpu)
