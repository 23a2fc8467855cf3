"""Predicted seconds per stage and per run, from the `time` section of a budget table.

A stage's time is modelled as two parts, each a sum of `coef x feature(plan, n_refs)` terms:

    start-up  import + prepare (weights into host memory): what pre-start can hide behind the previous stage
    run       from `go` to the manifest, as a function of the plan's knobs: for rgb/normal the UNet per
              image on the conditional branch every step and on the unconditional branch on THG's
              refresh steps, plus decode and per-view work; mesh per iteration x views; video per frame

A run's wall time follows the runner: stage i+1's process starts when stage i gets `go`, so only the
part of its start-up longer than stage i's wall is paid; each stage adds a fixed hand-off (process
exit, manifest, sampling), and the job a fixed overhead (planning, report). Coefficients are fitted to
measured stage times (budgets.timing_fit); each term says whether it was measured or derived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from budgets.units import KINDS, render_px, res2
from stages.plan import Plan
from up2you.diffusion.refresh import uncond_evaluations

PARTS = ("startup", "run")


def n_uncond(plan: Plan) -> int:
    """Denoising steps that also run the unconditional branch (THG refresh steps; every step for plain CFG)."""
    return uncond_evaluations(plan.thg_schedule, plan.steps, plan.thg_interval, plan.guidance)


def unet_calls(plan: Plan, n_refs: int) -> float:
    """UNet forward calls of a diffusion stage: one per step, one more per refresh step with sequential CFG,
    and the reference pass's chunks (what sequential offload streams the UNet blocks for)."""
    extra = n_uncond(plan) if plan.cfg_mode == "sequential" else 0
    return float(plan.steps + extra + -(-n_refs // max(1, plan.ref_chunk)))


TimeFeature = Callable[[Plan, int], float]

TIME_FEATURES: dict[str, TimeFeature] = {
    "one": lambda p, r: 1.0,
    "views": lambda p, r: float(p.views),
    "n_refs": lambda p, r: float(r),
    "views_res2": lambda p, r: p.views * res2(p),
    "cond_images": lambda p, r: p.steps * p.views * res2(p),
    "uncond_images": lambda p, r: n_uncond(p) * p.views * res2(p),
    "unet_calls": unet_calls,
    "mesh_iters": lambda p, r: float(p.mesh_iters),
    "mesh_iter_views_px": lambda p, r: p.mesh_iters * p.views * render_px(p.mesh_resolution),
    "video_frames_px": lambda p, r: p.video_frames * render_px(p.video_resolution),
}  # fmt: skip
"""Features of a plan that time coefficients (seconds per unit) multiply; `n_refs` is the number of photos."""


@dataclass(frozen=True)
class TimeTerm:
    """One additive piece of a stage's time: `coef` seconds per unit of `feature`, in `part`."""

    name: str
    feature: str
    coef: float = 0.0
    part: str = "run"
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    kind: str = "derived"
    source: str = ""

    def applies(self, plan: Plan) -> bool:
        return all(getattr(plan, knob) in values for knob, values in self.when.items())

    def unit(self, plan: Plan, n_refs: int) -> float:
        """The feature's value where the term applies, else 0: the term's column in a fit."""
        return TIME_FEATURES[self.feature](plan, n_refs) if self.applies(plan) else 0.0

    def seconds(self, plan: Plan, n_refs: int) -> float:
        return self.coef * self.unit(plan, n_refs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimeTerm:
        if d["feature"] not in TIME_FEATURES:
            raise ValueError(f"time term {d['name']!r}: unknown feature {d['feature']!r} "
                             f"(known: {sorted(TIME_FEATURES)})")  # fmt: skip
        if d.get("part", "run") not in PARTS or d.get("kind", "derived") not in KINDS:
            raise ValueError(f"time term {d['name']!r}: part must be one of {PARTS}, kind one of {KINDS}")
        return cls(name=d["name"], feature=d["feature"], coef=float(d["coef"]), part=d.get("part", "run"),
                   when={k: tuple(v) for k, v in d.get("when", {}).items()}, kind=d.get("kind", "derived"),
                   source=d.get("source", ""))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "feature": self.feature, "coef": self.coef, "part": self.part,
                             "kind": self.kind, "source": self.source}  # fmt: skip
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when.items()}
        return d


@dataclass(frozen=True)
class StageTime:
    terms: tuple[TimeTerm, ...]
    notes: str = ""


@dataclass(frozen=True)
class TimeModel:
    """The `time` section of a table: per-stage terms, the per-stage hand-off and the per-job overhead."""

    stages: Mapping[str, StageTime]
    handoff_s: float = 0.0
    job_overhead_s: float = 0.0
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": dict(self.provenance), "handoff_s": self.handoff_s,
                "job_overhead_s": self.job_overhead_s,
                "stages": {s: {"notes": m.notes, "terms": [t.to_dict() for t in m.terms]}
                           for s, m in self.stages.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimeModel:
        stages = {name: StageTime(tuple(TimeTerm.from_dict(t) for t in s["terms"]), s.get("notes", ""))
                  for name, s in d["stages"].items()}  # fmt: skip
        return cls(stages, float(d.get("handoff_s", 0.0)), float(d.get("job_overhead_s", 0.0)),
                   d.get("provenance", {}))  # fmt: skip


@dataclass(frozen=True)
class StageSeconds:
    """Predicted time of one stage: its start-up, its run, how much start-up pre-start hides, its wall."""

    stage: str
    startup_s: float
    run_s: float
    hidden_s: float
    wall_s: float  # what the runner measures: unhidden start-up + run + hand-off


@dataclass(frozen=True)
class PlanTime:
    """Predicted time of a whole run, stage by stage; `missing` lists stages the table has no time for."""

    stages: tuple[StageSeconds, ...]
    job_overhead_s: float
    missing: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        return sum(s.wall_s for s in self.stages) + self.job_overhead_s

    def get(self, stage: str) -> StageSeconds | None:
        return next((s for s in self.stages if s.stage == stage), None)

    def longest(self, n: int = 2) -> tuple[StageSeconds, ...]:
        return tuple(sorted(self.stages, key=lambda s: -s.wall_s)[:n])

    def to_dict(self) -> dict[str, Any]:
        return {"total_s": round(self.total_s, 2), "job_overhead_s": round(self.job_overhead_s, 2),
                "missing": list(self.missing),
                "stages": {s.stage: {"startup_s": round(s.startup_s, 2), "run_s": round(s.run_s, 2),
                                     "hidden_s": round(s.hidden_s, 2), "wall_s": round(s.wall_s, 2)}
                           for s in self.stages}}  # fmt: skip


def stage_parts(stage: str, plan: Plan, n_refs: int, model: TimeModel) -> tuple[float, float]:
    """(start-up, run) seconds of `stage` under `plan`; KeyError if the model has no such stage."""
    terms = model.stages[stage].terms
    startup = sum(t.seconds(plan, n_refs) for t in terms if t.part == "startup")
    run = sum(t.seconds(plan, n_refs) for t in terms if t.part == "run")
    return max(0.0, startup), max(0.0, run)


def plan_time(stages: Iterable[str], plan: Plan, n_refs: int, model: TimeModel, ahead: int = 1) -> PlanTime:
    """Predicted wall of every stage run in order from a fresh job folder, with the runner's pre-start of
    `ahead` stages (0: none): stage j's process starts when stage j - ahead starts (the first `ahead` at the
    job's start), so it pays only max(0, start-up - the time from then to its turn). Host memory can hold
    fewer ahead than asked; that limit is not modelled."""
    out: list[StageSeconds] = []
    missing: list[str] = []
    starts: list[float] = []  # when each timed stage of this run of timed stages began, from its first
    now = 0.0
    for name in stages:
        if name not in model.stages:  # an untimed stage: the timeline starts afresh after it
            missing.append(name)
            starts, now = [], 0.0
            continue
        startup, run = stage_parts(name, plan, n_refs, model)
        spawned = starts[max(0, len(starts) - ahead)] if (ahead > 0 and starts) else now
        hidden = min(startup, now - spawned)
        wall = startup - hidden + run + model.handoff_s
        out.append(StageSeconds(name, startup, run, hidden, wall))
        starts.append(now)
        now += wall
    return PlanTime(tuple(out), model.job_overhead_s, tuple(missing))


def seconds_flag(seconds: float) -> str:
    """The `--time-budget` value a user would type for at least `seconds` (whole seconds, rounded up)."""
    return f"{int(-(-seconds // 1))}s"
