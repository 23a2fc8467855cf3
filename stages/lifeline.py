"""Children die with their parent: a tiny launcher that arms the death signal, then runs the real module.

    python -m stages.lifeline stages.rgb JOB --weights DIR ...

A stage process that outlives a SIGKILLed orchestrator keeps its GPU memory, which on a shared card
belongs to someone else. So before anything slow happens (importing torch takes seconds), the launcher

1. asks Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)`` via ctypes);
2. checks that the parent it was started by (``UP2YOU_PARENT_PID``) is still its parent — if the
   parent died before step 1, the death signal will never come, so it exits at once;
3. starts a daemon thread that polls ``getppid()`` (the portable fallback where prctl is missing) and
   kills this process's group when the parent is gone;
4. makes SIGINT raise KeyboardInterrupt again where the parent was started ignoring it (a non-interactive
   shell's ``&`` and ``nohup`` do that, and the child inherits it). The child leads its own session, so no
   terminal's Ctrl-C reaches it: SIGINT comes only from its parent, which forwards Ctrl-C and stops stages
   with it;

then runs the named module as ``__main__``. Torch-free and import-light on purpose. The orchestrator
side is `command()` and `env()`; a job process started by the fleet uses the same launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import runpy
import signal
import sys
import threading
import time

LAUNCHED_AT = time.time()  # this process's start as the stage's own clock reads it (psutil's can be ~1 s off)
PARENT_ENV = "UP2YOU_PARENT_PID"
STARTED_ENV = "UP2YOU_PROCESS_STARTED"
PR_SET_PDEATHSIG = 1
WATCH_S = 0.2  # the fallback notices a dead parent within this (the kernel's signal is immediate)


def command(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` under the lifeline."""
    return [sys.executable, "-m", "stages.lifeline", module, *args]


def env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) plus this process's pid as the child's expected parent."""
    out = dict(os.environ if base is None else base)
    out[PARENT_ENV] = str(os.getpid())
    return out


def arm_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die() -> None:
    with contextlib.suppress(OSError):
        if os.getpgrp() == os.getpid():  # we lead our own group (start_new_session): take helpers along
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(137)


def _watch(parent: int) -> None:
    while True:
        time.sleep(WATCH_S)
        if os.getppid() != parent:
            _die()


def guard(parent: int | None) -> None:
    """Arm the death signal and the watch for `parent`; exit now if it is already gone."""
    if parent is None:
        return
    arm_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        _die()
    threading.Thread(target=_watch, args=(parent,), name="lifeline", daemon=True).start()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m stages.lifeline MODULE [ARGS...]")
    raw = os.environ.get(PARENT_ENV, "")
    guard(int(raw) if raw.isdigit() else None)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    os.environ[STARTED_ENV] = repr(LAUNCHED_AT)  # for the stage's import time (stages.harness)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
