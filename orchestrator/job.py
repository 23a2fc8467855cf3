"""One job from photos to deliverables: validate, probe, budget, plan, run, report.

`run_job` raises `JobError` for anything found before the first stage starts (bad input, missing
weights, no GPU, a budget below the minimum, a full disk) — each with a one-line message and an exit
code — and returns a `RunReport` once stages ran, whether they all succeeded or not.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from budgets.table import BudgetTable, load_table
from orchestrator.console import ProgressPrinter, plan_table
from orchestrator.corrections import Corrections, cache_dir
from orchestrator.inputs import EXIT_USAGE, InputError, InputSet, scan_inputs
from orchestrator.outlock import OutputLock, OutputLocked
from orchestrator.planner import Constraints, NoPlanFits, PlanChoice, base_plan, choose_plan
from orchestrator.prestart import startup_report
from orchestrator.probe import GpuInfo, NvmlProbe, Probe, ProbeError, select_gpu
from orchestrator.report import collect_deliverables, plot_timeline, write_json
from orchestrator.runner import AUTO_RESERVE, PipelineResult, RunContext, run_pipeline
from orchestrator.sizes import gib, parse_size
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
    wait_for_vram_s: float = 0.0
    prefer: str = "quality"
    device: str = "cuda"  # cuda | cpu (cpu: tiny models only, for tests and smoke runs)
    tiny: bool = False
    # full-size architectures with random weights and no files: what benchmarks and calibration measure
    full_random: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()  # Plan fields fixed for every candidate (benchmarks)
    plan_only: bool = False
    quiet: bool = False  # no progress lines (--json)
    table: Path | None = None  # another budget table file


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
                                     "measured_rss_bytes": a.measured_rss_bytes, "outcome": a.outcome}  # fmt: skip
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
            "attempts": [a.to_dict() for a in r.attempts] if r else [],
            "replans": [p.__dict__ for p in r.replans] if r else [],
            "overlap_saved_s": round(r.overlap_saved_s, 3) if r else 0.0,
            "startup": startup_report(r.attempts, {a.stage: JobDir(self.job_dir).read_manifest(a.stage) or {}
                                                   for a in r.attempts}) if r else {},
            "wall_s": round(self.wall_s, 3), "deliverables": self.deliverables,
        }  # fmt: skip


def default_out_dir(input_dir: Path) -> Path:
    """`photos/` -> `photos_up2you/`, beside the input."""
    p = Path(input_dir).resolve()
    return p.parent / f"{p.name}_up2you"


def resolve_budget(vram: str, gpu: GpuInfo | None) -> Budget:
    """The memory every stage may use: the user's cap, but never more than is free now (less a reserve)."""
    cap = None if vram == "auto" else parse_size(vram)
    if gpu is None:  # CPU run: the cap is only what plans against (tiny models)
        avail = psutil.virtual_memory().available
        return Budget(cap or avail, f"--vram {vram}" if cap else f"auto: host memory available {gib(avail)}", None)
    usable = max(0, gpu.free - AUTO_RESERVE)
    if cap is None:
        return Budget(usable, f"auto: {gib(gpu.free)} free on GPU {gpu.index} minus {gib(AUTO_RESERVE)} reserve", gpu)
    if cap > usable:
        return Budget(usable, f"--vram {vram}, but only {gib(gpu.free)} free on GPU {gpu.index}: using {gib(usable)}",
                      gpu)  # fmt: skip
    return Budget(cap, f"--vram {vram}", gpu)


def plan_job(
    input_dir: Path | str, options: RunOptions = RunOptions(), probe: Probe | None = None,
    pipeline: Pipeline = UP2YOU, table: BudgetTable | None = None,
) -> JobPlan:  # fmt: skip
    """Everything up to the plan: validate inputs, pick the GPU, resolve the budget, choose the plan."""
    try:
        inputs = scan_inputs(input_dir)
    except InputError as exc:
        raise JobError(str(exc), exc.exit_code) from None
    table = table or load_table(options.table, pipeline.name)
    gpu = _pick_gpu(options, probe)
    budget = _wait_for_budget(options, probe, gpu) if gpu else resolve_budget(options.vram, None)
    smoke = options.tiny
    constraints = Constraints(options.views or (6 if smoke else None), options.resolution or (256 if smoke else None),
                              options.steps or (4 if smoke else None), options.thg_interval, options.prefer)
    profile = "tiny" if smoke else "full-random" if options.full_random else "real"
    base = base_plan(constraints, device="cuda:0" if options.device != "cpu" else "cpu", profile=profile,
                     weights_dir="" if options.full_random else str(_weights_dir(options)),
                     **(SMOKE_GEOMETRY if smoke else {})).replace(**dict(options.overrides))  # fmt: skip
    corrections = Corrections(gpu.name if gpu else "cpu", f"{table.name}@v{table.version}")
    try:
        choice = choose_plan(pipeline, table, len(inputs.photos), budget.bytes, base, constraints,
                             corrections.factors())  # fmt: skip
    except NoPlanFits as exc:
        prefix = f"--vram {options.vram}: " if options.vram != "auto" else "the free GPU memory: "
        raise JobError(prefix + str(exc), EXIT_USAGE) from None
    return JobPlan(inputs, budget, constraints, base, choice, corrections, table)


def run_job(
    input_dir: Path | str, out_dir: Path | str | None = None, options: RunOptions = RunOptions(),
    probe: Probe | None = None, pipeline: Pipeline = UP2YOU, table: BudgetTable | None = None,
    console: Console | None = None,
) -> RunReport:  # fmt: skip
    """Plan and (unless options.plan_only) run one job; see the module docstring for what raises."""
    t0 = time.monotonic()
    console = console or Console(stderr=True, quiet=options.quiet)
    jp = plan_job(input_dir, options, probe, pipeline, table)
    inputs, budget, choice = jp.inputs, jp.budget, jp.choice
    out = Path(out_dir) if out_dir else default_out_dir(Path(input_dir))
    job = JobDir(out / "job")
    if options.tiny:
        console.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
    for p in inputs.ignored:
        console.print(f"[dim]note: {p.name} is not an image, ignored[/dim]")
    console.print(plan_table(pipeline, choice, f"plan: {choice.candidate.label} — budget {budget.source}"))
    for d in choice.degradations:
        console.print(f"[yellow]  {d}[/yellow]")
    report = RunReport(True, 0, "plan only: nothing ran", out, job.root, choice, budget, len(inputs.photos),
                       [str(p) for p in inputs.ignored], options.tiny)  # fmt: skip
    if options.plan_only:
        return report
    _preflight(pipeline, choice, options, out)
    if options.tiny:
        ensure_tiny_weights(Path(choice.plan.weights_dir), console)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except OutputLocked as exc:
        raise JobError(str(exc), exc.exit_code) from None
    try:
        return _run_locked(report, jp, job, out, options, probe, pipeline, console, t0)
    finally:
        lock.release()


def _run_locked(
    report: RunReport, jp: JobPlan, job: JobDir, out: Path, options: RunOptions, probe: Probe | None,
    pipeline: Pipeline, console: Console, t0: float,
) -> RunReport:  # fmt: skip
    """The part of a run that writes into `out`: only ever one at a time per folder (the caller holds its lock)."""
    inputs, budget, choice = jp.inputs, jp.budget, jp.choice
    job.root.mkdir(parents=True, exist_ok=True)
    job.write_inputs(inputs.record())
    ctx = RunContext(job, pipeline, jp.table, len(inputs.photos), inputs.key, jp.constraints, jp.base, budget.bytes,
                     jp.corrections, probe=_probe_for(options, probe), gpu=budget.gpu,
                     max_retries=options.max_retries, wait_for_vram_s=options.wait_for_vram_s,
                     weights_dir=choice.plan.weights_dir, on_event=ProgressPrinter(console, options.quiet))
    with _sigterm_as_interrupt():
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


def _pick_gpu(options: RunOptions, probe: Probe | None) -> GpuInfo | None:
    """The GPU to plan for: none on a CPU run without a probe; NVML's otherwise."""
    if options.device == "cpu" and probe is None:
        return None
    try:
        return select_gpu((probe or NvmlProbe()).gpus(), options.gpu)
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None


def _probe_for(options: RunOptions, probe: Probe | None) -> Probe | None:
    if probe is not None or options.device == "cpu":
        return probe
    return NvmlProbe()


def _wait_for_budget(options: RunOptions, probe: Probe | None, gpu: GpuInfo) -> Budget:
    """With --wait-for-vram and a fixed --vram: wait (with backoff) until that much is free, then budget."""
    budget = resolve_budget(options.vram, gpu)
    if options.vram == "auto" or options.wait_for_vram_s <= 0:
        return budget
    want = parse_size(options.vram)
    deadline, delay = time.monotonic() + options.wait_for_vram_s, 0.5
    while budget.bytes < want and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 30.0)
        gpu = select_gpu((probe or NvmlProbe()).gpus(), str(gpu.index))
        budget = resolve_budget(options.vram, gpu)
    return budget


def _weights_dir(options: RunOptions) -> Path:
    if options.tiny:
        return cache_dir() / "tiny-weights"
    return (options.weights or Path("weights")).resolve()


def _preflight(pipeline: Pipeline, choice: PlanChoice, options: RunOptions, out: Path) -> None:
    """Stop before any process starts: missing weights (listed with their source), too little disk."""
    if not (options.tiny or options.full_random):
        keys = sorted({k for s in pipeline.stages for k in s.checkpoints})
        missing = checkpoints.missing(choice.plan.weights_dir, keys)
        if missing:
            lines = "\n".join(f"  {path}\n    get it from {source}" for path, source in missing)
            raise JobError(f"{len(missing)} weight file(s) missing under {choice.plan.weights_dir} "
                           f"(--weights DIR):\n{lines}\nor run with --tiny for a smoke test", EXIT_MISSING_WEIGHTS)  # fmt: skip
    need = DISK_BASE + DISK_PER_VIEW * choice.plan.views
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    free = shutil.disk_usage(probe_dir).free
    if free < need:
        raise JobError(f"not enough disk in {probe_dir}: {free / 1e9:.1f} GB free, this run needs about "
                       f"{need / 1e9:.1f} GB; free space or pass --out on another disk", EXIT_DISK_FULL)  # fmt: skip


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
def _sigterm_as_interrupt() -> Iterator[None]:
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
