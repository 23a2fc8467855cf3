"""Fit a table's `time` section to measured stage times: what calibration and the shipped table use.

Each stage part (start-up, run) is linear in its coefficients, so they follow from measured times over a
spread of plans by non-negative least squares on the *relative* error (a 0.6-s stage counts as much as
a 60-s one). Short calibration runs (2 steps, 20 mesh iterations, 16 frames) pin the fixed terms; whole
runs (50 steps, 700 iterations, 64 frames) pin the per-step, per-iteration and per-frame terms.

Honesty rules: a term whose column is zero over the rows (never exercised) or adds nothing the earlier
columns do not already explain (e.g. per-step at one step count only) is not fitted: it keeps its
template coefficient and kind and is listed as such. A row the first fit misses by more than
OUTLIER_REL (the one-time nvdiffrast build inside the first `apose` of a machine: 30 s against 4 s) is
dropped, refitted once and listed.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from budgets.timing import StageTime, TimeModel, TimeTerm
from stages.plan import Plan

OUTLIER_REL = 0.5
BENCHMARK_PHOTOS = 4  # benchmarks/run_benchmark.py writes orchestrator.calibrate.write_photos' default 4 photos


def _t(name: str, feature: str, part: str = "run", **when: tuple[Any, ...]) -> TimeTerm:
    return TimeTerm(name, feature, 0.0, part, when, "derived", "template: not yet fitted")


_STARTUP = _t("imports and prepare (weights into host memory)", "one", "startup")
# Real weights (profile `real`, as the benchmark's full-files runs) against full-random (calibration): the files
# are read in `prepare`, and the diffusion stages run BiRefNet for the alphas, which full-random has no model
# for. These come last in their stage's terms: never exercised by full-random rows (the H100 fit keeps them at
# 0, as before), fitted where real-file runs are among the rows (the H200 fit).
_READ_FILES = _t("reading the weight files (real weights)", "one", "startup", profile=("real",))
_DIFFUSION = (
    _STARTUP,
    _t("fixed: prompt and reference encode, reference pass, pose adapter", "one"),
    _t("per photo: reference encode and pass", "n_refs"),
    _t("per view: VAE decode, top-K selection, alpha, PNGs", "views_res2"),
    _t("tiled VAE decode, extra per view", "views_res2", vae_mode=("tiled",)),
    _t("model offload: module moves", "one", offload=("model",)),
    _t("sequential offload: UNet blocks streamed, per call", "unet_calls", offload=("sequential",)),
    _t("UNet conditional branch, per image and step", "cond_images"),
    _t("UNet unconditional branch, per image and refresh step", "uncond_images"),
    _t("offload: reference states from pinned host memory, per conditional image and step", "cond_images",
       offload=("model", "sequential")),
    # pinning the selected reference states (2.08 GB at 20 views x 768) is paid once, in the reference pass:
    # 4.63 s there against 1.22 s with them on the GPU (H200, 8GB run of 6d7356a)
    _t("offload: reference states copied into pinned host memory, once per view", "views_res2",
       offload=("model", "sequential")),
    _READ_FILES,
    _t("BiRefNet alphas per view (real weights)", "views", profile=("real",)),
)  # fmt: skip
UP2YOU_TIME_TERMS: Mapping[str, tuple[TimeTerm, ...]] = {
    "segment": (_STARTUP, _t("fixed", "one"), _t("BiRefNet per photo", "n_refs")),
    "features": (_STARTUP, _t("fixed", "one"), _t("DINOv2 per photo", "n_refs"), _READ_FILES),
    "apose": (_STARTUP, _t("fixed: SMPL-X forward", "one"), _t("rasterisation per view", "views_res2")),
    "weights": (_STARTUP, _t("fixed", "one"), _t("aggregator per view", "views"), _READ_FILES),
    "rgb": _DIFFUSION,
    "normal": _DIFFUSION,
    "mesh": (_STARTUP, _t("fixed: SMPL-X fit, hands, Poisson, colours", "one"),
             _t("per remeshing iteration", "mesh_iters"),
             _t("per iteration and view: rasterise and loss", "mesh_iter_views_px")),
    "video": (_STARTUP, _t("fixed: encoders, contact sheet", "one"), _t("contact sheet per view", "views"),
              _t("per frame (RGB and normals)", "video_frames_px")),
}  # fmt: skip
"""The UP2You time structure, used where a template table has no `time` section yet."""


def template_terms(stage: str, template: TimeModel | None) -> tuple[TimeTerm, ...]:
    """The template's terms for `stage`, else UP2You's structure, else a constant start-up and run."""
    if template is not None and stage in template.stages:
        return template.stages[stage].terms
    return UP2YOU_TIME_TERMS.get(stage, (_STARTUP, _t("fixed", "one")))


@dataclass(frozen=True)
class TimeRow:
    """One measured stage run: its plan, the photos, and the times the runner and the manifest recorded."""

    stage: str
    plan: Plan
    n_refs: int
    run_s: float | None  # manifest: go -> outputs written
    startup_s: float | None  # manifest: import + prepare
    wall_s: float | None = None  # runner: start -> exit
    # how long pre-start had to hide the start-up: the previous stage's wall (0: first stage, a retry or
    # pre-start off; None: not known)
    available_s: float | None = None
    source: str = ""
    waited_for_go: bool | None = None  # the process was ready before `go` (start-up all hidden); None: not recorded

    def target(self, part: str) -> float | None:
        return self.startup_s if part == "startup" else self.run_s


@dataclass(frozen=True)
class PartFit:
    """The fitted terms of one part of one stage, and what the fit could not do."""

    terms: tuple[TimeTerm, ...]
    max_rel_error: float | None  # over the rows used
    n_rows: int
    excluded: tuple[str, ...] = ()  # rows dropped as outliers, with why
    not_fitted: tuple[str, ...] = ()  # terms kept from the template, with why


def fit_part(terms: Sequence[TimeTerm], rows: Sequence[TimeRow], part: str, source: str) -> PartFit:
    """Fit the coefficients of `terms` (those of `part`; others pass through) to the rows' measured times."""
    mine = [j for j, t in enumerate(terms) if t.part == part]
    usable = [r for r in rows if (r.target(part) or 0.0) > 0.0]
    solved = _solve(terms, mine, usable, part)
    if solved is None:
        return PartFit(tuple(terms), None, 0, (), tuple(f"{terms[j].name}: no measured rows" for j in mine))
    coef, pred, fitted = solved
    y = np.array([r.target(part) for r in usable])
    rel = np.abs(pred - y) / y
    bad = {i for i, e in enumerate(rel) if e > OUTLIER_REL}
    excluded: tuple[str, ...] = ()
    if bad and len(bad) < len(usable):
        excluded = tuple(f"{usable[i].stage} @ {usable[i].source}: measured {y[i]:.1f} s, fit {pred[i]:.1f} s"
                         for i in sorted(bad))  # fmt: skip
        usable = [r for i, r in enumerate(usable) if i not in bad]
        coef, pred, fitted = _solve(terms, mine, usable, part)  # type: ignore[misc]
        y = np.array([r.target(part) for r in usable])
        rel = np.abs(pred - y) / y
    worst = float(max(rel)) if len(rel) else None
    src = f"{source}: NNLS on relative error over {len(usable)} measured rows"
    out, kept = list(terms), []
    for j in mine:
        if j in fitted:
            out[j] = dataclasses.replace(terms[j], coef=float(coef[j]), kind="measured", source=src)
        else:
            why = "never exercised by these rows" if not any(terms[j].unit(r.plan, r.n_refs) for r in usable) \
                else "not separable from the terms before it over these rows"
            kept.append(f"{terms[j].name}: {why}; kept {terms[j].coef:.4g} ({terms[j].kind})")
    return PartFit(tuple(out), worst, len(usable), excluded, tuple(kept))


def _solve(terms: Sequence[TimeTerm], mine: Sequence[int], rows: Sequence[TimeRow], part: str
           ) -> tuple[dict[int, float], np.ndarray, set[int]] | None:  # fmt: skip
    """NNLS weighted by 1/measured over the separable columns (each column that raises the rank, in term
    order); the rest contribute their template coefficient. Returns (coefficients, predictions, fitted)."""
    if not rows:
        return None
    y = np.array([r.target(part) for r in rows], dtype=np.float64)
    x = np.array([[terms[j].unit(r.plan, r.n_refs) for j in mine] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    w = 1.0 / y
    chosen: list[int] = []  # positions in `mine`
    for k in range(len(mine)):
        col = x[:, k] * w
        if not np.any(col):
            continue
        trial = np.stack([x[:, c] * w for c in chosen + [k]], axis=1)
        trial = trial / np.linalg.norm(trial, axis=0)
        if np.linalg.matrix_rank(trial, tol=1e-6) == len(chosen) + 1:
            chosen.append(k)
    kept = [k for k in range(len(mine)) if k not in chosen]
    offset = x[:, kept] @ np.array([terms[mine[k]].coef for k in kept]) if kept else np.zeros(len(rows))
    coef = {mine[k]: terms[mine[k]].coef for k in kept}
    if chosen:
        a = x[:, chosen] * w[:, None]
        sol, _ = nnls(a, (y - offset) * w)
        coef.update({mine[k]: float(c) for k, c in zip(chosen, sol, strict=True)})
    pred = x @ np.array([coef[j] for j in mine]) if mine else np.zeros(len(rows))
    return coef, pred, {mine[k] for k in chosen}


def handoff_seconds(rows: Iterable[TimeRow]) -> tuple[float, int, str]:
    """What a stage's wall holds beyond run + the start-up pre-start could not hide, as budgets.timing
    predicts it: the CUDA set-up after `go`, the exit and the runner's polling.

    Where rows say that their process was waiting for `go` (its start-up all hidden), the median of their
    wall - run is exactly that. Otherwise, the median over the rows that record all four of wall - run - the
    start-up not hidden behind the previous stage (small, of either sign: start-up is timed from the
    process's fork, the wall from the runner's `start`; and wrong where more than one stage was pre-started)."""
    rows = list(rows)
    hidden = [r.wall_s - r.run_s for r in rows if r.waited_for_go and None not in (r.wall_s, r.run_s)]  # type: ignore[operator]
    if hidden:
        return float(statistics.median(hidden)), len(hidden), "wall - run, of stage runs whose process waited for go"
    gaps = [r.wall_s - r.run_s - max(0.0, r.startup_s - r.available_s) for r in rows  # type: ignore[operator]
            if None not in (r.wall_s, r.run_s, r.startup_s, r.available_s)]  # fmt: skip
    how = "wall - run - unhidden start-up"
    return (float(statistics.median(gaps)), len(gaps), how) if gaps else (0.0, 0, how)


def fit_time_model(
    template: TimeModel | None, stages: Iterable[str], rows: Sequence[TimeRow], provenance: Mapping[str, Any],
    job_overheads: Sequence[float] = (),
) -> TimeModel:  # fmt: skip
    """A `time` section for `stages` fitted to `rows`; `job_overheads` are measured (run wall - sum of stage walls)."""
    src = f"calibrated ({provenance.get('gpu', '?')})"
    models: dict[str, StageTime] = {}
    errors: dict[str, dict[str, float | None]] = {}
    excluded: list[str] = []
    not_fitted: list[str] = []
    for stage in stages:
        terms = template_terms(stage, template)
        mine = [r for r in rows if r.stage == stage]
        errors[stage] = {}
        for part in ("startup", "run"):
            f = fit_part(terms, mine, part, src)
            terms = f.terms
            errors[stage][part] = round(f.max_rel_error, 4) if f.max_rel_error is not None else None
            excluded += [f"{part}: {e}" for e in f.excluded]
            not_fitted += [f"{stage} {part}: {k}" for k in f.not_fitted]
        notes = template.stages[stage].notes if template is not None and stage in template.stages else ""
        models[stage] = StageTime(terms, notes)
    handoff, n_handoff, how = handoff_seconds(rows)
    if n_handoff == 0 and template is not None:
        handoff = template.handoff_s
    overhead = max(0.0, statistics.median(job_overheads)) if job_overheads else (
        template.job_overhead_s if template is not None else 0.0)  # fmt: skip
    prov = {
        **provenance,
        "fit_max_rel_error": errors,
        "worst_fit_error": max((e for s in errors.values() for e in s.values() if e is not None), default=None),
        "excluded_rows": excluded, "not_fitted": not_fitted,
        "handoff": f"median over {n_handoff} stage runs of {how}" if n_handoff
                   else "kept from the template (no row records the hidden start-up)",
        "job_overhead": f"median over {len(job_overheads)} whole runs of wall - sum of stage walls"
                        if job_overheads else "kept from the template (no whole-run measurement)",
    }  # fmt: skip
    return TimeModel(models, round(handoff, 4), round(overhead, 4), prov)


# ---------------------------------------------------------------------------------------------------
# the committed measurement files


def rows_from_calibration(path: Path | str) -> list[TimeRow]:
    """Rows of a calibration's measurements.json (orchestrator.calibrate.Measurement records, in run order)."""
    return calibration_rows(json.loads(Path(path).read_text())["measurements"], Path(path).name)


def calibration_rows(measurements: Sequence[Mapping[str, Any]], name: str) -> list[TimeRow]:
    """Rows of calibration measurements in run order: within a grid point the first stage that ran was
    started afresh, each later one pre-started behind the one before."""
    out = []
    previous: tuple[str, float] | None = None  # (point, wall of the stage that ran before)
    for m in measurements:
        available = previous[1] if previous is not None and previous[0] == m["point"] else 0.0
        previous = (m["point"], float(m.get("wall_s") or 0.0))
        t = m.get("timings") or {}
        if m["outcome"] != "ok" or "run_s" not in t:
            continue
        out.append(TimeRow(m["stage"], Plan.from_dict(m["plan"]), int(m["n_refs"]), t["run_s"],
                           t.get("import_s", 0.0) + t.get("prepare_s", 0.0), m.get("wall_s"), available,
                           f"{name}: {m['point']}", _waited(t)))  # fmt: skip
    return out


WAITED_S = 0.05  # a pre-started process that waited longer than this for `go` had its start-up all hidden


def _waited(timings: Mapping[str, Any] | None) -> bool | None:
    """Whether a manifest's timings show the process waiting for `go` (None: the timings do not say)."""
    if not timings or "wait_s" not in timings:
        return None
    return float(timings["wait_s"]) > WAITED_S


def _runner_startups(windows: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Start-up (spawn -> `ready`) per stage on the runner's one clock, from a run's windows that record the spawn
    ([stage, go, wall, ready, spawned]); the manifests' import_s rests on psutil's create_time, which can be ~1 s
    off (the H200 of 2026-12-03). First attempts only."""
    out: dict[str, float] = {}
    for w in windows:
        if len(w) >= 5 and w[3] is not None and w[4] is not None and w[0] not in out:
            out[w[0]] = max(0.0, float(w[3]) - float(w[4]))
    return out


def rows_from_benchmark(path: Path | str, skip_runs: Sequence[str] = ()) -> tuple[list[TimeRow], list[float]]:
    """Rows of a benchmarks/run_benchmark.py result, and each clean run's job overhead.

    A stage's plan is the run's final plan; a diffusion stage that ran under an earlier plan (before a
    re-plan) is left out. Stages are listed in run order, so pre-start had the previous one's wall to
    hide a start-up in, except in the first stage, a retry (attempt > 1: started afresh) and the run
    `noprestart` (UP2YOU_PRESTART=0). The job overhead counts only runs that finished with no re-plan.
    Runs named in `skip_runs` are left out (a leave-one-out check).
    """
    name = Path(path).name
    rows: list[TimeRow] = []
    overheads: list[float] = []
    for run_name, r in json.loads(Path(path).read_text())["runs"].items():
        if run_name in skip_runs:
            continue
        plan = Plan.from_dict(r["plan"])
        runner_startup = _runner_startups(r.get("windows") or [])
        walls: list[float] = []
        previous_wall: float | None = None
        for stage, s in r["stages"].items():
            available = previous_wall if (previous_wall is not None and run_name != "noprestart"
                                          and s.get("attempt", 1) == 1) else 0.0  # fmt: skip
            previous_wall = s["wall_s"]
            if s["outcome"] != "ok" or s.get("run_s") is None:
                continue
            walls.append(s["wall_s"])
            if s.get("nfe") is not None and s["plan"] != r["plan_label"]:
                continue
            startup = runner_startup.get(stage, (s.get("import_s") or 0.0) + (s.get("prepare_s") or 0.0))
            rows.append(TimeRow(stage, plan, BENCHMARK_PHOTOS, s["run_s"], startup, s["wall_s"],
                                available, f"{name}: {run_name}", _waited(s.get("timings"))))  # fmt: skip
        if r.get("ok") and not r.get("replans") and walls:
            overheads.append(r["wall_s"] - sum(walls))
    return rows, overheads
