"""The runner end to end on the fake pipeline: real stage processes, a simulated GPU, injected faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.job import RunOptions, plan_job, run_job
from stages.jobfs import JobDir
from tests.fakestages import FAKE

ROOT = Path(__file__).resolve().parent.parent
OPTS = RunOptions(vram="12GB", device="cpu")


def _run(photos: Path, out: Path, probe, table, **opts):
    return run_job(photos, out, RunOptions(**{**OPTS.__dict__, **opts}), probe=probe, pipeline=FAKE, table=table)


def _attempts(report, stage: str) -> list:
    return [a for a in report.pipeline_result.attempts if a.stage == stage and a.outcome != "skipped"]


def _our_processes(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                out.append(p)
        except psutil.Error:
            pass
    return out


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`proc.communicate`; past the timeout, fail with the stacks of every thread of the driver (SIGUSR1)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the orchestrator did not exit within {timeout} s; its threads and stderr:\n{stderr}")


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_run_prestarts_the_next_stage_and_resumes(photos, tmp_path, gpu24, fake_table, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_RUN_S", "views=6")  # longer than a cold `import torch` here (~3-5 s)
    monkeypatch.setenv("UP2YOU_CPROFILE", "views")  # the benchmark's --cprofile: a profile beside, not an output
    out = tmp_path / "out"
    report = _run(photos, out, gpu24, fake_table)
    assert report.ok, report.message
    profile = out / "job" / "views" / "cprofile.txt"
    assert "cumulative" in profile.read_text() and "run_fake" in profile.read_text()
    assert not (out / "job" / "prep" / "cprofile.txt").exists()
    assert "cprofile.txt" not in (JobDir(out / "job").read_manifest("views") or {})["outputs"]
    ran = report.pipeline_result.attempts
    assert [a.stage for a in ran] == ["prep", "views", "rgb", "mesh"]
    views, rgb = ran[1], ran[2]
    # rgb was started when views got `go`, and was ready (imported, prepared) before views ended
    assert rgb.ready_s is not None and rgb.ready_s < views.started_s + views.wall_s
    assert rgb.hidden_startup_s > 0.5  # its import of torch (about 1-5 s here), which a stage not pre-started pays
    assert rgb.started_s >= views.started_s + views.wall_s  # but `go` came only after views exited
    record = json.loads((out / "run.json").read_text())
    assert record["overlap_saved_s"] >= rgb.hidden_startup_s
    assert record["predicted_vs_measured"]["rgb"]["measured_rss_bytes"] > 0
    assert (out / "vram_timeline.png").stat().st_size > 0
    assert {"mesh.obj", "views/view_00.png"} <= set(report.deliverables)
    assert (out / "mesh.obj").is_file() and (out / "views" / "view_19.png").is_file()
    # same OUT again: every stage is done with the same key, nothing runs
    again = _run(photos, out, gpu24, fake_table)
    assert again.ok and all(a.outcome == "skipped" for a in again.pipeline_result.attempts)


def test_oom_in_a_middle_stage_degrades_learns_and_completes(photos, tmp_path, gpu24, fake_table, monkeypatch,
                                                             isolated_cache) -> None:  # fmt: skip
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:oom:4")
    report = _run(photos, tmp_path / "out", gpu24, fake_table, max_retries=4)
    assert report.ok, report.message
    r = report.pipeline_result
    assert [a.outcome for a in _attempts(report, "rgb")] == ["out of GPU memory"] * 4 + ["ok"]
    assert len(_attempts(report, "prep")) == 1  # never rerun
    # each attempt is capped at what it reserved (its predicted need), so each OOM lifts the estimate above it
    rgb = _attempts(report, "rgb")
    assert all(a.predicted_bytes < a.reserved_bytes <= 12 * 2**30 for a in rgb)
    # the first three retries change memory-only knobs: nothing but the failed stage is recomputed
    assert [p.invalidated for p in r.replans[:3]] == [[], [], []]
    assert r.replans[0].after.endswith("sequential CFG") and r.replans[2].after.endswith("offload sequential")
    # the fourth needs fewer pixels: the per-view stage and everything after it are recomputed, prep is not
    assert r.replans[3].invalidated == ["views", "rgb", "mesh"]
    assert len(_attempts(report, "views")) == 2
    p = r.choice.plan
    assert (p.views, p.resolution, p.cfg_mode) == (20, 512, "sequential")
    assert any("re-plan after rgb" in d for d in report.to_dict()["degradations"])
    # what it learned persists for this GPU model and shapes the next plan from the start
    corrections = json.loads((isolated_cache / "corrections.json").read_text())
    assert corrections["Simulated 24G"]["fake@v1"]["rgb"]["factor"] > 2.0
    assert plan_job(photos, OPTS, gpu24, FAKE, fake_table).choice.plan.resolution == 512


def test_oom_gives_up_after_max_retries_with_every_attempt(photos, tmp_path, gpu24, fake_table, monkeypatch) -> None:
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:oom:99")  # every attempt fails, wherever it runs
    report = _run(photos, tmp_path / "out", gpu24, fake_table, max_retries=1, cpu_fallback=False)
    assert not report.ok and report.exit_code == 75
    assert "--max-retries 1" in report.message
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [a["outcome"] for a in record["attempts"] if a["stage"] == "rgb"] == ["out of GPU memory"] * 2
    assert "mesh" not in [a["stage"] for a in record["attempts"]]
    assert not _our_processes(str(tmp_path / "out"))
    # with the CPU rung (the default) the retries used up lead to one CPU attempt; when that fails too, it stops
    report = _run(photos, tmp_path / "out2", gpu24, fake_table, max_retries=1)
    assert report.exit_code == 75 and "ran out of memory on the CPU too" in report.message
    rgb = [a for a in report.pipeline_result.attempts if a.stage == "rgb"]
    assert [bool(a.cpu_fallback) for a in rgb] == [False, False, True]


def test_a_crash_stops_with_the_stage_message(photos, tmp_path, gpu24, fake_table, monkeypatch) -> None:
    monkeypatch.setenv("UP2YOU_FAULTS", "views:crash:1")
    report = _run(photos, tmp_path / "out", gpu24, fake_table)
    assert report.exit_code == 1 and "injected crash" in report.message
    assert len(_attempts(report, "views")) == 1  # a bug is not retried


def test_sigkill_mid_stage_then_rerun_resumes_with_identical_outputs(photos, tmp_path, gpu24, fake_table,
                                                                    monkeypatch) -> None:  # fmt: skip
    reference = _run(photos, tmp_path / "ref", gpu24, fake_table)
    assert reference.ok
    out = tmp_path / "out"
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:60")
    request = JobDir(out / "job").path("rgb", "request.msgpack")

    def killer() -> None:
        _wait_for(request.exists)
        time.sleep(0.3)
        for p in _our_processes("tests.fakestages.rgb"):
            if str(out) in " ".join(p.cmdline()):
                p.send_signal(signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    killed = _run(photos, out, gpu24, fake_table)
    t.join()
    assert not killed.ok and "signal 9" in killed.message
    monkeypatch.delenv("UP2YOU_FAULTS")
    resumed = _run(photos, out, gpu24, fake_table)
    assert resumed.ok
    assert {a.stage: a.outcome for a in resumed.pipeline_result.attempts} == {
        "prep": "skipped", "views": "skipped", "rgb": "ok", "mesh": "ok"}  # fmt: skip
    for stage in FAKE.names:
        a = (tmp_path / "ref" / "job" / stage / "outputs.safetensors").read_bytes()
        b = (out / "job" / stage / "outputs.safetensors").read_bytes()
        assert a == b, stage


def test_ctrl_c_to_the_orchestrator_leaves_no_child(photos, tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "UP2YOU_FAULTS": "rgb:sleep:1:120", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakestages.drive", str(photos), str(out)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(JobDir(out / "job").path("rgb", "request.msgpack").exists)
        time.sleep(0.5)
        assert _our_processes(str(out)), "the stage processes should be running"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = _communicate(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    time.sleep(0.2)
    assert not _our_processes(str(out))
    # the signal reached the running stage (while importing, or as the harness's "interrupted")
    assert "nterrupt" in (out / "job" / "rgb" / "log.txt").read_text()
    # and rgb's claim in the GPU ledger was given back, not left for a sweep
    [ledger] = (tmp_path / "runtime").glob("*.json")
    assert json.loads(ledger.read_text())["entries"] == []


@pytest.mark.parametrize("stage", ["views"])
def test_missing_stage_outputs_are_recomputed(photos, tmp_path, gpu24, fake_table, stage) -> None:
    out = tmp_path / "out"
    assert _run(photos, out, gpu24, fake_table).ok
    (out / "job" / stage / "outputs.safetensors").unlink()
    again = _run(photos, out, gpu24, fake_table)
    assert [a.stage for a in again.pipeline_result.attempts if a.outcome == "ok"] == [stage]


def test_oom_caused_by_a_neighbour_lowers_the_budget_without_learning(photos, tmp_path, gpu24, fake_table,
                                                                      monkeypatch, isolated_cache) -> None:  # fmt: skip
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:oom:1")
    out = tmp_path / "out"
    request = JobDir(out / "job").path("rgb", "request.msgpack")

    def neighbour_arrives() -> None:
        _wait_for(request.exists)
        gpu24.set_neighbour(0, 16 * 2**30)  # 8 GiB left of 24: the 12 GiB budget is no longer there

    t = threading.Thread(target=neighbour_arrives)
    t.start()
    report = _run(photos, out, gpu24, fake_table)
    t.join()
    assert report.ok, report.message
    r = report.pipeline_result
    assert "another process took memory" in r.replans[0].reason
    assert r.budget_bytes < 8 * 2**30
    assert r.choice.plan.cfg_mode == "sequential"
    assert not (isolated_cache / "corrections.json").exists()  # the estimate was not to blame


def test_too_little_disk_stops_before_any_stage(photos, tmp_path, gpu24, fake_table, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from orchestrator.job import JobError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**6, 10**6))
    out = tmp_path / "out"
    with pytest.raises(JobError) as info:
        _run(photos, out, gpu24, fake_table)
    assert info.value.exit_code == 74
    assert "not enough disk" in str(info.value) and "--out" in str(info.value)
    assert not (out / "job").exists()  # nothing started, nothing half-written


def test_full_random_runs_plan_without_weight_files_and_keep_overrides(photos, gpu24, fake_table) -> None:
    opts = RunOptions(**{**OPTS.__dict__, "full_random": True, "overrides": (("thg_schedule", "off"),)})
    plan = plan_job(photos, opts, gpu24, FAKE, fake_table).choice.plan
    assert (plan.profile, plan.weights_dir, plan.thg_schedule) == ("full-random", "", "off")
