"""Waiting instead of dying: a job on a shared (simulated) GPU waits for memory that others will give back
and finishes on its full plan; our own jobs wait for each other; a wait that never ends exits 75."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestrator.job import RunOptions, run_job
from orchestrator.probe import GpuProcess, SimulatedGpu, SimulatedProbe
from stages.jobfs import JobDir
from tests.conftest import write_photos
from tests.fakestages import FAKE

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
BEST = "20 views, 768 px, batched VAE decode"


def _neighbour_during(probe: SimulatedProbe, out: Path, nbytes: int, hold_s: float | None) -> threading.Thread:
    """A foreign process takes `nbytes` once the `views` stage has its request, and gives it back hold_s after
    the job has queued for memory (a ticket in the ledger), however slow the machine."""
    from orchestrator.ledger import Ledger

    request = JobDir(out / "job").path("views", "request.msgpack")

    def neighbour() -> None:
        deadline = time.monotonic() + 120
        while not request.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.set_neighbour(0, nbytes)
        if hold_s is not None:
            led = Ledger(probe=probe)
            while not led.tickets(probe.gpus()[0].uuid) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(hold_s)
            probe.set_neighbour(0, 0)

    t = threading.Thread(target=neighbour, daemon=True)
    t.start()
    return t


def test_a_neighbour_that_gives_memory_back_is_waited_for_and_the_plan_is_kept(photos, tmp_path, fake_table,
                                                                               capsys) -> None:  # fmt: skip
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    t = _neighbour_during(probe, out, 20 * GiB, hold_s=2.0)  # 4 GiB left: no rung of rgb fits
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=60), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok, report.message
    r = report.pipeline_result
    assert r.choice.candidate.label == BEST and r.replans == []  # nothing degraded, nothing re-planned
    [wait] = r.waits
    assert wait.stage == "rgb" and wait.kind == "foreign" and wait.outcome == "admitted"
    assert 1.0 <= wait.seconds <= 30
    assert "pid 999999" in wait.holders[0] and "not ours" in wait.holders[0]
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert err.count("waiting (up to 60 s: --wait-for-vram)") == 1  # said once, not once per poll
    assert "has 4.0 GiB free and unreserved, rgb needs" in err
    assert "plus 0.2 GiB kept free; waiting" in err  # the reserve is named, so the numbers add up
    record = json.loads((out / "run.json").read_text())
    assert record["waits"][0]["stage"] == "rgb" and record["waits"][0]["seconds"] >= 1.0
    # the stage was capped at what it reserved, and the reservation is gone with the process
    rgb = next(a for a in r.attempts if a.stage == "rgb")
    assert rgb.reserved_bytes and rgb.reserved_bytes <= 12 * GiB
    assert not list((tmp_path / "runtime").glob("*.json")) or all(
        json.loads(p.read_text())["entries"] == [] for p in (tmp_path / "runtime").glob("*.json"))


def test_a_neighbour_that_stays_past_the_wait_allowed_ends_in_exit_75_without_cpu_fallback(photos, tmp_path, fake_table) -> None:
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    t = _neighbour_during(probe, out, 22 * GiB + GiB // 2, hold_s=None)  # 1.5 GiB left, for good
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=1, cpu_fallback=False),
                     probe=probe, pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.exit_code == 75
    assert "no plan fits any more" in report.message and "below the minimum of any plan" in report.message
    [wait] = report.pipeline_result.waits
    assert wait.outcome == "limit reached" and 0.8 <= wait.seconds <= 10
    assert [a.stage for a in report.pipeline_result.attempts if a.outcome == "ok"] == ["prep", "views"]


def test_sibling_jobs_wait_for_each_other_and_both_finish_on_full_quality(tmp_path) -> None:
    # one card of 12.5 GiB shared by two job processes: one rgb stage at a time fits, never two
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"gpus": [{"name": "Sim 12.5G", "uuid": "GPU-sibling", "total": "12.5GB"}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UP2YOU_SIMULATED_GPUS": str(gpus), "FAKE_RUN_S": "rgb=6"}
    jobs = []
    a_rgb = JobDir(tmp_path / "out_a" / "job").path("rgb", "request.msgpack")
    for name in ("a", "b"):
        photos = write_photos(tmp_path / f"photos_{name}")
        jobs.append(subprocess.Popen([sys.executable, "-m", "tests.fakestages.drive_shared", str(photos),
                                      str(tmp_path / f"out_{name}")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))  # fmt: skip
        deadline = time.monotonic() + 180
        while name == "a" and not a_rgb.exists():  # b starts while a's rgb holds most of the card
            assert time.monotonic() < deadline and jobs[0].poll() is None, "job a never reached rgb"
            time.sleep(0.05)
    outputs = [p.communicate(timeout=240) for p in jobs]
    for p, (stdout, stderr) in zip(jobs, outputs, strict=True):
        assert p.returncode == 0, stdout + stderr
    records = [json.loads((tmp_path / f"out_{n}" / "run.json").read_text()) for n in ("a", "b")]
    for rec in records:
        assert rec["plan"]["views"] == 20 and rec["plan"]["resolution"] == 768  # no quality lost
        assert not [d for d in rec["degradations"] if d.startswith(("views", "resolution"))]
    waits = [w for rec in records for w in rec["waits"]]
    assert all(w["kind"] == "siblings" and w["outcome"] == "admitted" for w in waits)
    # b could not even plan its full run while a's rgb held the card: it waited for a, and says so
    assert any("job out_a (rgb" in h for w in records[1]["waits"] for h in w["holders"])
    # their rgb claims could not both fit the card: one of them waited for the other
    rgb = [next(a for a in rec["attempts"] if a["stage"] == "rgb" and a["outcome"] == "ok") for rec in records]
    assert all(a["reserved_bytes"] for a in rgb)
    assert sum(a["reserved_bytes"] for a in rgb) > 12.5 * GiB - 256 * 2**20


def test_a_job_planned_while_siblings_hold_the_card_waits_for_them_instead_of_degrading(photos, fake_table,
                                                                                        gpu24) -> None:  # fmt: skip
    from orchestrator.job import plan_job
    from orchestrator.ledger import Ledger

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        led = Ledger(probe=gpu24)
        held = led.reserve(gpu24.gpus()[0], "/runs/sibling_up2you", "rgb", sibling.pid, 20 * GiB)
        assert held is not None
        # --plan never waits: it says what would be planned now (4 GiB free and unreserved)
        now = plan_job(photos, RunOptions(vram="auto", device="cpu", plan_only=True), gpu24, FAKE, fake_table)
        assert now.waits == () and now.budget.bytes < 4 * GiB and "free and unreserved" in now.budget.source
        threading.Timer(1.5, led.release, (held,)).start()  # its stage ends
        events: list[tuple[str, object]] = []
        jp = plan_job(photos, RunOptions(vram="auto", device="cpu"), gpu24, FAKE, fake_table,
                      on_event=lambda kind, payload: events.append((kind, payload)))  # fmt: skip
    finally:
        sibling.kill()
        sibling.wait()
    assert jp.choice.candidate.label == BEST and jp.choice.degradations == ()
    [wait] = jp.waits
    assert wait.stage == "plan" and wait.kind == "siblings" and wait.outcome == "admitted" and wait.seconds >= 1.0
    assert [k for k, _ in events] == ["wait"]
    assert "job sibling_up2you (rgb, 20.0 GiB)" in str(events[0][1])


def test_an_oom_while_our_other_jobs_hold_the_card_waits_for_them_and_learns_nothing(photos, tmp_path, fake_table,
                                                                                      gpu24, monkeypatch,
                                                                                      isolated_cache) -> None:  # fmt: skip
    from orchestrator.ledger import Ledger

    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:1,rgb:oom:1")  # runs 1 s, then fails as if the card were full
    out = tmp_path / "out"
    request = JobDir(out / "job").path("rgb", "request.msgpack")
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def sibling_job() -> None:  # another job's stage, admitted beside our rgb, overruns its claim
        while not request.exists():
            time.sleep(0.02)
        led = Ledger(probe=gpu24)
        held = led.reserve(gpu24.gpus()[0], "/runs/other_up2you", "normal", sibling.pid, 10 * GiB)
        assert held is not None  # 24 - 11.4 (our rgb) leaves room for it
        gpu24.set_processes(0, [GpuProcess(sibling.pid, 20 * GiB, "other job")])  # NVML: it holds 20 GiB
        failed = JobDir(out / "job").path("rgb", "error.msgpack")
        while not failed.exists():  # ... until our rgb has failed, and 2 s more
            time.sleep(0.02)
        time.sleep(2.0)
        gpu24.set_processes(0, [])
        led.release(held)

    t = threading.Thread(target=sibling_job, daemon=True)
    t.start()
    try:
        report = run_job(photos, out, RunOptions(vram="12GB", device="cpu"), probe=gpu24, pipeline=FAKE,
                         table=fake_table)  # fmt: skip
    finally:
        t.join()
        sibling.kill()
        sibling.wait()
    assert report.ok, report.message
    r = report.pipeline_result
    assert [a.outcome for a in r.attempts if a.stage == "rgb"] == ["out of GPU memory", "ok"]
    assert "our other jobs hold the rest" in r.replans[0].reason and r.replans[0].invalidated == []
    # 4 GiB left fit no rung of rgb: it waited for the sibling rather than shrink the plan, then ran it in full
    assert r.choice.candidate.label == BEST
    assert [w.kind for w in r.waits] == ["siblings"] and r.waits[0].holders == ["job other_up2you (normal, 20.0 GiB)"]
    assert not (isolated_cache / "corrections.json").exists()  # the estimate was not to blame


def test_admission_takes_a_memory_only_rung_that_fits_now_rather_than_waiting(tmp_path, fake_table, gpu24) -> None:
    from orchestrator.corrections import Corrections
    from orchestrator.ledger import Ledger
    from orchestrator.planner import Constraints, base_plan, choose_plan
    from orchestrator.runner import RunContext, Runner

    base = base_plan(Constraints(), device="cpu", profile="tiny", weights_dir="")
    choice = choose_plan(FAKE, fake_table, 3, 12 * GiB, base, Constraints())
    ctx = RunContext(JobDir(tmp_path / "job"), FAKE, fake_table, 3, "inputs", Constraints(), base, 12 * GiB,
                     Corrections("Sim 24G", "fake@v1"), probe=gpu24, gpu=gpu24.gpus()[0], ledger=Ledger(probe=gpu24),
                     job_id="me", vram_cap=12 * GiB)  # fmt: skip
    runner = Runner(ctx, choice)
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gpu24.set_neighbour(0, 16 * GiB)  # 8 GiB free: batched rgb (11.4 GiB) does not fit, sequential CFG does
        assert runner._admit(FAKE["rgb"], stage) is None
        assert runner.choice.plan.cfg_mode == "sequential" and runner.admitter.waits == []
        assert runner.replans[-1].invalidated == [] and "memory only" in runner.replans[-1].reason
        assert runner.reservation is not None and runner.reservation.nbytes < 8 * GiB
        runner._release()
        gpu24.set_neighbour(0, 0)  # the card is free again: the next stage goes back to the fastest rung
        assert runner._admit(FAKE["rgb"], stage) is None
        assert runner.choice.candidate.label == BEST
        runner._release()
    finally:
        stage.kill()
        stage.wait()
    assert ctx.ledger.entries(gpu24.gpus()[0].uuid) == []
