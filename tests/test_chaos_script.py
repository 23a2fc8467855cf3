"""The pure parts of benchmarks/chaos.py (the GPU script): its schedule and what it reads from run.json."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chaos", ROOT / "benchmarks" / "chaos.py")
assert _spec and _spec.loader
chaos = importlib.util.module_from_spec(_spec)
sys.modules["chaos"] = chaos  # dataclasses look their module up there
_spec.loader.exec_module(chaos)

TIMELINE = {s: (2.0 + 5 * i, 6.0 + 5 * i) for i, s in enumerate(chaos.STAGES)}


def test_schedule_is_seeded_and_covers_the_ranges() -> None:
    grabs = chaos.schedule(200, ["0", "1"], {"0": TIMELINE, "1": TIMELINE}, seed=3)
    assert grabs == chaos.schedule(200, ["0", "1"], {"0": TIMELINE, "1": TIMELINE}, seed=3)
    assert grabs != chaos.schedule(200, ["0", "1"], {"0": TIMELINE, "1": TIMELINE}, seed=4)
    assert [g.gpu for g in grabs[:4]] == ["0", "1", "0", "1"]
    assert all(0.30 <= g.fraction <= 0.97 for g in grabs)
    assert {g.target for g in grabs} == {"before", *chaos.STAGES}
    for g in grabs:
        if g.target == "before":
            assert g.at_s == 0.0
        else:
            lo, hi = TIMELINE[g.target]
            assert lo <= g.at_s <= hi
    held = [g.hold_s < 0 for g in grabs]
    assert 0.3 < sum(held) / len(held) < 0.7
    assert all(2.0 <= g.hold_s <= 20.0 for g in grabs if g.hold_s >= 0)


def _attempt(stage: str, outcome: str, start: float, wall: float, peak: int = 0, cap: int = 0) -> dict:
    return {"stage": stage, "outcome": outcome, "started_s": start, "wall_s": wall, "measured_gpu_bytes": peak,
            "cap_bytes": cap}


def test_what_the_table_reads_from_the_attempts() -> None:
    attempts = [_attempt("segment", "skipped", 0, 0), _attempt("features", "ok", 1, 2, 5, 10),
                _attempt("rgb", "out of GPU memory", 4, 3, 9, 10), _attempt("rgb", "ok", 8, 3, 6, 7),
                _attempt("rgb", "ok", 12, 1, 6, 7)]  # fmt: skip
    assert chaos.stage_at(attempts, 0.5) == "before"
    assert chaos.stage_at(attempts, 2.0) == "features"
    assert chaos.stage_at(attempts, 3.5) == "between"
    assert chaos.stage_at(attempts, 5.0) == "rgb"
    assert chaos.stage_at(attempts, 99.0) == "after"
    assert chaos.recomputed(attempts) == ["rgb"]
    assert chaos.peak_vs_cap(attempts, context_bytes=1) == (9, 11, True)
    assert chaos.peak_vs_cap(attempts, context_bytes=0)[2] is True
    assert chaos.peak_vs_cap([_attempt("rgb", "ok", 0, 1, 12, 10)], context_bytes=1) == (12, 11, False)


def test_the_stages_that_ran_on_the_cpu_are_read_from_run_json_and_counted() -> None:
    report = {"cpu_stages": [{"stage": "rgb", "outcome": "ok"}, {"stage": "mesh", "outcome": "out of GPU memory"},
                             {"stage": "mesh", "outcome": "ok"}]}  # fmt: skip
    assert chaos.cpu_stages(report) == ["rgb", "mesh"] and chaos.cpu_stages({}) == []
    row = {"ok": True, "recomputed": [], "peak_within_cap": True, "replans": [], "time_lost_s": 1.0}
    rows = [{**row, "cpu_stages": ["rgb", "mesh"]}, {**row, "cpu_stages": []}, row]  # the last: an older part
    summary = chaos.summarise_all(rows, 10.0)
    assert (summary["finished"], summary["ran_on_cpu"], summary["cpu_stages"]) == (3, 1, 2)


def test_merge_keeps_the_newest_row_of_a_run_measured_again_and_lists_the_older(tmp_path: Path) -> None:
    import json

    grab = {"gpu": "0", "target": "rgb", "at_s": 1.0, "fraction": 0.8, "hold_s": -1.0, "grabbed_bytes": 0,
            "grab_s": 1.0, "stage_hit": "rgb", "oom_stages": [], "replans": [], "time_lost_s": 0.0,
            "recomputed": [], "peak_nvml_bytes": 0, "cap_bytes": 1, "peak_within_cap": True}  # fmt: skip

    def part(name: str, date: str, runs: dict[int, bool]) -> Path:
        rows = [{**grab, "run": i, "ok": ok, "exit_code": 0 if ok else 75, "message": "m", "cpu_stages": []}
                for i, ok in runs.items()]
        path = tmp_path / name
        path.write_text(json.dumps({"meta": {"date": date, "git": name}, "summary": {"total_s": 5.0}, "runs": rows}))
        return path

    old1 = part("p1", "2026-12-01T21:00:00", {0: True, 2: False})
    old2 = part("p2", "2026-12-01T21:10:00", {1: True})
    again = part("again", "2026-12-02T00:00:00", {2: True, 3: True})
    assert chaos.merge([again, old1, old2], tmp_path / "out") == 0  # every run's newest row finished
    merged = json.loads((tmp_path / "out" / "chaos.json").read_text())
    assert [(r["run"], r["ok"], r["git"]) for r in merged["runs"]] == [(0, True, "p1"), (1, True, "p2"),
                                                                         (2, True, "again"), (3, True, "again")]
    assert [(s["run"], s["ok"], s["git"]) for s in merged["meta"]["superseded"]] == [(2, False, "p1")]
    assert merged["summary"]["runs"] == 4 and merged["summary"]["finished"] == 4


def test_a_replay_meets_the_recorded_grabs_against_the_recorded_baseline(tmp_path: Path) -> None:
    grabs = chaos.schedule(6, ["0", "1"], {"0": TIMELINE, "1": TIMELINE}, seed=5)
    rows = [{**vars(g), "ok": False, "exit_code": -9} for g in grabs]  # a row carries its grab's fields and more
    earlier = {"meta": {"baselines": {"0": {"wall_s": 37.3, "plan": "6 views", "ok": True},
                                      "1": {"wall_s": 40.0, "plan": "6 views", "ok": True}}}, "runs": rows}  # fmt: skip
    path = tmp_path / "chaos_runs.json"
    path.write_text(json.dumps(earlier))
    base, replayed = chaos.replayed(path, ["1"])
    assert replayed == [g for g in grabs if g.gpu == "1"] and len(replayed) == 3
    assert set(base) == {"1"} and base["1"][1] == 40.0 and base["1"][0]["ok"] is True
