"""The local backend: one OS process per subject's job on this host, which dies with the fleet.

Each job gets its own session (a terminal's Ctrl-C reaches only the fleet, which forwards it: the job
stops its stage and writes run.json) and runs under `stages.lifeline`, so if the fleet is killed, even
with SIGKILL, the job and its stages die with it; a rerun resumes from the finished stages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from stages import lifeline

GRACE_S = 20.0  # how long an interrupted job may take to stop its stage and write run.json


class LocalJob:
    """One job process (`cmd` from command.job_command: under the lifeline); stdout and stderr go to
    `log_path`, the progress lines the fleet follows."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"--- {' '.join(cmd)}\n")
            log.flush()
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=lifeline.env(env),
                                          start_new_session=True)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def interrupt(self) -> None:
        """Ctrl-C to the job's group (it stops its stage, writes run.json); SIGKILL if it takes too long."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGINT)

    def wait(self, timeout: float = GRACE_S) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()
