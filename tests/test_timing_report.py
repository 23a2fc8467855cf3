"""A run prints predicted seconds in its plan table and writes predicted vs measured seconds to run.json."""

from __future__ import annotations

import dataclasses
import json

from rich.console import Console

from budgets.timing import StageTime, TimeModel, TimeTerm, plan_time
from orchestrator.job import RunOptions, run_job
from orchestrator.prestart import configured_ahead
from stages.jobfs import JobDir
from tests.fakestages import FAKE


def _model() -> TimeModel:
    stages = {name: StageTime((TimeTerm("start-up", "one", 4.0, "startup"), TimeTerm("run", "views", 0.05 * (i + 1))))
              for i, name in enumerate(FAKE.names)}  # fmt: skip
    return TimeModel(stages, handoff_s=0.3, job_overhead_s=1.0, provenance={"gpu": "made up for a test"})


def test_run_reports_predicted_and_measured_seconds_per_stage(photos, tmp_path, gpu24, fake_table) -> None:
    table = dataclasses.replace(fake_table, time=_model())
    out = tmp_path / "out"
    console = Console(record=True, width=200)
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu"), probe=gpu24, pipeline=FAKE, table=table,
                     console=console)  # fmt: skip
    assert report.ok, report.message
    printed = console.export_text()
    assert "predicted time" in printed and "│ total" in printed
    record = json.loads((out / "run.json").read_text())
    plan = report.choice.plan
    predicted = plan_time(FAKE.names, plan, report.n_photos, table.time, ahead=configured_ahead())  # as the runner
    assert record["predicted_seconds"]["total_s"] == round(predicted.total_s, 2)
    job = JobDir(report.job_dir)
    for a in report.pipeline_result.attempts:
        row = record["predicted_vs_measured"][a.stage]
        assert row["predicted_wall_s"] == round(predicted.get(a.stage).wall_s, 2)
        assert row["predicted_run_s"] == round(predicted.get(a.stage).run_s, 2)
        assert row["measured_wall_s"] == round(a.wall_s, 2) and a.wall_s > 0
        assert row["measured_run_s"] == round(job.read_manifest(a.stage)["timings"]["run_s"], 2)
