"""Choose the best Plan whose every stage fits the memory budget. Pure: no I/O, no GPU.

Candidates are enumerated in quality order: 20 views before 12 before 6, and 768 px before 512 at
each view count. Within one quality level, memory-only knobs are tried first, cheapest first:
batched then sliced VAE decode, sequential CFG, offload "model", offload "sequential". These change
memory and time, not the result, so `--prefer quality` never loses views or pixels while one of them
can still make a plan fit. `--prefer speed` tries every quality level without offload before paying
for offload (offload can cost several times the run time).

A stage fits when predicted allocator peak x learned correction + CUDA context + margin <= budget.
Stages run one at a time, so each one gets the whole budget.

Knobs that only one stage reads and that are exact are not rungs of the ladder: for each candidate
the planner takes the cheapest value that lets that stage fit. Today that is the mesh fit's
`mesh_view_chunk`: all views in one batch if they fit, else the fewest equal chunks that do
(same result, one rasterizer pass more per chunk).

With a time budget (`--time-budget 90s`) a plan must also finish in time by the table's time model
(budgets.timing). Inside each quality level the planner then tries, before losing views or pixels, a
larger THG interval (fewer unconditional evaluations) and only then fewer denoising steps. Without one
the speed ladder is the single default rung and the choice is exactly the memory-only one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from budgets.table import BudgetTable, Prediction, predict
from budgets.timing import PlanTime, plan_time, seconds_flag
from orchestrator import prestart
from orchestrator.sizes import gib, vram_flag
from stages.plan import RESOLUTION_CHOICES, VIEW_CHOICES, Plan
from stages.spec import Pipeline


@dataclass(frozen=True)
class MemoryStep:
    """One rung of the memory ladder: memory-only knob values and what they cost."""

    label: str
    knobs: Mapping[str, Any]
    offload: bool  # whether this rung moves weights off the GPU (slow)


MEMORY_LADDER: tuple[MemoryStep, ...] = (
    MemoryStep("batched VAE decode", {"cfg_mode": "batched", "vae_mode": "batched", "offload": "none", "ref_chunk": 4},
               False),
    MemoryStep("sliced VAE decode", {"cfg_mode": "batched", "vae_mode": "sliced", "offload": "none", "ref_chunk": 4},
               False),
    MemoryStep("sequential CFG", {"cfg_mode": "sequential", "vae_mode": "sliced", "offload": "none", "ref_chunk": 4},
               False),
    MemoryStep("offload model", {"cfg_mode": "sequential", "vae_mode": "sliced", "offload": "model", "ref_chunk": 2},
               True),
    MemoryStep("offload sequential",
               {"cfg_mode": "sequential", "vae_mode": "sliced", "offload": "sequential", "ref_chunk": 1}, True),
)  # fmt: skip

PREFERENCES = ("quality", "speed")
# the speed ladder, tried only under a time budget: THG intervals first (the fixed schedule), then fewer steps
THG_LADDER = (3, 4, 6)
STEP_LADDER = (50, 40, 30, 20)


@dataclass(frozen=True)
class SpeedStep:
    """One rung of the speed ladder: denoising steps and THG interval; `label` is empty for the default rung."""

    steps: int
    thg_interval: int
    label: str = ""


@dataclass(frozen=True)
class Constraints:
    """What the user fixed on the command line; None = the planner chooses."""

    views: int | None = None
    resolution: int | None = None
    steps: int | None = None
    thg_interval: int | None = None  # None = auto: fixed schedule, interval 3
    prefer: str = "quality"
    time_budget_s: float | None = None  # None = no time budget (memory alone decides)

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise ValueError(f"--prefer {self.prefer!r}: expected one of {PREFERENCES}")
        if self.views is not None and self.views not in VIEW_CHOICES:
            raise ValueError(f"--views {self.views}: expected auto or one of {VIEW_CHOICES}")
        if self.resolution is not None and (self.resolution % 64 or not 128 <= self.resolution <= 1024):
            # the CLI offers RESOLUTION_CHOICES; smaller multiples of 64 serve the CPU smoke profile
            raise ValueError(f"--resolution {self.resolution}: expected auto or one of {RESOLUTION_CHOICES}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"--time-budget {self.time_budget_s:g}s: expected a positive duration such as 90s")


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    quality_rank: int  # 0 = best
    step: MemoryStep
    speed: SpeedStep | None = None  # the speed-ladder rung (None or label "" = the default steps and interval)

    @property
    def label(self) -> str:
        chunk = self.plan.mesh_view_chunk
        mesh = f", mesh views in chunks of {chunk}" if 0 < chunk < self.plan.views else ""
        video = f", video frames {self.plan.video_chunk} at a time" if self.plan.video_chunk < VIDEO_CHUNK else ""
        speed = f"{self.speed.label}, " if self.speed is not None and self.speed.label else ""
        return f"{self.plan.views} views, {self.plan.resolution} px, {speed}{self.step.label}{mesh}{video}"


@dataclass(frozen=True)
class StageFit:
    stage: str
    prediction: Prediction  # with the learned correction applied
    need_bytes: int  # prediction total + margin
    fits: bool


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    candidate: Candidate
    budget_bytes: int
    fits: tuple[StageFit, ...]
    degradations: tuple[str, ...] = field(default_factory=tuple)
    times: PlanTime | None = None  # predicted seconds (None: the table has no time section)

    @property
    def peak_need(self) -> StageFit:
        return max(self.fits, key=lambda f: f.need_bytes)


class NoPlanFits(Exception):
    """Even the cheapest plan needs more than the budget; carries the minimum and what it is."""

    def __init__(self, budget_bytes: int, minimum_bytes: int, minimum_label: str, stage: str) -> None:
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes
        self.minimum_label = minimum_label
        self.stage = stage
        super().__init__(
            f"{gib(budget_bytes)} is below the minimum of any plan ({gib(minimum_bytes)}: {minimum_label}; "
            f"stage {stage}); use --vram {vram_flag(minimum_bytes)} or more, or free GPU memory")


class NoTimeModel(ValueError):
    """A time budget was asked for, but the budget table predicts no time for some stage (tables before v3)."""


class TimeBudgetTooShort(NoPlanFits):
    """Plans fit the memory, but even the fastest of them is predicted to need more than the time budget."""

    def __init__(self, budget_s: float, fastest: PlanTime, label: str, fixed: tuple[str, ...]) -> None:
        Exception.__init__(self, _too_slow(budget_s, fastest, label, fixed))
        self.budget_s = budget_s
        self.minimum_s = fastest.total_s
        self.minimum_label = label


def _too_slow(budget_s: float, fastest: PlanTime, label: str, fixed: tuple[str, ...]) -> str:
    longest = ", ".join(f"{s.stage} {s.wall_s:.0f} s" for s in fastest.longest())
    unfix = f", or leave {'/'.join(fixed)} on auto" if fixed else ""
    return (f"{budget_s:.0f} s is below the fastest plan that fits the memory ({fastest.total_s:.0f} s predicted: "
            f"{label}; longest {longest}); use --time-budget {seconds_flag(fastest.total_s)} or more{unfix}")


def base_plan(constraints: Constraints, **fields: Any) -> Plan:
    """The fixed part of every candidate: user constraints and run settings (device, profile, weights)."""
    interval = constraints.thg_interval
    thg = {"thg_schedule": "fixed", "thg_interval": interval or 3}
    steps = {"steps": constraints.steps} if constraints.steps else {}
    return Plan(**thg, **steps, **fields)


def speed_ladder(base: Plan, constraints: Constraints) -> list[SpeedStep]:
    """The (steps, THG interval) rungs to try, fastest last: only the default one without a time budget."""
    default = SpeedStep(base.steps, base.thg_interval)
    if constraints.time_budget_s is None:
        return [default]
    steps = [base.steps] + ([s for s in STEP_LADDER if s < base.steps] if constraints.steps is None else [])
    thg = base.thg_schedule == "fixed" and constraints.thg_interval is None
    intervals = [base.thg_interval] + ([i for i in THG_LADDER if i > base.thg_interval] if thg else [])
    out = []
    for st in steps:
        for iv in intervals:
            words = ([f"{st} steps"] if st != base.steps else []) + \
                    ([f"THG interval {iv}"] if iv != base.thg_interval else [])
            out.append(SpeedStep(st, iv, ", ".join(words)))
    return out


def candidates(base: Plan, constraints: Constraints) -> list[Candidate]:
    """Every plan worth considering, best first under the user's preference."""
    views = [constraints.views] if constraints.views else list(VIEW_CHOICES)
    resolutions = [constraints.resolution] if constraints.resolution else list(RESOLUTION_CHOICES)
    levels = [(v, r) for v in views for r in resolutions]
    out = [Candidate(base.replace(views=v, resolution=r, steps=sp.steps, thg_interval=sp.thg_interval, **step.knobs),
                     q, step, sp)
           for q, (v, r) in enumerate(levels) for sp in speed_ladder(base, constraints)
           for step in MEMORY_LADDER]  # fmt: skip
    if constraints.prefer == "speed":
        out.sort(key=lambda c: (c.step.offload, c.quality_rank))  # stable: ladder order kept inside
    return out


def evaluate(
    plan: Plan, pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int,
    factors: Mapping[str, float] | None = None,
) -> tuple[StageFit, ...]:  # fmt: skip
    """Predicted need of every GPU stage of `pipeline` under `plan`, against `budget_bytes`."""
    fits = []
    for spec in pipeline.stages:
        if not spec.gpu:
            continue
        pred = predict(spec.name, plan, n_refs, table).scaled((factors or {}).get(spec.name, 1.0))
        need = pred.total_bytes + table.margin(pred.allocator_bytes)
        fits.append(StageFit(spec.name, pred, need, need <= budget_bytes))
    return tuple(fits)


def mesh_view_chunks(views: int) -> list[int]:
    """mesh_view_chunk values from fastest to leanest: 0 (all views), then the divisors of `views`
    downwards (for 20 views: 10, 5, 4, 2, 1). Equal chunks only: nvdiffrast reallocates its buffers
    whenever the number of images per call changes, so a short last chunk would cost two
    reallocations per iteration."""
    return [0] + [k for k in range(views - 1, 0, -1) if views % k == 0]


VIDEO_CHUNK = Plan().video_chunk  # frames rasterised per batch by default (the measured setting)


def video_chunks(default: int = VIDEO_CHUNK) -> list[int]:
    """video_chunk values from fastest to leanest: the default, then halves down to one frame at a time.
    Memory only: the frames are the same however many are rasterised together."""
    out = [default]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _fits(stage: str, plan: Plan, n_refs: int, table: BudgetTable, budget_bytes: int,
          factors: Mapping[str, float] | None) -> bool:
    pred = predict(stage, plan, n_refs, table).scaled((factors or {}).get(stage, 1.0))
    return pred.total_bytes + table.margin(pred.allocator_bytes) <= budget_bytes


def with_stage_knobs(
    cand: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int,
    factors: Mapping[str, float] | None = None,
) -> Candidate:  # fmt: skip
    """`cand` with the cheapest mesh_view_chunk and video_chunk that let the mesh and video stages fit (the
    leanest where none does)."""
    plan = cand.plan
    if "mesh" in pipeline.names and pipeline["mesh"].gpu:
        for chunk in mesh_view_chunks(plan.views):
            plan = plan.replace(mesh_view_chunk=chunk)
            if _fits("mesh", plan, n_refs, table, budget_bytes, factors):
                break
    if "video" in pipeline.names and pipeline["video"].gpu:
        for frames in video_chunks(cand.plan.video_chunk):
            plan = plan.replace(video_chunk=frames)
            if _fits("video", plan, n_refs, table, budget_bytes, factors):
                break
    return Candidate(plan, cand.quality_rank, cand.step, cand.speed)


def predict_time(pipeline: Pipeline, table: BudgetTable, plan: Plan, n_refs: int) -> PlanTime | None:
    """Predicted seconds of every stage of `pipeline` under `plan`; None if the table has no time section or
    the plan runs tiny smoke-test models (which no table times)."""
    if table.time is None or not _timed(plan):
        return None
    return plan_time(pipeline.names, plan, n_refs, table.time, ahead=prestart.configured_ahead())


def _timed(plan: Plan) -> bool:
    return plan.profile != "tiny"


def choose_plan(
    pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int, base: Plan,
    constraints: Constraints, factors: Mapping[str, float] | None = None,
) -> PlanChoice:  # fmt: skip
    """The first candidate (in preference order) whose every stage fits the memory and, with a time
    budget, whose predicted total fits the time; NoPlanFits or TimeBudgetTooShort otherwise."""
    budget_s = constraints.time_budget_s
    if budget_s is not None and not _timed(base):
        raise NoTimeModel("no table times the tiny smoke-test models; drop --tiny or --time-budget")
    untimed = sorted(set(pipeline.names) - set(table.time.stages)) if table.time else ["any stage"]
    if budget_s is not None and untimed:
        raise NoTimeModel(f"budget table {table.name}@v{table.version} has no time model for {', '.join(untimed)}: "
                          "--time-budget needs a table with a time section (v3 or a new calibration)")  # fmt: skip
    cands = candidates(base, constraints)
    smallest: tuple[int, Candidate, str] | None = None
    fastest: dict[int, tuple[PlanTime, Candidate]] = {}  # per quality rank: the fastest memory-fitting plan
    for cand in cands:
        cand = with_stage_knobs(cand, pipeline, table, n_refs, budget_bytes, factors)
        fits = evaluate(cand.plan, pipeline, table, n_refs, budget_bytes, factors)
        worst = max(fits, key=lambda f: f.need_bytes)
        if not worst.fits:
            if smallest is None or worst.need_bytes < smallest[0]:
                smallest = (worst.need_bytes, cand, worst.stage)
            continue
        times = predict_time(pipeline, table, cand.plan, n_refs)
        if budget_s is not None and times is not None and times.total_s > budget_s:
            q = cand.quality_rank
            if q not in fastest or times.total_s < fastest[q][0].total_s:
                fastest[q] = (times, cand)
            continue
        return PlanChoice(cand.plan, cand, budget_bytes, fits,
                          _degradations(cands[0], cand, pipeline, table, n_refs, factors, fastest, budget_s), times)
    if fastest:
        times, cand = min(fastest.values(), key=lambda tc: tc[0].total_s)
        fixed = tuple(f"--{k.replace('_', '-')}" for k in ("views", "resolution", "steps", "thg_interval")
                      if getattr(constraints, k) is not None)  # fmt: skip
        raise TimeBudgetTooShort(budget_s or 0.0, times, cand.label, fixed)
    assert smallest is not None
    raise NoPlanFits(budget_bytes, smallest[0], smallest[1].label, smallest[2])


def _degradations(
    best: Candidate, chosen: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int,
    factors: Mapping[str, float] | None, too_slow: Mapping[int, tuple[PlanTime, Candidate]] | None = None,
    budget_s: float | None = None,
) -> tuple[str, ...]:  # fmt: skip
    """Why the chosen plan differs from the best one, in words a user can act on."""
    if chosen is best:
        return ()
    fits = evaluate(best.plan, pipeline, table, n_refs, 0, factors)
    worst = max(fits, key=lambda f: f.need_bytes)
    memory_why = f"the best plan ({best.label}) needs {gib(worst.need_bytes)} in stage {worst.stage}"
    # the best quality level at which some plan fitted the memory: above it memory decided, below it time
    too_slow = too_slow or {}
    level = min([chosen.quality_rank, *too_slow])
    fitted = too_slow[level][1] if level in too_slow else chosen
    out = _quality_steps(best.plan, fitted.plan, memory_why)
    if level in too_slow:
        time_why = (f"at {fitted.plan.views} views, {fitted.plan.resolution} px the fastest plan that fits the memory "
                    f"is predicted at {too_slow[level][0].total_s:.0f} s, over the time budget of {budget_s or 0:.0f} s")
        out += _quality_steps(fitted.plan, chosen.plan, time_why)
    for knob, name in (("thg_interval", "THG interval"), ("steps", "steps")):
        a, b = getattr(best.plan, knob), getattr(chosen.plan, knob)
        at = predict_time(pipeline, table, chosen.plan.replace(**{knob: a}), n_refs) if a != b else None
        if at is not None:
            out.append(f"{name} {a} -> {b}: with {name} {a} this plan is predicted at {at.total_s:.0f} s, "
                       f"over the time budget of {budget_s or 0:.0f} s")  # fmt: skip
    for knob in ("cfg_mode", "vae_mode", "offload"):
        a, b = getattr(best.plan, knob), getattr(chosen.plan, knob)
        if a != b:
            out.append(f"{knob} {a} -> {b} (memory only, slower)")
    if 0 < chosen.plan.mesh_view_chunk < chosen.plan.views:
        out.append(f"mesh views all -> chunks of {chosen.plan.mesh_view_chunk} (memory only, same result, slower)")
    if chosen.plan.video_chunk < best.plan.video_chunk:
        out.append(f"video frames {best.plan.video_chunk} -> {chosen.plan.video_chunk} at a time (memory only, same "
                   "frames, slower)")  # fmt: skip
    return tuple(out)


def same_quality(plan: Plan, base: Plan, constraints: Constraints) -> list[Candidate]:
    """The memory-only alternatives to `plan` (same views, resolution, steps and THG interval), in ladder order:
    fastest first. Switching between them changes no stage's key, so nothing already computed is invalidated."""
    same = (plan.views, plan.resolution, plan.steps, plan.thg_interval)
    rungs = [c for c in candidates(base, constraints)
             if (c.plan.views, c.plan.resolution, c.plan.steps, c.plan.thg_interval) == same]  # fmt: skip
    # the mesh fit's view chunks and the video's frame chunks are memory-only too: each rung also in every
    # chunking, the fastest first
    return [Candidate(c.plan.replace(mesh_view_chunk=k, video_chunk=f), c.quality_rank, c.step, c.speed)
            for c in rungs for k in mesh_view_chunks(plan.views) for f in video_chunks(base.video_chunk)]  # fmt: skip


def choice_of(
    cand: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int,
    factors: Mapping[str, float] | None = None, degradations: tuple[str, ...] = (),
) -> PlanChoice:  # fmt: skip
    """`cand` as a PlanChoice against `budget_bytes` (its fits say which stages fit that budget)."""
    return PlanChoice(cand.plan, cand, budget_bytes, evaluate(cand.plan, pipeline, table, n_refs, budget_bytes, factors),
                      degradations, predict_time(pipeline, table, cand.plan, n_refs))  # fmt: skip


def _quality_steps(a: Plan, b: Plan, why: str) -> list[str]:
    out = []
    if a.views != b.views:
        out.append(f"views {a.views} -> {b.views}: {why}")
    if a.resolution != b.resolution:
        out.append(f"resolution {a.resolution} -> {b.resolution} px: {why}")
    return out
