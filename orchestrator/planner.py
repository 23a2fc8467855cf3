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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from budgets.table import BudgetTable, Prediction, predict
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


@dataclass(frozen=True)
class Constraints:
    """What the user fixed on the command line; None = the planner chooses."""

    views: int | None = None
    resolution: int | None = None
    steps: int | None = None
    thg_interval: int | None = None  # None = auto: fixed schedule, interval 3
    prefer: str = "quality"

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise ValueError(f"--prefer {self.prefer!r}: expected one of {PREFERENCES}")
        if self.views is not None and self.views not in VIEW_CHOICES:
            raise ValueError(f"--views {self.views}: expected auto or one of {VIEW_CHOICES}")
        if self.resolution is not None and (self.resolution % 64 or not 128 <= self.resolution <= 1024):
            # the CLI offers RESOLUTION_CHOICES; smaller multiples of 64 serve the CPU smoke profile
            raise ValueError(f"--resolution {self.resolution}: expected auto or one of {RESOLUTION_CHOICES}")


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    quality_rank: int  # 0 = best
    step: MemoryStep

    @property
    def label(self) -> str:
        chunk = self.plan.mesh_view_chunk
        mesh = f", mesh views in chunks of {chunk}" if 0 < chunk < self.plan.views else ""
        return f"{self.plan.views} views, {self.plan.resolution} px, {self.step.label}{mesh}"


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


def base_plan(constraints: Constraints, **fields: Any) -> Plan:
    """The fixed part of every candidate: user constraints and run settings (device, profile, weights)."""
    interval = constraints.thg_interval
    thg = {"thg_schedule": "fixed", "thg_interval": interval or 3}
    steps = {"steps": constraints.steps} if constraints.steps else {}
    return Plan(**thg, **steps, **fields)


def candidates(base: Plan, constraints: Constraints) -> list[Candidate]:
    """Every plan worth considering, best first under the user's preference."""
    views = [constraints.views] if constraints.views else list(VIEW_CHOICES)
    resolutions = [constraints.resolution] if constraints.resolution else list(RESOLUTION_CHOICES)
    levels = [(v, r) for v in views for r in resolutions]
    out = [Candidate(base.replace(views=v, resolution=r, **step.knobs), q, step)
           for q, (v, r) in enumerate(levels) for step in MEMORY_LADDER]  # fmt: skip
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


def with_stage_knobs(
    cand: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int,
    factors: Mapping[str, float] | None = None,
) -> Candidate:  # fmt: skip
    """`cand` with the cheapest mesh_view_chunk that lets the mesh stage fit (the leanest if none does)."""
    if "mesh" not in pipeline.names or not pipeline["mesh"].gpu:
        return cand
    plan = cand.plan
    for chunk in mesh_view_chunks(plan.views):
        plan = cand.plan.replace(mesh_view_chunk=chunk)
        pred = predict("mesh", plan, n_refs, table).scaled((factors or {}).get("mesh", 1.0))
        if pred.total_bytes + table.margin(pred.allocator_bytes) <= budget_bytes:
            break
    return Candidate(plan, cand.quality_rank, cand.step)


def choose_plan(
    pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int, base: Plan,
    constraints: Constraints, factors: Mapping[str, float] | None = None,
) -> PlanChoice:  # fmt: skip
    """The first candidate (in preference order) whose every stage fits; NoPlanFits otherwise."""
    cands = candidates(base, constraints)
    smallest: tuple[int, Candidate, str] | None = None
    for cand in cands:
        cand = with_stage_knobs(cand, pipeline, table, n_refs, budget_bytes, factors)
        fits = evaluate(cand.plan, pipeline, table, n_refs, budget_bytes, factors)
        worst = max(fits, key=lambda f: f.need_bytes)
        if worst.fits:
            return PlanChoice(cand.plan, cand, budget_bytes, fits, _degradations(cands[0], cand, pipeline,
                                                                                  table, n_refs, factors))
        if smallest is None or worst.need_bytes < smallest[0]:
            smallest = (worst.need_bytes, cand, worst.stage)
    assert smallest is not None
    raise NoPlanFits(budget_bytes, smallest[0], smallest[1].label, smallest[2])


def _degradations(
    best: Candidate, chosen: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int,
    factors: Mapping[str, float] | None,
) -> tuple[str, ...]:  # fmt: skip
    """Why the chosen plan differs from the best one, in words a user can act on."""
    if chosen is best:
        return ()
    fits = evaluate(best.plan, pipeline, table, n_refs, 0, factors)
    worst = max(fits, key=lambda f: f.need_bytes)
    why = f"the best plan ({best.label}) needs {gib(worst.need_bytes)} in stage {worst.stage}"
    out = []
    if chosen.plan.views != best.plan.views:
        out.append(f"views {best.plan.views} -> {chosen.plan.views}: {why}")
    if chosen.plan.resolution != best.plan.resolution:
        out.append(f"resolution {best.plan.resolution} -> {chosen.plan.resolution} px: {why}")
    for knob in ("cfg_mode", "vae_mode", "offload"):
        a, b = getattr(best.plan, knob), getattr(chosen.plan, knob)
        if a != b:
            out.append(f"{knob} {a} -> {b} (memory only, slower)")
    if 0 < chosen.plan.mesh_view_chunk < chosen.plan.views:
        out.append(f"mesh views all -> chunks of {chosen.plan.mesh_view_chunk} (memory only, same result, slower)")
    return tuple(out)


def same_quality(plan: Plan, base: Plan, constraints: Constraints) -> list[Candidate]:
    """The memory-only alternatives to `plan` (same views and resolution), in ladder order: fastest first.
    Switching between them changes no stage's key, so nothing already computed is invalidated."""
    return [c for c in candidates(base, constraints) if (c.plan.views, c.plan.resolution) == (plan.views, plan.resolution)]


def choice_of(
    cand: Candidate, pipeline: Pipeline, table: BudgetTable, n_refs: int, budget_bytes: int,
    factors: Mapping[str, float] | None = None, degradations: tuple[str, ...] = (),
) -> PlanChoice:  # fmt: skip
    """`cand` as a PlanChoice against `budget_bytes` (its fits say which stages fit that budget)."""
    return PlanChoice(cand.plan, cand, budget_bytes, evaluate(cand.plan, pipeline, table, n_refs, budget_bytes, factors),
                      degradations)  # fmt: skip
