"""Calibration: the fit recovers known coefficients, and `calibrate` writes a table the planner can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budgets.fit import FitRow
from budgets.table import Term, load_table, predict
from orchestrator.calibrate import GridPoint, Measurement, PhaseRow, calibrate, fit_stage, phase_rows
from orchestrator.planner import Constraints, base_plan, choose_plan
from stages.plan import Plan
from tests.fakestages import FAKE

GiB = 2**30

TERMS = (
    Term("unet weights", "one", 1.0, when={"offload": ("none",)}),
    Term("vae weights", "one", 3.0, when={"offload": ("none",)}),  # identical column: shares in ratio 1:3
    Term("activations", "batch_res2", 1.0, phases=("denoise",)),
    Term("decode batched", "views_res2", 1.0, phases=("decode",), when={"vae_mode": ("batched",)}),
    Term("decode sliced", "res2", 1.0, phases=("decode",), when={"vae_mode": ("sliced",)}),
    Term("never exercised", "one", 123.0, phases=("matte",), when={"offload": ("sequential",)}),
)
TRUE = {"unet weights": 0.5e9, "vae weights": 1.5e9, "activations": 1.5e8, "decode batched": 1.1e9,
        "decode sliced": 1.4e9}  # fmt: skip


def _truth(plan: Plan, phase: str) -> float:
    return sum(TRUE[t.name] * t.bytes(plan, 4) / t.coef for t in TERMS
               if t.name in TRUE and ("resident" in t.phases or phase in t.phases))  # fmt: skip


def _rows() -> list[PhaseRow]:
    rows = []
    for v in (6, 12, 20):
        for r in (512, 768):
            for cfg in ("batched", "sequential"):
                for vae in ("batched", "sliced"):
                    p = Plan(views=v, resolution=r, cfg_mode=cfg, vae_mode=vae)
                    rows += [PhaseRow(FitRow(p, 4, _truth(p, ph)), ph) for ph in ("denoise", "decode")]
    return rows


def test_fit_recovers_known_coefficients_and_keeps_unexercised_terms() -> None:
    fitted, worst = fit_stage(TERMS, _rows(), "test")
    got = {t.name: t for t in fitted}
    assert worst < 1e-9
    for name in ("activations", "decode batched", "decode sliced"):
        assert got[name].coef == pytest.approx(TRUE[name], rel=1e-6)
        assert got[name].kind == "measured" and got[name].source == "test"
    # two constant terms cannot be told apart: their total is measured, the split keeps the prior ratio
    assert got["unet weights"].coef + got["vae weights"].coef == pytest.approx(2.0e9, rel=1e-6)
    assert got["vae weights"].coef == pytest.approx(3 * got["unet weights"].coef, rel=1e-6)
    assert got["never exercised"].coef == 123.0 and got["never exercised"].kind == "derived"


def test_fit_never_returns_negative_memory() -> None:
    rows = [PhaseRow(FitRow(Plan(views=v), 4, 1e9 - 1e6 * v), "denoise") for v in (6, 12, 20)]
    fitted, _ = fit_stage((Term("w", "one", 1.0), Term("a", "views", 1.0, phases=("denoise",))), rows, "t")
    assert all(t.coef >= 0 for t in fitted)


def test_diffusion_phase_rows_come_from_the_cumulative_peaks(fake_table) -> None:
    plan = Plan(views=20, resolution=768, vae_mode="batched")
    m = Measurement("rgb", "p", plan.to_dict(), 4, "ok", nvml_peak=22 * GiB, rss_peak=None,
                    torch_allocated=20 * GiB, torch_reserved=21 * GiB,
                    phase_peaks={"encode_prompt": 1 * GiB, "encode_refs": 1 * GiB, "reference_pass": 4 * GiB,
                                 "pose_adapter": 4 * GiB, "denoise": 10 * GiB, "decode": 20 * GiB})  # fmt: skip
    rows = {r.phase: r.row.peak_bytes for r in phase_rows(m, fake_table, context=2 * GiB)}
    # prompt encoding is not a row; pose_adapter did not grow; NVML - context = 20 GiB = the allocated peak
    assert rows == {"reference": pytest.approx(4 * GiB), "denoise": pytest.approx(10 * GiB),
                    "decode": pytest.approx(20 * GiB)}  # fmt: skip


def test_calibrate_on_the_fake_pipeline_writes_a_table_the_planner_uses(photos, tmp_path, fake_table) -> None:
    out = tmp_path / "tables" / "fake-calibrated.json"
    grid = (GridPoint(6, 512), GridPoint(6, 512, cfg_mode="sequential"))
    result = calibrate(tmp_path / "work", device="cpu", grid=grid, out=out, pipeline=FAKE, template=fake_table,
                       log=lambda m: None)  # fmt: skip
    assert result.path == out and out.is_file()
    table = load_table(out)
    assert table.version == fake_table.version + 1 and table.pipeline == "fake"
    prov = table.provenance
    for key in ("gpu", "torch", "date", "grid", "fixed_knobs", "method"):
        assert prov[key], key
    assert prov["grid"] == [p.label for p in grid] and prov["torch"][0].isdigit()
    assert not prov["failed"]
    # every stage ran; the fake stages with no knob in common with the grid change ran once
    ran = [(m.stage, m.point) for m in result.measurements]
    assert [s for s, _ in ran].count("prep") == 1 and [s for s, _ in ran].count("rgb") == 2
    assert all(m.rss_peak and m.rss_peak > 0 for m in result.measurements)
    assert any(t.kind == "measured" for m in table.stages.values() for t in m.terms)
    assert predict("rgb", Plan(views=6, resolution=512), 3, table).allocator_bytes > 0
    raw = json.loads((tmp_path / "work" / "measurements.json").read_text())
    assert raw["table"] == str(out) and len(raw["measurements"]) == len(ran)
    c = Constraints()
    choice = choose_plan(FAKE, table, 3, 64 * GiB, base_plan(c, device="cpu"), c)
    assert choice.plan.views == 20
    # the time section is fitted from the same runs: start-ups measured; per-step terms, at one step count, not
    assert table.time is not None and set(table.time.stages) == set(FAKE.names)
    for name, model in table.time.stages.items():
        startup = next(t for t in model.terms if t.part == "startup")
        assert startup.kind == "measured" and startup.coef > 0, name
    assert any(n.startswith("rgb run: UNet conditional branch") and "not separable" in n
               for n in table.time.provenance["not_fitted"])  # fmt: skip
    assert table.time.provenance["lengths"] == ["2 steps, 20 mesh iterations, 16 frames"]
    assert choice.times is not None and choice.times.total_s > 0


def test_cli_calibrate_refuses_cpu_without_tiny(tmp_path: Path, capsys) -> None:
    from cli import main

    assert main(["calibrate", "--device", "cpu"]) != 0


def test_grid_parts_cover_the_grid_once_in_order() -> None:
    from orchestrator.calibrate import full_grid, grid_part

    grid = full_grid()
    for n in (1, 2, 3):
        parts = [grid_part(grid, k, n) for k in range(1, n + 1)]
        assert sum(parts, ()) == grid
    with pytest.raises(ValueError):
        grid_part(grid, 3, 2)


def test_full_length_points_end_the_grid_and_only_raise_a_stage_they_measure_higher(fake_table) -> None:
    from orchestrator.calibrate import fit_table, full_grid

    grid = full_grid()
    assert [p.full_length for p in grid[-2:]] == [True, True] and not any(p.full_length for p in grid[:-2])
    assert {p.thg_interval for p in grid[-2:]} == {1, 3} and len({p.views for p in grid[-2:]}) == 2
    assert "full-length" in grid[-1].label and "thg-1" in grid[-1].label
    Plan(**grid[-1].knobs())  # only Plan fields

    def m(views: int, peak: int, full: bool) -> Measurement:
        return Measurement("mesh", f"p{views}{full}", Plan(views=views).to_dict(), 3, "ok", nvml_peak=peak,
                           rss_peak=None, torch_allocated=None, torch_reserved=peak - GiB, full_length=full)

    short = [m(6, 3 * GiB, False), m(20, 5 * GiB, False)]
    a, _ = fit_table(fake_table, short, {})
    lower, _ = fit_table(fake_table, [*short, m(20, 4 * GiB, True)], {})  # below the fit: nothing changes
    assert a.stages == lower.stages and a.context_bytes == lower.context_bytes
    b, _ = fit_table(fake_table, [*short, m(12, 40 * GiB, True)], {})  # the mesh grew over its iterations
    assert b.context_bytes == a.context_bytes and b.stages.keys() == a.stages.keys()
    context = a.context_bytes
    for views in (6, 12, 20):  # every plan raised by one factor: the short points' shape, the long one's height
        pa, pb = (predict("mesh", Plan(views=views), 3, t).allocator_bytes for t in (a, b))
        assert pb / pa == pytest.approx((40 * GiB - context) / predict("mesh", Plan(views=12), 3, a).allocator_bytes,
                                        rel=1e-6)  # fmt: skip
    assert predict("mesh", Plan(views=12), 3, b).total_bytes == pytest.approx(40 * GiB, rel=1e-6)
    assert all("to cover 'p12True' (a full-length run" in t.source for t in b.stages["mesh"].terms if t.coef)
    assert [s for s in a.stages if a.stages[s] != b.stages[s]] == ["mesh"]
