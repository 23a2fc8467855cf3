"""Which subjects a rerun may skip, and how a finished job is recorded.

A subject is done when its run.json says ok and `fleet_job.json` beside it holds the same fingerprint:
the content key of its photos and the options its job ran with. `fleet_job.json` is written only after
the job finished ok (and removed when a job starts), so a job killed half-way is never taken as done;
an unfinished subject simply runs again into the same OUT, where the job resumes stage by stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.fleet.command import job_args
from orchestrator.fleet.summary import SubjectRecord, read_run
from orchestrator.inputs import scan_inputs
from orchestrator.job import RunOptions
from orchestrator.report import write_json
from stages.spec import EXIT_INTERRUPTED, EXIT_OK

FLEET_RECORD = "fleet_job.json"


def fingerprint(folder: Path, options: RunOptions) -> dict[str, Any]:
    """What must not change for a finished subject to stay finished (InputError if the photos are unusable)."""
    return {"inputs_key": scan_inputs(folder).key, "args": job_args(options)}


def is_done(out_dir: Path, fp: dict[str, Any]) -> bool:
    run = read_run(out_dir)
    try:
        recorded = json.loads((out_dir / FLEET_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return bool(run and run.get("ok")) and recorded.get("fingerprint") == fp


def mark_started(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.unlink(out_dir / FLEET_RECORD)
    except FileNotFoundError:
        pass


def finish(rec: SubjectRecord, code: int, fp: dict[str, Any], ended_s: float, log_tail: str = "") -> None:
    """Record a job's exit in `rec` (outcome, message from its run.json) and, if ok, its fingerprint."""
    rec.ended_s, rec.exit_code = ended_s, code
    run = read_run(rec.out_dir)
    rec.outcome = "ok" if code == EXIT_OK else "interrupted" if code == EXIT_INTERRUPTED else "failed"
    if code == EXIT_OK:
        write_json(rec.out_dir / FLEET_RECORD, {"subject": rec.subject, "fingerprint": fp})
        rec.message = "done"
    elif run is not None and not run.get("ok"):
        rec.message = str(run.get("message", ""))
    else:  # it stopped before writing run.json (bad input found by the job, no GPU, ...): its last line says why
        rec.message = log_tail.removeprefix("error: ") or f"exit code {code}"
    rec.activity = ""
