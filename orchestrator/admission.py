"""Admitting a stage onto a shared GPU: reserve its need in the ledger, or wait for it, or say it cannot.

A stage offers its acceptable sizes in preference order (the plan's memory-only rungs: the same views
and pixels, so nothing is invalidated). The first that fits what is free and unreserved now is
reserved. If none fits, the job waits, holding no reservation (so waiting cannot deadlock), with a
ticket in the ledger's first-come-first-served queue, polling with jittered backoff:

- memory held by our own jobs (ledger entries, earlier waiters) comes back when their stages end, so
  waiting for it is on by default, bounded only by `wait_for_siblings_s` (an hour: a hung sibling
  must not hold a lab's queue forever);
- memory held by processes the ledger does not know (NVML lists them) may never come back: that
  wait is bounded by `--wait-for-vram` (default 0: degrade or fail at once, as before).

When the wait allowed is used up, `admit` returns no reservation and the caller degrades (fewer
views or pixels) or exits 75. Each wait is printed once (who holds how much) and recorded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.ledger import Ledger, LedgerView, Reservation, Ticket, process_start
from orchestrator.probe import GpuInfo, Probe
from orchestrator.sizes import gib

SIBLING_WAIT_S = 3600.0  # default bound on waiting for our own jobs (they finish; a hung one must not block)
POLL_MIN_S, POLL_MAX_S = 0.2, 2.0  # backoff between polls (well inside the ledger's ticket lease)


class StageGone(Exception):
    """The stage process ended before it was admitted (it failed while starting): nothing to reserve for."""


@dataclass
class Wait:
    """One wait for GPU memory, as recorded in run.json."""

    stage: str  # the stage that waited ("plan" for a wait before planning)
    seconds: float
    kind: str  # siblings (our own jobs) | foreign (other processes) | both
    needed_bytes: int
    available_bytes: int  # free and unreserved when the wait began
    holders: list[str] = field(default_factory=list)  # who held the memory when the wait began
    outcome: str = ""  # admitted | limit reached | interrupted
    message: str = ""


def job_label(job_id: str) -> str:
    """A job's id as a person reads it: the output folder's name (the id is its path) or the id."""
    return Path(job_id).name or job_id if "/" in job_id else job_id


def holders(view: LedgerView, job_id: str) -> list[str]:
    """Who holds the GPU, largest first: our other jobs' stages, earlier waiters, other processes."""
    rows: list[tuple[int, str]] = []
    for h in view.holdings:
        if h.reservation.job_id != job_id:
            r = h.reservation
            rows.append((h.held, f"job {job_label(r.job_id)} ({r.stage}, {gib(h.held)})"))
    for t in view.tickets:
        if t.job_id != job_id:
            rows.append((t.nbytes, f"job {job_label(t.job_id)} waiting ({t.stage}, {gib(t.nbytes)})"))
    for pid, nbytes, name in view.foreign:
        rows.append((nbytes, f"pid {pid}{' ' + name.split()[0] if name else ''} ({gib(nbytes)}, not ours)"))
    return [text for _, text in sorted(rows, key=lambda r: -r[0])]


def wait_line(view: LedgerView, job_id: str, stage: str, need: int, kind: str, limit_s: float,
              keep_free: int = 0) -> str:  # fmt: skip
    """The one line printed when a wait begins (the reserve kept free is named: without it, 1.5 GiB free for
    a 1.3 GiB need would read as a wait for nothing)."""
    who = holders(view, job_id)
    bound = "" if kind == "siblings" else f" (up to {limit_s:.0f} s: --wait-for-vram)"
    kept = f" plus {gib(keep_free)} kept free" if keep_free else ""
    return (f"GPU {view.gpu.index} has {gib(view.available(job_id))} free and unreserved, {stage} needs "
            f"{gib(need)}{kept}; waiting{bound} for {', '.join(who[:4]) or 'memory to come back'}"
            + (f" and {len(who) - 4} more" if len(who) > 4 else ""))  # fmt: skip


def wait_kind(view: LedgerView, job_id: str, need: int, keep_free: int) -> str:
    """siblings if `need` fits once our other jobs' stages end; foreign if other processes must leave too."""
    return "siblings" if need <= view.if_siblings_finished(job_id) - keep_free else "foreign"


class Admitter:
    """Reserve-or-wait for the stages of one job on one GPU."""

    def __init__(
        self, ledger: Ledger, gpu: GpuInfo, job_id: str, *, probe: Probe | None = None, keep_free: int = 0,
        wait_for_vram_s: float = 0.0, wait_for_siblings_s: float = SIBLING_WAIT_S,
        on_event: Callable[[str, Any], None] = lambda kind, payload: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.ledger = ledger
        self.gpu = gpu
        self.job_id = job_id
        self.probe = probe
        self.keep_free = keep_free
        self.wait_for_vram_s = wait_for_vram_s
        self.wait_for_siblings_s = wait_for_siblings_s
        self.on_event = on_event
        self.sleep = sleep
        self.waits: list[Wait] = []
        self.last_kind = ""  # what the last admit call found holding the memory: siblings | foreign
        self.last_wait: Wait | None = None  # the wait of the last admit call, if it waited

    def current_gpu(self) -> GpuInfo:
        """Our GPU as the probe sees it now (free memory changes)."""
        if self.probe is not None:
            for g in self.probe.gpus():
                if g.uuid == self.gpu.uuid:
                    self.gpu = g
        return self.gpu

    def try_admit(self, stage: str, pid: int, sizes: Sequence[int], cap: int | None = None) -> Reservation | None:
        """Reserve the first of `sizes` that fits now, or None at once: no wait, no queue ticket."""
        return self.ledger.reserve_first_fit(self.current_gpu(), self.job_id, stage, pid, sizes,
                                             keep_free=self.keep_free, cap=cap)  # fmt: skip

    def admit(self, stage: str, pid: int, sizes: Sequence[int], cap: int | None = None) -> Reservation | None:
        """Reserve the first of `sizes` that fits, waiting as the module docstring says; None = limit reached.

        Raises StageGone if process `pid` ends meanwhile (its exit code tells why, not the ledger)."""
        least = min(sizes)
        if cap is not None and least > cap:
            return None
        ticket: Ticket | None = None
        waited = {"siblings": 0.0, "foreign": 0.0}
        record: Wait | None = None
        self.last_wait, self.last_kind = None, ""
        delay = POLL_MIN_S
        try:
            while True:
                if process_start(pid) is None:
                    raise StageGone(pid)
                gpu = self.current_gpu()
                r = self.ledger.reserve_first_fit(gpu, self.job_id, stage, pid, sizes, ticket=ticket,
                                                  keep_free=self.keep_free, cap=cap)  # fmt: skip
                if r is not None:
                    ticket = None  # granted: the ledger removed it
                    if record is not None:
                        record.outcome = "admitted"
                    return r
                view = self.ledger.view(gpu)
                kind = self.last_kind = wait_kind(view, self.job_id, least, self.keep_free)
                limit = self.wait_for_siblings_s if kind == "siblings" else self.wait_for_vram_s
                if waited[kind] >= limit:
                    if record is not None:
                        record.outcome = "limit reached"
                    return None
                ticket = (self.ledger.take_ticket(gpu, self.job_id, stage, least) if ticket is None
                          else self.ledger.touch(ticket, least))  # fmt: skip
                if record is None:
                    line = wait_line(view, self.job_id, stage, least, kind, limit, self.keep_free)
                    record = Wait(stage, 0.0, kind, least, view.available(self.job_id), holders(view, self.job_id),
                                  message=line)  # fmt: skip
                    self.waits.append(record)
                    self.last_wait = record
                    self.on_event("wait", line)
                elif record.kind != kind:
                    record.kind = "both"
                pause = min(delay, max(0.05, limit - waited[kind])) * random.uniform(0.8, 1.2)
                self.sleep(pause)
                waited[kind] += pause
                record.seconds = round(sum(waited.values()), 3)
                delay = min(delay * 1.5, POLL_MAX_S)
        except KeyboardInterrupt:
            if record is not None:
                record.outcome = "interrupted"
            raise
        finally:
            if ticket is not None:
                self.ledger.drop_ticket(ticket)
