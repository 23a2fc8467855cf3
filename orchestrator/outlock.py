"""One writer per output folder: an OS file lock on `OUT/.up2you.lock` for the whole life of a job.

The lock is `filelock`'s (flock on Linux): the kernel drops it when its holder dies, SIGKILL included,
so a lock left by a killed run never blocks the next one. Who holds it is written beside it
(`OUT/.up2you.owner`: pid, host, start time) only to name the holder in the refusal; that file says
nothing about whether the lock is held, and a stale one is simply overwritten.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

LOCK_NAME = ".up2you.lock"
OWNER_NAME = ".up2you.owner"
EXIT_LOCKED = 73  # EX_CANTCREAT: the output folder cannot be written by this run now


class OutputLocked(RuntimeError):
    """Another live run writes this output folder; the message names its pid and the fix."""

    exit_code = EXIT_LOCKED


class OutputLock:
    """`with OutputLock(out):` — held until the block ends or the process dies."""

    def __init__(self, out: Path | str) -> None:
        self.out = Path(out)
        self._lock = FileLock(str(self.out / LOCK_NAME), timeout=0, thread_local=False)

    def acquire(self) -> None:
        """Take the lock (creating the folder), or raise OutputLocked; nothing to do if this object holds it."""
        if self._lock.is_locked:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise OutputLocked(self._refusal()) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        tmp = self.out / f".{OWNER_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, self.out / OWNER_NAME)

    def acquire_if_used(self) -> None:
        """Take the lock now if a run has used this folder (its lock file is there), else create nothing.

        A run takes this before planning, which may wait for GPU memory that the run holding the folder has:
        a second run is then refused at once, and of two runs started together on such a folder one is refused
        here, before either plans. On a folder no run has used, `acquire` after planning decides."""
        if (self.out / LOCK_NAME).exists():
            self.acquire()

    def release(self) -> None:
        if self._lock.is_locked:
            (self.out / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _refusal(self) -> str:
        who = "another up2you-budget run"
        try:
            owner = json.loads((self.out / OWNER_NAME).read_text())
            started = time.strftime("%H:%M:%S", time.localtime(owner["started"]))
            who += f" (pid {owner['pid']} on {owner['host']}, since {started})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return f"output folder {self.out} is in use by {who}: wait for it to finish, or pass another --out"
