"""Pre-starting several stages ahead: which ones fit in host memory, and a fake-pipeline run that does it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator import prestart
from orchestrator.job import RunOptions, run_job
from orchestrator.ledger import Ledger, LedgerError
from orchestrator.prestart import HOST_RESERVE, host_footprint, pending_growth, pick_prestarts
from orchestrator.probe import SimulatedGpu, SimulatedProbe
from stages.jobfs import JobDir
from stages.spec import UP2YOU
from tests.fakestages import FAKE

MiB, GiB = 2**20, 2**30
UPCOMING = [("weights", 1 * GiB), ("rgb", 6 * GiB), ("normal", 6 * GiB), ("mesh", 2 * GiB)]


@pytest.mark.parametrize(("available_gib", "expected"), [
    (100, ["weights", "rgb", "normal", "mesh"]),  # everything fits
    (15, ["weights", "rgb", "normal"]),  # 1 + 6 + 6 = 13 GiB fit in 15 - 2; mesh would need 2 more
    (14, ["weights", "rgb"]),  # normal does not fit, and nothing after it is pre-started before it
    (2.5, ["weights"]),
    (1, ["weights"]),  # the next stage is pre-started even in tight memory (it starts a moment later anyway)
])  # fmt: skip
def test_pick_takes_stages_in_order_while_their_footprints_fit(available_gib: float, expected: list[str]) -> None:
    assert pick_prestarts(UPCOMING, int(available_gib * GiB)) == expected


def test_pick_respects_minimum_maximum_and_reserve() -> None:
    assert pick_prestarts(UPCOMING, 1 * GiB, minimum=0) == []
    assert pick_prestarts(UPCOMING, 100 * GiB, maximum=2) == ["weights", "rgb"]
    assert pick_prestarts(UPCOMING, 100 * GiB, maximum=0) == []
    assert pick_prestarts(UPCOMING, 8 * GiB, reserve=0) == ["weights", "rgb"]
    assert pick_prestarts(UPCOMING, 8 * GiB, reserve=HOST_RESERVE) == ["weights"]
    assert pick_prestarts([], 100 * GiB) == []


def test_live_processes_still_growing_count_against_memory() -> None:
    # a process at 1 GiB of an expected 5 GiB will take 4 more; one past its estimate takes nothing more
    assert pending_growth([(1 * GiB, 5 * GiB), (3 * GiB, 2 * GiB)]) == 4 * GiB


def test_footprint_is_the_measured_peak_plus_the_files_a_real_run_reads(tmp_path: Path) -> None:
    rgb = UP2YOU["rgb"]
    assert host_footprint(rgb, "full-random", "") == prestart.MEASURED_RSS_PEAK["rgb"]
    adapter = tmp_path / "pretrained_models" / "rgb_adapter.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"\0" * 3 * MiB)
    unet = tmp_path / "stable-diffusion-2-1-base" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.parent.mkdir(parents=True)
    unet.write_bytes(b"\0" * 5 * MiB)
    assert host_footprint(rgb, "real", str(tmp_path)) == prestart.MEASURED_RSS_PEAK["rgb"] + 8 * MiB
    assert host_footprint(UP2YOU["video"], "real", str(tmp_path)) == prestart.MEASURED_RSS_PEAK["video"]
    matte = tmp_path / "BiRefNet" / "model.safetensors"  # stored fp16, run fp32: twice its size
    matte.parent.mkdir()
    matte.write_bytes(b"\0" * 1 * MiB)
    assert host_footprint(UP2YOU["segment"], "real", str(tmp_path)) == prestart.MEASURED_RSS_PEAK["segment"] + 2 * MiB


def test_two_stages_wait_ahead_in_the_memory_for_two_and_one_holds_the_gpu_at_a_time(
    photos: Path, tmp_path: Path, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # room for three 100-MiB footprints; at prep's go prep itself (just spawned) may still grow to its 100 MiB
    monkeypatch.setattr(prestart, "available_host_memory", lambda: HOST_RESERVE + 350 * MiB)
    monkeypatch.setattr(prestart, "host_footprint", lambda spec, profile, weights: 100 * MiB)
    monkeypatch.setenv(prestart.AHEAD_ENV, "3")
    monkeypatch.setenv("FAKE_RUN_S", "prep=2")
    out = tmp_path / "out"
    report = run_job(photos, out, RunOptions(vram="12GB", device="cpu"), probe=gpu24, pipeline=FAKE, table=fake_table)
    assert report.ok, report.message
    job = JobDir(out / "job")
    m = {s: job.read_manifest(s) for s in ("prep", "views", "rgb", "mesh")}
    windows = {s: m[s]["extras"]["run_window"] for s in m}
    spawned = {s: m[s]["process_started_at"] for s in m}
    # while prep ran, views AND rgb were already started (two ahead); mesh did not fit, it came at views' go
    assert spawned["views"] < windows["prep"][1] and spawned["rgb"] < windows["prep"][1]
    assert spawned["mesh"] > windows["prep"][1]
    # and each stage ran (held the "GPU") only after the one before it had finished
    order = ["prep", "views", "rgb", "mesh"]
    for a, b in zip(order, order[1:], strict=False):
        assert windows[b][0] >= windows[a][1], (a, b, windows)
    startup = json.loads((out / "run.json").read_text())["startup"]
    assert set(startup) == set(order)
    assert startup["rgb"]["hidden_s"] > 0 and all(s["not_hidden_s"] >= 0 for s in startup.values())
    assert startup["prep"]["not_hidden_s"] >= startup["prep"]["setup_after_go_s"]


def _run_with_prep_lingering(photos: Path, out: Path, vram: str, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch):
    """A fake job whose prep says `done`, then takes 3 s to exit (as a slow CUDA teardown does); and the seconds
    from the end of prep's work to the start of views' work (wall clocks of the two processes)."""
    monkeypatch.setenv("UP2YOU_FAULTS", "prep:linger:1:3")
    report = run_job(photos, out, RunOptions(vram=vram, device="cpu"), probe=gpu24, pipeline=FAKE, table=fake_table)
    assert report.ok, report.message
    assert report.pipeline_result is not None and not report.pipeline_result.replans  # the plan is kept either way
    job = JobDir(out / "job")
    gap = job.read_manifest("views")["extras"]["run_window"][0] - job.read_manifest("prep")["extras"]["run_window"][1]
    return report, gap


def test_the_next_stage_starts_at_done_while_the_last_one_is_still_exiting(
    photos: Path, tmp_path: Path, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # 12 GB holds prep (1.9 GiB) and views (2.4 GiB) side by side: views is admitted beside prep's reservation
    out = tmp_path / "out"
    report, gap = _run_with_prep_lingering(photos, out, "12GB", gpu24, fake_table, monkeypatch)
    assert gap < 2.0
    result = report.pipeline_result
    prep = next(a for a in result.attempts if a.stage == "prep")
    work_ended = JobDir(out / "job").read_manifest("prep")["extras"]["run_window"][1]
    assert prep.outcome == "ok"
    assert result.started_at + prep.started_s + prep.wall_s - work_ended < 1.5  # its wall ends at `done`, not 3 s later


def test_without_room_for_both_the_next_stage_waits_for_the_exit_and_keeps_its_plan(
    photos: Path, tmp_path: Path, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # --vram 3GB: prep needs 1.9 GiB and views 1.7 GiB, 3.6 together: views must wait until prep has exited
    # (its memory is back), and must not take a smaller rung for want of what prep still holds
    _, gap = _run_with_prep_lingering(photos, tmp_path / "out", "3GB", gpu24, fake_table, monkeypatch)
    assert gap >= 2.5


class _ListsOurProcesses(SimulatedProbe):
    """A simulated 24 GiB card on which NVML lists each of our stage processes as holding `held` bytes:
    at `done` that is what a finished stage still holds until its exit (its context)."""

    def __init__(self, held: int) -> None:
        super().__init__(SimulatedGpu(24 * GiB, name="Simulated 24G"))
        self.held = held

    def process_bytes(self, index: int, pids) -> int | None:
        return self.held if pids else None


@pytest.mark.parametrize(("held_gib", "starts_at_done"), [(0.5, True), (1.5, False)])
def test_under_a_tight_cap_the_next_stage_starts_beside_what_the_finished_one_still_holds(
    photos: Path, tmp_path: Path, fake_table, monkeypatch: pytest.MonkeyPatch, held_gib: float, starts_at_done: bool,
) -> None:  # fmt: skip
    # --vram 3GB: prep's claim (1.9 GiB) and views' need (1.7 GiB) do not fit together. At prep's `done` NVML
    # lists 0.5 GiB for it: views fits beside (2.2 GiB) and starts while prep is still exiting. With 1.5 GiB
    # listed (3.2 GiB together) it does not: it waits for the exit, as before
    probe = _ListsOurProcesses(int(held_gib * GiB))
    report, gap = _run_with_prep_lingering(photos, tmp_path / "out", "3GB", probe, fake_table, monkeypatch)
    assert (gap < 2.0) is starts_at_done, gap
    assert report.ok


def _run_watching_claims(photos: Path, tmp_path: Path, probe, fake_table, vram: str):
    """Run a fake job while a thread reads the ledger every 20 ms: (report, the job's claims at each reading)."""
    snapshots: list[list[tuple[str, int]]] = []
    stop = threading.Event()

    def watch() -> None:
        led = Ledger(tmp_path / "runtime", probe)
        while not stop.is_set():
            with contextlib.suppress(LedgerError):
                snapshots.append(sorted((e.stage, e.nbytes) for e in led.entries("GPU-sim-0")))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = run_job(photos, tmp_path / "out", RunOptions(vram=vram, device="cpu"), probe=probe, pipeline=FAKE,
                         table=fake_table)  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    return report, snapshots


def test_while_a_stage_runs_the_next_one_is_warmed_under_a_context_claim_within_the_cap(
    photos: Path, tmp_path: Path, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # --vram 3GB: views (1.69 GiB) leaves room for rgb's context (0.6 GiB) beside it; rgb (2.63 GiB) leaves none
    # for mesh's. The ledger, read while the job runs, shows that, and the claims never exceed the cap
    monkeypatch.setenv("UP2YOU_FAULTS", "views:sleep:1:2,rgb:sleep:1:2")
    report, snapshots = _run_watching_claims(photos, tmp_path, gpu24, fake_table, "3GB")
    assert report.ok, report.message
    ctx_bytes = fake_table.context_bytes
    claims = {name: next(a.reserved_bytes for a in report.pipeline_result.attempts if a.stage == name)
              for name in ("views", "rgb")}  # fmt: skip
    assert [("rgb", ctx_bytes), ("views", claims["views"])] in snapshots  # rgb warmed while views ran
    assert not any(("rgb", claims["rgb"]) in snap and ("mesh", ctx_bytes) in snap for snap in snapshots)
    assert all(sum(n for _, n in snap) <= 3 * GiB for snap in snapshots)
    assert snapshots[-1] == []  # every claim, the warm ones too, ended with the job
    assert "warm_s" in JobDir(tmp_path / "out" / "job").read_manifest("rgb")["timings"]
    assert "warm_s" not in JobDir(tmp_path / "out" / "job").read_manifest("mesh")["timings"]


def test_a_warmed_stage_whose_prepare_failed_still_says_why_at_its_turn(
    photos: Path, tmp_path: Path, gpu24, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # mesh fails while pre-starting (the disk is full) and is warmed while rgb runs: it must wait past `warm`
    # for `go` and report the failure then, not exit as if dismissed
    monkeypatch.setenv("UP2YOU_FAULTS", "rgb:sleep:1:2,mesh:enospc:1:prepare")
    report = run_job(photos, tmp_path / "out", RunOptions(vram="auto", device="cpu"), probe=gpu24, pipeline=FAKE,
                     table=fake_table)  # fmt: skip
    assert not report.ok
    mesh = [a for a in report.pipeline_result.attempts if a.stage == "mesh"]
    assert mesh and mesh[0].exit_code == 74, [(a.stage, a.outcome, a.message) for a in report.pipeline_result.attempts]
    assert "No space left" in mesh[0].message


def test_a_waiting_stage_starts_the_cuda_driver_but_makes_no_context(monkeypatch) -> None:
    import torch

    from stages import harness

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    harness._start_cuda_driver(False)
    assert calls == [1] and not torch.cuda.is_initialized()  # a device count: no context, no GPU memory
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden: nothing to start
    harness._start_cuda_driver(False)
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: 1 / 0)  # a broken driver never fails the stage
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    harness._start_cuda_driver(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    harness._start_cuda_driver(True)  # a lazy-device stage that imported torch (segment before matting)
    assert calls == [1, 1]
    monkeypatch.setattr(harness, "_torch_if_imported", lambda: None)
    harness._start_cuda_driver(True)  # one that has not (cut-outs only): no torch import, no driver
    assert calls == [1, 1]


def test_a_stage_still_exiting_counts_within_the_cap_until_it_has_exited(
    photos: Path, tmp_path: Path, fake_table, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # --vram 3GB, NVML lists 0.5 GiB for each finished process. prep lingers 4 s after `done`: views (1.7 GiB)
    # starts beside it, finishes at once, and rgb (2.63 GiB) fits only once prep has exited. Every claim of the
    # job, read from the ledger while it runs, stays within the cap; rgb keeps its plan (it waits, never degrades)
    monkeypatch.setenv("UP2YOU_FAULTS", "prep:linger:1:4")
    report, snapshots = _run_watching_claims(photos, tmp_path, _ListsOurProcesses(int(0.5 * GiB)), fake_table, "3GB")
    assert report.ok, report.message
    assert report.pipeline_result is not None and not report.pipeline_result.replans
    assert any({s for s, _ in snap} >= {"prep", "views"} for snap in snapshots)  # views started beside prep
    over = [snap for snap in snapshots if sum(n for _, n in snap) > 3 * GiB]
    assert not over, over[:3]
    job = JobDir(tmp_path / "out" / "job")
    prep_done = job.read_manifest("prep")["extras"]["run_window"][1]
    assert job.read_manifest("rgb")["extras"]["run_window"][0] - prep_done >= 3.5  # rgb waited for prep's exit
