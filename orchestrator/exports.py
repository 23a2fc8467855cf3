"""Deliverable exports (`stages.export`) running beside the next stage: start, cancel, wait for all.

A stage that declares `exports` leaves its PNG/OBJ/GLB files to a torch-free CPU process that the runner
starts once the stage's manifest is written; the next stage starts at the same time. The job ends only
after every export has finished (`wait_all`), so the deliverables are there when `run_job` returns. An
export whose stage is run again (a re-plan, a retry) is cancelled first: the new run exports anew.
Each export runs under `stages.lifeline` in its own process group, as stages do, so it dies with us.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.process import GRACE_S
from stages import lifeline
from stages.jobfs import JobDir
from stages.spec import EXIT_MEANINGS, EXIT_OK


@dataclass
class Export:
    stage: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    ended: float | None = None  # set by `watcher` the moment the process exits (the runner polls only stages)
    code: int | None = None
    watcher: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.watcher = threading.Thread(target=self._watch, name=f"export-{self.stage}", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        code = self.popen.wait()
        self.ended, self.code = time.monotonic(), code

    def poll(self) -> int | None:
        return self.code if self.code is not None else self.popen.poll()

    def wait(self) -> int:
        assert self.watcher is not None
        self.watcher.join()
        return self.popen.returncode


@dataclass
class ExportFailure:
    stage: str
    exit_code: int
    message: str


@dataclass
class Exports:
    """The background exports of one job (the runner owns one)."""

    job: JobDir
    env: dict[str, str]
    t0: float = field(default_factory=time.monotonic)
    running: dict[str, Export] = field(default_factory=dict)
    finished: list[Export] = field(default_factory=list)
    waited_s: float = 0.0  # how long the job waited at its end for exports still running

    def start(self, stage: str) -> None:
        """Export `stage`'s deliverables in the background, unless they are there already for its manifest."""
        self.cancel(stage)
        self.job.sweep_temporaries(stage)  # of an export killed with us (the stage itself is done and not running)
        if self.job.is_exported(stage):
            return
        log = self.job.path(stage, "export.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "CUDA_VISIBLE_DEVICES": ""}  # torch-free; and never a CUDA context if that changes
        with open(log, "ab") as out:
            popen = subprocess.Popen(lifeline.command("stages.export", str(self.job.root), stage),
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=lifeline.env(env),
                                     start_new_session=True)  # fmt: skip
        self.running[stage] = Export(stage, popen, log, time.monotonic())

    def cancel(self, stage: str) -> None:
        """Stop `stage`'s export (its stage is about to run again) and forget its record."""
        e = self.running.pop(stage, None)
        if e is not None and e.poll() is None:
            _kill(e.popen)
        self.job.clear_export(stage)

    def wait_all(self) -> list[ExportFailure]:
        """Block until every export has ended; the failed ones, each with the last line of its log."""
        t = time.monotonic()
        failures = []
        for stage, e in list(self.running.items()):
            e.code = e.wait()
            del self.running[stage]
            self.finished.append(e)
            if e.code != EXIT_OK:
                failures.append(ExportFailure(stage, e.code, _why(e)))
        self.waited_s += time.monotonic() - t
        return failures

    def kill_all(self) -> None:
        """The job is ending without success: stop what runs (a resume exports again)."""
        for e in self.running.values():
            if e.poll() is None:
                _kill(e.popen)
        self.running.clear()

    def record(self) -> dict[str, object]:
        """What run.json says: per stage when it started and how long it took (seconds from the job's start)."""
        return {"waited_at_end_s": round(self.waited_s, 3),
                "stages": {e.stage: {"started_s": round(e.started - self.t0, 3),
                                     "wall_s": round((e.ended or e.started) - e.started, 3), "exit_code": e.code}
                           for e in self.finished}}  # fmt: skip


def _why(e: Export) -> str:
    lines = [ln for ln in e.log.read_text(errors="replace").splitlines() if ln.strip()] if e.log.is_file() else []
    last = next((ln for ln in reversed(lines) if ln.startswith("[export")), lines[-1] if lines else "")
    meaning = EXIT_MEANINGS.get(e.code or 0, "unexpected error") if (e.code or 0) >= 0 else f"signal {-(e.code or 0)}"
    return f"{last or meaning} (exit {e.code}: {meaning}; see {e.log})"


def _kill(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(GRACE_S)
