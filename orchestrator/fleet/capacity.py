"""How much of each GPU the queue may still give out: NVML and the host ledger, less what our jobs will take.

A job reserves only its current stage's need in the ledger (orchestrator.ledger), while the queue must
keep room for its whole plan. So for every job of ours it counts the part of its planned peak that the
job has not reserved yet (`claim - reserved`), on top of what the ledger says is free and unreserved.
Reservations are matched to a job by its ledger id (the job's output folder) or by process (the
job's pid or any of its descendants).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, Protocol

import psutil

from orchestrator.fleet.placement import Slot
from orchestrator.job import JobError
from orchestrator.ledger import Ledger, LedgerError
from orchestrator.probe import GpuInfo, Probe
from stages.spec import EXIT_DISK_FULL


class LedgerView(Protocol):
    def available(self, gpu: GpuInfo, exclude_job: str | None = None) -> int: ...

    def entries(self, gpu_uuid: str) -> list[Any]: ...


def host_ledger(probe: Probe) -> LedgerView:
    """The host-wide ledger (JobError with the fix if its runtime folder cannot be used)."""
    try:
        return Ledger(probe=probe)
    except LedgerError as exc:
        raise JobError(str(exc), EXIT_DISK_FULL) from None


@dataclass(frozen=True)
class Claim:
    """A running job of ours: where, which process, its ledger id (its output folder), its plan's peak need."""

    index: int | None
    pid: int
    job_id: str
    need: int


def _tree(pid: int) -> set[int]:
    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.Error:
        return {pid}


class Capacity:
    """Snapshots of the selected GPUs (or of the host, on a CPU run) for the placement decisions."""

    def __init__(self, probe: Probe | None, ledger: LedgerView | None, gpus: Collection[int] | None) -> None:
        self.probe = probe
        self.ledger = ledger
        self.gpus = gpus

    def slots(self, claims: Collection[Claim]) -> list[Slot]:
        if self.probe is None:
            mem = psutil.virtual_memory()
            mine = [c for c in claims if c.index is None]
            return [Slot(None, "host memory", mem.total, mem.available, mem.available - sum(c.need for c in mine),
                         len(mine))]  # fmt: skip
        out = []
        for g in self.probe.gpus():
            if self.gpus is not None and g.index not in self.gpus:
                continue
            mine = [c for c in claims if c.index == g.index]
            available = self.ledger.available(g) if self.ledger else g.free
            reserved = self._reserved(g, mine)
            ideal = available + sum(reserved.values())
            headroom = available - sum(max(0, c.need - reserved[c.pid]) for c in mine)
            out.append(Slot(g.index, g.name, g.total, ideal, headroom, len(mine), g))
        return out

    def _reserved(self, gpu: GpuInfo, mine: list[Claim]) -> dict[int, int]:
        """Bytes each of our jobs holds in the ledger on `gpu` now (0 between stages, or with no ledger)."""
        out = {c.pid: 0 for c in mine}
        if not self.ledger or not mine:
            return out
        entries = self.ledger.entries(gpu.uuid)
        for c in mine:
            tree = _tree(c.pid)
            out[c.pid] = sum(int(e.nbytes) for e in entries if e.job_id == c.job_id or e.pid in tree)
        return out


class StaticProbe:
    """A probe that always shows one GPU as given (for planning a subject against a chosen budget)."""

    def __init__(self, gpu: GpuInfo) -> None:
        self.gpu = gpu

    def gpus(self) -> list[GpuInfo]:
        return [self.gpu]

    def process_bytes(self, index: int, pids: Collection[int]) -> int | None:
        return None


def planning_probe(slot: Slot) -> StaticProbe | None:
    """A probe showing `slot`'s GPU with ample free memory, so that a plan made through it (and the ledger
    it consults) is bounded by the --vram given to the planner alone: the fleet passes exact bytes there."""
    if slot.gpu is None:
        return None
    return StaticProbe(replace(slot.gpu, free=slot.gpu.total + 2**40))
