"""`up2you-budget calibrate`: measure every stage on THIS GPU over a grid of plans and fit a new budget table.

Torch-free, like the rest of the orchestrator: it only writes a photo folder, starts stage processes
through the ordinary runner (one fixed Plan per grid point: no planning, no cap, no retries) and reads
what they report. Per stage and grid point it keeps the runner's NVML per-process peak (what the
planner must bound: allocator + CUDA context + what torch does not see) and the manifest's torch
peaks; the diffusion stages also record the cumulative allocator peak after each of their phases.

Small step counts (steps=2, mesh_iters=20, video_frames=16) are used on purpose: the diffusion
stages' peak does not depend on them (the denoising loop allocates the same buffers every step), only
their time does. The mesh and video stages are the exception: remeshing grows the mesh over its
iterations (7.0 GiB at 700 iterations against 4.4 GiB at 20, 20 views, H100), so a stage whose
full-length points peak above the short points' fit has its terms scaled up to cover them
(`cover_full_length`). The job folder is reused across grid points, so stages
whose cache key did not change (segment, features; apose/weights per views x resolution) run once;
the memory-only knobs (cfg_mode, vae_mode, offload) are not in the keys, so the diffusion stages are
invalidated explicitly between grid points that differ only in them.

Time: every stage's start-up and run time is recorded too, and the table's `time` section
(budgets.timing) is fitted from them (budgets.timing_fit). Short runs pin only the fixed terms, so the
full grid ends with two full-length points (50 steps, 700 mesh iterations, 64 frames; THG fixed-3
batched at 20 views, plain CFG sequential at 12 views) that pin the per-step, per-iteration and per-frame
terms; they are left out of the memory least squares and only raise a stage that they measure higher. A grid
without them (--quick, --tiny) keeps the template's per-step terms and says so in the provenance.

The fit (per stage, all phases at once): peak(phase) = sum of the resident terms + that phase's terms,
non-negative least squares over every (grid point, phase) measurement; terms whose feature columns
are identical over the grid (e.g. several constant weight terms) share one fitted total in the ratio
of their previous coefficients; terms the grid never exercises keep their previous coefficient.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from budgets.fit import FitRow
from budgets.table import RESIDENT, TABLES_DIR, BudgetTable, StageModel, Term, load_table, predict, save_table
from budgets.timing import TimeModel
from budgets.timing_fit import calibration_rows, fit_time_model
from orchestrator.corrections import Corrections
from orchestrator.inputs import scan_inputs
from orchestrator.planner import Candidate, Constraints, MemoryStep, PlanChoice, evaluate
from orchestrator.probe import GpuInfo, NvmlProbe, Probe, select_gpu
from orchestrator.runner import Attempt, RunContext, run_pipeline
from stages.jobfs import JobDir
from stages.plan import Plan
from stages.spec import UP2YOU, Pipeline

MiB = 2**20
# Sampler phase (manifest extras `diffusion_peak_after_<phase>`) -> budget-table phase. Prompt encoding
# and the reference VAE encode run before the UNet is placed, so they are not rows of the table's
# structure (resident UNet): they are never a stage's peak and are left out of the fit.
SAMPLER_PHASES = {"reference_pass": "reference", "pose_adapter": "denoise", "denoise": "denoise",
                  "decode": "decode"}  # fmt: skip
SAMPLER_ORDER = ("encode_prompt", "encode_refs", "reference_pass", "pose_adapter", "denoise", "decode")
GROW_BYTES = 1 * MiB  # a cumulative peak that grew less than this in a phase did not peak there


@dataclass(frozen=True)
class GridPoint:
    """One plan of the calibration grid: the quality knobs and the memory-only knobs."""

    views: int
    resolution: int
    cfg_mode: str = "batched"
    vae_mode: str = "sliced"
    offload: str = "none"
    thg_interval: int = 3
    full_length: bool = False  # the Plan's own steps/mesh_iters/video_frames instead of the fast ones (time)

    @property
    def label(self) -> str:
        extra = (f" thg-{self.thg_interval}" if self.thg_interval != 3 else "") + \
                (" full-length" if self.full_length else "")
        return f"{self.views}x{self.resolution} cfg-{self.cfg_mode} vae-{self.vae_mode} offload-{self.offload}{extra}"

    def knobs(self) -> dict[str, Any]:
        """The Plan fields this point sets."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "full_length"}


def grid_part(grid: Sequence[GridPoint], k: int, n: int) -> tuple[GridPoint, ...]:
    """Part k (1-based) of n contiguous parts, so one calibration fits into several shorter GPU sessions."""
    if not 1 <= k <= n:
        raise ValueError(f"--part {k}/{n}: expected 1 <= K <= N")
    bounds = [round(i * len(grid) / n) for i in range(n + 1)]
    return tuple(grid[bounds[k - 1]:bounds[k]])


def load_measurements(path: Path) -> list[Measurement]:
    """The measurements a (partial) calibration wrote to its work folder's measurements.json."""
    return [Measurement(**m) for m in json.loads(Path(path).read_text())["measurements"]]


def full_grid() -> tuple[GridPoint, ...]:
    """views x resolution x CFG (VAE sliced, no offload), plus VAE batched/tiled and offload at a few
    points; memory-only variants follow their base point so apose/weights/mesh are not recomputed."""
    out: list[GridPoint] = []
    for v in (6, 12, 20):
        for r in (512, 768):
            out += [GridPoint(v, r), GridPoint(v, r, cfg_mode="sequential")]
            if (v, r) in ((6, 512), (20, 768)):
                out += [GridPoint(v, r, vae_mode="batched"), GridPoint(v, r, vae_mode="tiled"),
                        GridPoint(v, r, cfg_mode="sequential", offload="model")]  # fmt: skip
            if (v, r) == (12, 768):
                out += [GridPoint(v, r, vae_mode="batched"),
                        GridPoint(v, r, cfg_mode="sequential", offload="sequential")]  # fmt: skip
    # time only: whole-length runs pin the per-step/-iteration/-frame terms (two uncond/cond ratios, two view counts)
    out += [GridPoint(20, 768, full_length=True), GridPoint(12, 768, cfg_mode="sequential", thg_interval=1,
                                                            full_length=True)]  # fmt: skip
    return tuple(out)


QUICK_GRID = (GridPoint(6, 512), GridPoint(20, 768), GridPoint(20, 768, cfg_mode="sequential"))
TINY_GRID = (GridPoint(6, 128), GridPoint(6, 128, cfg_mode="sequential"))
# the diffusion peaks do not depend on these (see the module docstring: mesh and video do); they make the grid fast
FAST_KNOBS: dict[str, Any] = {"steps": 2, "mesh_iters": 20, "video_frames": 16}
LENGTH_KNOBS = ("steps", "mesh_iters", "video_frames")  # what a full-length point leaves at the Plan's defaults
TINY_KNOBS: dict[str, Any] = {"steps": 2, "mesh_iters": 10, "mesh_resolution": 128, "video_frames": 8,
                              "video_resolution": 128, "video_chunk": 4}  # fmt: skip


@dataclass
class Measurement:
    """What one stage reported at one grid point."""

    stage: str
    point: str
    plan: dict[str, Any]
    n_refs: int
    outcome: str
    nvml_peak: int | None  # runner's NVML per-process peak (context included)
    rss_peak: int | None
    torch_allocated: int | None
    torch_reserved: int | None
    phase_peaks: dict[str, int] = field(default_factory=dict)  # sampler phase -> cumulative allocated peak
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    full_length: bool = False  # measured for the time fit only (left out of the memory fit)


# ---------------------------------------------------------------------------------------------------
# synthetic input


def write_photos(folder: Path, n: int = 4, size: tuple[int, int] = (512, 768)) -> Path:
    """`n` RGBA PNGs of a simple standing figure with an alpha, so segment needs no BiRefNet."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        colour = (200 - 30 * i, 120 + 20 * i, 90 + 30 * i, 255)
        cx = w // 2 + (i - n // 2) * 6
        d.ellipse((cx - 45, 40, cx + 45, 150), fill=(230, 190, 160, 255))  # head
        d.rectangle((cx - 80, 150, cx + 80, 430), fill=colour)  # torso
        d.rectangle((cx - 130, 160, cx - 85, 400), fill=colour)  # arms
        d.rectangle((cx + 85, 160, cx + 130, 400), fill=colour)
        d.rectangle((cx - 75, 430, cx - 10, 720), fill=(40, 40, 90, 255))  # legs
        d.rectangle((cx + 10, 430, cx + 75, 720), fill=(40, 40, 90, 255))
        im.save(folder / f"photo_{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# running the grid


@dataclass(frozen=True)
class CalibrationSetup:
    """Where and how the grid runs; `pipeline`/`template` are swappable for tests (the fake pipeline)."""

    work_dir: Path
    device: str = "cuda"  # cuda | cpu
    profile: str = "full-random"
    weights_dir: str = ""
    gpu: GpuInfo | None = None
    probe: Probe | None = None
    pipeline: Pipeline = UP2YOU
    template: BudgetTable | None = None
    base_knobs: dict[str, Any] = field(default_factory=lambda: dict(FAST_KNOBS))


def run_grid(setup: CalibrationSetup, grid: Sequence[GridPoint],
             log: Callable[[str], None] = lambda m: None) -> list[Measurement]:  # fmt: skip
    """Run the pipeline once per grid point in one reused job folder; return every stage's measurement."""
    table = setup.template or load_table(pipeline=setup.pipeline.name)
    photos = write_photos(setup.work_dir / "photos")
    inputs = scan_inputs(photos)
    job = JobDir(setup.work_dir / "job")
    shutil.rmtree(job.root, ignore_errors=True)  # results of an earlier calibration would be skipped, unmeasured
    job.root.mkdir(parents=True, exist_ok=True)
    job.write_inputs(inputs.record())
    n_refs = len(inputs.photos)
    on_gpu = setup.device == "cuda"
    # no cap: a budget above the whole GPU makes the stage's memory fraction 1.0
    budget = (setup.gpu.total if setup.gpu else 1 << 50) + table.context_bytes
    memory_only = ("cfg_mode", "vae_mode", "offload")
    # the diffusion stages: keyed on the sampler's knobs, not on the memory-only ones they obey
    diffusion = [s.name for s in setup.pipeline.stages if "steps" in s.knobs]
    previous: GridPoint | None = None
    out: list[Measurement] = []
    for k, point in enumerate(grid):
        knobs = {k: v for k, v in setup.base_knobs.items() if not (point.full_length and k in LENGTH_KNOBS)}
        plan = Plan(device="cuda:0" if on_gpu else "cpu", profile=setup.profile, weights_dir=setup.weights_dir,
                    thg_schedule="fixed", ref_chunk=4, **knobs, **point.knobs())
        if previous is not None and any(getattr(previous, m) != getattr(point, m) for m in memory_only):
            for name in diffusion:  # same key, different memory: run them again (later stages keep theirs)
                job.invalidate(name)
        previous = point
        log(f"[{k + 1}/{len(grid)}] {point.label}")
        t = time.monotonic()
        attempts = _run_point(setup, table, job, plan, n_refs, inputs.key, budget, point.label)
        for a in attempts:
            if a.outcome == "skipped":
                continue
            out.append(_measurement(job, a, point, plan, n_refs))
        log(f"    {time.monotonic() - t:.1f} s: " + ", ".join(
            f"{m.stage} {_mib(m.nvml_peak or m.torch_reserved or m.rss_peak)}" for m in out
            if m.point == point.label))  # fmt: skip
    return out


def _run_point(setup: CalibrationSetup, table: BudgetTable, job: JobDir, plan: Plan, n_refs: int,
               inputs_key: str, budget: int, label: str) -> list[Attempt]:  # fmt: skip
    step = MemoryStep(f"calibration {label}", {}, plan.offload != "none")
    fits = evaluate(plan, setup.pipeline, table, n_refs, budget)
    choice = PlanChoice(plan, Candidate(plan, 0, step), budget, fits)
    ctx = RunContext(job, setup.pipeline, table, n_refs, inputs_key, Constraints(), plan, budget,
                     Corrections("calibration", label, setup.work_dir / "corrections.json"),
                     probe=setup.probe, gpu=setup.gpu, max_retries=0, weights_dir=setup.weights_dir)  # fmt: skip
    return run_pipeline(ctx, choice).attempts


def _measurement(job: JobDir, a: Attempt, point: GridPoint, plan: Plan, n_refs: int) -> Measurement:
    manifest = job.read_manifest(a.stage) if a.outcome == "ok" else None
    m = manifest or {}
    extras = m.get("extras", {})
    phases = {ph: int(extras[f"diffusion_peak_after_{ph}"]) for ph in SAMPLER_ORDER
              if f"diffusion_peak_after_{ph}" in extras}  # fmt: skip
    return Measurement(
        stage=a.stage, point=point.label, plan=plan.to_dict(), n_refs=n_refs, outcome=a.outcome,
        nvml_peak=a.measured_gpu_bytes, rss_peak=a.measured_rss_bytes,
        torch_allocated=m.get("torch_peak_allocated", a.torch_peak_allocated), torch_reserved=m.get("torch_peak_reserved"),
        phase_peaks=phases, wall_s=a.wall_s, timings=dict(m.get("timings", {})), full_length=point.full_length,
    )  # fmt: skip


def _mib(b: int | None) -> str:
    return f"{b / MiB:.0f} MiB" if b else "-"


# ---------------------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class PhaseRow:
    """A measured peak of one phase (resident terms + that phase's terms) under one plan."""

    row: FitRow
    phase: str


def estimate_context(measurements: Sequence[Measurement], fallback: int) -> tuple[int, str]:
    """What NVML sees beyond torch's reserved pool (CUDA context, cuBLAS/cuDNN workspaces): the median
    of (NVML peak - torch reserved peak) over the stages that used the GPU."""
    gaps = [m.nvml_peak - m.torch_reserved for m in measurements
            if m.nvml_peak and m.torch_reserved and m.nvml_peak > m.torch_reserved]  # fmt: skip
    if not gaps:
        return fallback, "kept from the template table (no NVML per-process measurement)"
    return int(np.median(gaps)), f"measured: median of NVML peak - torch reserved peak over {len(gaps)} stage runs"


def target_bytes(m: Measurement, context: int) -> tuple[float | None, str]:
    """The allocator-side peak the table must predict: NVML minus the context where NVML saw the process,
    else torch's reserved peak, else (CPU runs: tests of the machinery only) the host RSS peak."""
    if m.nvml_peak:
        return float(max(0, m.nvml_peak - context)), "nvml"
    if m.torch_reserved:
        return float(m.torch_reserved), "torch_reserved"
    if m.rss_peak:
        return float(m.rss_peak), "rss"
    return None, "none"


def phase_rows(m: Measurement, table: BudgetTable, context: int) -> list[PhaseRow]:
    """The rows one measurement gives: its overall peak in the phase where it happened, and for the
    diffusion stages every earlier table phase in which the cumulative allocator peak still grew
    (scaled by this run's NVML/allocated ratio, so all rows are on the NVML side)."""
    y, _ = target_bytes(m, context)
    if y is None or m.outcome != "ok":
        return []
    plan = Plan.from_dict(m.plan)
    fit_row = FitRow(plan, m.n_refs, y)
    if not m.phase_peaks:
        phase = predict(m.stage, plan, m.n_refs, table).peak_phase or RESIDENT
        return [PhaseRow(fit_row, phase)]
    scale = y / m.torch_allocated if m.torch_allocated else 1.0
    rows: list[PhaseRow] = []
    best: dict[str, float] = {}
    before = 0
    for ph in SAMPLER_ORDER:
        if ph not in m.phase_peaks:
            continue
        after = m.phase_peaks[ph]
        if ph in SAMPLER_PHASES and after > before + GROW_BYTES:
            tp = SAMPLER_PHASES[ph]
            best[tp] = max(best.get(tp, 0.0), after * scale)
        before = max(before, after)
    rows = [PhaseRow(FitRow(plan, m.n_refs, v), ph) for ph, v in best.items()]
    return rows or [PhaseRow(fit_row, predict(m.stage, plan, m.n_refs, table).peak_phase or RESIDENT)]


def fit_stage(terms: Sequence[Term], rows: Sequence[PhaseRow], source: str) -> tuple[tuple[Term, ...], float]:
    """Joint non-negative least squares of a stage's terms over phase rows; returns (terms, worst rel. error).

    Terms never exercised keep their coefficient and kind; identical columns share one fitted total
    in the ratio of their previous coefficients (so derived splits of a constant survive).
    """
    if not rows:
        return tuple(terms), float("nan")
    x = np.array([[_unit(t, r) for t in terms] for r in rows], dtype=np.float64)
    y = np.array([r.row.peak_bytes for r in rows], dtype=np.float64)
    groups: list[list[int]] = []
    for j in range(len(terms)):
        if not np.any(x[:, j]):
            continue
        for g in groups:
            if np.allclose(x[:, g[0]], x[:, j], rtol=1e-9, atol=0.0):
                g.append(j)
                break
        else:
            groups.append([j])
    shares = []
    for g in groups:
        prior = np.array([max(terms[j].coef, 0.0) for j in g])
        shares.append(prior / prior.sum() if prior.sum() > 0 else np.full(len(g), 1.0 / len(g)))
    xg = np.stack([x[:, g[0]] for g in groups], axis=1) if groups else np.zeros((len(rows), 0))
    coef_g = _nnls(xg, y)
    coef = {j: float(c * s) for g, c, sh in zip(groups, coef_g, shares, strict=True) for j, s in zip(g, sh, strict=True)}
    pred = xg @ coef_g
    worst = float(np.max(np.abs(pred - y) / np.maximum(y, 1.0))) if len(y) else float("nan")
    out = tuple(dataclasses.replace(t, coef=coef[j], kind="measured", source=source) if j in coef else t
                for j, t in enumerate(terms))  # fmt: skip
    return out, worst


def _unit(term: Term, r: PhaseRow) -> float:
    if not (RESIDENT in term.phases or r.phase in term.phases):
        return 0.0
    return dataclasses.replace(term, coef=1.0).bytes(r.row.plan, r.row.n_refs)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Active-set NNLS as in budgets.fit: drop negative coefficients and refit (enough for a few terms)."""
    coef = np.zeros(x.shape[1])
    active = list(range(x.shape[1]))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            break
        worst = active[int(np.argmin(sol))]  # drop the most negative one, keep the rest
        active = [j for j in active if j != worst]
    return coef


def fit_table(template: BudgetTable, measurements: Sequence[Measurement], provenance: dict[str, Any],
              version: int | None = None) -> tuple[BudgetTable, dict[str, float]]:  # fmt: skip
    """A new table version: the template's term structure with coefficients fitted to the short points'
    measurements; then each stage is raised, where needed, to cover its full-length points (below)."""
    full = [m for m in measurements if m.full_length]
    measurements = [m for m in measurements if not m.full_length]
    context, context_note = estimate_context(measurements, template.context_bytes)
    errors: dict[str, float] = {}
    stages: dict[str, StageModel] = {}
    for name, model in template.stages.items():
        rows = [r for m in measurements if m.stage == name for r in phase_rows(m, template, context)]
        src = f"calibrated: joint NNLS over {len(rows)} measured phase peaks ({provenance.get('gpu', '?')})"
        terms, err = fit_stage(model.terms, rows, src)
        terms = cover_full_length(name, terms, [m for m in full if m.stage == name], context)
        errors[name] = err
        stages[name] = StageModel(terms, model.notes)
    prov = {**provenance, "context": context_note,
            "fit_max_rel_error": {k: (round(v, 4) if v == v else None) for k, v in errors.items()}}  # fmt: skip
    table = BudgetTable(name=f"{template.pipeline}-calibrated", version=version or template.version + 1,
                        pipeline=template.pipeline, provenance=prov, context_bytes=context,
                        margin_bytes=template.margin_bytes, margin_fraction=template.margin_fraction, stages=stages)
    return table, errors


def cover_full_length(stage: str, terms: Sequence[Term], full: Sequence[Measurement], context: int) -> tuple[Term, ...]:
    """The stage's terms scaled up by the largest (measured / predicted) allocator peak of its full-length
    points, if that is above 1. Remeshing grows the mesh over its iterations, so mesh and video peak
    higher at 700 iterations than at the grid's 20 (H200, 20 views: 7.49 against 4.25 GiB); the short
    points still fix how the terms scale with views and chunks, the full-length ones how high they go.
    A stage whose peak does not depend on the length (the diffusion stages) is left as it was."""
    if not full:
        return tuple(terms)
    model = StageModel(tuple(terms), "")
    probe = BudgetTable(name="fit", version=0, pipeline="", provenance={}, context_bytes=context, margin_bytes=0,
                        margin_fraction=0.0, stages={stage: model})  # fmt: skip
    ratios = []
    for m in full:
        y, _ = target_bytes(m, context)
        predicted = predict(stage, Plan.from_dict(m.plan), m.n_refs, probe).allocator_bytes
        if y is not None and m.outcome == "ok" and predicted > 0:
            ratios.append((y / predicted, m.point))
    if not ratios or max(ratios)[0] <= 1.0:
        return tuple(terms)
    factor, point = max(ratios)
    note = f" | scaled x{factor:.3f} to cover {point!r} (a full-length run that peaked above the fit)"
    return tuple(dataclasses.replace(t, coef=t.coef * factor, source=t.source + note) for t in terms)


def fit_time(template: BudgetTable, pipeline: Pipeline, measurements: Sequence[Measurement],
             provenance: dict[str, Any]) -> TimeModel:  # fmt: skip
    """The table's `time` section from the grid's own stage times (start-up, run, wall; run order kept)."""
    rows = calibration_rows([m.__dict__ for m in measurements], "calibration")
    lengths = sorted({(m.plan.get("steps"), m.plan.get("mesh_iters"), m.plan.get("video_frames")) for m in measurements})
    prov = {k: provenance.get(k) for k in ("gpu", "driver", "torch", "date", "profile", "template")}
    prov |= {"files": ["measurements.json of this calibration (its work folder)"],
             "lengths": [f"{s} steps, {i} mesh iterations, {f} frames" for s, i, f in lengths],
             "method": "up2you-budget calibrate: per stage and part (start-up = import + prepare; run = the "
                       "manifest's run_s), NNLS on the relative error over the grid's stage runs"}  # fmt: skip
    return fit_time_model(template.time, pipeline.names, rows, prov)


# ---------------------------------------------------------------------------------------------------
# provenance and the command


def torch_version(env: dict[str, str] | None = None) -> str:
    """Asked of a child process: the orchestrator itself never imports torch."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True, timeout=120, env=env)  # fmt: skip
        return proc.stdout.strip() or f"unknown ({proc.stderr.strip().splitlines()[-1:]})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"


def driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception as exc:  # noqa: BLE001 - provenance only
        return f"unknown ({type(exc).__name__})"


def next_version(pipeline: str) -> int:
    versions = [int(json.loads(p.read_text()).get("version", 0)) for p in TABLES_DIR.glob("*.json")
                if json.loads(p.read_text()).get("pipeline") == pipeline]  # fmt: skip
    return max(versions, default=0) + 1


@dataclass
class CalibrationResult:
    table: BudgetTable
    path: Path
    measurements: list[Measurement]
    errors: dict[str, float]
    wall_s: float


def calibrate(
    work_dir: Path, gpu: str = "0", quick: bool = False, out: Path | None = None, device: str = "cuda",
    tiny: bool = False, grid: Sequence[GridPoint] | None = None, pipeline: Pipeline = UP2YOU,
    template: BudgetTable | None = None, probe: Probe | None = None, log: Callable[[str], None] = print,
    part: tuple[int, int] | None = None, earlier: Sequence[Measurement] = (),
) -> CalibrationResult:  # fmt: skip
    """Run the grid (or part K of N of it), fit it together with `earlier` measurements (other parts, from
    their measurements.json), write the table (budgets/tables/<pipeline>-v<next>.json unless `out`)."""
    t0 = time.monotonic()
    gpu_info: GpuInfo | None = None
    if device == "cuda":
        probe = probe or NvmlProbe()
        gpu_info = select_gpu(probe.gpus(), gpu)
    # the template gives the structure and the terms the grid cannot fit: this GPU's own table where there is one
    template = template or load_table(pipeline=pipeline.name, gpu_name=gpu_info.name if gpu_info else None)
    profile, weights, knobs = "full-random", "", dict(FAST_KNOBS)
    if tiny:
        from orchestrator.corrections import cache_dir
        from orchestrator.job import ensure_tiny_weights

        weights_path = cache_dir() / "tiny-weights"
        from rich.console import Console

        ensure_tiny_weights(weights_path, Console(stderr=True, quiet=True))
        profile, weights, knobs = "tiny", str(weights_path), dict(TINY_KNOBS)
    if grid is None:
        grid = TINY_GRID if tiny else (QUICK_GRID if quick else full_grid())
    if part is not None:
        grid = grid_part(grid, *part)
    setup = CalibrationSetup(Path(work_dir), device, profile, weights, gpu_info, probe, pipeline, template, knobs)
    measurements = list(earlier) + run_grid(setup, grid, log)
    version = next_version(pipeline.name) if out is None else template.version + 1
    provenance = {
        "gpu": gpu_info.name if gpu_info else f"none (device {device}; host RSS measured: a machinery test only)",
        "gpu_total_bytes": gpu_info.total if gpu_info else None,
        "driver": driver_version() if gpu_info else None,
        "torch": torch_version(), "python": platform.python_version(), "host": platform.node(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": profile, "template": f"{template.name}@v{template.version}",
        "grid": sorted({m.point for m in measurements}), "fixed_knobs": knobs,
        "method": "up2you-budget calibrate: each grid point run through the orchestrator's runner (no cap); "
                  "targets are NVML per-process peaks minus the context; small step counts (diffusion "
                  "peaks do not depend on them; mesh/video must be checked against a full-length run)",
        "failed": [f"{m.stage} @ {m.point}: {m.outcome}" for m in measurements if m.outcome != "ok"],
    }  # fmt: skip
    table, errors = fit_table(template, measurements, provenance, version)
    table = dataclasses.replace(table, time=fit_time(template, pipeline, measurements, provenance))
    path = Path(out) if out else TABLES_DIR / f"{pipeline.name}-v{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_table(table, path)
    raw = Path(work_dir) / "measurements.json"  # not beside the table: budgets/tables/ holds tables only
    raw.write_text(json.dumps({"table": str(path), "measurements": [m.__dict__ for m in measurements]}, indent=1))
    return CalibrationResult(table, path, measurements, errors, time.monotonic() - t0)
