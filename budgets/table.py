"""The budget table: a per-stage memory model in terms of the Plan's knobs, loaded from versioned JSON.

A stage's allocator peak is modelled as

    peak = sum(resident terms) + max over phases(sum of that phase's terms)

because a stage runs its phases one after another (text encoder, reference pass, denoising loop,
VAE decode...) while its weights stay put. Each term is `coef x feature(plan, n_refs)`, applies only
`when` some knobs have some values (e.g. offload == "none"), and records whether its coefficient was
measured or derived and from where. The CUDA context is not a term: it is per process, and the table
stores it once (`context_bytes`). Calibration writes a new table file; nothing else does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgets.timing import TimeModel
from budgets.units import KINDS, render_px, res2
from stages.plan import Plan

TABLES_DIR = Path(__file__).parent / "tables"
FORMAT = 1
RESIDENT = "resident"



def _unet_batch(plan: Plan) -> int:
    """Images per denoising UNet call: cond and uncond together (batched CFG) or one at a time."""
    return 2 * plan.views if plan.cfg_mode == "batched" else plan.views


def _mesh_chunk(plan: Plan) -> int:
    """Views the mesh fit renders together: mesh_view_chunk of them, or all (0 or more than there are)."""
    return min(plan.mesh_view_chunk, plan.views) if plan.mesh_view_chunk > 0 else plan.views


Feature = Callable[[Plan, int], float]

FEATURES: dict[str, Feature] = {
    "one": lambda p, r: 1.0,
    "views": lambda p, r: float(p.views),
    "n_refs": lambda p, r: float(r),
    "res2": lambda p, r: res2(p),
    "views_res2": lambda p, r: p.views * res2(p),
    "refs_res2": lambda p, r: r * res2(p),
    "batch_res2": lambda p, r: _unet_batch(p) * res2(p),
    "ref_chunk_res2": lambda p, r: min(r, p.ref_chunk) * res2(p),
    "view_chunk_res2": lambda p, r: min(p.views, p.ref_chunk) * res2(p),
    "mesh_views_px": lambda p, r: p.views * render_px(p.mesh_resolution),
    "mesh_chunk_px": lambda p, r: _mesh_chunk(p) * render_px(p.mesh_resolution),
    "video_chunk_px": lambda p, r: min(p.video_chunk, p.video_frames) * render_px(p.video_resolution),
}  # fmt: skip
"""Simple features of a plan that coefficients multiply. `n_refs` is the number of input photos."""

_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Term:
    """One additive piece of a stage's memory: `coef` bytes per unit of `feature`."""

    name: str
    feature: str
    coef: float
    phases: tuple[str, ...] = (RESIDENT,)
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    dtype_scaled: bool = False  # bytes scale with the plan's dtype (the coefficient is for fp16)
    kind: str = "derived"
    source: str = ""

    def applies(self, plan: Plan) -> bool:
        return all(getattr(plan, knob) in values for knob, values in self.when.items())

    def bytes(self, plan: Plan, n_refs: int) -> float:
        if not self.applies(plan):
            return 0.0
        scale = _DTYPE_BYTES[plan.dtype] / 2 if self.dtype_scaled else 1.0
        return self.coef * FEATURES[self.feature](plan, n_refs) * scale

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Term:
        if d["feature"] not in FEATURES:
            raise ValueError(f"term {d['name']!r}: unknown feature {d['feature']!r} (known: {sorted(FEATURES)})")
        if d.get("kind", "derived") not in KINDS:
            raise ValueError(f"term {d['name']!r}: kind must be one of {KINDS}")
        return cls(
            name=d["name"], feature=d["feature"], coef=float(d["coef"]),
            phases=tuple(d.get("phases", (RESIDENT,))),
            when={k: tuple(v) for k, v in d.get("when", {}).items()},
            dtype_scaled=bool(d.get("dtype_scaled", False)), kind=d.get("kind", "derived"),
            source=d.get("source", ""),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "feature": self.feature, "coef": self.coef,
                             "phases": list(self.phases), "kind": self.kind, "source": self.source}
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when.items()}
        if self.dtype_scaled:
            d["dtype_scaled"] = True
        return d


@dataclass(frozen=True)
class StageModel:
    terms: tuple[Term, ...]
    notes: str = ""


@dataclass(frozen=True)
class BudgetTable:
    """A whole table: per-stage models plus the per-process and safety constants they share."""

    name: str
    version: int
    pipeline: str
    provenance: Mapping[str, Any]
    context_bytes: int  # CUDA context per process: NVML sees it, torch does not
    margin_bytes: int  # fixed safety margin per stage
    margin_fraction: float  # plus this fraction of the predicted allocator peak
    stages: Mapping[str, StageModel]
    path: str = ""
    time: TimeModel | None = None  # predicted seconds per stage (budgets.timing); None in tables before v3

    def margin(self, allocator_bytes: float) -> int:
        return int(self.margin_bytes + self.margin_fraction * allocator_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "name": self.name, "version": self.version, "pipeline": self.pipeline,
            "provenance": dict(self.provenance), "context_bytes": self.context_bytes,
            "margin": {"bytes": self.margin_bytes, "fraction": self.margin_fraction},
            "stages": {s: {"notes": m.notes, "terms": [t.to_dict() for t in m.terms]}
                       for s, m in self.stages.items()},
        } | ({"time": self.time.to_dict()} if self.time is not None else {})  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    """Predicted peak of one stage: what the allocator will hold, and the NVML-visible total."""

    stage: str
    allocator_bytes: int
    context_bytes: int
    breakdown: Mapping[str, int]  # term name -> bytes, resident terms and the peak phase's terms
    peak_phase: str

    @property
    def total_bytes(self) -> int:
        """What NVML will show for the stage's process at its peak: allocator + CUDA context."""
        return self.allocator_bytes + self.context_bytes

    def scaled(self, factor: float) -> Prediction:
        """The same prediction with the allocator part raised by a learned correction factor."""
        if factor == 1.0:
            return self
        return Prediction(self.stage, int(self.allocator_bytes * factor), self.context_bytes,
                          {**self.breakdown, "learned correction": int(self.allocator_bytes * (factor - 1))},
                          self.peak_phase)  # fmt: skip


def table_from_dict(d: Mapping[str, Any], path: str = "") -> BudgetTable:
    if d.get("format") != FORMAT:
        raise ValueError(f"budget table {path or d.get('name')}: format {d.get('format')!r}, expected {FORMAT}")
    stages = {
        name: StageModel(tuple(Term.from_dict(t) for t in s["terms"]), s.get("notes", ""))
        for name, s in d["stages"].items()
    }
    return BudgetTable(
        name=d["name"], version=int(d["version"]), pipeline=d["pipeline"], provenance=d.get("provenance", {}),
        context_bytes=int(d["context_bytes"]), margin_bytes=int(d["margin"]["bytes"]),
        margin_fraction=float(d["margin"]["fraction"]), stages=stages, path=path,
        time=TimeModel.from_dict(d["time"]) if "time" in d else None,
    )  # fmt: skip


def table_gpu(table: BudgetTable) -> str:
    """The GPU a table was measured on, as NVML names it ('' when the provenance does not say)."""
    gpu = str(table.provenance.get("gpu", ""))
    return gpu.split(" (")[0].strip()  # v1: "NVIDIA H100 80GB HBM3 (measured rows); other coefficients ..."


def measured_on(table: BudgetTable, gpu_name: str | None) -> bool:
    """Whether `table` was measured on a GPU of this name (NVML's, compared without case)."""
    return bool(gpu_name) and table_gpu(table).casefold() == str(gpu_name).strip().casefold()


def load_table(path: Path | str | None = None, pipeline: str = "up2you", gpu_name: str | None = None) -> BudgetTable:
    """Load a table file; or, from budgets/tables/, the newest version for `pipeline` measured on a GPU named
    `gpu_name` (memory context, workspaces and every time term depend on the GPU), else the newest of all."""
    if path is None:
        candidates = []
        for p in sorted(TABLES_DIR.glob("*.json")):
            d = json.loads(p.read_text())
            if d.get("pipeline") == pipeline:
                candidates.append(table_from_dict(d, str(p)))
        if not candidates:
            raise FileNotFoundError(f"no budget table for pipeline {pipeline!r} in {TABLES_DIR}")
        same_gpu = [t for t in candidates if measured_on(t, gpu_name)]
        return max(same_gpu or candidates, key=lambda t: t.version)
    return table_from_dict(json.loads(Path(path).read_text()), str(path))


def save_table(table: BudgetTable, path: Path | str) -> None:
    Path(path).write_text(json.dumps(table.to_dict(), indent=1) + "\n")


def predict(stage: str, plan: Plan, n_refs: int, table: BudgetTable) -> Prediction:
    """Predicted peak of `stage` under `plan` with `n_refs` input photos."""
    try:
        model = table.stages[stage]
    except KeyError:
        raise KeyError(f"budget table {table.name!r} has no model for stage {stage!r}") from None
    resident: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    for t in model.terms:
        b = t.bytes(plan, n_refs)
        if b <= 0:
            continue
        for ph in t.phases:
            bucket = resident if ph == RESIDENT else phases.setdefault(ph, {})
            bucket[t.name] = bucket.get(t.name, 0.0) + b
    peak_phase, peak_terms = max(phases.items(), key=lambda kv: sum(kv[1].values()), default=("", {}))
    breakdown = {k: int(v) for k, v in {**resident, **peak_terms}.items()}
    return Prediction(stage, int(sum(resident.values()) + sum(peak_terms.values())), table.context_bytes,
                      breakdown, peak_phase)  # fmt: skip
