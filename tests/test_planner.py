"""Plan choice across budgets with the real UP2You table: quality first, memory knobs before quality."""

import pytest

from budgets.table import load_table
from orchestrator.planner import MEMORY_LADDER, Constraints, NoPlanFits, base_plan, candidates, choose_plan
from stages.spec import UP2YOU

GiB = 2**30


@pytest.fixture(scope="module")
def table():
    return load_table()


def _choose(table, gib: float, prefer: str = "quality", factors=None, **fixed):
    c = Constraints(prefer=prefer, **fixed)
    return choose_plan(UP2YOU, table, 6, int(gib * GiB), base_plan(c), c, factors)


@pytest.mark.parametrize(("budget", "views", "res", "cfg", "offload"), [
    (24, 20, 768, "batched", "none"),
    (16, 20, 768, "batched", "none"),
    (12, 20, 768, "sequential", "none"),
    (8, 20, 768, "sequential", "model"),  # the H100-calibrated table: model offload suffices at 8 GiB
    (6, 12, 768, "sequential", "model"),  # 20 views: the mesh stage alone needs 7 GiB (measured)
    (4, 6, 768, "sequential", "model"),
])  # fmt: skip
def test_quality_plan_per_budget(table, budget, views, res, cfg, offload) -> None:
    choice = _choose(table, budget)
    p = choice.plan
    assert (p.views, p.resolution, p.cfg_mode, p.offload) == (views, res, cfg, offload)
    assert all(f.need_bytes <= budget * GiB for f in choice.fits)


def test_quality_uses_every_memory_knob_before_losing_views(table) -> None:
    # at 8 GiB, 20 views at 768 only fit with offload: quality takes it
    assert _choose(table, 8).plan.views == 20


def test_speed_prefers_fewer_pixels_to_offload(table) -> None:
    p = _choose(table, 8, prefer="speed").plan
    assert p.offload == "none"
    assert (p.views, p.resolution) == (20, 512)


def test_thg_auto_is_fixed_interval_3_and_user_values_stick(table) -> None:
    p = _choose(table, 24).plan
    assert (p.thg_schedule, p.thg_interval) == ("fixed", 3)
    p = _choose(table, 24, thg_interval=5, steps=30, views=12).plan
    assert (p.thg_interval, p.steps, p.views) == (5, 30, 12)


def test_fixed_views_never_change(table) -> None:
    p = _choose(table, 4, views=6).plan
    assert p.views == 6


def test_below_minimum_names_the_minimum_plan(table) -> None:
    with pytest.raises(NoPlanFits) as info:
        _choose(table, 2)
    e = info.value
    assert 2 * GiB < e.minimum_bytes < 4 * GiB
    assert "below the minimum of any plan" in str(e)
    assert "6 views" in str(e) and "512 px" in str(e) and "offload" in str(e)
    suggested = float(str(e).split("--vram ")[1].split("GB")[0])
    assert e.minimum_bytes / GiB <= suggested <= e.minimum_bytes / GiB + 0.2
    # the minimum really is enough
    assert _choose(table, e.minimum_bytes / GiB).plan


def test_learned_correction_degrades_the_plan(table) -> None:
    assert _choose(table, 16, factors={"rgb": 1.5}).plan.cfg_mode == "sequential"


def test_degradations_explain_the_choice(table) -> None:
    d = " | ".join(_choose(table, 6).degradations)
    assert "views 20 -> 12" in d and "needs" in d
    assert _choose(table, 80).degradations == ()


def test_candidates_are_in_quality_then_ladder_order() -> None:
    c = Constraints()
    labels = [(x.plan.views, x.plan.resolution, x.step.label) for x in candidates(base_plan(c), c)]
    assert labels[0] == (20, 768, MEMORY_LADDER[0].label)
    assert labels[len(MEMORY_LADDER)] == (20, 512, MEMORY_LADDER[0].label)
    assert labels[-1] == (6, 512, "offload sequential")


def test_bad_constraints_are_rejected() -> None:
    with pytest.raises(ValueError):
        Constraints(views=7)
    with pytest.raises(ValueError):
        Constraints(prefer="cheap")
