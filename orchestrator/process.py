"""One stage process, seen from the parent: spawn pre-started, let it go, watch it, end it.

Protocol (stages.harness): the child, started with `--prestart`, imports and prepares (host memory
only), prints `ready <t>` on stdout and blocks reading one line from stdin; `go\\n` lets it run,
closing stdin dismisses it (exit 0). Once its outputs and manifest are written it prints `done <t>`,
before its (sometimes slow) exit: the runner may hand the GPU on from there. Each child gets its own
process group, so a terminal's Ctrl-C reaches only the orchestrator, which forwards it, and a kill of
the group leaves no orphan. Every child runs under `stages.lifeline`, so it also dies when the
orchestrator itself is killed (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from stages import lifeline
from stages.spec import StageSpec

GRACE_S = 5.0  # how long a child may take to exit after SIGINT before the group is killed


class StageProcess:
    """A pre-started `python -m <spec.module> JOB --prestart` child."""

    def __init__(
        self, spec: StageSpec, job_dir: Path, weights_dir: str, profile: str, env: dict[str, str], log_path: Path,
    ) -> None:  # fmt: skip
        self.spec = spec
        # under the lifeline: the child dies with this process, however this process dies
        cmd = lifeline.command(spec.module, str(job_dir), "--weights", weights_dir, "--profile", profile, "--prestart")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a")  # noqa: SIM115 - closed in _reap, after the child is gone
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        self._log.flush()
        self.spawned_at = time.monotonic()
        self.ready_at: float | None = None
        self.go_at: float | None = None
        self.done_at: float | None = None  # when `done` came: the work is on disk, the process may still hold memory
        self.exited_at: float | None = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self._done_or_eof = threading.Event()  # news for the runner's loop: `done`, or stdout closed (the exit)
        self._eof = threading.Event()
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=lifeline.env(env), text=True,
            start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_stdout, name=f"stdout-{spec.name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("ready") and self.ready_at is None:
                self.ready_at = time.monotonic()
                self._ready.set()
            elif line.startswith("done") and self.go_at is not None and self.done_at is None:
                self.done_at = time.monotonic()
                self._done_or_eof.set()
            else:
                self.stdout_lines.append(line.rstrip("\n"))
        self._ready.set()  # EOF: no `ready` will come
        self._eof.set()
        self._done_or_eof.set()

    def warm(self, device: str) -> None:
        """Let a waiting child make its CUDA context on `device` now (the runner has claimed the context's
        memory for it); it goes on waiting for `go`."""
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):  # it died while waiting: wait() reports how
            self.popen.stdin.write(f"warm {device}\n")
            self.popen.stdin.flush()

    def go(self) -> None:
        """Let the child run (it reads the request file, which must already be written)."""
        assert self.popen.stdin is not None
        self.go_at = time.monotonic()
        with contextlib.suppress(BrokenPipeError, OSError):  # it died while waiting: wait() reports how
            self.popen.stdin.write("go\n")
            self.popen.stdin.flush()

    def wait_for_news(self, timeout: float) -> None:
        """Sleep up to `timeout`, waking at once on `done` (unless it came already) or on the exit."""
        if self._eof.is_set():  # stdout is closed: the exit is a moment away
            time.sleep(min(timeout, 0.005))
        elif self.done_at is None:
            self._done_or_eof.wait(timeout)
        else:
            self._eof.wait(timeout)

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return code

    @property
    def finished_at(self) -> float | None:
        """When the stage's work ended as far as the next stage cares: `done`, else the exit."""
        return self.done_at if self.done_at is not None else self.exited_at

    def dismiss(self) -> None:
        """Tell a waiting child it is not needed (close stdin: it exits 0); kill it if it does not."""
        with contextlib.suppress(OSError):
            if self.popen.stdin:
                self.popen.stdin.close()
        self.wait_or_kill()

    def interrupt(self) -> None:
        """Forward Ctrl-C to the child's group; kill the group if it has not exited after GRACE_S."""
        self.signal_group(signal.SIGINT)
        self.wait_or_kill()

    def wait_or_kill(self) -> None:
        """Wait up to GRACE_S for the exit, then kill the group; close our ends either way."""
        try:
            self.popen.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(GRACE_S)
        self._reap()

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # the group id is the child's pid (start_new_session)

    def finish(self) -> int:
        """Wait for exit (the caller polls first); close our ends. Returns the exit code."""
        code = self.popen.wait()
        self.poll()
        self._reap()
        return code

    def _reap(self) -> None:
        self.poll()
        self._reader.join(timeout=1.0)
        for f in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError):
                if f:
                    f.close()
        with contextlib.suppress(OSError):
            self._log.close()

    def pids(self) -> list[int]:
        """The child and its descendants (a stage may spawn helpers, e.g. an extension build)."""
        import psutil

        try:
            p = psutil.Process(self.popen.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def hidden_startup_s(self, previous_exit: float | None) -> float:
        """Start-up time that overlapped the previous stage: from spawn to ready, cut at the previous exit."""
        if self.ready_at is None:
            return 0.0
        end = min(self.ready_at, previous_exit) if previous_exit is not None else self.spawned_at
        return max(0.0, end - self.spawned_at)


def process_rss(pids: Sequence[int]) -> int:
    """Resident bytes of a process and its children (0 once gone)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total
