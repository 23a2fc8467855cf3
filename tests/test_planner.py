"""Plan choice across budgets with the real UP2You table: quality first, memory knobs before quality."""

import pytest

from budgets.table import TABLES_DIR, load_table, predict
from orchestrator.planner import (
    MEMORY_LADDER,
    Constraints,
    NoPlanFits,
    base_plan,
    candidates,
    choose_plan,
    evaluate,
    mesh_view_chunks,
    video_chunks,
)
from stages.spec import UP2YOU

GiB = 2**30


@pytest.fixture(scope="module")
def table():
    """v4 (the H100's memory terms): the numbers these tests work out were read off it; the planner's logic,
    not a table's coefficients, is what they test."""
    return load_table(TABLES_DIR / "up2you-v4.json")


def _choose(table, gib: float, prefer: str = "quality", factors=None, **fixed):
    c = Constraints(prefer=prefer, **fixed)
    return choose_plan(UP2YOU, table, 6, int(gib * GiB), base_plan(c), c, factors)


@pytest.mark.parametrize(("budget", "views", "res", "cfg", "offload"), [
    (24, 20, 768, "batched", "none"),
    (16, 20, 768, "batched", "none"),
    (12, 20, 768, "sequential", "none"),
    (8, 20, 768, "sequential", "model"),  # the H100-calibrated table: model offload suffices at 8 GiB
    (6, 20, 512, "sequential", "none"),  # 20 views: mesh views in chunks (all at once needs 7 GiB, measured)
    (4, 12, 512, "sequential", "model"),
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
    assert "512 px" in str(e) and "offload" in str(e)
    # not mesh, nor video: with the mesh views and the video frames in chunks, the normal diffusion sets the floor
    assert e.stage == "normal" and "video frames 1 at a time" in str(e)
    suggested = float(str(e).split("--vram ")[1].split("GB")[0])
    assert e.minimum_bytes / GiB <= suggested <= e.minimum_bytes / GiB + 0.2
    # the minimum really is enough
    assert _choose(table, e.minimum_bytes / GiB).plan


def test_learned_correction_degrades_the_plan(table) -> None:
    assert _choose(table, 16, factors={"rgb": 1.5}).plan.cfg_mode == "sequential"


def test_degradations_explain_the_choice(table) -> None:
    d = " | ".join(_choose(table, 6).degradations)
    assert "resolution 768 -> 512 px" in d and "needs" in d and "mesh views all -> chunks of" in d
    assert "views 20 -> 12" in " | ".join(_choose(table, 4).degradations)
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


def test_6gb_keeps_20_views_by_rendering_the_mesh_views_in_chunks(table) -> None:
    choice = _choose(table, 6)
    p = choice.plan
    assert p.views == 20 and 0 < p.mesh_view_chunk < 20
    mesh = next(f for f in choice.fits if f.stage == "mesh")
    assert mesh.fits and mesh.need_bytes <= 6 * GiB
    # all 20 views in one batch would not fit: the chunk is what keeps the views
    unchunked = evaluate(p.replace(mesh_view_chunk=0), UP2YOU, table, 6, 6 * GiB)
    assert not next(f for f in unchunked if f.stage == "mesh").fits
    # and it is the fewest chunks that fit: one chunk size up (fewer chunks) does not
    sizes = mesh_view_chunks(20)
    bigger = sizes[sizes.index(p.mesh_view_chunk) - 1]
    assert not next(f for f in evaluate(p.replace(mesh_view_chunk=bigger), UP2YOU, table, 6, 6 * GiB)
                    if f.stage == "mesh").fits
    assert f"mesh views in chunks of {p.mesh_view_chunk}" in choice.candidate.label


@pytest.mark.parametrize("budget", [80, 12])  # at 8 GiB all 20 views measured 7.54 GiB on the H200: chunks
def test_mesh_views_stay_in_one_batch_when_they_fit(table, budget: int) -> None:
    p = _choose(table, budget).plan
    assert p.mesh_view_chunk == 0 and p.views == 20
    assert "chunks" not in " | ".join(_choose(table, budget).degradations)


def test_a_learned_mesh_correction_shrinks_the_chunk_not_the_plan(table) -> None:
    base = _choose(table, 12).plan
    p = _choose(table, 12, factors={"mesh": 1.7}).plan
    assert 0 < p.mesh_view_chunk < 20
    assert p.replace(mesh_view_chunk=0) == base  # views, pixels and the diffusion knobs are untouched
    pred = predict("mesh", p, 6, table).scaled(1.7)
    assert pred.total_bytes + table.margin(pred.allocator_bytes) <= 12 * GiB


def test_mesh_view_chunks_go_from_all_views_to_one() -> None:
    assert mesh_view_chunks(20) == [0, 10, 5, 4, 2, 1]  # equal chunks only
    assert mesh_view_chunks(12) == [0, 6, 4, 3, 2, 1]
    assert mesh_view_chunks(6) == [0, 3, 2, 1]
    assert mesh_view_chunks(1) == [0]


def test_mesh_view_chunk_is_not_part_of_any_cache_key() -> None:
    from stages.plan import Plan

    assert UP2YOU.keys(Plan(), "in") == UP2YOU.keys(Plan(mesh_view_chunk=5), "in")


def test_video_frames_go_in_smaller_batches_only_when_the_default_does_not_fit(table) -> None:
    assert video_chunks() == [8, 4, 2, 1]
    roomy = _choose(table, 12).plan
    assert roomy.video_chunk == 8
    tight = _choose(table, 3.5)  # just above the floor
    p = tight.plan
    assert p.video_chunk < 8 and f"video frames {p.video_chunk} at a time" in tight.candidate.label
    video = next(f for f in tight.fits if f.stage == "video")
    assert video.fits
    bigger = evaluate(p.replace(video_chunk=p.video_chunk * 2), UP2YOU, table, 6, int(3.5 * GiB))
    assert not next(f for f in bigger if f.stage == "video").fits  # the largest batch that fits, not smaller
    assert any("video frames 8 ->" in d for d in tight.degradations)
    assert UP2YOU.keys(p, "in") == UP2YOU.keys(p.replace(video_chunk=8), "in")  # memory only: no key changes


def test_the_plan_says_when_its_table_was_measured_on_another_gpu(photos) -> None:
    from budgets.table import measured_on
    from orchestrator.job import RunOptions, plan_job, plan_notes
    from orchestrator.probe import SimulatedGpu, SimulatedProbe

    def planned(name: str):
        return plan_job(photos, RunOptions(vram="12GB", plan_only=True), SimulatedProbe(SimulatedGpu(80 * GiB, name=name)))

    for name, version in (("NVIDIA H100 80GB HBM3", 3), ("NVIDIA H200", 8)):  # each has its own table
        jp = planned(name)
        assert jp.table.version == version and measured_on(jp.table, name)
        assert not [n for n in plan_notes(jp) if "measured on" in n]
    other = planned("NVIDIA A100-SXM4-80GB")  # none: the newest, said so
    notes = [n for n in plan_notes(other) if "measured on" in n]
    assert other.table.version == 8 and len(notes) == 1
    assert "NVIDIA H200, not on this NVIDIA A100-SXM4-80GB" in notes[0] and "calibrate --gpu 0" in notes[0]
