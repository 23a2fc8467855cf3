"""The last rung: when a neighbour leaves less GPU memory than the smallest plan needs, that one stage runs on
the CPU (same plan, same key: nothing recomputed) and the next stage asks the GPU again; `--cpu-fallback never`
keeps exit 75 (tests/test_waiting.py); a --vram cap below every plan stays a usage error."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator import runner
from orchestrator.fleet.command import job_args
from orchestrator.inputs import EXIT_USAGE
from orchestrator.job import JobError, RunOptions, plan_job, run_job
from orchestrator.probe import SimulatedGpu, SimulatedProbe
from orchestrator.runner import child_env
from stages.jobfs import JobDir
from tests.fakestages import FAKE

GiB = 2**30
BEST = "20 views, 768 px, batched VAE decode"
SQUEEZE = 22 * GiB + GiB // 2  # of 24 GiB: 1.5 GiB left, below every plan of the fake pipeline


def _request_exists(job: JobDir, stage: str, cpu: bool = False) -> bool:
    try:
        return bool(job.read_request(stage).get("cpu_fallback")) or not cpu
    except Exception:  # not written yet (or being written)
        return False


def _neighbour(probe: SimulatedProbe, job: JobDir, arrive: str | None, leave: str) -> threading.Thread:
    """A foreign process holds SQUEEZE from the moment `arrive`'s request exists (None: from now) until
    `leave` has been handed a CPU plan: then it gives the memory back."""

    def run() -> None:
        deadline = time.monotonic() + 120
        while arrive is not None and not _request_exists(job, arrive) and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.set_neighbour(0, SQUEEZE)
        while not _request_exists(job, leave, cpu=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.set_neighbour(0, 0)

    if arrive is None:
        probe.set_neighbour(0, SQUEEZE)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _ok_attempts(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in report.pipeline_result.attempts:
        out.setdefault(a.stage, []).append(a)
    return out


def test_no_plan_fits_what_a_neighbour_left_so_that_stage_runs_on_the_cpu_and_the_next_on_the_gpu(
        photos, tmp_path, fake_table, capsys) -> None:  # fmt: skip
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    job = JobDir(out / "job")
    t = _neighbour(probe, job, arrive="views", leave="rgb")
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=1), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok and report.exit_code == 0, report.message
    r = report.pipeline_result
    attempts = _ok_attempts(report)
    assert {s: [a.outcome for a in attempts[s]] for s in FAKE.names} == {s: ["ok"] for s in FAKE.names}
    [rgb] = attempts["rgb"]
    assert "1.2 GiB free and unreserved on GPU 0 after waiting 1 s; the smallest plan needs" in rgb.cpu_fallback
    assert rgb.cpu_fallback.endswith("running rgb on the CPU (slow; nothing recomputed)")
    assert rgb.reserved_bytes is None and rgb.cap_bytes is None  # no ledger claim, no allocator cap
    # the stages before and after were admitted on the GPU (a ledger reservation each), on the same plan
    for stage in ("prep", "views", "mesh"):
        [a] = attempts[stage]
        assert a.cpu_fallback == "" and a.reserved_bytes, stage
    assert r.choice.candidate.label == BEST and r.replans == []  # nothing degraded, nothing invalidated
    # rgb's process was asked for the CPU, with the plan's knobs, and never saw the GPU it was spawned with
    request = job.read_request("rgb")
    assert request["plan"]["device"] == "cpu" and request["cap_bytes"] is None and request["cpu_fallback"]
    assert request["key"] == rgb.key == job.read_manifest("rgb")["key"]  # the key of the GPU plan: kept, not recomputed
    assert FAKE.keys(r.choice.plan.replace(device="cuda:0"), "in") == FAKE.keys(r.choice.plan, "in")
    assert child_env(probe.gpus()[0])["CUDA_VISIBLE_DEVICES"] == "GPU-sim-0"
    extras = job.read_manifest("rgb")["extras"]
    assert extras["cpu_fallback"] is True and extras["cuda_visible_devices"] == "" and not extras["cuda_initialized"]
    assert job.read_manifest("mesh")["extras"]["cpu_fallback"] is False
    # what the user sees and what run.json keeps
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("running rgb on the CPU (slow; nothing recomputed)") == 1
    record = json.loads((out / "run.json").read_text())
    assert [c["stage"] for c in record["cpu_stages"]] == ["rgb"] and record["cpu_stages"][0]["outcome"] == "ok"
    assert "rgb ran on the CPU" in record["message"]
    assert [a["cpu_fallback"] != "" for a in record["attempts"]] == [False, False, True, False]
    assert [s for s, row in record["predicted_vs_measured"].items() if row["on_cpu"]] == ["rgb"]


def test_an_oom_after_which_the_memory_stays_gone_reruns_that_stage_on_the_cpu(photos, tmp_path, fake_table,
                                                                              monkeypatch, isolated_cache) -> None:  # fmt: skip
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:1,rgb:oom:1")  # runs 1 s, then fails as if the card were full
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    job = JobDir(out / "job")
    t = _neighbour(probe, job, arrive="rgb", leave="rgb")  # takes the card while rgb runs, until rgb is on the CPU
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=1), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok, report.message
    r = report.pipeline_result
    attempts = _ok_attempts(report)
    assert [(a.outcome, bool(a.cpu_fallback)) for a in attempts["rgb"]] == [("out of GPU memory", False), ("ok", True)]
    assert "after the failure; the smallest plan needs" in attempts["rgb"][1].cpu_fallback
    [replan] = r.replans
    assert replan.invalidated == [] and "another process took memory" in replan.reason
    assert "running rgb on the CPU" in replan.reason and "budget lowered" not in replan.reason
    assert r.choice.candidate.label == BEST
    assert [len(attempts[s]) for s in ("prep", "views", "mesh")] == [1, 1, 1]  # nothing else reran
    # the budget is not left at what the neighbour allowed: mesh is admitted on the GPU with its full claim
    [mesh] = attempts["mesh"]
    assert mesh.cpu_fallback == "" and mesh.reserved_bytes and mesh.reserved_bytes > 1.5 * GiB
    assert job.read_request("rgb")["attempt"] == 2 and job.read_manifest("rgb")["extras"]["cpu_fallback"]
    assert not (isolated_cache / "corrections.json").exists()  # the estimate was not to blame


def test_planned_for_the_best_quality_when_only_the_free_memory_is_short(photos, tmp_path, fake_table) -> None:
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    job = JobDir(out / "job")
    t = _neighbour(probe, job, arrive=None, leave="prep")  # there at the start; gone once prep is on the CPU
    report = run_job(photos, out, RunOptions(vram="auto", device="cpu", wait_for_vram_s=1), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok, report.message
    r = report.pipeline_result
    # planned for the best quality (its cheapest memory rung), not refused; no view or pixel was given up
    assert report.budget.source.startswith("auto: planned for the best quality (5.6 GiB); only 1.2 GiB usable")
    assert (r.choice.plan.views, r.choice.plan.resolution) == (20, 768)
    assert all(p.invalidated == [] for p in r.replans)
    assert [a.stage for a in r.attempts if a.cpu_fallback] == ["prep"] and r.cpu_stages == ["prep"]
    assert all(a.reserved_bytes for a in r.attempts if a.stage != "prep")


def test_plan_only_says_the_stages_would_wait_or_run_on_the_cpu_and_never_keeps_the_usage_error(
        photos, fake_table) -> None:  # fmt: skip
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    probe.set_neighbour(0, SQUEEZE)
    jp = plan_job(photos, RunOptions(vram="12GB", device="cpu", plan_only=True, wait_for_vram_s=10), probe, FAKE,
                  fake_table)  # fmt: skip
    assert jp.choice.candidate.label == BEST and jp.budget.bytes == 12 * GiB
    assert jp.budget.source.startswith("--vram 12GB; only 1.2 GiB usable on GPU 0 now, below the smallest plan")
    assert "each stage would wait for memory (--wait-for-vram 10s), then take what fits or run on the CPU" in \
           jp.budget.source
    with pytest.raises(JobError) as exc:
        plan_job(photos, RunOptions(vram="12GB", device="cpu", plan_only=True, cpu_fallback=False), probe, FAKE,
                 fake_table)  # fmt: skip
    assert exc.value.exit_code == EXIT_USAGE and "below the minimum of any plan" in str(exc.value)


def test_a_cap_below_every_plan_is_still_a_usage_error_that_names_the_minimum(photos, fake_table) -> None:
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    for neighbour in (0, SQUEEZE):  # whether or not a neighbour holds memory too
        probe.set_neighbour(0, neighbour)
        with pytest.raises(JobError) as exc:
            plan_job(photos, RunOptions(vram="1GB", device="cpu", plan_only=True), probe, FAKE, fake_table)
        assert exc.value.exit_code == EXIT_USAGE
        message = str(exc.value)
        assert message.startswith("--vram 1GB: 1.0 GiB is below the minimum of any plan (") and "use --vram " in message


def test_fleet_jobs_get_never_and_auto_is_the_default(tmp_path: Path) -> None:
    assert "--cpu-fallback" not in job_args(RunOptions())  # the default: earlier runs' fingerprints still match
    args = job_args(RunOptions(cpu_fallback=False))
    assert args[args.index("--cpu-fallback") + 1] == "never"


def test_the_option_takes_auto_or_never_and_refuses_anything_else_in_one_line(capsys, photos: Path) -> None:
    import cli

    assert cli.main(["--cpu-fallback", "sometimes", str(photos), "--device", "cpu", "--plan"]) == 2
    text = capsys.readouterr().err
    assert "--cpu-fallback" in text and "expected auto or never" in text and "Traceback" not in text
    assert cli.main(["--cpu-fallback", "never", str(photos), "--device", "cpu", "--tiny", "--plan"]) == 0


def test_a_stage_that_fits_on_a_smaller_rung_retries_on_the_gpu_though_no_whole_plan_fits(
        photos, tmp_path, fake_table, monkeypatch, isolated_cache) -> None:  # fmt: skip
    """6 views x 512: rgb needs 1.9 GiB at its smallest rung, mesh 2.5 GiB at any. A neighbour leaves 2.2 GiB
    during rgb's first attempt (which then fails): no whole plan fits, but rgb does, so rgb retries on the GPU
    on that rung; mesh, admitted in its turn, finds no rung that fits and runs on the CPU."""
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:1,rgb:oom:1")
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    job = JobDir(out / "job")
    left = int(2.2 * GiB)
    squeeze = 24 * GiB - left - 256 * 2**20  # what it leaves above the runner's reserve: 2.2 GiB

    def neighbour() -> None:
        deadline = time.monotonic() + 120
        while not _request_exists(job, "rgb") and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.set_neighbour(0, squeeze)
        while not _request_exists(job, "mesh", cpu=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.set_neighbour(0, 0)

    t = threading.Thread(target=neighbour, daemon=True)
    t.start()
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=1, views=6, resolution=512),
                     probe=probe, pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok, report.message
    attempts = _ok_attempts(report)
    first, second = attempts["rgb"]
    assert first.outcome == "out of GPU memory" and second.outcome == "ok"
    assert second.cpu_fallback == "" and second.reserved_bytes and second.reserved_bytes <= left
    assert "rgb alone fits in 2.2 GiB on a smaller memory rung" in report.pipeline_result.replans[0].reason
    [mesh] = attempts["mesh"]
    assert mesh.cpu_fallback and "running mesh on the CPU" in mesh.cpu_fallback
    assert report.pipeline_result.cpu_stages == ["mesh"]


def test_when_the_retries_are_used_up_the_stage_runs_on_the_cpu_and_stays_there_while_the_room_is_the_same(
        photos, tmp_path, fake_table, monkeypatch, isolated_cache, capsys) -> None:  # fmt: skip
    """rgb runs out of memory twice within --vram with nobody else on the GPU, so its CPU attempt is taken with all
    the room there is. Looking for the GPU every 0.1 s finds that same room: handing back would only run out again
    and throw the CPU's work away (a CI run bounced rgb GPU -> CPU -> GPU three times)."""
    monkeypatch.setattr(runner, "RECLAIM_AFTER_S", 0.2)
    monkeypatch.setattr(runner, "RECLAIM_EVERY_S", 0.1)
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:oom:2")  # attempts 1 and 2 (the GPU) fail; the third is on the CPU
    monkeypatch.setenv("FAKE_RUN_S", "rgb=3")  # ... and runs 3 s: some 28 looks for the GPU
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    report = run_job(photos, tmp_path / "out", RunOptions(vram="12GB", device="cpu", max_retries=1), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    assert report.ok, report.message
    rgb = _ok_attempts(report)["rgb"]
    assert [(a.outcome, bool(a.cpu_fallback)) for a in rgb] == [("out of GPU memory", False),
                                                                 ("out of GPU memory", False), ("ok", True)]
    assert "--max-retries 1 is used up: running rgb on the CPU" in rgb[2].cpu_fallback
    assert rgb[2].wall_s >= 3.0 and "has room again" not in capsys.readouterr().err
    assert report.pipeline_result.cpu_stages == ["rgb"]
    never = run_job(photos, tmp_path / "out2", RunOptions(vram="12GB", device="cpu", max_retries=1,
                                                         cpu_fallback=False), probe=probe, pipeline=FAKE,
                    table=fake_table)  # fmt: skip
    assert never.exit_code == 75 and "--max-retries 1 is used up" in never.message


def test_when_the_memory_comes_back_during_a_cpu_attempt_the_stage_is_handed_back_to_the_gpu(
        photos, tmp_path, fake_table, monkeypatch, isolated_cache, capsys) -> None:  # fmt: skip

    monkeypatch.setattr(runner, "RECLAIM_AFTER_S", 0.5)
    monkeypatch.setattr(runner, "RECLAIM_EVERY_S", 0.2)
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:60")  # the CPU attempt (attempt 1) would take a minute
    probe = SimulatedProbe(SimulatedGpu(24 * GiB, name="Sim 24G"))
    out = tmp_path / "out"
    job = JobDir(out / "job")
    t = _neighbour(probe, job, arrive="views", leave="rgb")  # gives the memory back once rgb is on the CPU
    began = time.monotonic()
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu", wait_for_vram_s=1), probe=probe,
                     pipeline=FAKE, table=fake_table)  # fmt: skip
    t.join()
    assert report.ok, report.message
    assert time.monotonic() - began < 45  # the minute on the CPU was not waited out
    attempts = _ok_attempts(report)
    cpu, gpu = attempts["rgb"]
    assert (cpu.outcome, bool(cpu.cpu_fallback)) == (runner.HANDED_BACK, True) and cpu.reserved_bytes is None
    assert (gpu.outcome, gpu.cpu_fallback) == ("ok", "") and gpu.reserved_bytes  # admitted: a ledger claim
    assert gpu.key == cpu.key == job.read_manifest("rgb")["key"]  # the same key: nothing else was invalidated
    assert job.read_manifest("rgb")["extras"]["cpu_fallback"] is False  # the outputs are the GPU attempt's
    assert {s: [a.outcome for a in attempts[s]] for s in FAKE.names if s != "rgb"} == {
        s: ["ok"] for s in FAKE.names if s != "rgb"}
    assert report.pipeline_result.cpu_stages == [] and "on the CPU" not in report.message
    err = " ".join(capsys.readouterr().err.split())
    assert "running rgb on the CPU (slow; nothing recomputed)" in err
    assert "rgb: GPU 0 has room again (" in err
    assert "reserved): stopping the CPU attempt and running rgb on the GPU" in err
    record = json.loads((out / "run.json").read_text())
    assert [(c["stage"], c["outcome"]) for c in record["cpu_stages"]] == [("rgb", runner.HANDED_BACK)]
