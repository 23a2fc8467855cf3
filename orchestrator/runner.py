"""Run a Pipeline's stages one process at a time; on out-of-memory, learn, re-plan and retry.

The runner owns the loop and nothing else: planning is `orchestrator.planner`, the child protocol
`orchestrator.process`, measuring `orchestrator.monitor`. While stage i runs, the processes of stage i+1
and of as many stages after it as host memory holds (`orchestrator.prestart`) are already importing and
loading weights into host memory (pre-start); each gets `go` only after the stage before it has exited,
so two stages never hold GPU memory at once.

On a shared GPU (a `Ledger` in the context) each GPU stage is admitted before `go`
(`orchestrator.admission`): its predicted need is reserved host-wide, on the fastest memory-only
rung that fits now, or the job waits; the stage's allocator cap is what it reserved, and the
reservation is released when the process has exited.

The last rung of "degrade only as far as it must" is the CPU: when no GPU plan fits what a neighbour
left (after `--wait-for-vram`, or after an OOM), that one stage runs on the CPU (`cpu_fallback`): the
same plan with `device="cpu"`, so the same key and nothing recomputed, no cap, no reservation. The
next stage asks the GPU again, and so does the CPU attempt itself: when the memory comes back while it
runs (a neighbour that held it for a while), a GPU process is started and admitted, and only then is the
CPU attempt stopped and the stage run on the GPU ("handed back to the GPU"). A stage is minutes on the
CPU and seconds on the GPU, so the most this can lose is one GPU run of the stage.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgets.table import BudgetTable, predict
from orchestrator import prestart
from orchestrator.admission import SIBLING_WAIT_S, Admitter, StageGone, Wait, wait_kind
from orchestrator.corrections import OOM_GROWTH, Corrections, oom_factor
from orchestrator.exports import Exports
from orchestrator.ledger import Ledger, LedgerError, LedgerView, Reservation
from orchestrator.monitor import MemorySampler, Sample
from orchestrator.planner import (
    Constraints,
    NoPlanFits,
    PlanChoice,
    StageFit,
    TimeBudgetTooShort,
    choice_of,
    choose_plan,
    same_quality,
)
from orchestrator.probe import GpuInfo, Probe
from orchestrator.process import StageProcess, process_rss
from orchestrator.sizes import gib
from stages.jobfs import JobDir
from stages.plan import Plan
from stages.spec import (
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_MEANINGS,
    EXIT_OK,
    EXIT_OOM,
    Pipeline,
    StageSpec,
)

AUTO_RESERVE = 256 * 2**20  # free memory left untouched when the budget follows what is free
POLL_S = 0.05
RECLAIM_AFTER_S = 5.0  # a CPU attempt looks for the GPU again once it has run this long (no thrashing) ...
RECLAIM_EVERY_S = 2.0  # ... and then this often
HANDED_BACK = "handed back to the GPU"  # the outcome of a CPU attempt stopped because the GPU had room again
PRESTART_ENV = "UP2YOU_PRESTART"
MAX_SAMPLES_IN_REPORT = 2000  # per attempt in run.json (a 20-minute stage sampled at 20 Hz has 24000)


@dataclass
class Attempt:
    """One stage process that ran (or a stage skipped because its result was already there)."""

    stage: str
    attempt: int
    outcome: str  # ok | skipped | oom | interrupted | bad input | missing weights | ...
    exit_code: int | None
    key: str
    plan_label: str
    predicted_bytes: int  # NVML-visible: allocator prediction (corrected) + context
    cap_bytes: int | None
    measured_gpu_bytes: int | None = None
    measured_rss_bytes: int | None = None
    torch_peak_allocated: int | None = None
    started_s: float = 0.0  # since the job started
    wall_s: float = 0.0
    hidden_startup_s: float = 0.0
    ready_s: float | None = None  # when the process said `ready` (pre-start done), since the job started
    spawned_s: float | None = None  # when its process was started, since the job started (before it, if earlier)
    message: str = ""
    reserved_bytes: int | None = None  # what the ledger reserved for it (its allocator cap + context)
    cpu_fallback: str = ""  # why this attempt ran on the CPU although the job plans for a GPU ("" = it did not)
    held_at_done_bytes: int | None = None  # what NVML listed for it at `done` (its claim came down to that)
    samples: list[Sample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "samples"}
        step = max(1, len(self.samples) // MAX_SAMPLES_IN_REPORT)
        d["samples"] = [[round(s.t, 3), s.gpu_bytes, s.rss_bytes] for s in self.samples[::step]]
        return d


@dataclass
class Replan:
    after_stage: str
    reason: str
    before: str
    after: str
    invalidated: list[str]


@dataclass
class PipelineResult:
    exit_code: int
    message: str
    choice: PlanChoice
    attempts: list[Attempt]
    replans: list[Replan]
    budget_bytes: int
    overlap_saved_s: float
    waits: list[Wait] = field(default_factory=list)
    started_at: float = 0.0  # wall-clock time (time.time()) that the attempts' started_s count from
    exports: dict[str, Any] = field(default_factory=dict)  # the deliverable exports (orchestrator.exports)

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    @property
    def cpu_stages(self) -> list[str]:
        return cpu_stages(self.attempts)


def cpu_stages(attempts: list[Attempt]) -> list[str]:
    """The stages whose finished attempt ran on the CPU for lack of GPU memory, in order."""
    return [a.stage for a in attempts if a.cpu_fallback and a.outcome == "ok"]


def cpu_note(stages: list[str]) -> str:
    """What a finished run says about its stages that took the CPU (run.json's message, the CLI's last line)."""
    return f"{', '.join(stages)} ran on the CPU (no GPU plan fit the memory that was free; see cpu_stages in run.json)"


@dataclass
class RunContext:
    """Everything the loop needs that is fixed for the job."""

    job: JobDir
    pipeline: Pipeline
    table: BudgetTable
    n_refs: int
    inputs_key: str
    constraints: Constraints
    base: Plan
    budget_bytes: int
    corrections: Corrections
    probe: Probe | None = None
    gpu: GpuInfo | None = None
    max_retries: int = 3
    wait_for_vram_s: float = 0.0
    weights_dir: str = ""
    on_event: Callable[[str, Any], None] = lambda kind, payload: None
    # start the next stage's process while this one runs; UP2YOU_PRESTART=0 turns it off (benchmarks
    # measure the orchestration overhead with and without it)
    prestart: bool = field(default_factory=lambda: os.environ.get(PRESTART_ENV, "1") != "0")
    # a shared GPU: admit each GPU stage through the host-wide ledger (None: no ledger, e.g. a CPU run)
    ledger: Ledger | None = None
    job_id: str = ""
    vram_cap: int | None = None  # the user's --vram (None = auto: what is free and unreserved at admission)
    wait_for_siblings_s: float = SIBLING_WAIT_S
    # at most this many stages waiting ahead, memory permitting (UP2YOU_PRESTART_AHEAD=N; default: cores - 1)
    prestart_ahead: int = field(default_factory=lambda: prestart.configured_ahead())  # a lambda: `prestart` is a field here
    # --cpu-fallback auto: a stage that no GPU plan fits runs on the CPU instead of exiting 75
    cpu_fallback: bool = True


class StageFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


def child_env(gpu: GpuInfo | None) -> dict[str, str]:
    """The environment of a stage process: our source tree importable, one GPU visible, no fragmentation."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONUNBUFFERED"] = "1"
    # idle OpenMP threads sleep instead of spinning: on a shared host spinning threads starve the others
    # (pymeshlab's Poisson took 358 s instead of 34 s on a loaded 2-core machine)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if gpu is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = gpu.cuda_visible_id
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Runner:
    def __init__(self, ctx: RunContext, choice: PlanChoice) -> None:
        self.ctx = ctx
        self.choice = choice
        self.budget = ctx.budget_bytes
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.env = child_env(ctx.gpu)
        self.attempts: list[Attempt] = []
        self.replans: list[Replan] = []
        self.prestarted: dict[str, StageProcess] = {}
        self.footprints: dict[str, int] | None = None
        self.running: StageProcess | None = None
        # stages past `done` whose process has not exited yet, each with the reservation it holds until then
        self.draining: list[tuple[StageProcess, Reservation | None]] = []
        self.tries: Counter[str] = Counter()
        self.retries = 0
        self.overlap_saved = 0.0
        self.reservation: Reservation | None = None
        self.reclaimed: tuple[StageProcess, Reservation] | None = None  # a GPU process admitted to replace a CPU one
        self.held_at_done: int | None = None  # the running stage's NVML bytes at `done`, once read
        self.warm: tuple[StageProcess, Reservation] | None = None  # the next stage's process and its context's claim
        self.admission_degrades = 0
        self.exports = Exports(ctx.job, self.env, self.t0)
        self.cpu_stage: tuple[str, str] | None = None  # (stage, why): its next attempt runs on the CPU
        self.room_at_fallback: int | None = None  # the GPU room when that stage was sent to the CPU
        self.admitter = (Admitter(ctx.ledger, ctx.gpu, ctx.job_id, probe=ctx.probe, keep_free=AUTO_RESERVE,
                                  wait_for_vram_s=ctx.wait_for_vram_s, wait_for_siblings_s=ctx.wait_for_siblings_s,
                                  on_event=ctx.on_event)
                         if ctx.ledger is not None and ctx.gpu is not None else None)  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def run(self) -> PipelineResult:
        code, message = EXIT_OK, "done"
        try:
            self._loop()
            self._wait_for_exports()
            cpu = cpu_stages(self.attempts)
            if cpu:
                message = f"done; {cpu_note(cpu)}"
        except StageFailed as exc:
            code, message = exc.code, str(exc)
        except LedgerError as exc:
            code, message = EXIT_DISK_FULL, str(exc)
        except KeyboardInterrupt:
            code, message = EXIT_INTERRUPTED, "interrupted: the running stage was stopped; rerun to resume"
            if self.running is not None:
                self.running.interrupt()
        finally:
            self._cleanup()
        return PipelineResult(code, message, self.choice, self.attempts, self.replans, self.budget,
                              self.overlap_saved, self.admitter.waits if self.admitter else [],
                              self.started_at, self.exports.record())  # fmt: skip

    def _wait_for_exports(self) -> None:
        """The job's deliverables are all written before it ends; a failed export fails the job (resumable)."""
        if self.exports.running:
            self.ctx.on_event("exports", sorted(self.exports.running))
        failures = self.exports.wait_all()
        if failures:
            f = failures[0]
            raise StageFailed(f.exit_code if f.exit_code > 0 else 1,
                              f"writing the deliverables of stage {f.stage} failed: {f.message}; rerun to resume "
                              "(every stage's result is kept)")  # fmt: skip

    def _loop(self) -> None:
        stages = self.ctx.pipeline.stages
        keys = self._keys(self.choice.plan)
        previous_exit: float | None = None
        i = 0
        while i < len(stages):
            spec = stages[i]
            if self.ctx.job.is_done(spec.name, keys[spec.name]):
                self.attempts.append(Attempt(spec.name, 0, "skipped", None, keys[spec.name], self.choice.candidate.label,
                                             0, None, message="already done (same key)"))  # fmt: skip
                self.ctx.on_event("skipped", spec.name)
                if spec.exports:
                    self.exports.start(spec.name)  # a resumed job whose files were never (fully) written
                i += 1
                continue
            proc = self.prestarted.pop(spec.name, None) or self._spawn(spec)
            self._reap_draining()  # what an exited stage held is back before this one is admitted
            degraded = self._admit(spec, proc)
            if degraded is not None:  # waited as long as allowed: fewer views or pixels, from where they change
                self.prestarted[spec.name] = proc
                keys, i = self._switch(spec, keys, *degraded)
                continue
            if spec.exports:
                self.exports.cancel(spec.name)  # an export of an earlier run of this stage must not write over it
            attempt = self._run_stage(spec, keys[spec.name], previous_exit, self._next_to_run(i + 1, keys), proc)
            previous_exit = self.running.finished_at if self.running else None
            self.running = None
            if self.reclaimed is not None:  # the GPU had room again: its process, already admitted, runs the stage
                self.prestarted[spec.name], self.reservation = self.reclaimed
                self.reclaimed = None
                continue
            if attempt.exit_code == EXIT_OK:
                if not self.ctx.job.is_written(spec.name, keys[spec.name]):
                    raise StageFailed(1, f"stage {spec.name} exited 0 without its manifest or outputs (a bug); "
                                         f"see {self.ctx.job.path(spec.name, 'log.txt')}")  # fmt: skip
                if spec.exports:
                    self.exports.start(spec.name)  # beside the next stage: no later stage reads these files
                i += 1
                continue
            if attempt.exit_code != EXIT_OOM:
                code = attempt.exit_code if attempt.exit_code and attempt.exit_code > 0 else 1
                raise StageFailed(code, f"stage {spec.name} failed ({attempt.outcome}): {attempt.message}")
            if attempt.cpu_fallback:  # the CPU attempt ran out of (host) memory: no rung is left below it
                raise StageFailed(EXIT_OOM, f"stage {spec.name} ran out of memory on the CPU too (the last rung, "
                                            f"taken because the GPU had too little): free host or GPU memory and "
                                            f"rerun to resume; see {self.ctx.job.path(spec.name, 'log.txt')}")  # fmt: skip
            if self.retries >= self.ctx.max_retries:
                if self._may_fall_back():
                    self._fall_back_to_cpu(spec, f"{spec.name}: ran out of GPU memory {self.tries[spec.name]} "
                                                 f"time(s) and --max-retries {self.ctx.max_retries} is used up: "
                                                 f"running {spec.name} on the CPU (slow; nothing recomputed)")  # fmt: skip
                    continue
                raise StageFailed(EXIT_OOM, f"stage {spec.name} ran out of GPU memory and --max-retries "
                                            f"{self.ctx.max_retries} is used up; see the attempts in run.json")
            self.retries += 1
            keys, i = self._switch(spec, keys, *self._recover(spec, attempt))

    def _switch(self, spec: StageSpec, keys: dict[str, str], new_choice: PlanChoice,
                reason: str) -> tuple[dict[str, str], int]:  # fmt: skip
        """Adopt `new_choice`: invalidate exactly the stages whose key changed; continue from the first of them."""
        stages = self.ctx.pipeline.stages
        new_keys = self._keys(new_choice.plan)
        changed = [s.name for s in stages if new_keys[s.name] != keys[s.name]]
        for name in changed:
            self.ctx.job.invalidate(name)
        self.replans.append(Replan(spec.name, reason, self.choice.candidate.label, new_choice.candidate.label,
                                   changed))  # fmt: skip
        self.ctx.on_event("replan", self.replans[-1])
        self.choice = new_choice
        i = self.ctx.pipeline.names.index(spec.name)
        return new_keys, min([self.ctx.pipeline.names.index(n) for n in changed] + [i])

    def _keys(self, plan: Plan) -> dict[str, str]:
        return self.ctx.pipeline.keys(plan, self.ctx.inputs_key)

    def _next_to_run(self, start: int, keys: dict[str, str]) -> StageSpec | None:
        for spec in self.ctx.pipeline.stages[start:]:
            if not self.ctx.job.is_done(spec.name, keys[spec.name]):
                return spec
        return None

    def _spawn(self, spec: StageSpec) -> StageProcess:
        return StageProcess(spec, self.ctx.job.root, self.ctx.weights_dir, self.choice.plan.profile, self.env,
                            self.ctx.job.path(spec.name, "log.txt"))  # fmt: skip

    def _prestart_ahead(self, nxt: StageSpec | None, running: StageProcess) -> None:
        """Start the processes of `nxt` and the stages after it that host memory holds (orchestrator.prestart)."""
        if not self.ctx.prestart or nxt is None:
            return
        keys = self._keys(self.choice.plan)
        upcoming = [s.name for s in self.ctx.pipeline.stages[self.ctx.pipeline.names.index(nxt.name):]
                    if not self.ctx.job.is_done(s.name, keys[s.name])]  # fmt: skip
        foot = self._footprints()
        growth = prestart.pending_growth((process_rss(p.pids()), foot[p.spec.name])
                                         for p in (running, *self.prestarted.values()))  # fmt: skip
        waiting = sum(n in self.prestarted for n in upcoming)
        picked = prestart.pick_prestarts([(n, foot[n]) for n in upcoming if n not in self.prestarted],
                                         prestart.available_host_memory() - growth,
                                         minimum=0 if nxt.name in self.prestarted else 1,
                                         maximum=max(0, self.ctx.prestart_ahead - waiting))  # fmt: skip
        for name in picked:
            self.prestarted[name] = self._spawn(self.ctx.pipeline[name])

    def _footprints(self) -> dict[str, int]:
        """Host bytes each stage's process may hold (measured peaks + the files it reads), once per run."""
        if self.footprints is None:
            profile, weights = self.choice.plan.profile, self.ctx.weights_dir
            self.footprints = {s.name: prestart.host_footprint(s, profile, weights) for s in self.ctx.pipeline.stages}
        return self.footprints

    def _fit(self, stage: str) -> StageFit | None:
        return next((f for f in self.choice.fits if f.stage == stage), None)

    # --- admission on a shared GPU ------------------------------------------------------------
    def _admit(self, spec: StageSpec, proc: StageProcess) -> tuple[PlanChoice, str] | None:
        """Reserve this stage's need on the fastest memory-only rung that fits now, waiting if none does.

        Returns None once reserved (or when there is nothing to reserve), or (degraded choice, why)
        when the wait allowed is used up and a plan with fewer views or pixels fits what is there.
        """
        if self.admitter is None or self._fit(spec.name) is None or self._on_cpu(spec):
            return None
        if self.reservation is not None and self.reservation.pid == proc.pid:
            return None  # admitted already (handed back to the GPU from the CPU)
        rungs, sizes = self._rung_sizes(spec)
        cap = self._cap_beside(None)
        if cap is not None and self.draining and sizes[0] > cap:
            self._reap_draining(wait=True)  # stages still exiting give back within moments: wait, never degrade for it
            cap = self._cap_beside(None)
        try:
            r = self.admitter.admit(spec.name, proc.pid, sizes, cap)
        except StageGone:
            return None  # it died while starting: `go` finds it gone and its exit code says why
        if r is not None:
            self.reservation = r
            self._end_warm(proc)  # its whole need, context included, is claimed now
            self._adopt_rung(spec, r, rungs, sizes)
            return None
        return self._degrade(spec)

    def _rung_sizes(self, spec: StageSpec) -> tuple[list[PlanChoice], list[int]]:
        """The memory-only rungs, fastest first, and what this stage needs on each."""
        rungs = self._rungs() or [self.choice]
        return rungs, [next(f.need_bytes for f in r.fits if f.stage == spec.name) for r in rungs]

    def _room(self, view: LedgerView) -> int:
        """What a stage of this job may take on the GPU now: free and unreserved, less the reserve, within what
        --vram leaves beside our stages still exiting."""
        room = max(0, view.available(self.ctx.job_id) - AUTO_RESERVE)
        cap = self._cap_beside(None)
        return room if cap is None else min(room, cap)

    def _room_now(self) -> int:
        """`_room` on our GPU as NVML and the ledger see it now (a shared GPU only)."""
        assert self.admitter is not None and self.ctx.ledger is not None
        return self._room(self.ctx.ledger.view(self.admitter.current_gpu()))

    def _adopt_rung(self, spec: StageSpec, r: Reservation, rungs: list[PlanChoice], sizes: list[int]) -> None:
        """Run on the fastest rung that `r` reserved for; if the current plan needs the same, keep it."""
        current = self._fit(spec.name)
        same = current is not None and current.need_bytes == r.nbytes
        chosen = self.choice if same else rungs[sizes.index(r.nbytes)]
        if chosen.candidate.label != self.choice.candidate.label:
            why = (f"{spec.name} admitted with {gib(r.nbytes)} on the shared GPU: {chosen.candidate.step.label} "
                   f"fits what is free and unreserved now (memory only: nothing recomputed)")  # fmt: skip
            self.replans.append(Replan(spec.name, why, self.choice.candidate.label, chosen.candidate.label, []))
            self.ctx.on_event("replan", self.replans[-1])
            self.choice = chosen

    def _reclaim_gpu(self, spec: StageSpec) -> bool:
        """While `spec` runs on the CPU: if its need fits the GPU again, start a GPU process for it and admit it
        (`self.reclaimed`). True once admitted; the caller then stops the CPU attempt."""
        ctx = self.ctx
        if self.admitter is None or ctx.ledger is None or self._fit(spec.name) is None:
            return False
        rungs, sizes = self._rung_sizes(spec)
        room = self._room_now()
        if min(sizes) > room or (self.room_at_fallback is not None and room < self.room_at_fallback * OOM_GROWTH):
            return False  # too small, or no more than the stage ran out of: handing back would only run out again
        if prestart.available_host_memory() < self._footprints()[spec.name]:
            return False  # a second process of this stage would not fit beside the first: stay on the CPU
        proc = self._spawn(spec)
        try:
            r = self.admitter.try_admit(spec.name, proc.pid, sizes, self._cap_beside(None))
        except LedgerError:
            r = None
        if r is None:  # taken meanwhile
            proc.kill()
            return False
        self.reclaimed = (proc, r)
        self._adopt_rung(spec, r, rungs, sizes)
        ctx.on_event("cpu", f"{spec.name}: GPU {self.admitter.gpu.index} has room again ({gib(r.nbytes)} "
                            f"reserved): stopping the CPU attempt and running {spec.name} on the GPU")  # fmt: skip
        return True

    def _may_fall_back(self, exc: NoPlanFits | None = None) -> bool:
        """--cpu-fallback auto, on a job that plans for a GPU (a CPU run is there already), for lack of memory
        (not of time: a plan that fits the memory but not --time-budget is no reason for the slower CPU)."""
        return self.ctx.cpu_fallback and self.ctx.gpu is not None and not isinstance(exc, TimeBudgetTooShort)

    def _on_cpu(self, spec: StageSpec) -> bool:
        return self.cpu_stage is not None and self.cpu_stage[0] == spec.name

    def _fall_back_to_cpu(self, spec: StageSpec, why: str, announce: bool = True) -> None:
        """Run this stage's next attempt on the CPU (same plan, same key); say so once. The GPU room now is
        kept: the attempt is handed back only when clearly more comes back (after an OOM with room to spare,
        the same room would run out again, and each hand-back throws the CPU's work away)."""
        self.cpu_stage = (spec.name, why)
        self.room_at_fallback = self._room_now() if self.admitter is not None and self.ctx.ledger is not None else None
        if announce:
            self.ctx.on_event("cpu", why)

    def _degrade(self, spec: StageSpec) -> tuple[PlanChoice, str] | None:
        """The best plan that fits what is free and unreserved now; if none does, this stage on the CPU
        (None) with --cpu-fallback auto, else exit 75."""
        ctx = self.ctx
        assert ctx.ledger is not None and ctx.gpu is not None and self.admitter is not None
        self.admission_degrades += 1
        view = ctx.ledger.view(self.admitter.gpu)
        room = self._room(view)
        waited = self.admitter.last_wait.seconds if self.admitter.last_wait else 0.0
        bound = "--wait-for-siblings" if self.admitter.last_kind == "siblings" else "--wait-for-vram"
        where = f"{gib(room)} free and unreserved on GPU {view.gpu.index} after waiting {waited:.0f} s"
        if self.admission_degrades > 2 * len(ctx.pipeline.stages):  # memory keeps vanishing as we re-plan
            if self._may_fall_back():
                self._fall_back_to_cpu(spec, f"{spec.name}: GPU memory vanished each of the "
                                             f"{self.admission_degrades - 1} times it was planned for ({where}): "
                                             f"running {spec.name} on the CPU (slow; nothing recomputed)")  # fmt: skip
                return None
            raise StageFailed(EXIT_OOM, f"stage {spec.name} cannot get GPU memory: re-planned "
                                        f"{self.admission_degrades - 1} times for what was free, and it was gone "
                                        f"each time; free GPU memory or pass --wait-for-vram")  # fmt: skip
        try:
            choice = choose_plan(ctx.pipeline, ctx.table, ctx.n_refs, room, ctx.base, ctx.constraints,
                                 ctx.corrections.factors())  # fmt: skip
        except NoPlanFits as exc:
            if self._may_fall_back(exc):
                self._fall_back_to_cpu(spec, f"{spec.name}: {where}; the smallest plan needs "
                                             f"{gib(exc.minimum_bytes)}: running {spec.name} on the CPU "
                                             f"(slow; nothing recomputed)")  # fmt: skip
                return None
            raise StageFailed(EXIT_OOM, f"stage {spec.name} cannot get GPU memory and no plan fits any more: "
                                        f"{exc}") from None  # fmt: skip
        why = f"{spec.name}: {where} ({bound}): planned for that"
        return choice, why

    def _release(self) -> None:
        if self.reservation is not None and self.ctx.ledger is not None:
            r, self.reservation = self.reservation, None
            self.ctx.ledger.release(r)

    def _run_stage(self, spec: StageSpec, key: str, previous_exit: float | None, nxt: StageSpec | None,
                   proc: StageProcess) -> Attempt:  # fmt: skip
        cpu_why = self.cpu_stage[1] if self.cpu_stage is not None and self._on_cpu(spec) else ""
        self.cpu_stage = None  # the CPU is for this attempt only: a retry, and the next stage, ask the GPU again
        # on the CPU: the same plan on another device (the device is in no key: nothing is recomputed)
        plan = self.choice.plan.replace(device="cpu") if cpu_why else self.choice.plan
        self.running = proc
        self.held_at_done = None
        self.tries[spec.name] += 1
        reserved = self.reservation.nbytes if self.reservation is not None else None
        cap = (reserved or self.budget) - self.ctx.table.context_bytes if plan.on_gpu else None
        fit = self._fit(spec.name)
        self.ctx.job.clear_error(spec.name)  # what error.msgpack says from here on is about this attempt
        self.ctx.job.write_request(spec.name, {"plan": plan.to_dict(), "key": key, "attempt": self.tries[spec.name],
                                               "cap_bytes": cap, "cpu_fallback": cpu_why})  # fmt: skip
        started = time.monotonic()
        label = self.choice.candidate.label + (", on the CPU" if cpu_why else "")
        self.ctx.on_event("start", (spec.name, label, None if cpu_why else fit))
        gpu_index = self.ctx.gpu.index if (self.ctx.gpu is not None and plan.on_gpu) else None
        # sampling starts before `go`: a pre-started stage can finish before a late sampler sees it
        handed_back = False
        with MemorySampler(proc, self.ctx.probe, gpu_index, self.t0) as sampler:
            proc.go()
            self._prestart_ahead(nxt, proc)
            if not cpu_why:
                self._warm_next(nxt)
            look_at = started + RECLAIM_AFTER_S
            handed_over = False
            while proc.poll() is None:
                if proc.done_at is not None and not cpu_why and self._hand_over(proc, nxt):
                    handed_over = True
                    break
                self._reap_draining()
                proc.wait_for_news(POLL_S)
                if cpu_why and time.monotonic() >= look_at:
                    look_at = time.monotonic() + RECLAIM_EVERY_S
                    if self._reclaim_gpu(spec):
                        handed_back = True
                        proc.interrupt()
                        break
        if handed_over:  # its outputs and manifest are written; it exits (and its reservation ends) in the background
            code = EXIT_OK
        else:
            code = proc.finish()
            self._release()  # the process is gone: what it held is back (NVML says so on the next admission)
            self._end_warm(proc)  # warmed, then run on the CPU: its context claim ends with it
        hidden = proc.hidden_startup_s(previous_exit)
        self.overlap_saved += hidden
        error = self.ctx.job.read_error(spec.name) if code != EXIT_OK else None
        manifest = self.ctx.job.read_manifest(spec.name) if code == EXIT_OK else None
        if handed_back and code == EXIT_OK:  # it finished just as the GPU came back: keep it, drop the new one
            assert self.reclaimed is not None and self.ctx.ledger is not None
            (proc_back, r), self.reclaimed = self.reclaimed, None
            proc_back.kill()
            self.ctx.ledger.release(r)
            handed_back = False
        attempt = Attempt(
            stage=spec.name, attempt=self.tries[spec.name],
            outcome=HANDED_BACK if handed_back else _outcome(code), exit_code=code, key=key,
            plan_label=self.choice.candidate.label, predicted_bytes=fit.prediction.total_bytes if fit else 0,
            cap_bytes=cap, measured_gpu_bytes=sampler.peak_gpu, measured_rss_bytes=sampler.peak_rss,
            torch_peak_allocated=(manifest or error or {}).get("torch_peak_allocated"),
            started_s=started - self.t0, wall_s=time.monotonic() - started, hidden_startup_s=hidden,
            ready_s=proc.ready_at - self.t0 if proc.ready_at is not None else None,
            spawned_s=proc.spawned_at - self.t0,
            message=("the GPU had room again: stopped here and run there" if handed_back
                     else _message(code, error, self.ctx.job.path(spec.name, "log.txt"))),
            reserved_bytes=reserved,
            cpu_fallback=cpu_why, samples=sampler.samples, held_at_done_bytes=self.held_at_done,
        )  # fmt: skip
        self.attempts.append(attempt)
        self.ctx.on_event("end", attempt)
        if code != EXIT_OK:
            self._dismiss_warm()
        return attempt

    def _hand_over(self, proc: StageProcess, nxt: StageSpec | None) -> bool:
        """At `done`, before `proc` has exited (a CUDA context can take a few hundred ms to tear down): may the
        next stage start now? Yes when its process is waiting and, on a shared GPU, its need on the current
        plan fits beside what `proc` still holds (within --vram for the two together). Its reservation is then
        made here and `proc`'s moves to `draining`; otherwise the runner waits for the exit, as before, and
        admission may wait or pick a memory rung with all of it back."""
        waiting = self.prestarted.get(nxt.name) if nxt is not None else None
        if waiting is None or waiting.poll() is not None:
            return False
        assert nxt is not None
        own = self.reservation
        fit = self._fit(nxt.name)
        r: Reservation | None = None
        if self.admitter is not None and fit is not None and not self._on_cpu(nxt):
            try:
                own = self._shrink_to_what_it_holds(proc, own)
                r = self.admitter.try_admit(nxt.name, waiting.pid, [fit.need_bytes], self._cap_beside(own))
            except LedgerError:
                return False
            if r is None:
                self.reservation = own  # smaller or not, it is the same claim: released at the exit
                return False
        self.draining.append((proc, own))
        self.reservation = r
        if r is not None:
            self._end_warm(waiting)
        return True

    def _warm_next(self, nxt: StageSpec | None) -> None:
        """While a stage runs, let the next one's waiting process make its CUDA context, under a claim of the
        table's context_bytes beside the running stage (within --vram): the set-up after `go` (0.12-0.20 s a stage
        on the lent H200) then leaves the critical path. One warm process at a time; none where it does not fit."""
        if nxt is None or self.warm is not None or self.admitter is None or self.ctx.ledger is None:
            return
        waiting = self.prestarted.get(nxt.name)
        if waiting is None or waiting.poll() is not None or self._on_cpu(nxt):
            return  # (a plan on the CPU is claimed for as any other, as admission does; its stage makes no context)
        fit = self._fit(nxt.name)
        if fit is None:
            return
        try:
            r = self.admitter.try_admit(nxt.name, waiting.pid, [self.ctx.table.context_bytes],
                                        self._cap_beside(self.reservation))  # fmt: skip
        except (LedgerError, StageGone):
            return
        if r is not None:
            self.warm = (waiting, r)
            waiting.warm(self.choice.plan.device)

    def _cap_beside(self, held: Reservation | None) -> int | None:
        """What --vram leaves for one more claim of this job beside `held` and the stages still exiting (their
        claims last until their exit); None without a cap."""
        if self.ctx.vram_cap is None:
            return None
        return self.budget - (held.nbytes if held is not None else 0) - sum(r.nbytes for _, r in self.draining if r is not None)

    def _dismiss_warm(self) -> None:
        """After a failed attempt: the retry (or a smaller plan) is admitted within --vram with nothing of ours
        beside it, so the warm process goes, with its context; it is started again behind the retry."""
        if self.warm is None:
            return
        proc = self.warm[0]
        self.prestarted = {name: p for name, p in self.prestarted.items() if p is not proc}
        proc.dismiss()
        self._end_warm(proc)

    def _end_warm(self, proc: StageProcess | None = None) -> None:
        """End the context claim of `proc` (of any process, without one): it has its whole need claimed, or is gone."""
        if self.warm is None or (proc is not None and self.warm[0] is not proc):
            return
        _, r = self.warm
        self.warm = None
        if self.ctx.ledger is not None:
            with contextlib.suppress(LedgerError):
                self.ctx.ledger.release(r)

    def _shrink_to_what_it_holds(self, proc: StageProcess, own: Reservation | None) -> Reservation | None:
        """At `done` a stage has given back torch's cache and cuBLAS's workspaces and allocates nothing more: what
        NVML lists for it now (its CUDA context, and what a library holds outside torch) is all it can still hold.
        Its claim comes down to that, so the next stage may be admitted beside it under a tight --vram.
        Unchanged where NVML cannot say what the process holds."""
        if own is None or self.ctx.ledger is None or self.ctx.gpu is None or self.ctx.probe is None:
            return own
        try:
            held = self.ctx.probe.process_bytes(self.ctx.gpu.index, set(proc.pids()))
        except Exception:  # NVML hiccup: keep the whole claim until the exit, as without a reading
            return own
        if held is None or held >= own.nbytes:
            return own
        if self.held_at_done is None:  # asked again while it exits, it may hold less: the claim follows
            self.held_at_done = held
        return self.ctx.ledger.shrink(own, held)

    def _reap_draining(self, wait: bool = False) -> None:
        """Collect the draining processes that have exited (all of them with `wait`) and end their reservations."""
        for proc, r in list(self.draining):
            if wait:
                proc.wait_or_kill()
            elif proc.poll() is None:
                continue
            else:
                proc.finish()
            self.draining.remove((proc, r))
            if r is not None and self.ctx.ledger is not None:
                self.ctx.ledger.release(r)

    def _recover(self, spec: StageSpec, attempt: Attempt) -> tuple[PlanChoice, str]:
        """After an OOM: blame our own jobs (retry: admission waits for them), a neighbour (wait, or
        shrink the budget) or the estimate (learn), then re-plan."""
        free = self._free_now()
        budget_before = self.budget
        had = attempt.reserved_bytes or self.budget  # what the stage could use: its reservation, or the budget
        reason, lowered = "", ""
        if free is not None and free - AUTO_RESERVE < had and self._siblings_hold_it(had):
            return self.choice, (f"only {gib(free)} free and unreserved after the failure (the stage had "
                                 f"{gib(had)}): our other jobs hold the rest; retrying when they give it back")  # fmt: skip
        if free is not None and free - AUTO_RESERVE < had:
            reason = f"only {gib(free)} free after the failure (budget {gib(self.budget)}): another process took memory"
            free = self._wait_for_free(free, had)
            if free - AUTO_RESERVE < had:
                self.budget = max(0, min(self.budget, free - AUTO_RESERVE))
                lowered = f"; budget lowered to {gib(self.budget)}"
            else:
                reason += "; it was given back while waiting"
        else:
            raw = predict(spec.name, self.choice.plan, self.ctx.n_refs, self.ctx.table).allocator_bytes
            ctxb = self.ctx.table.context_bytes
            measured = attempt.measured_gpu_bytes - ctxb if attempt.measured_gpu_bytes else None
            cap = had - ctxb
            factor = oom_factor(raw, self.ctx.corrections.factor(spec.name), cap, measured)
            factor = self.ctx.corrections.learn(spec.name, factor, f"OOM at cap {gib(cap)} with {attempt.plan_label}")
            reason = (f"stage {spec.name} ran out of memory at a cap of {gib(cap)} (predicted "
                      f"{gib(attempt.predicted_bytes)}): its estimate is now x{factor:.2f}")  # fmt: skip
        try:
            choice = choose_plan(self.ctx.pipeline, self.ctx.table, self.ctx.n_refs, self.budget, self.ctx.base,
                                 self.ctx.constraints, self.ctx.corrections.factors())  # fmt: skip
        except NoPlanFits as exc:
            if not self._may_fall_back(exc):
                raise StageFailed(EXIT_OOM, f"stage {spec.name} ran out of memory and no plan fits any more: "
                                            f"{exc}") from None  # fmt: skip
            # the next stage is admitted against the budget as it was (the neighbour may go)
            self.budget = budget_before
            smallest = self._smallest_rung(spec)
            if free is not None and smallest is not None and smallest <= free - AUTO_RESERVE:
                # no whole plan fits (a later stage needs more), but this stage does on a smaller memory rung:
                # retry it on the GPU; admission picks the rung, and each later stage is admitted in its turn
                return self.choice, (f"{reason}; {spec.name} alone fits in {gib(free - AUTO_RESERVE)} on a "
                                     f"smaller memory rung ({gib(smallest)}): retried on the GPU")  # fmt: skip
            gpu = self.ctx.gpu
            short = free is not None and gpu is not None and free - AUTO_RESERVE < exc.minimum_bytes
            room = (f"{gib(free or 0)} free and unreserved on GPU {gpu.index} after the failure"
                    if short and gpu is not None else f"the budget is {gib(exc.budget_bytes)}")  # fmt: skip
            why = (f"{spec.name}: {room}; the smallest plan needs {gib(exc.minimum_bytes)}: running {spec.name} "
                   f"on the CPU (slow; nothing recomputed)")  # fmt: skip
            self._fall_back_to_cpu(spec, why, announce=False)  # the re-plan line says it
            return self.choice, f"{reason}; {why}"
        return choice, reason + lowered

    def _rungs(self) -> list[PlanChoice]:
        """The memory-only alternatives to the current plan (same views, pixels, steps), fastest first."""
        ctx = self.ctx
        return [choice_of(c, ctx.pipeline, ctx.table, ctx.n_refs, self.budget, ctx.corrections.factors(),
                          self.choice.degradations)
                for c in same_quality(self.choice.plan, ctx.base, ctx.constraints)]  # fmt: skip

    def _smallest_rung(self, spec: StageSpec) -> int | None:
        """The least this stage needs on any memory rung of the current quality (views, pixels): what
        admission can still reserve for it. None when the stage has no GPU fit (nothing to reserve)."""
        sizes = [f.need_bytes for r in self._rungs() for f in r.fits if f.stage == spec.name]
        return min(sizes) if sizes else None

    def _free_now(self) -> int | None:
        """NVML free on our GPU; on a shared GPU, free and unreserved (other jobs' claims subtracted)."""
        if self.ctx.probe is None or self.ctx.gpu is None:
            return None
        for g in self.ctx.probe.gpus():
            if g.index == self.ctx.gpu.index:
                return self.ctx.ledger.available(g, self.ctx.job_id) if self.ctx.ledger is not None else g.free
        return None

    def _siblings_hold_it(self, need: int) -> bool:
        """On a shared GPU: would `need` fit once our other jobs' stages have ended?"""
        if self.ctx.ledger is None or self.admitter is None:
            return False
        return wait_kind(self.ctx.ledger.view(self.admitter.gpu), self.ctx.job_id, need, AUTO_RESERVE) == "siblings"

    def _wait_for_free(self, free: int, need: int) -> int:
        """With --wait-for-vram: poll with backoff until `need` is free again or time is up."""
        deadline = time.monotonic() + self.ctx.wait_for_vram_s
        delay = 0.5
        while free - AUTO_RESERVE < need and time.monotonic() < deadline:
            self.ctx.on_event("waiting", (free, need))
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 30.0)
            free = self._free_now() or free
        return free

    def _cleanup(self) -> None:
        if self.running is not None and self.running.poll() is None:
            self.running.kill()
        self.exports.kill_all()  # after success they have all ended; otherwise a resume exports again
        if self.reclaimed is not None:  # interrupted between a hand-back and its GPU attempt
            self.prestarted[self.reclaimed[0].spec.name], self.reservation = self.reclaimed
            self.reclaimed = None
        for release in (self._release, lambda: self._reap_draining(wait=True)):
            try:
                release()  # after the process is gone, so its memory is never handed out twice
            except LedgerError:
                pass  # the entry is swept when the next reader finds the process gone
        for proc in self.prestarted.values():  # never got `go`: they hold no GPU memory (or a context) and wrote nothing
            if proc.ready_at is not None:
                proc.dismiss()
            else:
                proc.kill()
        self.prestarted.clear()
        self._end_warm()  # after its process is gone


def _outcome(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return EXIT_MEANINGS.get(code, "bug")


def _message(code: int, error: dict[str, Any] | None, log: Path) -> str:
    if code == EXIT_OK:
        return ""
    if error and error.get("message"):
        return str(error["message"])
    if code < 0:
        return f"the process was killed by signal {-code}; see {log}"
    return f"exit code {code} ({EXIT_MEANINGS.get(code, 'unexpected error')}); see {log}"


def run_pipeline(ctx: RunContext, choice: PlanChoice) -> PipelineResult:
    """Run `ctx.pipeline` from `choice`, resuming finished stages; never raises for a stage failure."""
    return Runner(ctx, choice).run()
