"""The budget table: loading, predictions that follow the knobs, provenance, and the least-squares fit."""

import json
from pathlib import Path

import pytest

from budgets.fit import FitRow, fit
from budgets.table import FEATURES, TABLES_DIR, Term, load_table, predict, save_table
from stages.plan import Plan
from stages.spec import UP2YOU

GiB = 2**30


@pytest.fixture(scope="module")
def table():
    """The derived table (v1): these tests check its arithmetic against the facts it was derived from."""
    return load_table(TABLES_DIR / "up2you-v1.json")


def test_default_table_covers_every_up2you_stage_with_provenance(table) -> None:
    assert set(UP2YOU.names) <= set(table.stages)
    for stage, model in table.stages.items():
        for t in model.terms:
            assert t.kind in ("measured", "derived"), (stage, t.name)
            assert t.source, (stage, t.name)
            assert t.feature in FEATURES
    assert {"gpu", "torch", "date", "method"} <= set(table.provenance)


def test_rgb_prediction_matches_the_derived_facts(table) -> None:
    # 20 views, 768, batched CFG: weights 2.25 GB + cache 2.08 GB + 40 images x (153 + 24 + 11) MB
    p = predict("rgb", Plan(views=20, resolution=768, cfg_mode="batched", vae_mode="sliced"), 6, table)
    assert p.peak_phase == "denoise"
    assert p.allocator_bytes == pytest.approx(2.25e9 + 2.079e9 + 40 * 187.74e6, rel=0.01)
    assert p.total_bytes == p.allocator_bytes + table.context_bytes
    assert p.breakdown["UNet weights"] == pytest.approx(1.73e9, rel=1e-6)


@pytest.mark.parametrize(("change", "smaller"), [
    ({"cfg_mode": "sequential"}, True), ({"offload": "sequential"}, True), ({"views": 12}, True),
    ({"resolution": 512}, True), ({"vae_mode": "batched"}, False), ({"dtype": "fp32"}, False),
])  # fmt: skip
def test_knobs_move_the_prediction_the_right_way(table, change: dict, smaller: bool) -> None:
    base = Plan(views=20, resolution=768, cfg_mode="batched", vae_mode="sliced", offload="none")
    a = predict("rgb", base, 6, table).allocator_bytes
    b = predict("rgb", base.replace(**change), 6, table).allocator_bytes
    assert (b < a) if smaller else (b > a)


def test_batched_vae_decode_of_20_views_is_the_measured_24_gib(table) -> None:
    p = predict("rgb", Plan(views=20, resolution=768, vae_mode="batched"), 6, table)
    assert p.peak_phase == "decode"
    assert p.breakdown["VAE decode, batched (per view)"] + p.breakdown["VAE decode, batched (per view, size-independent part)"] \
        == pytest.approx(23907.9 * 2**20, rel=0.05)


def test_more_photos_cost_more_in_the_aggregator(table) -> None:
    assert predict("weights", Plan(), 12, table).allocator_bytes > predict("weights", Plan(), 3, table).allocator_bytes


def test_unknown_stage_and_feature_are_errors(table, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no model for stage"):
        predict("nope", Plan(), 1, table)
    bad = table.to_dict()
    bad["stages"]["rgb"]["terms"][0]["feature"] = "vibes"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown feature"):
        load_table(path)


def test_save_and_load_round_trip(table, tmp_path: Path) -> None:
    save_table(table, tmp_path / "t.json")
    again = load_table(tmp_path / "t.json")
    plan = Plan(views=12, resolution=512, offload="model")
    for s in table.stages:
        assert predict(s, plan, 5, again) == predict(s, plan, 5, table)


def test_newest_version_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table) -> None:
    d = table.to_dict()
    for v in (1, 3, 2):
        (tmp_path / f"t{v}.json").write_text(json.dumps({**d, "version": v, "name": f"v{v}"}))
    monkeypatch.setattr("budgets.table.TABLES_DIR", tmp_path)
    assert load_table().name == "v3"
    assert TABLES_DIR.name == "tables"


def test_fit_recovers_known_coefficients() -> None:
    terms = [Term("weights", "one", 0.0), Term("activations", "batch_res2", 0.0),
             Term("cache", "views_res2", 0.0)]  # fmt: skip
    truth = {"weights": 2e9, "activations": 150e6, "cache": 100e6}
    rows = []
    for views in (6, 12, 20):
        for res in (512, 768):
            for cfg in ("batched", "sequential"):
                plan = Plan(views=views, resolution=res, cfg_mode=cfg)
                peak = sum(Term(n, t.feature, c).bytes(plan, 3) for t in terms for n, c in truth.items() if n == t.name)
                rows.append(FitRow(plan, 3, peak))
    result = fit(terms, rows)
    got = {t.name: t.coef for t in result.terms}
    for name, c in truth.items():
        assert got[name] == pytest.approx(c, rel=1e-6)
    assert all(t.kind == "measured" for t in result.terms)
    assert result.max_rel_error < 1e-9


def test_fit_never_returns_negative_memory() -> None:
    terms = [Term("weights", "one", 0.0), Term("per view", "views", 0.0)]
    rows = [FitRow(Plan(views=v), 1, 5e9 - v * 1e8) for v in (6, 12, 20)]  # memory falling with views
    result = fit(terms, rows)
    assert all(t.coef >= 0 for t in result.terms)
    with pytest.raises(ValueError):
        fit(terms, [])


def test_mesh_view_chunk_scales_only_the_per_view_rasterisation_term() -> None:
    table = load_table()  # the calibrated table the planner uses
    plan = Plan(views=20)
    full = predict("mesh", plan, 6, table)
    assert predict("mesh", plan.replace(mesh_view_chunk=20), 6, table) == full
    assert predict("mesh", plan.replace(mesh_view_chunk=40), 6, table) == full
    per_view = "rasterisation forward + backward per view in a chunk"
    for chunk in (10, 5, 1):
        p = predict("mesh", plan.replace(mesh_view_chunk=chunk), 6, table)
        assert p.breakdown[per_view] == pytest.approx(full.breakdown[per_view] * chunk / 20, rel=1e-6)
        # the targets of all 20 views and the mesh stay resident whatever the chunk
        assert {k: v for k, v in p.breakdown.items() if k != per_view} == \
            {k: v for k, v in full.breakdown.items() if k != per_view}
    assert "mesh_view_chunk" in table.provenance["derived_predictions"]


def test_a_table_measured_on_this_gpu_wins_over_a_newer_one_from_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table) -> None:  # fmt: skip
    d = table.to_dict()
    gpus = {1: "NVIDIA H100 80GB HBM3 (measured rows); other coefficients derived", 2: "NVIDIA H200",
            3: "NVIDIA H100 80GB HBM3", 4: "NVIDIA H200", 5: "NVIDIA H100 80GB HBM3"}
    for v, gpu in gpus.items():
        (tmp_path / f"t{v}.json").write_text(json.dumps({**d, "version": v, "name": f"v{v}",
                                                         "provenance": {**d["provenance"], "gpu": gpu}}))
    monkeypatch.setattr("budgets.table.TABLES_DIR", tmp_path)
    assert load_table(gpu_name="NVIDIA H200").name == "v4"  # not v5, measured on the H100
    assert load_table(gpu_name="nvidia h100 80gb hbm3").name == "v5"
    assert load_table(gpu_name="NVIDIA A100-SXM4-40GB").name == "v5"  # none measured there: the newest
    assert load_table().name == "v5"
    (tmp_path / "t5.json").unlink()
    (tmp_path / "t3.json").unlink()
    assert load_table(gpu_name="NVIDIA H100 80GB HBM3").name == "v1"  # v1's provenance names the GPU first
