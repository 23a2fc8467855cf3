"""The local backend: one OS process per subject's job on this host, which dies with the fleet.

Each job gets its own session (a terminal's Ctrl-C reaches only the fleet, which forwards it) and
PR_SET_PDEATHSIG=SIGTERM (Linux): if the fleet is killed, even with SIGKILL, the kernel sends each job
SIGTERM, which the job treats as Ctrl-C: it stops its stage and writes run.json, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

GRACE_S = 20.0  # how long an interrupted job may take to stop its stage and write run.json


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when the process that started it exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class LocalJob:
    """One job process; stdout and stderr go to `log_path` (the progress lines the fleet follows).

    Start it from a thread that lives as long as the fleet: the death signal follows the starting thread.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"--- {' '.join(cmd)}\n")
            log.flush()
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True,
                                          preexec_fn=_die_with_parent)  # fmt: skip

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
