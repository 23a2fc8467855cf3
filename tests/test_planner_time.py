"""--time-budget: the planner raises the THG interval, then lowers steps, then views, to fit the time too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from rich.console import Console

from budgets.table import load_table
from orchestrator.console import plan_table
from orchestrator.job import JobError, RunOptions, plan_job
from orchestrator.planner import (
    Constraints,
    NoPlanFits,
    NoTimeModel,
    TimeBudgetTooShort,
    base_plan,
    choose_plan,
    predict_time,
)
from stages.spec import UP2YOU

GiB = 2**30


@pytest.fixture(scope="module")
def table():
    # the H100's table: the budgets below are set against its predicted seconds
    return load_table(Path(__file__).resolve().parent.parent / "budgets" / "tables" / "up2you-v3.json")


def _choose(table, gib: float, seconds: float | None, **fixed):
    c = Constraints(time_budget_s=seconds, **fixed)
    return choose_plan(UP2YOU, table, 4, int(gib * GiB), base_plan(c), c)


def _total(table, plan) -> float:
    return predict_time(UP2YOU, table, plan, 4).total_s


@pytest.mark.parametrize("gib", [80, 12, 8, 6])
def test_no_or_a_generous_time_budget_changes_nothing(table, gib) -> None:
    plain = _choose(table, gib, None)
    assert _choose(table, gib, 3600).plan == plain.plan
    assert (plain.plan.steps, plain.plan.thg_interval) == (50, 3)
    assert plain.times is not None and plain.times.total_s == pytest.approx(_total(table, plain.plan))


def test_the_thg_interval_goes_up_before_steps_come_down(table) -> None:
    full = _choose(table, 80, None).plan
    at4 = _total(table, full.replace(thg_interval=4))
    p = _choose(table, 80, at4 + 0.01).plan  # the interval-4 plan fits exactly
    assert (p.views, p.steps, p.thg_interval) == (20, 50, 4)
    assert at4 < _total(table, full)  # fewer unconditional evaluations really are faster


def test_steps_come_down_before_views(table) -> None:
    full = _choose(table, 80, None).plan
    budget = _total(table, full.replace(steps=40, thg_interval=3)) + 0.01
    choice = _choose(table, 80, budget)
    assert (choice.plan.views, choice.plan.resolution, choice.plan.steps) == (20, 768, 40)
    assert choice.times.total_s <= budget
    assert any(d.startswith("steps 50 -> 40") and "over the time budget" in d for d in choice.degradations)
    assert "40 steps" in choice.candidate.label


def test_pixels_then_views_go_only_when_no_step_count_is_fast_enough(table) -> None:
    full = _choose(table, 80, None).plan

    def fastest(**level) -> float:
        return min(_total(table, full.replace(steps=s, thg_interval=i, **level))
                   for s in (50, 40, 30, 20) for i in (3, 4, 6))  # fmt: skip

    at_512 = _choose(table, 80, fastest(resolution=768) - 1)
    assert (at_512.plan.views, at_512.plan.resolution) == (20, 512)
    fewer = _choose(table, 80, fastest(resolution=512) - 1)
    assert fewer.plan.views < 20 and fewer.times.total_s <= fastest(resolution=512) - 1
    d = " | ".join(fewer.degradations)
    assert "views 20 -> " in d and "fits the memory is predicted at" in d


def test_memory_and_time_reasons_are_told_apart(table) -> None:
    choice = _choose(table, 6, 100)  # 6 GiB allows 20 views at 512 px (rgb; mesh in chunks); 100 s allows only 6
    assert choice.plan.views == 6
    d = choice.degradations
    assert any(x.startswith("resolution 768 -> 512") and "GiB" in x for x in d)
    assert any(x.startswith("views 20 -> 6") and "time budget of 100 s" in x for x in d)


def test_nothing_fast_enough_names_the_fastest_plan(table) -> None:
    with pytest.raises(TimeBudgetTooShort) as info:
        _choose(table, 80, 30)
    e = info.value
    msg = str(e)
    assert "30 s is below the fastest plan that fits the memory" in msg and "\n" not in msg
    assert "6 views" in msg and "512 px" in msg and "20 steps" in msg and "longest mesh" in msg
    suggested = float(msg.split("--time-budget ")[1].split("s")[0])
    assert e.minimum_s <= suggested < e.minimum_s + 1
    assert _choose(table, 80, suggested).times.total_s <= suggested  # the suggestion really is enough
    assert isinstance(e, NoPlanFits)  # the runner's re-plan after an OOM stops on it the same way


def test_fixed_knobs_are_kept_and_named_in_the_refusal(table) -> None:
    p = _choose(table, 80, 3600, steps=30, thg_interval=2).plan
    assert (p.steps, p.thg_interval) == (30, 2)
    with pytest.raises(TimeBudgetTooShort, match="leave --views/--steps on auto"):
        _choose(table, 80, 60, views=20, steps=50)


def test_memory_still_comes_first(table) -> None:
    with pytest.raises(NoPlanFits) as info:
        _choose(table, 2, 3600)
    assert not isinstance(info.value, TimeBudgetTooShort) and "--vram" in str(info.value)


def test_a_table_without_time_refuses_a_time_budget_but_plans_without_one(table) -> None:
    old = dataclasses.replace(table, time=None)
    with pytest.raises(NoTimeModel, match="no time model"):
        _choose(old, 80, 90)
    assert _choose(old, 80, None).times is None


def test_plan_table_shows_seconds_per_stage_and_the_total(table) -> None:
    choice = _choose(table, 8, None)
    con = Console(record=True, width=200)
    con.print(plan_table(UP2YOU, choice, "plan"))
    text = con.export_text()
    assert "predicted time" in text
    for s in choice.times.stages:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"│ {s.stage} "))
        assert f"{s.wall_s:.0f} s" in line
    total = next(ln for ln in text.splitlines() if ln.startswith("│ total"))
    assert f"{choice.times.total_s:.0f} s" in total


def test_job_maps_a_short_time_budget_to_one_line_and_usage_exit(photos, gpu24) -> None:
    with pytest.raises(JobError) as info:
        plan_job(photos, RunOptions(vram="8GB", time_budget_s=20, plan_only=True), probe=gpu24)
    assert str(info.value).startswith("--time-budget 20s: 20 s is below the fastest plan")
    assert info.value.exit_code == 2
    jp = plan_job(photos, RunOptions(vram="8GB", time_budget_s=3600, plan_only=True), probe=gpu24)
    assert jp.choice.times.total_s < 3600
    with pytest.raises(JobError, match="tiny"):
        plan_job(photos, RunOptions(device="cpu", tiny=True, time_budget_s=90, plan_only=True))


def test_cli_time_budget_option(capsys, photos) -> None:
    from cli import main

    assert main([str(photos), "--plan", "--device", "cpu", "--vram", "8GB", "--time-budget", "soon"]) == 2
    assert "--time-budget" in capsys.readouterr().err
    assert main([str(photos), "--plan", "--json", "--device", "cpu", "--vram", "8GB", "--time-budget", "10m"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["predicted_seconds"]["total_s"] <= 600 and set(out["predicted_seconds"]["stages"]) == set(UP2YOU.names)
