"""One job from photos to deliverables: validate, probe, budget, plan, run, report.

`run_job` raises `JobError` for anything found before the first stage starts (bad input, missing
weights, no GPU, a budget below the minimum, a full disk) — each with a one-line message and an exit
code — and returns a `RunReport` once stages ran, whether they all succeeded or not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape

from budgets.table import BudgetTable, load_table, measured_on, table_gpu
from orchestrator.admission import SIBLING_WAIT_S, Wait, holders, wait_kind, wait_line
from orchestrator.console import ProgressPrinter, plan_table
from orchestrator.corrections import Corrections, cache_dir
from orchestrator.inputs import EXIT_USAGE, InputError, InputSet, scan_inputs, shown
from orchestrator.ledger import Ledger, LedgerError
from orchestrator.outlock import OutputLock, OutputLocked
from orchestrator.planner import (
    Constraints,
    NoPlanFits,
    NoTimeModel,
    PlanChoice,
    TimeBudgetTooShort,
    base_plan,
    candidates,
    choose_plan,
    evaluate,
    same_quality,
)
from orchestrator.prestart import startup_report
from orchestrator.probe import GpuInfo, NoSuchGpu, Probe, ProbeError, default_probe, select_gpu
from orchestrator.report import collect_deliverables, plot_timeline, warm_up_plotting, write_json
from orchestrator.runner import AUTO_RESERVE, PipelineResult, RunContext, run_pipeline
from orchestrator.sizes import gib, parse_size
from orchestrator.weightfiles import missing_message, verify_checkpoint, weights_record
from orchestrator.weightfiles import resolve as resolve_weights
from stages.jobfs import JobDir
from stages.plan import Plan
from stages.spec import EXIT_DISK_FULL, EXIT_MISSING_WEIGHTS, EXIT_NO_DEVICE, UP2YOU, Pipeline
from up2you import checkpoints

SMOKE_TEST = "SMOKE TEST: tiny random weights; the output is noise, not a reconstruction"
# A smoke run checks the plumbing, not the result: small geometry so it finishes in a minute on a CPU.
SMOKE_GEOMETRY = {"mesh_iters": 10, "mesh_resolution": 128, "video_frames": 8, "video_resolution": 128,
                  "video_chunk": 4}
DISK_BASE = 500 * 10**6  # job folder overhead (tensors of the early stages, mesh, video)
DISK_PER_VIEW = 75 * 10**6  # per generated view: rgb + normal PNGs and latents/tensors (20 views ~ 2 GB total)


class JobError(Exception):
    """The job cannot start; `str()` is one line for the user, `exit_code` what the CLI returns."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        self.exit_code = exit_code
        super().__init__(message)


@dataclass(frozen=True)
class RunOptions:
    """The CLI's options, as values (None = the planner chooses)."""

    vram: str = "auto"  # SIZE (12GB = 12 x 2^30 bytes) or auto (free now minus a reserve)
    gpu: str = "auto"  # auto (most free) or an NVML index
    views: int | None = None
    resolution: int | None = None
    steps: int | None = None
    thg_interval: int | None = None
    weights: Path | None = None
    max_retries: int = 3
    wait_for_vram_s: float = 0.0  # how long to wait for memory that processes outside the ledger hold
    wait_for_siblings_s: float = SIBLING_WAIT_S  # ... and for memory our own jobs (ledger entries) hold
    job_id: str | None = None  # this job in the GPU ledger (default: the output folder's path)
    prefer: str = "quality"
    device: str = "cuda"  # cuda | cpu (cpu: tiny models only, for tests and smoke runs)
    tiny: bool = False
    # full-size architectures with random weights and no files: what benchmarks and calibration measure
    full_random: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()  # Plan fields fixed for every candidate (benchmarks)
    plan_only: bool = False
    quiet: bool = False  # no progress lines (--json)
    table: Path | None = None  # another budget table file
    time_budget_s: float | None = None  # --time-budget: the plan must also finish in this many seconds (predicted)
    # --cpu-fallback auto: a stage that no GPU plan fits (a neighbour left too little) runs on the CPU, not exit 75
    cpu_fallback: bool = True


@dataclass
class Budget:
    bytes: int
    source: str
    gpu: GpuInfo | None


@dataclass(frozen=True)
class JobPlan:
    """The outcome of planning: what `--plan` prints and what a run starts from."""

    inputs: InputSet
    budget: Budget
    constraints: Constraints
    base: Plan
    choice: PlanChoice
    corrections: Corrections
    table: BudgetTable
    ledger: Ledger | None = None  # the host-wide GPU ledger (None on a CPU run)
    waits: tuple[Wait, ...] = ()  # waits before planning (for memory our jobs or others held)


@dataclass
class RunReport:
    ok: bool
    exit_code: int
    message: str
    out_dir: Path
    job_dir: Path
    choice: PlanChoice
    budget: Budget
    n_photos: int
    ignored_files: list[str] = field(default_factory=list)
    smoke_test: bool = False
    pipeline_result: PipelineResult | None = None
    deliverables: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    waits: list[Wait] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)  # where each checkpoint was found, what was verified

    def to_dict(self) -> dict[str, Any]:
        r = self.pipeline_result
        final = r.choice if r else self.choice
        plan_view = {f.stage: {"predicted_bytes": f.prediction.total_bytes, "need_bytes": f.need_bytes,
                               "breakdown": dict(f.prediction.breakdown), "phase": f.prediction.peak_phase}
                     for f in final.fits}  # fmt: skip
        measured: dict[str, Any] = {}
        for a in r.attempts if r else []:
            if a.outcome != "skipped":
                measured[a.stage] = {"predicted_bytes": a.predicted_bytes, "measured_gpu_bytes": a.measured_gpu_bytes,
                                     "measured_rss_bytes": a.measured_rss_bytes, "outcome": a.outcome,
                                     "on_cpu": bool(a.cpu_fallback),
                                     **self._seconds(a.stage, a.wall_s, final)}  # fmt: skip
        return {
            "ok": self.ok, "exit_code": self.exit_code, "message": self.message,
            "smoke_test": SMOKE_TEST if self.smoke_test else False,
            "out_dir": str(self.out_dir), "job_dir": str(self.job_dir), "n_photos": self.n_photos,
            "ignored_files": self.ignored_files,
            "budget": {"bytes": self.budget.bytes, "source": self.budget.source,
                       "gpu": self.budget.gpu.__dict__ if self.budget.gpu else None},
            "plan": final.plan.to_dict(), "plan_label": final.candidate.label,
            "degradations": list(final.degradations) + [f"re-plan after {p.after_stage}: {p.reason}"
                                                        for p in (r.replans if r else [])],
            "predictions": plan_view, "predicted_vs_measured": measured,
            "predicted_seconds": final.times.to_dict() if final.times else None,
            "attempts": [a.to_dict() for a in r.attempts] if r else [],
            "attempts_t0_wall": r.started_at if r else None,  # time.time() that the attempts' started_s count from
            "replans": [p.__dict__ for p in r.replans] if r else [],
            "overlap_saved_s": round(r.overlap_saved_s, 3) if r else 0.0,
            "exports": r.exports if r else {},  # deliverable files written beside the later stages
            "cpu_stages": [{"stage": a.stage, "attempt": a.attempt, "outcome": a.outcome, "why": a.cpu_fallback}
                           for a in (r.attempts if r else []) if a.cpu_fallback],
            "waits": [w.__dict__ for w in self.waits + (r.waits if r else [])],
            "startup": startup_report(r.attempts, {a.stage: JobDir(self.job_dir).read_manifest(a.stage) or {}
                                                   for a in r.attempts}) if r else {},
            "wall_s": round(self.wall_s, 3), "deliverables": self.deliverables, "weights": self.weights,
        }  # fmt: skip


    def _seconds(self, stage: str, wall_s: float, choice: PlanChoice) -> dict[str, Any]:
        """Predicted (the final plan's time model) vs measured seconds: the attempt's wall, the manifest's run."""
        pred = choice.times.get(stage) if choice.times else None
        run_s = ((JobDir(self.job_dir).read_manifest(stage) or {}).get("timings") or {}).get("run_s")
        return {"predicted_wall_s": round(pred.wall_s, 2) if pred else None,
                "predicted_run_s": round(pred.run_s, 2) if pred else None,
                "measured_wall_s": round(wall_s, 2), "measured_run_s": round(run_s, 2) if run_s is not None else None}


def default_out_dir(input_dir: Path) -> Path:
    """`photos/` -> `photos_up2you/`, beside the input."""
    p = Path(input_dir).resolve()
    return p.parent / f"{p.name}_up2you"


def resolve_budget(vram: str, gpu: GpuInfo | None, available: int | None = None) -> Budget:
    """The memory every stage may use: the user's cap, but never more than is free now (less a reserve).

    `available`: free and unreserved (the ledger's `available`: NVML free minus what other jobs have
    reserved but not allocated yet); NVML free when not given.
    """
    cap = None if vram == "auto" else parse_size(vram)
    if gpu is None:  # CPU run: the cap is only what plans against (tiny models)
        avail = psutil.virtual_memory().available
        return Budget(cap or avail, f"--vram {vram}" if cap else f"auto: host memory available {gib(avail)}", None)
    free = gpu.free if available is None else available
    what = "free" if available is None else "free and unreserved"
    usable = max(0, free - AUTO_RESERVE)
    if cap is None:
        return Budget(usable, f"auto: {gib(free)} {what} on GPU {gpu.index} minus {gib(AUTO_RESERVE)} reserve", gpu)
    if cap > usable:
        return Budget(usable, f"--vram {vram}, but only {gib(free)} {what} on GPU {gpu.index}: using {gib(usable)}",
                      gpu)  # fmt: skip
    return Budget(cap, f"--vram {vram}", gpu)


def plan_job(
    input_dir: Path | str, options: RunOptions = RunOptions(), probe: Probe | None = None,
    pipeline: Pipeline = UP2YOU, table: BudgetTable | None = None,
    on_event: Callable[[str, Any], None] | None = None,
) -> JobPlan:  # fmt: skip
    """Everything up to the plan: validate inputs, pick the GPU, resolve the budget, choose the plan."""
    try:
        inputs = scan_inputs(input_dir)
    except InputError as exc:
        raise JobError(str(exc), exc.exit_code) from None
    probe = probe or _default_probe(options.device)
    try:
        ledger = Ledger(probe=probe) if probe is not None else None
        gpu = _pick_gpu(options, probe, ledger)
        _check_vram_fits_card(options.vram, gpu)
    except LedgerError as exc:
        raise JobError(str(exc), EXIT_DISK_FULL) from None
    table = table or load_table(options.table, pipeline.name, gpu.name if gpu else None)
    smoke = options.tiny
    constraints = Constraints(options.views or (6 if smoke else None), options.resolution or (256 if smoke else None),
                              options.steps or (4 if smoke else None), options.thg_interval, options.prefer,
                              options.time_budget_s)  # fmt: skip
    profile = "tiny" if smoke else "full-random" if options.full_random else "real"
    base = base_plan(constraints, device="cuda:0" if options.device != "cpu" else "cpu", profile=profile,
                     weights_dir="" if options.full_random else str(_weights_dir(options)),
                     **(SMOKE_GEOMETRY if smoke else {})).replace(**dict(options.overrides))  # fmt: skip
    corrections = Corrections(gpu.name if gpu else "cpu", f"{table.name}@v{table.version}")
    waits: tuple[Wait, ...] = ()
    want: int | None = None
    if gpu is None or ledger is None:
        budget, ledger = resolve_budget(options.vram, None), None
    else:
        try:
            want = _wanted_budget(options, pipeline, table, len(inputs.photos), base, constraints, corrections)
            budget, gpu, waits = _wait_for_budget(options, probe, gpu, ledger, want, on_event)
        except LedgerError as exc:
            raise JobError(str(exc), EXIT_DISK_FULL) from None

    def choose(nbytes: int) -> PlanChoice:
        try:
            return choose_plan(pipeline, table, len(inputs.photos), nbytes, base, constraints, corrections.factors())
        except TimeBudgetTooShort as exc:
            raise JobError(f"--time-budget {options.time_budget_s:g}s: {exc}", EXIT_USAGE) from None
        except NoTimeModel as exc:
            raise JobError(f"--time-budget: {exc}", EXIT_USAGE) from None

    prefix = f"--vram {options.vram}: " if options.vram != "auto" else "the free GPU memory: "
    try:
        choice = choose(budget.bytes)
    except NoPlanFits as exc:
        if not options.cpu_fallback or want is None or want <= budget.bytes:
            raise JobError(prefix + str(exc), EXIT_USAGE) from None
        # the cap (or the best quality) would fit: only the memory free now is short, someone else holds it
        try:
            choice = choose(want)
        except NoPlanFits as below:  # the user's own cap is below every plan: a usage error
            raise JobError(prefix + str(below), EXIT_USAGE) from None
        budget = _budget_for_later(options, budget, want, exc.minimum_bytes)
    return JobPlan(inputs, budget, constraints, base, choice, corrections, table, ledger, waits)


def _budget_for_later(options: RunOptions, now: Budget, want: int, minimum: int) -> Budget:
    """Plan against the cap (auto: the best quality) when only the memory free now is short of every plan:
    each stage's admission then waits, degrades, or runs the stage on the CPU (--cpu-fallback auto)."""
    assert now.gpu is not None
    will = "would" if options.plan_only else "will"
    head = f"--vram {options.vram}" if options.vram != "auto" else f"auto: planned for the best quality ({gib(want)})"
    return Budget(want, f"{head}; only {gib(now.bytes)} usable on GPU {now.gpu.index} now, below the smallest "
                        f"plan ({gib(minimum)}): each stage {will} wait for memory (--wait-for-vram "
                        f"{options.wait_for_vram_s:g}s), then take what fits or run on the CPU", now.gpu)  # fmt: skip


def run_job(
    input_dir: Path | str, out_dir: Path | str | None = None, options: RunOptions = RunOptions(),
    probe: Probe | None = None, pipeline: Pipeline = UP2YOU, table: BudgetTable | None = None,
    console: Console | None = None,
) -> RunReport:  # fmt: skip
    """Plan and (unless options.plan_only) run one job; see the module docstring for what raises."""
    t0 = time.monotonic()
    console = console or Console(stderr=True, quiet=options.quiet)
    printer = ProgressPrinter(console, options.quiet)
    out = Path(out_dir) if out_dir else default_out_dir(Path(input_dir))
    lock = OutputLock(out)
    if not options.plan_only:  # before planning, which may wait for GPU memory that the run holding `out` has
        _refused_if_locked(lock.acquire_if_used)
    try:
        probe = probe or _default_probe(options.device)
        jp = plan_job(input_dir, options, probe, pipeline, table, on_event=printer)
        inputs, budget, choice = jp.inputs, jp.budget, jp.choice
        if out.resolve() == Path(input_dir).resolve():
            raise JobError(f"--out {shown(out)} is the photo folder itself: the next run would read the outputs as "
                           "photos; pass another folder (the default is <photos>_up2you/)", EXIT_USAGE)  # fmt: skip
        job = JobDir(out / "job")
        if options.tiny:
            console.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
        for line in plan_notes(jp):
            console.print(f"[dim]note: {escape(line)}[/dim]", highlight=False, soft_wrap=True)
        console.print(plan_table(pipeline, choice, f"plan: {choice.candidate.label} — budget {budget.source}"))
        for d in choice.degradations:
            console.print(f"[yellow]  {d}[/yellow]")
        report = RunReport(True, 0, "plan only: nothing ran", out, job.root, choice, budget, len(inputs.photos),
                           [str(p) for p in inputs.ignored], options.tiny, waits=list(jp.waits))  # fmt: skip
        if options.plan_only:
            return report
        report.weights = _preflight(pipeline, choice, options, out)
        if options.tiny:
            ensure_tiny_weights(Path(choice.plan.weights_dir), console)
        _refused_if_locked(lock.acquire)  # held already where a run had used `out`
        return _run_locked(report, jp, job, out, options, probe, pipeline, printer, t0)
    finally:
        lock.release()


def _refused_if_locked(take: Callable[[], None]) -> None:
    """Take the output folder's lock (`take`: now, or only if a run used the folder); another live run
    holding it is a JobError naming its pid."""
    try:
        take()
    except OutputLocked as exc:
        raise JobError(str(exc), exc.exit_code) from None


def _run_locked(
    report: RunReport, jp: JobPlan, job: JobDir, out: Path, options: RunOptions, probe: Probe | None,
    pipeline: Pipeline, printer: ProgressPrinter, t0: float,
) -> RunReport:  # fmt: skip
    """The part of a run that writes into `out`: only ever one at a time per folder (the caller holds its lock)."""
    inputs, budget, choice = jp.inputs, jp.budget, jp.choice
    warm_up_plotting()  # the timeline plot comes after the last stage: its import happens while they run
    job.root.mkdir(parents=True, exist_ok=True)
    job.write_inputs(inputs.record())
    ctx = RunContext(job, pipeline, jp.table, len(inputs.photos), inputs.key, jp.constraints, jp.base, budget.bytes,
                     jp.corrections, probe=probe, gpu=budget.gpu,
                     max_retries=options.max_retries, wait_for_vram_s=options.wait_for_vram_s,
                     weights_dir=choice.plan.weights_dir, on_event=printer,
                     ledger=jp.ledger,
                     job_id=options.job_id or str(out.resolve()),
                     vram_cap=None if options.vram == "auto" else parse_size(options.vram),
                     wait_for_siblings_s=options.wait_for_siblings_s, cpu_fallback=options.cpu_fallback)  # fmt: skip
    with sigterm_as_interrupt():
        result = run_pipeline(ctx, choice)
    report.pipeline_result = result
    report.ok, report.exit_code, report.message = result.ok, result.exit_code, result.message
    report.choice = result.choice
    report.deliverables = collect_deliverables(job, out) if result.ok else []
    report.wall_s = time.monotonic() - t0
    write_json(out / "run.json", report.to_dict())
    cap = result.budget_bytes - jp.table.context_bytes if choice.plan.on_gpu else None
    plot_timeline(out / "vram_timeline.png", result.attempts, result.budget_bytes, cap)
    return report


def _pick_gpu(options: RunOptions, probe: Probe | None, ledger: Ledger | None) -> GpuInfo | None:
    """The GPU to plan for: none on a CPU run without a probe; else --gpu, or (auto) the most free and unreserved."""
    if probe is None:
        return None
    try:
        gpus = probe.gpus()
        if options.gpu == "auto" and ledger is not None and gpus:
            return max(gpus, key=lambda g: ledger.available(g))
        return select_gpu(gpus, options.gpu)
    except NoSuchGpu as exc:
        raise JobError(str(exc), EXIT_USAGE) from None
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None


def _wanted_budget(
    options: RunOptions, pipeline: Pipeline, table: BudgetTable, n_refs: int, base: Plan, constraints: Constraints,
    corrections: Corrections,
) -> int:  # fmt: skip
    """The budget worth waiting for before planning: the --vram cap, or (auto) the least that lets the best
    quality level (views, pixels) fit on some memory rung."""
    if options.vram != "auto":
        return parse_size(options.vram)
    best = candidates(base, constraints)[0]
    return min(max(f.need_bytes for f in evaluate(c.plan, pipeline, table, n_refs, 0, corrections.factors()))
               for c in same_quality(best.plan, base, constraints))  # fmt: skip


def _default_probe(device: str) -> Probe | None:
    """NVML (or the simulated file); no NVML, no driver: the one-line no-GPU error, not a traceback."""
    try:
        return default_probe(device)
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None


def input_notes(inputs: InputSet) -> list[str]:
    """What the scan did about odd inputs, one line each (printed as notes before the plan)."""
    return [f"{shown(p.name)} is not an image, ignored" for p in inputs.ignored] + list(inputs.notes)


def plan_notes(jp: JobPlan) -> list[str]:
    """The notes printed before the plan: odd inputs, and a budget table measured on another GPU."""
    return input_notes(jp.inputs) + ([note] if (note := table_note(jp.table, jp.budget.gpu)) else [])


def table_note(table: BudgetTable, gpu: GpuInfo | None) -> str | None:
    """Say so when no table was measured on this GPU: its memory terms are tensor sizes and carry over (each
    stage's measured peak corrects the next plan), but the CUDA context and every predicted second are that GPU's."""
    if gpu is None or measured_on(table, gpu.name):
        return None
    return (f"budget table {table.name} v{table.version} was measured on {table_gpu(table) or 'another GPU'}, not "
            f"on this {gpu.name}: predicted times are that GPU's; `up2you-budget calibrate --gpu {gpu.index}` "
            "measures this one")


def _check_vram_fits_card(vram: str, gpu: GpuInfo | None) -> None:
    """A cap above the card's total can never be met: a typo or the wrong --gpu, not a neighbour."""
    if vram == "auto" or gpu is None or parse_size(vram) <= gpu.total:
        return
    raise JobError(f"--vram {vram} is more than GPU {gpu.index} ({gpu.name}) has in total ({gib(gpu.total)}): pass at "
                   f"most {int(gpu.total * 10 / 2**30) / 10:g}GB, or auto, or pick another GPU with --gpu", EXIT_USAGE)  # fmt: skip


def _wait_for_budget(
    options: RunOptions, probe: Probe | None, gpu: GpuInfo, ledger: Ledger, want: int,
    on_event: Callable[[str, Any], None] | None,
) -> tuple[Budget, GpuInfo, tuple[Wait, ...]]:  # fmt: skip
    """Budget from what is free and unreserved; if that is below `want`, wait with backoff first: for our own
    jobs (ledger entries) up to --wait-for-siblings, for other processes up to --wait-for-vram. (--plan never waits.)"""
    view = ledger.view(gpu)
    budget = resolve_budget(options.vram, gpu, view.available())
    waited = {"siblings": 0.0, "foreign": 0.0}
    record: Wait | None = None
    delay = 0.5
    while budget.bytes < want and not options.plan_only and probe is not None:
        kind = wait_kind(view, "", want, AUTO_RESERVE)
        limit = options.wait_for_siblings_s if kind == "siblings" else options.wait_for_vram_s
        if waited[kind] >= limit:
            break
        if record is None:
            line = wait_line(view, "", "the best plan" if options.vram == "auto" else f"--vram {options.vram}", want,
                             kind, limit)  # fmt: skip
            record = Wait("plan", 0.0, kind, want, view.available(), holders(view, ""), message=line)
            if on_event is not None:
                on_event("wait", line)
        pause = min(delay, max(0.05, limit - waited[kind]))
        time.sleep(pause)
        waited[kind] += pause
        record.seconds = round(sum(waited.values()), 3)
        delay = min(delay * 1.5, 5.0)
        gpu = select_gpu(probe.gpus(), str(gpu.index))
        view = ledger.view(gpu)
        budget = resolve_budget(options.vram, gpu, view.available())
    if record is not None:
        record.outcome = "admitted" if budget.bytes >= want else "limit reached"
    return budget, gpu, (record,) if record else ()


def _weights_dir(options: RunOptions) -> Path:
    if options.tiny:
        return cache_dir() / "tiny-weights"
    return resolve_weights(options.weights).root  # --weights, $UP2YOU_WEIGHTS, ./weights, the HF cache


def _preflight(pipeline: Pipeline, choice: PlanChoice, options: RunOptions, out: Path) -> dict[str, Any]:
    """Stop before any process starts: missing or wrong weights (each with its fix), too little disk.

    Returns what run.json records about the weights (where found, size/sha256 verified).
    """
    record: dict[str, Any] = {}
    if not (options.tiny or options.full_random):
        keys = sorted({k for s in pipeline.stages for k in s.checkpoints})
        res = resolve_weights(options.weights, keys)
        if res.missing:
            raise JobError(missing_message(res), EXIT_MISSING_WEIGHTS)
        broken = checkpoints.damaged(res.root, keys)  # cheap header checks first: truncation, pickle payloads
        if broken:
            more = f" (and {len(broken) - 1} more damaged file(s))" if len(broken) > 1 else ""
            raise JobError(f"weight file {broken[0]}{more}", EXIT_MISSING_WEIGHTS)
        if (res.root / checkpoints.STAND_IN_MARKER).is_file():  # benchmarks' random stand-ins: layout only
            record = {"root": str(res.root), "stand_ins": "full-size random files (up2you.fullsize): released "
                      "layout and strict loaders; sizes and hashes not checked against the release"}  # fmt: skip
        else:
            checks = {k: verify_checkpoint(k, Path(choice.plan.weights_dir), hash_unknown=True) for k in keys}
            bad = [v.problem for vs in checks.values() for v in vs if not v.ok]
            if bad:
                raise JobError("\n".join(bad), EXIT_MISSING_WEIGHTS)
            record = weights_record(res, checks)
    _check_out_dir(out)
    need = DISK_BASE + DISK_PER_VIEW * choice.plan.views
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    free = shutil.disk_usage(probe_dir).free
    if free < need:
        raise JobError(f"not enough disk in {probe_dir}: {free / 1e9:.1f} GB free, this run needs about "
                       f"{need / 1e9:.1f} GB; free space or pass --out on another disk", EXIT_DISK_FULL)  # fmt: skip
    return record


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _check_out_dir(out: Path) -> None:
    """--out must be a folder we can write (created if missing)."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {shown(out)} is a file: pass a folder (it is created if missing)", EXIT_USAGE)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise JobError(f"--out {shown(out)}: a part of that path is a file: pass a folder path", EXIT_USAGE) from None
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        raise JobError(f"--out {shown(out)} is not writable ({os.strerror(exc.errno or 0)}): pass a folder you can "
                       "write to, e.g. --out ~/up2you_out", EXIT_DISK_FULL) from None  # fmt: skip


def ensure_tiny_weights(weights: Path, console: Console) -> None:
    """Write tiny random checkpoints once (a subprocess: up2you.tiny imports torch, we must not)."""
    if (weights / ".tiny").exists():
        return
    console.print(f"writing tiny random weights to {weights} ...")
    proc = subprocess.run([sys.executable, "-m", "up2you.tiny", str(weights)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise JobError(f"could not write tiny weights to {weights}: {tail}", 1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the job like Ctrl-C does (children are interrupted, then killed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
