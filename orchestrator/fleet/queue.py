"""The fleet: a folder of subjects -> one job each, spread over this host's GPUs (or a Ray cluster).

The fleet sits above a job: it plans each subject only to know its peak need (orchestrator.job.plan_job
against what the GPU could give it), starts the job as its own `up2you-budget` process where that need
fits beside the jobs already running, follows its progress lines, and reads its run.json at the end.
Inside each job, the runner reserves and releases per stage in the host ledger as usual.

Order: subjects are taken in name order; one that fits nowhere now is passed over for the next (the
queue is finite, so it only waits until enough of ours finish). When nothing of ours runs and a
subject still fits nowhere, it waits as a job would: while other up2you jobs hold reservations on the
GPUs, up to an hour (RunOptions.wait_for_siblings_s); for other processes, up to --wait-for-vram;
then it fails with the reason. One subject's failure never stops the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.corrections import cache_dir
from orchestrator.fleet import resume
from orchestrator.fleet.capacity import Capacity, Claim, LedgerView, host_ledger, planning_probe
from orchestrator.fleet.command import job_command, job_env
from orchestrator.fleet.joblog import JobLog
from orchestrator.fleet.local import LocalJob
from orchestrator.fleet.placement import Slot, auto_host_limit, choose_slot, take
from orchestrator.fleet.progress import FleetView
from orchestrator.fleet.subjects import Subject
from orchestrator.fleet.summary import SubjectRecord, plot_fleet_timeline, read_run, write_summary
from orchestrator.inputs import EXIT_USAGE, InputError
from orchestrator.job import JobError, RunOptions, ensure_tiny_weights, plan_job, sigterm_as_interrupt
from orchestrator.probe import Probe, ProbeError, default_probe
from orchestrator.runner import AUTO_RESERVE
from orchestrator.sizes import gib, parse_size
from orchestrator.testenv import job_doubles
from stages.spec import EXIT_INTERRUPTED, EXIT_NO_DEVICE, EXIT_OOM

EXIT_SUBJECTS_FAILED = 1  # the fleet ran, and at least one subject failed (summary.csv says which and why)
BACKENDS = ("local", "ray")
LOG_NAME = "fleet.log"


@dataclass(frozen=True)
class FleetOptions:
    """The fleet's own options; everything else is the jobs' (RunOptions)."""

    gpus: tuple[int, ...] | None = None  # None: every visible GPU
    jobs_per_gpu: int | None = None  # None: auto (as many as fit, at most auto_host_limit() on the host)
    backend: str = "local"
    address: str | None = None  # Ray: the cluster to join (None: a running cluster, or the one ray.init'ed)
    worker_retries: int = 2  # Ray: reruns of a task whose worker died (never for a job's own failure)
    poll_s: float = 0.25


@dataclass
class FleetResult:
    exit_code: int
    out_dir: Path
    records: list[SubjectRecord]
    rows: list[dict[str, Any]] = field(default_factory=list)


def parse_gpus(text: str) -> tuple[int, ...] | None:
    """`all` -> None; `0,1` -> (0, 1); ValueError with the expected form otherwise."""
    if text.strip() == "all":
        return None
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--gpus {text!r}: expected all or NVML indices like 0,1") from None
    if not out or any(i < 0 for i in out) or len(set(out)) != len(out):
        raise ValueError(f"--gpus {text!r}: expected all or distinct NVML indices like 0,1")
    return out


def fleet_probe(options: RunOptions, probe: Probe | None) -> Probe | None:
    """The probe the fleet places with: the one given, else the one every job uses (default_probe)."""
    if probe is not None:
        return probe
    try:
        return default_probe(options.device)
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None


class Fleet:
    """One run of the queue; `run()` returns a FleetResult and has written OUT/summary.*."""

    def __init__(
        self, subjects: list[Subject], out: Path, options: RunOptions, fleet: FleetOptions,
        console: Console | None = None, probe: Probe | None = None, ledger: LedgerView | None = None,
        live: bool | None = None,
    ) -> None:  # fmt: skip
        self.subjects = {s.name: s for s in subjects}
        self.out = Path(out)
        self.options = options
        self.fleet = fleet
        self.console = console or Console(stderr=True)
        self.view = FleetView(self.console, live)
        self.t0 = time.monotonic()
        self.doubles = job_doubles()
        self.probe = fleet_probe(options, probe) if fleet.backend == "local" else probe
        self.ledger = ledger if ledger is not None or self.probe is None else host_ledger(self.probe)
        self.records = [SubjectRecord(s.name, self.out / s.name) for s in subjects]
        self.fingerprints: dict[str, dict[str, Any]] = {}
        self._plans: dict[tuple[str, int | None, int], tuple[int, str] | JobError] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------------------------------
    def run(self) -> FleetResult:
        self._check_gpus()
        todo = self._prepare()
        if self.options.tiny and todo:  # once here, not racing in every job
            ensure_tiny_weights(cache_dir() / "tiny-weights", self.console)
        interrupted = False
        try:
            with sigterm_as_interrupt():
                if self.fleet.backend == "ray":
                    from orchestrator.fleet.ray_backend import run_on_ray

                    run_on_ray(self, todo)
                else:
                    self._run_local(todo)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.view.close(self.records, self.now())
            rows = self._write_summary()
        if interrupted:
            code = EXIT_INTERRUPTED
        else:
            code = EXIT_SUBJECTS_FAILED if any(r.outcome != "ok" and r.outcome != "skipped" for r in self.records) else 0
        return FleetResult(code, self.out, self.records, rows)

    def _check_gpus(self) -> None:
        if self.fleet.gpus is None or self.probe is None:
            return
        present = [g.index for g in self.probe.gpus()]
        missing = [i for i in self.fleet.gpus if i not in present]
        if missing:
            raise JobError(f"--gpus {','.join(map(str, self.fleet.gpus))}: no GPU {', '.join(map(str, missing))}; "
                           f"present: {', '.join(map(str, present)) or 'none'} (see `up2you-budget gpus`)", EXIT_USAGE)  # fmt: skip

    def _prepare(self) -> list[SubjectRecord]:
        """Fingerprint every subject: unusable photos fail it now, a finished one is skipped."""
        todo = []
        for rec in self.records:
            try:
                fp = resume.fingerprint(self.subjects[rec.subject].folder, self.options)
            except InputError as exc:
                rec.outcome, rec.exit_code, rec.message = "failed", exc.exit_code, str(exc)
                rec.ended_s = self.now()
                continue
            self.fingerprints[rec.subject] = fp
            if resume.is_done(rec.out_dir, fp):
                rec.outcome, rec.exit_code, rec.message = "skipped", 0, "already done (same photos and options)"
                rec.gpu = _gpu_of(rec.out_dir)
            else:
                todo.append(rec)
        self.view.update(self.records, self.now())
        return todo

    def _write_summary(self) -> list[dict[str, Any]]:
        meta = {"backend": self.fleet.backend, "gpus": list(self.fleet.gpus) if self.fleet.gpus else "all",
                "jobs_per_gpu": self.fleet.jobs_per_gpu or "auto", "vram": self.options.vram,
                "wall_s": round(self.now(), 3), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        rows = write_summary(self.out, self.records, meta)
        plot_fleet_timeline(self.out / "fleet_timeline.png", self.records)
        return rows

    # ------------------------------------------------------------------------------------------
    def plan_need(self, rec: SubjectRecord, slot: Slot) -> tuple[int, str] | JobError:
        """(peak need, plan label) of `rec` if it ran alone on `slot` as it is now; the JobError if no plan fits.

        The budget is what a job would get there (--vram, at most `ideal` less the reserve), handed to the
        planner as exact bytes, so the plan does not depend on the moment's reservations a second time."""
        cap = None if self.options.vram == "auto" else parse_size(self.options.vram)
        budget = max(1, min(cap or slot.ideal, slot.ideal - AUTO_RESERVE))
        key = (rec.subject, slot.index, budget >> 28)  # re-plan when the budget moves by 1/4 GiB
        if key not in self._plans:
            opts = replace(self.options, gpu=str(slot.index) if slot.index is not None else "auto", vram=str(budget),
                           wait_for_vram_s=0.0, plan_only=True, quiet=True)  # fmt: skip
            try:
                jp = plan_job(self.subjects[rec.subject].folder, opts, planning_probe(slot), **self.doubles)
                self._plans[key] = (jp.choice.peak_need.need_bytes, jp.choice.candidate.label)
            except JobError as exc:
                what = f"--vram {self.options.vram}" if cap else f"what {slot.label} can give ({gib(budget)})"
                self._plans[key] = JobError(f"{what}: {str(exc).split(': ', 1)[-1]}", exc.exit_code)
        return self._plans[key]

    def _run_local(self, todo: list[SubjectRecord]) -> None:
        capacity = Capacity(self.probe, self.ledger, self.fleet.gpus)
        waiting = list(todo)
        running: dict[str, tuple[LocalJob, Claim, JobLog]] = {}
        host_limit = auto_host_limit() if self.fleet.jobs_per_gpu is None else None
        idle_since: float | None = None
        try:
            while waiting or running:
                for name, (job, _, log) in list(running.items()):
                    rec = self._record(name)
                    rec.activity = log.update()
                    code = job.poll()
                    if code is not None:
                        log.update()
                        resume.finish(rec, code, self.fingerprints[name], self.now(), log.last_line)
                        del running[name]
                slots = capacity.slots([c for _, c, _ in running.values()])
                for rec in list(waiting):
                    if host_limit is not None and len(running) >= host_limit:
                        break
                    placed = self._place(rec, slots)
                    if placed is None:
                        continue
                    slot, need, label = placed
                    waiting.remove(rec)
                    running[rec.subject] = self._start_local(rec, slot, need, label)
                    slots = [take(s, need) if s is slot else s for s in slots]
                if waiting and not running:
                    idle_since = self.now() if idle_since is None else idle_since
                    if self.now() - idle_since >= self._idle_limit(slots):
                        for rec in waiting:
                            self._fail_unplaceable(rec, slots)
                        waiting.clear()
                else:
                    idle_since = None
                self.view.update(self.records, self.now())
                if waiting or running:
                    time.sleep(self.fleet.poll_s)
        except KeyboardInterrupt:
            for job, _, _ in running.values():
                job.interrupt()
            for name, (job, _, log) in running.items():
                code = job.wait()
                log.update()
                resume.finish(self._record(name), code, self.fingerprints[name], self.now(), log.last_line)
            raise

    def _idle_limit(self, slots: list[Slot]) -> float:
        """How long to wait, with nothing of ours running, for a subject that fits nowhere: as a job does,
        long for other up2you jobs' reservations (they finish), --wait-for-vram for anything else."""
        if self.ledger is not None and any(self.ledger.entries(s.gpu.uuid) for s in slots if s.gpu is not None):
            return self.options.wait_for_siblings_s
        return self.options.wait_for_vram_s

    def _record(self, name: str) -> SubjectRecord:
        return next(r for r in self.records if r.subject == name)

    def _place(self, rec: SubjectRecord, slots: list[Slot]) -> tuple[Slot, int, str] | None:
        needs: dict[int | None, int] = {}
        labels: dict[int | None, str] = {}
        for s in slots:
            planned = self.plan_need(rec, s)
            if isinstance(planned, tuple):
                needs[s.index], labels[s.index] = planned
        slot = choose_slot(needs, slots, self.fleet.jobs_per_gpu)
        return (slot, needs[slot.index], labels[slot.index]) if slot is not None else None

    def _start_local(self, rec: SubjectRecord, slot: Slot, need: int, label: str) -> tuple[LocalJob, Claim, JobLog]:
        resume.mark_started(rec.out_dir)
        cmd = job_command(self.subjects[rec.subject].folder, rec.out_dir, slot.index, self.options)
        log = JobLog(rec.out_dir / LOG_NAME)  # from the log's end: an earlier run's lines are not this one's
        job = LocalJob(cmd, job_env(), rec.out_dir / LOG_NAME)
        rec.outcome, rec.gpu, rec.need_bytes, rec.plan_label = "running", slot.label, need, label
        rec.started_s, rec.ended_s, rec.exit_code, rec.message = self.now(), None, None, ""
        return job, Claim(slot.index, job.pid, str(rec.out_dir.resolve()), need), log

    def _fail_unplaceable(self, rec: SubjectRecord, slots: list[Slot]) -> None:
        """Nothing of ours runs and `rec` still fits nowhere: say why, as a single job would."""
        rec.outcome, rec.ended_s = "failed", self.now()
        errors = [p for s in slots if isinstance(p := self.plan_need(rec, s), JobError)]
        if slots and len(errors) == len(slots):
            rec.exit_code, rec.message = errors[0].exit_code, str(errors[0])
            return
        most = max((s.headroom for s in slots), default=0)
        needs = [p[0] for s in slots if isinstance(p := self.plan_need(rec, s), tuple)]
        rec.exit_code = EXIT_OOM
        rec.message = (f"needs {gib(min(needs, default=0))} and no selected GPU has that free and unreserved "
                       f"(most: {gib(most)}); free GPU memory, or wait for it with --wait-for-vram")  # fmt: skip


def _gpu_of(out_dir: Path) -> str:
    run = read_run(out_dir) or {}
    gpu = (run.get("budget") or {}).get("gpu")
    return f"GPU {gpu['index']}" if gpu else "CPU"


def run_fleet(
    subjects: list[Subject], out: Path, options: RunOptions, fleet: FleetOptions = FleetOptions(),
    console: Console | None = None, probe: Probe | None = None, ledger: LedgerView | None = None,
    live: bool | None = None,
) -> FleetResult:  # fmt: skip
    """Run every subject (see the module docstring); JobError only for a fleet-wide problem (bad --gpus, no GPU)."""
    if fleet.backend not in BACKENDS:
        raise JobError(f"--backend {fleet.backend!r}: expected local or ray", EXIT_USAGE)
    return Fleet(subjects, out, options, fleet, console, probe, ledger, live).run()
