"""The time model: the fit recovers known coefficients, the shipped table predicts the measured H100 runs,
and a run's wall follows the runner's pre-start."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from budgets.table import load_table, predict
from budgets.timing import StageTime, TimeModel, TimeTerm, n_uncond, plan_time
from budgets.timing_fit import TimeRow, fit_part, fit_time_model, rows_from_benchmark
from stages.plan import Plan
from stages.spec import UP2YOU

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TABLES = ROOT / "budgets" / "tables"

TERMS = (
    TimeTerm("start-up", "one", part="startup"),
    TimeTerm("fixed", "one"),
    TimeTerm("per view", "views_res2"),
    TimeTerm("cond", "cond_images"),
    TimeTerm("uncond", "uncond_images"),
    TimeTerm("model offload", "one", when={"offload": ("model",)}),
    TimeTerm("never exercised", "unet_calls", coef=7.0, when={"offload": ("sequential",)}),
)
TRUE = {"start-up": 20.0, "fixed": 5.0, "per view": 0.3, "cond": 0.013, "uncond": 0.006, "model offload": 1.5}


def _truth(plan: Plan, part: str) -> float:
    return sum(TRUE[t.name] * t.unit(plan, 4) for t in TERMS if t.part == part and t.name in TRUE)


def _rows(steps: tuple[int, ...]) -> list[TimeRow]:
    rows = []
    for v in (6, 12, 20):
        for r in (512, 768):
            for st in steps:
                for interval in (1, 3):
                    for off in ("none", "model"):
                        p = Plan(views=v, resolution=r, steps=st, thg_interval=interval, offload=off)
                        rows.append(TimeRow("rgb", p, 4, _truth(p, "run"), _truth(p, "startup"), source=f"{v}x{r}"))
    return rows


def test_fit_recovers_known_coefficients_from_short_and_long_runs() -> None:
    rows = _rows((2, 50))
    for part in ("startup", "run"):
        f = fit_part(TERMS, rows, part, "test")
        assert f.max_rel_error < 1e-9 and not f.excluded
        got = {t.name: t for t in f.terms}
        for name, coef in TRUE.items():
            if got[name].part == part:
                assert got[name].coef == pytest.approx(coef, rel=1e-6), name
                assert got[name].kind == "measured"
    never = next(t for t in fit_part(TERMS, rows, "run", "test").terms if t.name == "never exercised")
    assert (never.coef, never.kind) == (7.0, "derived")  # kept, and listed as not fitted


def test_one_step_count_cannot_separate_per_step_from_per_view_and_says_so() -> None:
    f = fit_part(TERMS, _rows((2,)), "run", "test")
    got = {t.name: t for t in f.terms}
    assert got["cond"].kind == "derived" and got["cond"].coef == 0.0
    assert any(n.startswith("cond: not separable") for n in f.not_fitted)
    assert any(n.startswith("never exercised: never exercised") for n in f.not_fitted)


def test_an_outlier_row_is_dropped_and_named() -> None:
    rows = _rows((2, 50))
    slow = TimeRow("rgb", rows[0].plan, 4, rows[0].run_s * 6 + 28.0, rows[0].startup_s, source="first run")
    f = fit_part(TERMS, [slow, *rows], "run", "test")
    assert len(f.excluded) == 1 and "first run" in f.excluded[0]
    assert {t.name: t.coef for t in f.terms}["cond"] == pytest.approx(TRUE["cond"], rel=1e-6)


def test_fit_never_returns_negative_seconds() -> None:
    rows = [TimeRow("s", Plan(views=v), 4, 10.0 - 0.1 * v, 1.0) for v in (6, 12, 20)]
    terms = (TimeTerm("a", "one"), TimeTerm("b", "views"))
    assert all(t.coef >= 0 for t in fit_part(terms, rows, "run", "t").terms)


def test_uncond_count_is_the_samplers() -> None:
    from up2you.diffusion.guidance import GuidanceSchedule

    for schedule in ("off", "fixed", "paper"):
        for steps, interval in ((50, 3), (40, 4), (20, 6), (2, 3)):
            p = Plan(steps=steps, thg_schedule=schedule, thg_interval=interval)
            assert n_uncond(p) == GuidanceSchedule.from_plan(schedule, steps, p.guidance, interval).nfe() - steps
    assert n_uncond(Plan(guidance=1.0)) == 0


def test_prestart_hides_start_up_behind_the_previous_stage() -> None:
    model = TimeModel({"a": StageTime((TimeTerm("s", "one", 5.0, "startup"), TimeTerm("r", "one", 2.0))),
                       "b": StageTime((TimeTerm("s", "one", 20.0, "startup"), TimeTerm("r", "one", 30.0))),
                       "c": StageTime((TimeTerm("s", "one", 10.0, "startup"), TimeTerm("r", "one", 1.0)))},
                      handoff_s=0.5, job_overhead_s=1.0)  # fmt: skip
    pt = plan_time(["a", "b", "c", "missing"], Plan(), 4, model)
    a, b, c = pt.stages
    assert (a.hidden_s, a.wall_s) == (0.0, 7.5)  # the first stage pays its whole start-up
    assert (b.hidden_s, b.wall_s) == (7.5, 20.0 - 7.5 + 30.0 + 0.5)  # hidden only as long as a ran
    assert (c.hidden_s, c.wall_s) == (10.0, 1.5)  # wholly hidden behind b
    assert pt.total_s == pytest.approx(7.5 + 43.0 + 1.5 + 1.0) and pt.missing == ("missing",)
    cold = plan_time(["a", "b", "c"], Plan(), 4, model, ahead=0)
    assert [s.wall_s for s in cold.stages] == [7.5, 50.5, 11.5]
    # all started at the job's start (the runner's default on a many-core host): c's 10 s hide behind a and b
    model_c = TimeModel({**model.stages, "c": StageTime((TimeTerm("s", "one", 60.0, "startup"),
                                                         TimeTerm("r", "one", 1.0)))}, handoff_s=0.5)  # fmt: skip
    one, many = (plan_time(["a", "b", "c"], Plan(), 4, model_c, ahead=k) for k in (1, 2))
    assert one.get("c").hidden_s == 43.0  # only b's wall
    assert many.get("c").hidden_s == 7.5 + 43.0 and many.get("c").wall_s == 60.0 - 50.5 + 1.5
    assert many.get("b").wall_s == one.get("b").wall_s  # b was started at the job's start either way


# ---------------------------------------------------------------------------------------------------
# the shipped table


@pytest.fixture(scope="module")
def table():
    return load_table(TABLES / "up2you-v3.json")  # the H100's (what an H100 job plans with)


@functools.cache
def _fit_script():
    spec = importlib.util.spec_from_file_location("fit_time_table", ROOT / "benchmarks" / "fit_time_table.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    return script


def test_shipped_v3_keeps_v2_memory_and_is_a_fresh_fit_of_the_committed_data(table) -> None:
    v2, v3 = (json.loads((TABLES / f"up2you-v{v}.json").read_text()) for v in (2, 3))
    assert table.version == 3 and table.time is not None
    assert v3["stages"] == v2["stages"] and v3["context_bytes"] == v2["context_bytes"] and v3["margin"] == v2["margin"]
    v2t = load_table(TABLES / "up2you-v2.json")
    for plan in (Plan(), Plan(views=6, resolution=512, cfg_mode="sequential", offload="model")):
        for stage in UP2YOU.names:
            assert predict(stage, plan, 4, table) == predict(stage, plan, 4, v2t)
    script = _fit_script()
    # the least-squares fit repeats to the last bits only with the same BLAS: compare to 1e-9, not bit for bit
    assert _same_numbers(script.build(), v3), "budgets/tables/up2you-v3.json is stale: run benchmarks/fit_time_table.py"
    prov = table.time.provenance
    for key in ("gpu", "torch", "date", "files", "method", "derived", "fit_max_rel_error", "worst_fit_error"):
        assert prov[key], key
    assert all((ROOT / f).is_file() for f in prov["files"])
    assert any("apose" in e for e in prov["excluded_rows"])  # the one-time nvdiffrast build


def _same_numbers(a: object, b: object) -> bool:
    """Equal structures, with floats equal to a relative 1e-9."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_numbers(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _benchmark_runs():
    for path in sorted(RESULTS.glob("h100_benchmark_*.json")):
        for name, run in json.loads(path.read_text())["runs"].items():
            yield f"{path.name}: {name}", name, run


def test_prediction_is_within_15_percent_of_the_measured_h100_stage_times(table) -> None:
    """A check of the fit against the very runs it was fitted on (the 50-step benchmark runs), not a
    prediction of new data. Identical stage plans ran 1-6 times and a sub-second stage varies by up to
    +-35 % between identical runs, so each prediction is held against the median of its repeats; runs the
    fit excluded (the one-time nvdiffrast build) and retried stages (started afresh, not pre-started) are
    left out."""
    excluded = table.time.provenance["excluded_rows"]
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for source, name, run in _benchmark_runs():
        pt = plan_time(UP2YOU.names, Plan.from_dict(run["plan"]), 4, table.time, ahead=int(name != "noprestart"))  # one ahead, as then
        for stage, s in run["stages"].items():
            if s["outcome"] != "ok" or s["attempt"] > 1 or any(f"{stage} @ {source}:" in e for e in excluded):
                continue
            pred = pt.get(stage)
            groups[(stage, "run", round(pred.run_s, 3))].append(s["run_s"])
            groups[(stage, "wall", round(pred.wall_s, 3))].append(s["wall_s"])
    assert len({k[0] for k in groups}) == len(UP2YOU.names)
    for (stage, what, pred), measured in groups.items():
        med = statistics.median(measured)
        assert abs(pred - med) <= 0.15 * med, f"{stage} {what}: predicted {pred:.2f} s, measured median {med:.2f} s"


def test_predicted_total_is_within_15_percent_of_clean_whole_runs(table) -> None:
    """Whole runs with every stage measured, no re-plan and no nvdiffrast build (again: fitted data)."""
    excluded = table.time.provenance["excluded_rows"]
    checked = 0
    for source, name, run in _benchmark_runs():
        if not run["ok"] or run["replans"] or any(f"@ {source}:" in e for e in excluded):
            continue
        pt = plan_time(UP2YOU.names, Plan.from_dict(run["plan"]), 4, table.time, ahead=int(name != "noprestart"))  # one ahead, as then
        assert abs(pt.total_s - run["wall_s"]) <= 0.15 * run["wall_s"], (source, pt.total_s, run["wall_s"])
        checked += 1
    assert checked >= 3


def test_fit_from_benchmarks_alone_keeps_what_they_cannot_tell_apart() -> None:
    rows, overheads = rows_from_benchmark(RESULTS / "h100_benchmark_12GB_6GB_2026-11-22.json")
    model = fit_time_model(None, UP2YOU.names, rows, {"gpu": "test"}, overheads)
    assert model.job_overhead_s >= 0 and "median over 2 whole runs" in model.provenance["job_overhead"]
    # one mesh_iters value in these runs: the per-iteration term cannot be told from the constant
    assert any(n.startswith("mesh run: per remeshing iteration") for n in model.provenance["not_fitted"])


def test_the_h100_fit_predicts_the_h200_full_file_runs_once_every_stage_is_pre_started(table) -> None:
    """New data for the H100 fit: the H200 runs on full-size checkpoint files, where the runner started all
    stages at once (16 cores: 15 ahead). Modelled so, rgb's 17 s of start-up hide behind the four stages
    before it, as measured; modelled one ahead (as on the H100), the total is 21-22 % over."""
    h200 = RESULTS / "h200"
    runs = [(h200 / "h200_full_files_uncapped_6GB_2026-12-01.json", "uncapped"),
            (h200 / "h200_full_files_uncapped_6GB_2026-12-01.json", "6GB"),
            (h200 / "h200_full_files_uncapped_2026-12-02.json", "uncapped")]  # fmt: skip
    for path, name in runs:
        run = json.loads(path.read_text())["runs"][name]
        plan = Plan.from_dict(run["plan"])
        many, one = (plan_time(UP2YOU.names, plan, 4, table.time, ahead=k) for k in (15, 1))
        assert abs(many.total_s - run["wall_s"]) <= 0.15 * run["wall_s"], (path.name, name, many.total_s)
        assert one.total_s - run["wall_s"] > 0.15 * run["wall_s"]  # the old model of pre-start misses
        rgb = run["stages"]["rgb"]["wall_s"]
        assert abs(many.get("rgb").wall_s - rgb) <= 0.15 * rgb, (path.name, name, many.get("rgb").wall_s, rgb)


def test_shipped_v4_is_the_h200s_times_over_v3s_memory_and_a_fresh_fit() -> None:
    v3, v4 = (json.loads((TABLES / f"up2you-v{v}.json").read_text()) for v in (3, 4))
    assert v4["stages"] == v3["stages"] and v4["context_bytes"] == v3["context_bytes"] and v4["margin"] == v3["margin"]
    assert v4["provenance"]["gpu"] == "NVIDIA H200" and "H100" in v4["provenance"]["memory"]
    script = _fit_script()
    assert _same_numbers(script.build(script.H200), v4), "up2you-v4.json is stale: run benchmarks/fit_time_table.py"
    assert load_table(gpu_name="NVIDIA H100 80GB HBM3").version == 3
    prov = load_table(TABLES / "up2you-v4.json").time.provenance
    assert all((ROOT / f).is_file() for f in prov["files"])
    assert any("h200_full_files_5runs" in f for f in prov["files"])
    # the real-weight terms take part in the fit here (full-file runs among the rows); on the H100 they cannot
    for version, kind in ((4, "measured"), (3, "derived")):
        terms = {t.name: t for t in load_table(TABLES / f"up2you-v{version}.json").time.stages["rgb"].terms}
        assert terms["BiRefNet alphas per view (real weights)"].kind == kind, version


def test_shipped_v5_is_the_h200s_own_memory_and_times_and_a_fresh_fit() -> None:
    from orchestrator.calibrate import load_measurements

    script = _fit_script()
    v5 = json.loads((TABLES / "up2you-v5.json").read_text())
    assert _same_numbers(script.build(script.H200_V5), v5), "up2you-v5.json is stale: run benchmarks/fit_time_table.py"
    table = load_table(TABLES / "up2you-v5.json")
    assert table.provenance["gpu"] == "NVIDIA H200" and "measured on the H200" in table.provenance["memory"]
    measured = [t for m in table.stages.values() for t in m.terms if t.kind == "measured"]
    # the grid never peaks in BiRefNet (its photos have alphas) nor in a sliced decode: those terms keep the
    # H100's measured coefficients, and say so
    kept = [t.name for t in measured if "NVIDIA H200" not in t.source]
    assert all("H100" in t.source for t in measured if t.name in kept) and len(kept) <= len(measured) // 10, kept
    # every full-length peak the H200 measured, in the grid and in the whole runs, is covered
    full = [m for m in load_measurements(script.H200_V5.memory) if m.full_length]
    full += script.whole_run_peaks(script.H200_V5.benchmarks, script.LENGTH_DEPENDENT)
    assert {m.stage for m in full} >= {"mesh", "video"} and len(full) > 10
    for m in full:
        predicted = predict(m.stage, Plan.from_dict(m.plan), m.n_refs, table).total_bytes
        assert predicted >= m.nvml_peak * 0.999, (m.stage, m.point, predicted, m.nvml_peak)
        if m.stage in ("mesh", "video"):  # ... and not by much: it is a fit, not a ceiling
            assert predicted <= 1.25 * m.nvml_peak, (m.stage, m.point, predicted, m.nvml_peak)


def _startup_s(table, stage: str) -> float:
    """The table's start-up seconds of `stage` (its start-up terms are constants at the runs' 4 photos)."""
    return sum(t.coef for t in table.time.stages[stage].terms if t.part == "startup")


def _covers_every_length_dependent_peak(script, fit, table, count: int) -> None:
    """The memory side covers every mesh/video NVML peak of the fit's whole runs (`count` of them)."""
    runs = script.whole_run_peaks(fit.benchmarks, script.LENGTH_DEPENDENT)
    assert len(runs) == count
    for m in runs:
        assert predict(m.stage, Plan.from_dict(m.plan), m.n_refs, table).total_bytes >= m.nvml_peak * 0.999, m.point


def test_shipped_v7_takes_start_ups_from_the_runs_on_one_clock_and_is_the_h200s_table() -> None:
    script = _fit_script()
    v7 = json.loads((TABLES / "up2you-v7.json").read_text())
    assert _same_numbers(script.build(script.H200_V7), v7), "up2you-v7.json is stale: run benchmarks/fit_time_table.py"
    table = load_table(TABLES / "up2you-v7.json")
    files = table.time.provenance["files"]
    assert [f for f in files if "5runs" in f] == [
        "benchmarks/results/h200/h200_full_files_5runs_handover_prompts_2026-12-03.json",
        "benchmarks/results/h200/h200_full_files_5runs_handover_v7interim_2026-12-03.json"]
    # every start-up is the second invocation's spawn -> `ready`: segment's, for one, near its 2.3 s there and far
    # from the 4 s of the grid (no bytecode) or the ~2.8 s that psutil's clock gave in the first invocation
    segment = _startup_s(table, "segment")
    assert 2.0 < segment < 2.6, segment
    _covers_every_length_dependent_peak(script, script.H200_V7, table, 50)  # of all five invocations


def test_shipped_v8_takes_start_ups_from_the_torch_free_segment_runs_and_is_the_h200s_table() -> None:
    script = _fit_script()
    v8 = json.loads((TABLES / "up2you-v8.json").read_text())
    assert _same_numbers(script.build(script.H200_V8), v8), "up2you-v8.json is stale: run benchmarks/fit_time_table.py"
    assert load_table(gpu_name="NVIDIA H200").version == 8
    assert load_table(gpu_name="NVIDIA H100 80GB HBM3").version == 3
    table = load_table(TABLES / "up2you-v8.json")
    assert [f for f in table.time.provenance["files"] if "5runs" in f] == [
        f"benchmarks/results/h200/h200_full_files_5runs_{n}_2026-12-03.json"
        for n in ("handover_prompts", "handover_v7interim", "lean_compiler", "segment_numpy")]
    # start-ups from the a38ea68 runs: segment without torch (0.1-0.2 s of import there) and rgb without the
    # compiler, against v7's 2.0-2.6 s segment (torch imported)
    startup = {name: _startup_s(table, name) for name in ("segment", "rgb")}
    assert startup["segment"] < 0.6 and startup["rgb"] < 6.5, startup
    _covers_every_length_dependent_peak(script, script.H200_V8, table, 70)  # of all seven invocations


def test_shipped_v6_keeps_v5s_memory_fit_times_the_runs_with_exports() -> None:
    script = _fit_script()
    v6 = json.loads((TABLES / "up2you-v6.json").read_text())
    assert _same_numbers(script.build(script.H200_V6), v6), "up2you-v6.json is stale: run benchmarks/fit_time_table.py"
    files = load_table(TABLES / "up2you-v6.json").time.provenance["files"]
    assert [f for f in files if "5runs" in f] == ["benchmarks/results/h200/h200_full_files_5runs_exports_2026-12-03.json"]
    # the runs with the old in-stage writes still count for memory: every mesh/video peak of all three is covered
    table = load_table(TABLES / "up2you-v6.json")
    _covers_every_length_dependent_peak(script, script.H200_V6, table, 30)


def test_h200_whole_runs_are_predicted_by_a_fit_that_never_saw_them() -> None:
    """Leave-one-out over the five committed H200 runs: a prediction of data the fit did not see.

    v4 (calibration parts 1-2): whole runs within -8.6 ... +2.1 %, 33 of the 40 stage walls within +-15 %
    (features took 1.9-4.4 s for the same plan). v5 (the whole grid, two five-run invocations; a run is left
    out with its namesake in the other invocation): the same, except that without the 8GB runs no row has
    model offload at more than 2 steps, where the per-step read of the pinned reference states and their
    one-time pinning have proportional columns (2 x views x px): that split is not identified, and 8GB's rgb
    comes out far too long. With the 8GB runs in the fit (the shipped table) it is. v6 (the grid and the five
    runs with exports): whole runs -6.5 ... +11.4 %, 23 of the 32 stage walls outside 8GB within +-15 %
    (26 of 40 with it), 8GB unidentified as in v5. v7 (two invocations on two leases, start-ups from the second):
    whole runs -8.3 ... +13.8 % outside 8GB, 45 of the 64 stage walls outside 8GB within +-15 % (53 of 80). v8 (four
    invocations on four leases, start-ups from the last): whole runs -12.7 ... +5.7 % outside 8GB, 81 of 128 stage
    walls (the segment and features walls of the three invocations whose segment still imported torch miss most)."""
    script = _fit_script()
    for fit, runs, within_min, unidentified, bound, long_bound in (
            (script.H200, 5, 33, (), 10, 20), (script.H200_V5, 10, 52, ("8GB",), 10, 20),
            (script.H200_V6, 5, 23, ("8GB",), 12, 20), (script.H200_V7, 10, 45, ("8GB",), 14, 25),
            (script.H200_V8, 20, 81, ("8GB",), 13, 20)):  # fmt: skip
        result = script.leave_one_out(fit)
        assert len(result["runs"]) == runs
        for name, run in result["runs"].items():
            if name.split(": ")[-1] in unidentified:
                continue
            assert abs(run["error_pct"]) <= bound, (fit.version, name, run["error_pct"])
            for stage in ("rgb", "normal", "mesh"):  # the long stages
                assert abs(run["stages"][stage]["wall_error_pct"]) <= long_bound, (fit.version, name, stage)
        kept = [r for n, r in result["runs"].items() if n.split(": ")[-1] not in unidentified]
        within = sum(abs(s["wall_error_pct"]) <= 15 for r in kept for s in r["stages"].values())
        assert within >= within_min, (fit.version, within)


def test_the_hand_off_comes_from_stages_whose_start_up_was_all_hidden() -> None:
    from budgets.timing_fit import handoff_seconds

    plan = Plan()
    waited = [TimeRow("a", plan, 4, 1.0, 5.0, 1.4, 0.0, "x", True), TimeRow("b", plan, 4, 2.0, 6.0, 2.3, 0.0, "y", True)]
    first = TimeRow("c", plan, 4, 1.0, 5.0, 6.2, 0.0, "z", False)  # its start-up was on the clock: not a hand-off
    value, n, how = handoff_seconds([*waited, first])
    assert (round(value, 6), n) == (0.35, 2) and "waited for go" in how
    # rows that do not say (older results): wall - run - the start-up left over after the previous stage
    old = [TimeRow("a", plan, 4, 1.0, 5.0, 1.4, 5.0), TimeRow("c", plan, 4, 1.0, 5.0, 6.2, 0.0)]
    value, n, how = handoff_seconds(old)
    assert (round(value, 6), n) == (0.3, 2) and "unhidden" in how
