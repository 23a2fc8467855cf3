"""Children die with their parent, and one run at a time writes an output folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.inputs import EXIT_USAGE
from orchestrator.job import JobError, RunOptions, run_job
from orchestrator.ledger import Ledger
from orchestrator.outlock import EXIT_LOCKED, OWNER_NAME, OutputLock, OutputLocked
from stages import lifeline
from stages.jobfs import JobDir
from tests.fakestages import FAKE

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def _children_of_job(out: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if "stages.lifeline" in cmd and any(str(out) in part for part in cmd):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _alive_after(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those still running after `timeout` s (a zombie has exited and holds nothing: it is only unreaped,
    since its new parent, this sandbox's init, may not reap)."""

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in procs if alive(p)]


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _drive(photos: Path, out: Path, faults: str) -> subprocess.Popen[str]:
    env = {**os.environ, "UP2YOU_FAULTS": faults, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.fakestages.drive", str(photos), str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_sigkill_of_the_orchestrator_takes_running_and_prestarted_stages_along(photos, tmp_path) -> None:
    out = tmp_path / "out"
    proc = _drive(photos, out, "rgb:sleep:1:120")
    try:
        _wait_for(JobDir(out / "job").path("rgb", "request.msgpack").exists)
        # rgb is running (sleeping inside its run) and mesh is pre-started, waiting for `go`
        _wait_for(lambda: len(_children_of_job(out)) >= 2)
        children = _children_of_job(out)
        names = {" ".join(c.cmdline()) for c in children}
        assert any("tests.fakestages.rgb" in n for n in names) and any("tests.fakestages.mesh" in n for n in names)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        alive = _alive_after(children, 1.0)
        assert not alive, f"still alive {time.monotonic() - killed_at:.2f} s after the orchestrator's SIGKILL: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # the kernel dropped the killed run's folder lock: a rerun on the same folder is not refused, and resumes
    again = _drive(photos, out, "")
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert "exit 0" in stdout


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    # the expected parent (pid 1 is never our parent here) is not the actual one: the lifeline must not run it
    env = {**os.environ, lifeline.PARENT_ENV: "1", "PYTHONPATH": str(ROOT)}
    t = time.monotonic()
    proc = subprocess.run(lifeline.command("this_module_is_never_imported"), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    assert "No module named" not in proc.stderr
    assert time.monotonic() - t < 10


def test_the_lifeline_runs_the_module_with_its_arguments(tmp_path) -> None:
    script = tmp_path / "echo_args.py"
    script.write_text("import sys; print('args', sys.argv[1:])\n")
    env = lifeline.env({**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    proc = subprocess.run(lifeline.command("echo_args", "a", "--b"), env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "args ['a', '--b']" in proc.stdout


def _sigint_while_ignored_at_start(cmd: list[str], env: dict[str, str], ready: Path) -> subprocess.Popen[str]:
    """Start `cmd` with SIGINT ignored, as a parent started with `&` or nohup passes it on; SIGINT it once ready."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    _wait_for(ready.exists, timeout=30)
    proc.send_signal(signal.SIGINT)
    return proc


def test_sigint_from_the_parent_stops_the_child_even_when_the_parent_ignores_it(tmp_path) -> None:
    """The runner's forwarded Ctrl-C is its only gentle way to stop a stage: it must raise KeyboardInterrupt in
    the child even where the child inherited SIGINT ignored."""
    ready = tmp_path / "ready"
    waiter = tmp_path / "waiter.py"
    waiter.write_text(
        "import time\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    print('interrupted'); raise SystemExit(130)\n"
    )  # fmt: skip
    env = lifeline.env({**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    plain = _sigint_while_ignored_at_start([sys.executable, str(waiter)], env, ready)
    try:  # the set-up holds: without the launcher, the signal is ignored
        with pytest.raises(subprocess.TimeoutExpired):
            plain.wait(timeout=1.0)
    finally:
        plain.kill()
        plain.communicate()
    ready.unlink()
    launched = _sigint_while_ignored_at_start(lifeline.command("waiter"), env, ready)
    try:
        stdout, _ = launched.communicate(timeout=10)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode == 130
    assert "interrupted" in stdout


def test_a_parent_that_dies_later_is_noticed(tmp_path) -> None:
    """A middle process starts a lifeline child, then is SIGKILLed: the child must follow within a second."""
    child_pid = tmp_path / "child.pid"
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)\n")
    middle = (
        "import os, subprocess, sys, time\n"
        "from stages import lifeline\n"
        "subprocess.Popen(lifeline.command('sleeper'), env=lifeline.env(), start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    proc = subprocess.Popen([sys.executable, "-c", middle], env=env, cwd=ROOT)
    try:
        _wait_for(lambda: child_pid.exists() and child_pid.read_text().strip() != "", timeout=30)
        child = psutil.Process(int(child_pid.read_text()))
        proc.kill()
        proc.wait(timeout=10)
        assert not _alive_after([child], 1.0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(photos, tmp_path, gpu24, fake_table) -> None:
    out = tmp_path / "out"
    opts = RunOptions(vram="12GB", device="cpu")
    with OutputLock(out):  # another live run holds the folder
        with pytest.raises(JobError) as info:
            run_job(photos, out, opts, probe=gpu24, pipeline=FAKE, table=fake_table)
        assert info.value.exit_code == EXIT_LOCKED
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "--out" in message and "\n" not in message
        assert not (out / "job").exists()  # the refused run wrote nothing
    report = run_job(photos, out, opts, probe=gpu24, pipeline=FAKE, table=fake_table)  # free again
    assert report.ok, report.message


def test_a_second_run_is_refused_before_it_would_wait_for_gpu_memory(photos, tmp_path, gpu24, fake_table) -> None:
    # the run holding the folder may be the one holding the GPU (its reservation in the ledger): the second run
    # must not queue behind it for memory (here up to 120 s) but be refused at once, naming the holder
    Ledger(probe=gpu24).reserve(gpu24.gpus()[0], "the-first-run", "rgb", os.getpid(), 22 * GiB)
    out = tmp_path / "out"
    opts = RunOptions(vram="12GB", device="cpu", wait_for_siblings_s=120.0)
    with OutputLock(out):
        t0 = time.monotonic()
        with pytest.raises(JobError) as info:
            run_job(photos, out, opts, probe=gpu24, pipeline=FAKE, table=fake_table)
        assert info.value.exit_code == EXIT_LOCKED, str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        assert time.monotonic() - t0 < 60  # it did not wait out the 120 s
    assert not (out / "job").exists()


def test_on_a_folder_a_run_has_used_the_early_check_holds_the_lock_so_two_starting_together_cannot_both_pass(
        tmp_path) -> None:  # fmt: skip
    out = tmp_path / "out"
    with OutputLock(out):  # an earlier run used the folder: its lock file stays
        pass
    fresh = tmp_path / "fresh"
    OutputLock(fresh).acquire_if_used()  # no run used it: nothing is created, nothing held
    assert not fresh.exists()
    first, second = OutputLock(out), OutputLock(out)
    first.acquire_if_used()  # both check before either plans: the first keeps what it checked
    with pytest.raises(OutputLocked):
        second.acquire_if_used()
    first.acquire()  # after planning: held already
    first.release()
    second.acquire_if_used()
    second.release()


def test_a_run_refused_after_its_early_check_gives_the_folder_back(photos, tmp_path, gpu24, fake_table) -> None:
    out = tmp_path / "out"
    opts = RunOptions(vram="12GB", device="cpu")
    assert run_job(photos, out, opts, probe=gpu24, pipeline=FAKE, table=fake_table).ok
    with pytest.raises(JobError) as info:  # held from before planning; planning refuses a cap below every plan
        run_job(photos, out, RunOptions(vram="100MB", device="cpu"), probe=gpu24, pipeline=FAKE, table=fake_table)
    assert info.value.exit_code == EXIT_USAGE
    assert not (out / OWNER_NAME).exists()
    again = OutputLock(out)
    again.acquire_if_used()  # free again: the refused run let go of it
    again.release()


def test_two_processes_at_once_one_is_refused(photos, tmp_path) -> None:
    out = tmp_path / "out"
    first = _drive(photos, out, "rgb:sleep:1:120")
    try:
        _wait_for(JobDir(out / "job").path("rgb", "request.msgpack").exists)
        second = _drive(photos, out, "")
        stdout, stderr = second.communicate(timeout=60)
        assert second.returncode == EXIT_LOCKED, (stdout, stderr)
        assert f"pid {first.pid}" in stdout + stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.communicate()


def test_a_stage_times_its_import_from_the_launchers_note_not_psutil(monkeypatch) -> None:
    # psutil's create_time comes from the boot time in whole seconds (it read ~1 s early on the H200)
    from stages import harness

    monkeypatch.setenv(lifeline.STARTED_ENV, "1234.5")
    assert harness._process_start() == 1234.5
    assert lifeline.STARTED_ENV not in os.environ  # not handed on to a helper the stage starts
    assert harness._process_start() == psutil.Process().create_time()  # without a note: psutil's
