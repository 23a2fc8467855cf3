"""The host-wide GPU ledger: atomic across processes, swept when processes die, reconciled with NVML,
first come first served for waiters. Real processes (fork), real file locks, a simulated GPU."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from orchestrator import ledger as ledger_module
from orchestrator.admission import Admitter
from orchestrator.ledger import Ledger, Reservation, process_start
from orchestrator.probe import FileSimulatedProbe, GpuProcess, SimulatedGpu, SimulatedProbe

GiB = 2**30
FORK = multiprocessing.get_context("fork")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _gpu(total: int = 24 * GiB, *procs: GpuProcess) -> SimulatedProbe:
    return SimulatedProbe(SimulatedGpu(total, name="Sim", uuid="GPU-test", neighbours=list(procs)))


# --- concurrency across processes ---------------------------------------------------------------
def _reserve_at_once(root: str, barrier, results, release) -> None:  # runs in a forked child
    probe = _gpu()
    led = Ledger(Path(root), probe)
    barrier.wait()
    r = led.reserve(probe.gpus()[0], f"job-{os.getpid()}", "rgb", os.getpid(), 10 * GiB)
    results.put(r is not None)
    release.wait(30)  # hold it while the parent counts


def test_concurrent_reservers_across_processes_never_overcommit(tmp_path: Path) -> None:
    n = 6
    barrier, results, release = FORK.Barrier(n), FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=_reserve_at_once, args=(str(tmp_path), barrier, results, release)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        granted = [results.get(timeout=30) for _ in range(n)]
        # 24 GiB, six claims of 10 at the same instant: exactly two fit, whoever wins the lock
        assert granted.count(True) == 2
        probe = _gpu()
        led = Ledger(tmp_path, probe)
        assert sum(r.nbytes for r in led.entries("GPU-test")) == 20 * GiB
        assert led.available(probe.gpus()[0]) == 4 * GiB
    finally:
        release.set()
        for p in procs:
            p.join(10)
    # all holders have exited: their entries are swept, the card is whole again
    assert Ledger(tmp_path, _gpu()).entries("GPU-test") == []


def test_a_sigkilled_holder_is_swept_once_nvml_no_longer_lists_it(tmp_path: Path) -> None:
    holder = _sleeper()
    listed = GpuProcess(holder.pid, 3 * GiB, "holder")
    probe = _gpu(24 * GiB, listed)
    led = Ledger(tmp_path, probe)
    gpu = probe.gpus()[0]
    r = led.reserve(gpu, "job-a", "rgb", holder.pid, 10 * GiB)
    assert r is not None and led.available(gpu) == 24 * GiB - 3 * GiB - 7 * GiB
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # dead, but NVML still lists its memory (a context being torn down): the entry stays, owing nothing more
    assert [h.reservation.pid for h in Ledger(tmp_path, probe).view(gpu).holdings] == [holder.pid]
    assert not Ledger(tmp_path, probe).view(gpu).holdings[0].alive
    assert led.available(gpu) == 21 * GiB
    gone = _gpu()
    assert Ledger(tmp_path, gone).entries("GPU-test") == []
    assert Ledger(tmp_path, gone).available(gone.gpus()[0]) == 24 * GiB
    assert json.loads((tmp_path / "GPU-test.json").read_text())["entries"] == []


def test_a_reused_pid_with_another_start_time_is_not_the_owner(tmp_path: Path) -> None:
    probe = _gpu()
    led = Ledger(tmp_path, probe)
    started = process_start(os.getpid())
    assert started is not None
    stale = Reservation("GPU-test", "job-old", "rgb", os.getpid(), started - 1000.0, 8 * GiB, time.time())
    with led._locked("GPU-test") as state:  # an entry written by an earlier process that had our pid
        state["entries"].append(asdict(stale))
    assert led.entries("GPU-test") == []
    assert led.available(probe.gpus()[0]) == 24 * GiB


def test_nvml_used_and_reservations_are_not_counted_twice(tmp_path: Path) -> None:
    stage = _sleeper()
    try:
        # the stage has allocated 6 of its 10 GiB; a foreign process holds 2 GiB
        probe = _gpu(24 * GiB, GpuProcess(stage.pid, 6 * GiB, "stage"), GpuProcess(4242, 2 * GiB, "other"))
        led = Ledger(tmp_path, probe)
        gpu = probe.gpus()[0]
        assert gpu.free == 16 * GiB
        assert led.reserve(gpu, "job-a", "rgb", stage.pid, 10 * GiB) is not None
        view = led.view(gpu)
        assert view.available() == 16 * GiB - 4 * GiB  # only the 4 GiB not allocated yet
        assert view.available(exclude_job="job-a") == 16 * GiB
        assert view.foreign == ((4242, 2 * GiB, "other"),)
        assert view.if_siblings_finished("job-b") == 22 * GiB
        # a stage that allocated more than it reserved owes nothing more: NVML free already shows it
        over = _gpu(24 * GiB, GpuProcess(stage.pid, 12 * GiB, "stage"))
        assert Ledger(tmp_path, over).available(over.gpus()[0]) == 12 * GiB
    finally:
        stage.kill()
        stage.wait()


def test_reserve_takes_the_first_size_that_fits_and_respects_cap_and_reserve(tmp_path: Path) -> None:
    probe = _gpu(12 * GiB)
    led = Ledger(tmp_path, probe)
    gpu = probe.gpus()[0]
    r = led.reserve_first_fit(gpu, "a", "rgb", os.getpid(), [11 * GiB, 7 * GiB, 5 * GiB], keep_free=GiB // 2,
                              cap=8 * GiB)  # fmt: skip
    assert r is not None and r.nbytes == 7 * GiB  # 11 is over the cap; 7 fits 12 - 0.5 kept free
    assert led.reserve(gpu, "b", "rgb", os.getpid(), 5 * GiB, keep_free=1) is None  # 5 GiB left
    r2 = led.reserve(gpu, "b", "rgb", os.getpid(), 5 * GiB)
    assert r2 is not None and led.available(gpu) == 0
    led.release(r)
    led.release(r)  # idempotent
    assert [e.job_id for e in led.entries("GPU-test")] == ["b"]


def test_a_claim_shrinks_to_what_its_finished_process_holds_and_is_still_released(tmp_path: Path) -> None:
    probe = _gpu(12 * GiB)
    led = Ledger(tmp_path, probe)
    gpu = probe.gpus()[0]
    r = led.reserve(gpu, "a", "rgb", os.getpid(), 9 * GiB)
    assert r is not None and led.reserve(gpu, "a", "normal", os.getpid(), 4 * GiB) is None  # 3 GiB left
    small = led.shrink(r, GiB)  # rgb is done: its context is all it still holds
    assert small.nbytes == GiB and [e.nbytes for e in led.entries("GPU-test")] == [GiB]
    assert led.shrink(small, 5 * GiB).nbytes == GiB  # never raised
    nxt = led.reserve(gpu, "a", "normal", os.getpid(), 4 * GiB)
    assert nxt is not None
    led.release(small)  # found as the same claim
    assert [e.stage for e in led.entries("GPU-test")] == ["normal"]
    assert led.shrink(small, 0).nbytes == 0 and [e.stage for e in led.entries("GPU-test")] == ["normal"]  # gone stays gone


# --- waiting: first come, first served ----------------------------------------------------------
def test_waiters_are_served_in_ticket_order_and_a_large_one_does_not_starve(tmp_path: Path) -> None:
    probe = _gpu(24 * GiB)
    led = Ledger(tmp_path, probe)
    gpu = probe.gpus()[0]
    holder = led.reserve(gpu, "holder", "rgb", os.getpid(), 16 * GiB)
    assert holder is not None
    big = led.take_ticket(gpu, "big", "rgb", 20 * GiB)
    small = led.take_ticket(gpu, "small", "prep", 4 * GiB)
    assert [t.job_id for t in led.tickets("GPU-test")] == ["big", "small"]
    # 8 GiB free: the small one would fit, but the big one ahead of it is owed its 20 GiB first
    assert led.reserve(gpu, "small", "prep", os.getpid(), 4 * GiB, ticket=small) is None
    assert led.reserve(gpu, "late", "prep", os.getpid(), 2 * GiB) is None  # a newcomer queues behind both
    assert led.reserve(gpu, "big", "rgb", os.getpid(), 20 * GiB, ticket=big) is None
    led.release(holder)
    # memory is back: the small one still waits (24 - 20 set aside < 4 + nothing); the big one is served
    assert led.reserve(gpu, "small", "prep", os.getpid(), 8 * GiB, ticket=small) is None
    granted = led.reserve(gpu, "big", "rgb", os.getpid(), 20 * GiB, ticket=big)
    assert granted is not None and [t.job_id for t in led.tickets("GPU-test")] == ["small"]
    assert led.reserve(gpu, "small", "prep", os.getpid(), 4 * GiB, ticket=small) is not None
    assert led.tickets("GPU-test") == []


def test_a_ticket_whose_waiter_stops_polling_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _gpu()
    led = Ledger(tmp_path, probe)
    led.take_ticket(probe.gpus()[0], "gone", "rgb", 30 * GiB)
    monkeypatch.setattr(ledger_module, "TICKET_LEASE_S", 0.0)
    time.sleep(0.01)
    assert led.tickets("GPU-test") == []
    assert led.reserve(probe.gpus()[0], "next", "rgb", os.getpid(), 20 * GiB) is not None


def _wait_turn(spec: str, root: str, name: str, log: str) -> None:  # runs in a forked child
    probe = FileSimulatedProbe(spec)
    led = Ledger(Path(root), probe)
    adm = Admitter(led, probe.gpus()[0], name, probe=probe, wait_for_siblings_s=60)
    r = adm.admit("rgb", os.getpid(), [20 * GiB])
    t0 = time.time()
    time.sleep(0.4)
    led.release(r)
    with open(log, "a") as f:
        f.write(json.dumps([name, t0, time.time(), adm.waits[0].kind if adm.waits else None]) + "\n")


def test_one_waiter_wins_each_release_in_arrival_order_across_processes(tmp_path: Path) -> None:
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps({"gpus": [{"name": "Sim", "uuid": "GPU-file", "total": "24GB"}]}))
    probe = FileSimulatedProbe(spec)
    led = Ledger(tmp_path, probe)
    hold = led.reserve(probe.gpus()[0], "holder", "rgb", os.getpid(), 22 * GiB)
    assert hold is not None
    log = tmp_path / "order.jsonl"
    names = ["first", "second", "third"]
    procs = []
    for name in names:  # each needs (almost) the whole card: only one can hold it at a time
        p = FORK.Process(target=_wait_turn, args=(str(spec), str(tmp_path), name, str(log)))
        p.start()
        procs.append(p)
        deadline = time.monotonic() + 20
        while name not in [t.job_id for t in led.tickets("GPU-file")]:
            assert time.monotonic() < deadline, "the waiter never queued"
            time.sleep(0.05)
    led.release(hold)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r[0] for r in rows] == names  # served first come, first served
    assert all(r[3] == "siblings" for r in rows)  # they waited for ledger entries: our own jobs
    for a, b in zip(rows, rows[1:], strict=False):
        assert b[1] >= a[2] - 0.05  # no overlap: one winner per release, never two on 24 GiB
    assert led.tickets("GPU-file") == [] and led.entries("GPU-file") == []


def test_file_simulated_probe_reads_sizes_and_reports_a_bad_file(tmp_path: Path) -> None:
    from orchestrator.probe import ProbeError, default_probe

    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps({"gpus": [{"total": "16GB", "reserved": "1GB",
                                          "processes": [{"pid": 7, "used": "5GB", "name": "x"}]}]}))  # fmt: skip
    os.environ["UP2YOU_SIMULATED_GPUS"] = str(spec)
    try:
        probe = default_probe("cpu")
        assert isinstance(probe, FileSimulatedProbe)
        g = probe.gpus()[0]
        assert (g.uuid, g.total, g.free, g.used) == ("GPU-sim-0", 16 * GiB, 10 * GiB, 5 * GiB)
        assert probe.process_bytes(0, {7}) == 5 * GiB and probe.process_bytes(0, {8}) is None
    finally:
        del os.environ["UP2YOU_SIMULATED_GPUS"]
    spec.write_text("{not json")
    with pytest.raises(ProbeError, match="UP2YOU_SIMULATED_GPUS"):
        FileSimulatedProbe(spec).gpus()


def test_gpus_command_shows_reservations_and_waiters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import cli

    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps({"gpus": [{"name": "Sim 24G", "uuid": "GPU-cli", "total": "24GB"}]}))
    monkeypatch.setenv("UP2YOU_SIMULATED_GPUS", str(spec))
    probe = FileSimulatedProbe(spec)
    led = Ledger(probe=probe)  # the default root: $UP2YOU_RUNTIME_DIR of this test
    gpu = probe.gpus()[0]
    assert led.reserve(gpu, "/data/alice", "rgb", os.getpid(), 20 * GiB) is not None
    led.take_ticket(gpu, "/data/bob", "normal", 9 * GiB)
    assert cli.main(["gpus"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "alice" in out and "rgb" in out and "20.0 GiB" in out
    assert "bob" in out and "waiting #1" in out
    assert "--gpu auto would pick GPU 0 (4.0 GiB free and unreserved)" in out
    assert cli.main(["gpus", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["available_bytes"] == 4 * GiB and row["reservations"][0]["job_id"] == "/data/alice"
    assert row["waiting"][0]["stage"] == "normal"
