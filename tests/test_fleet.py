"""The fleet: layout detection, placement, the local queue over 2 simulated GPUs (real job processes on the
fake pipeline), rerun skipping, the summary files, ray-worker's commands, and a local Ray cluster."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

import cli
from orchestrator.fleet import resume
from orchestrator.fleet.capacity import Capacity, Claim
from orchestrator.fleet.placement import Slot, choose_slot, take
from orchestrator.fleet.queue import FleetOptions, run_fleet
from orchestrator.fleet.ray_worker import nvml_index, raylets
from orchestrator.fleet.subjects import detect_subjects
from orchestrator.inputs import InputError
from orchestrator.job import RunOptions
from orchestrator.probe import SIMULATED_GPUS_ENV, SimulatedGpu, SimulatedProbe
from orchestrator.testenv import TEST_PIPELINE_ENV
from tests.conftest import write_photos

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
OPTS = RunOptions(vram="8GB", device="cpu")


@pytest.fixture
def fleet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Jobs started as processes run the fake pipeline and see the same 2 simulated 24 GiB GPUs."""
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"gpus": [{"total": 24 * GiB, "name": "Sim A"}, {"total": 24 * GiB, "name": "Sim B"}]}))
    monkeypatch.setenv(TEST_PIPELINE_ENV, "tests.fakestages")
    monkeypatch.setenv(SIMULATED_GPUS_ENV, str(gpus))
    monkeypatch.setenv("UP2YOU_RUNTIME_DIR", str(tmp_path / "runtime"))  # the host ledger, if present
    return gpus


def _subjects(root: Path, names: list[str]) -> Path:
    for i, n in enumerate(names):
        write_photos(root / n, n=2 + i % 2)
    return root


def _overlaps(rows: list[dict], gpu: str) -> int:
    """The most subjects that ran at once on `gpu`, from the summary's start/end times."""
    spans = [(r["started_s"], r["ended_s"]) for r in rows if r["gpu"] == gpu and r["started_s"] is not None]
    return max((sum(1 for s, e in spans if s <= t < e) for t, _ in spans), default=0)


# --- layout ---------------------------------------------------------------------------------------
def test_layout_flat_subjects_mixed_and_excluded(tmp_path: Path) -> None:
    flat = write_photos(tmp_path / "flat")
    (flat / "notes").mkdir()  # a folder without images beside photos: still one job
    assert detect_subjects(flat) is None
    assert detect_subjects(tmp_path / "missing") is None  # the single-job path says it does not exist

    root = _subjects(tmp_path / "people", ["bob", "alice"])
    (root / ".cache").mkdir()
    (root / "empty").mkdir()  # fails on its own later, with the input message
    (root / "readme.txt").write_text("list of people")
    out = root / "out"
    write_photos(out / "alice")  # an output folder inside the input is not a subject
    subjects = detect_subjects(root, exclude=out)
    assert [s.name for s in subjects] == ["alice", "bob", "empty"]
    assert subjects[0].folder == root / "alice"

    write_photos(root, n=1)
    with pytest.raises(InputError, match=r"mixes photos \(photo_0.jpg\) with subject folders \(alice/, bob/"):
        detect_subjects(root)


def test_cli_rejects_a_mixed_folder_and_fleet_options_on_one_person(capsys, tmp_path: Path, fleet_env) -> None:
    root = _subjects(tmp_path / "people", ["alice"])
    write_photos(root, n=1)
    assert cli.main([str(root), "--device", "cpu"]) == 2
    text = capsys.readouterr().err
    assert "mixes photos" in text and "Traceback" not in text
    flat = write_photos(tmp_path / "flat")
    assert cli.main([str(flat), "--device", "cpu", "--backend", "ray"]) == 2
    assert "are for a folder of subject folders" in capsys.readouterr().err
    people = _subjects(tmp_path / "people2", ["alice"])
    assert cli.main([str(people), "--device", "cpu", "--gpus", "0,7"]) == 2
    assert "no GPU 7; present: 0, 1" in capsys.readouterr().err
    assert cli.main([str(people), "--device", "cpu", "--backend", "ray", "--gpus", "0"]) == 2
    assert "ray-worker --gpus" in capsys.readouterr().err
    assert cli.main([str(people), "--device", "cpu", "--gpu", "1"]) == 2
    assert "not --gpu" in capsys.readouterr().err


# --- placement ------------------------------------------------------------------------------------
def _slot(index: int, total_gib: float) -> Slot:
    b = int(total_gib * GiB)
    return Slot(index, f"GPU {index}", b, b, b, 0)


def _place_all(needs_gib: list[float], slots: list[Slot], jobs_per_gpu: int | None) -> list[int | None]:
    out = []
    for n in needs_gib:
        need = int(n * GiB)
        slot = choose_slot({s.index: need for s in slots}, slots, jobs_per_gpu)
        out.append(slot.index if slot else None)
        if slot:
            slots = [take(s, need) if s is slot else s for s in slots]
    return out


def test_placement_packs_a_big_gpu_spreads_and_obeys_jobs_per_gpu() -> None:
    big_small = [_slot(0, 80), _slot(1, 24)]
    # spread first (fewest running), then several side by side on the 80 GiB card while they fit
    assert _place_all([20] * 5, big_small, None) == [0, 1, 0, 0, None]
    assert _place_all([20] * 3, big_small, 1) == [0, 1, None]
    assert _place_all([30, 30], [_slot(0, 24)], None) == [None, None]  # never over a card
    # a subject that cannot plan on a GPU (absent from needs) is not placed there
    assert choose_slot({1: GiB}, big_small, None).index == 1


def test_capacity_counts_the_unreserved_part_of_running_plans_once(tmp_path: Path) -> None:
    from orchestrator.ledger import Ledger

    probe = SimulatedProbe(SimulatedGpu(80 * GiB), SimulatedGpu(24 * GiB))
    ledger = Ledger(root=tmp_path / "runtime", probe=probe)
    gpu = probe.gpus()[0]
    # job A (this process) planned a 30 GiB peak and holds a 10 GiB reservation for its current stage: the
    # ledger already counts those 10 as taken (70 available), the queue keeps the other 20 for A; job B
    # (started, nothing reserved yet) keeps its whole 5 GiB
    assert ledger.reserve(gpu, "/out/A", "rgb", os.getpid(), 10 * GiB) is not None
    claims = [Claim(0, os.getpid(), "/out/A", 30 * GiB), Claim(0, 2**22 + 12345, "/out/B", 5 * GiB)]
    slots = Capacity(probe, ledger, gpus=[0]).slots(claims)
    assert [s.index for s in slots] == [0]
    assert slots[0].ideal == 80 * GiB  # as if neither ran: what a subject plans against
    assert slots[0].headroom == 45 * GiB and slots[0].running == 2


def test_fingerprint_changes_with_the_photos_and_the_options(tmp_path: Path) -> None:
    folder = write_photos(tmp_path / "alice")
    out = tmp_path / "out"
    fp = resume.fingerprint(folder, OPTS)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"ok": True}))
    (out / resume.FLEET_RECORD).write_text(json.dumps({"fingerprint": fp}))
    assert resume.is_done(out, fp)
    assert not resume.is_done(out, resume.fingerprint(folder, RunOptions(vram="12GB", device="cpu")))
    write_photos(folder, n=4)
    assert not resume.is_done(out, resume.fingerprint(folder, OPTS))


# --- the local queue, end to end --------------------------------------------------------------------
def test_six_subjects_on_two_gpus_one_bad_then_a_rerun_skips(tmp_path: Path, fleet_env) -> None:
    names = ["ann", "ben", "cid", "dee", "eve", "fay"]
    root = _subjects(tmp_path / "subjects", names)
    (root / "cid" / "photo_0.jpg").write_bytes(b"not a jpeg")  # the bad subject
    out = tmp_path / "subjects_out"
    buf = io.StringIO()
    result = run_fleet(detect_subjects(root), out, OPTS, FleetOptions(jobs_per_gpu=2, poll_s=0.1),
                       console=Console(file=buf, width=200), live=False)  # fmt: skip
    text = buf.getvalue()
    assert result.exit_code == 1, text
    rows = {r["subject"]: r for r in result.rows}
    assert rows["cid"]["outcome"] == "failed" and "photo_0.jpg cannot be read as an image" in rows["cid"]["message"]
    good = [n for n in names if n != "cid"]
    assert all(rows[n]["outcome"] == "ok" for n in good), text
    for n in good:
        run = json.loads((out / n / "run.json").read_text())
        assert run["ok"] and run["n_photos"] == len(list((root / n).iterdir()))
        assert rows[n]["gpu"] == f"GPU {run['budget']['gpu']['index']}"
        assert (out / n / "mesh.obj").is_file()
    # spread over both GPUs, never more than --jobs-per-gpu 2 at once on one, and packed 2 side by side
    assert {rows[n]["gpu"] for n in good} == {"GPU 0", "GPU 1"}
    assert max(_overlaps(result.rows, g) for g in ("GPU 0", "GPU 1")) == 2
    assert "▶ ann on GPU" in text and "✗ cid failed" in text and "5 finished" in text

    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["subject"] for r in table] == names
    assert {r["outcome"] for r in table} == {"ok", "failed"}
    assert all(r["plan"] == "20 views, 768 px, sequential CFG" and float(r["peak_gib"]) > 0 for r in table
               if r["outcome"] == "ok")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 5, "failed": 1} and summary["jobs_per_gpu"] == 2
    assert (out / "fleet_timeline.png").stat().st_size > 10_000

    # rerun: the five finished subjects are skipped (no job starts), the bad one fails again
    buf = io.StringIO()
    again = run_fleet(detect_subjects(root), out, OPTS, FleetOptions(jobs_per_gpu=2, poll_s=0.1),
                      console=Console(file=buf, width=200), live=False)  # fmt: skip
    rows2 = {r["subject"]: r for r in again.rows}
    assert all(rows2[n]["outcome"] == "skipped" for n in good), buf.getvalue()
    assert rows2["cid"]["outcome"] == "failed" and again.exit_code == 1
    assert "▶" not in buf.getvalue()


# --- Ray ----------------------------------------------------------------------------------------------
def test_ray_worker_starts_one_raylet_per_gpu(capsys, fleet_env) -> None:
    assert cli.main(["ray-worker", "--address", "10.0.0.1:6379", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line.startswith(f"CUDA_VISIBLE_DEVICES=GPU-sim-{i} CUDA_DEVICE_ORDER=PCI_BUS_ID ray start")
        assert "--address=10.0.0.1:6379 --num-gpus=1" in line and '"vram_gib": 23.5' in line
        assert f"--dashboard-agent-listen-port={52365 + i}" in line
    r = raylets(SimulatedProbe(SimulatedGpu(80 * GiB, uuid="GPU-a")).gpus(), "h:1", cpus=16)[0]
    assert "--num-cpus=16" in r.cmd and r.env["CUDA_VISIBLE_DEVICES"] == "GPU-a"


def test_nvml_index_of_a_ray_gpu_id() -> None:
    gpus = SimulatedProbe(SimulatedGpu(GiB, uuid="GPU-a"), SimulatedGpu(GiB, uuid="GPU-b")).gpus()
    assert nvml_index(["GPU-b"], gpus) == 1
    assert nvml_index([0], gpus) == 0 and nvml_index(["1"], gpus) == 1
    assert nvml_index([], gpus) is None


def test_ray_backend_runs_subjects_on_a_local_cluster(tmp_path: Path, fleet_env, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no report to Ray's servers: loopback only
    root = _subjects(tmp_path / "subjects", ["ann", "ben"])
    ray.init(num_cpus=2, num_gpus=2, resources={"vram_gib": 47.0}, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=80 * 2**20, log_to_driver=False)  # fmt: skip
    try:
        buf = io.StringIO()
        result = run_fleet(detect_subjects(root), tmp_path / "out", OPTS, FleetOptions(backend="ray", poll_s=0.2),
                           console=Console(file=buf, width=200), live=False)  # fmt: skip
    finally:
        ray.shutdown()
    rows = {r["subject"]: r for r in result.rows}
    assert result.exit_code == 0, buf.getvalue() + json.dumps(result.rows, default=str)
    for n in ("ann", "ben"):
        assert rows[n]["outcome"] == "ok" and rows[n]["gpu"].endswith(("GPU 0", "GPU 1"))
        run = json.loads((tmp_path / "out" / n / "run.json").read_text())
        assert run["ok"] and f"GPU {run['budget']['gpu']['index']}" in rows[n]["gpu"]


def test_jobs_die_with_a_killed_fleet(tmp_path: Path, fleet_env, monkeypatch) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    monkeypatch.setenv("FAKE_RUN_S", "prep=60")
    root = _subjects(tmp_path / "subjects", ["ann", "ben"])
    out = tmp_path / "marker_out"
    fleet = subprocess.Popen([sys.executable, "-m", "cli", str(root), "--device", "cpu", "--vram", "8GB",
                              "--jobs-per-gpu", "1", "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != fleet.pid and any(str(out) in a for a in p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 60
    while not (out / "ann" / "job" / "prep" / "request.msgpack").exists():  # ann's first stage is running
        assert time.monotonic() < deadline and fleet.poll() is None, "the fleet did not start a job"
        time.sleep(0.1)
    assert ours()
    fleet.send_signal(signal.SIGKILL)
    fleet.wait()
    deadline = time.monotonic() + 15
    while ours():
        assert time.monotonic() < deadline, f"left behind: {[p.cmdline() for p in ours()]}"
        time.sleep(0.1)


def test_the_fleet_imports_neither_torch_nor_ray_and_only_ray_files_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, cli, orchestrator.fleet.queue, orchestrator.fleet.ray_worker; "
            "sys.exit(('torch' in sys.modules) + 2 * ('ray' in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or f"imported: code {proc.returncode} (1 torch, 2 ray)"
    importers = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("[!.]*/**/*.py")
                 if "tests" not in p.parts and any(line.strip().startswith(("import ray", "from ray"))
                                                   for line in p.read_text().splitlines())]  # fmt: skip
    assert importers and all(p.startswith("orchestrator/fleet/ray") for p in importers), importers


def test_job_log_follows_stages_and_waits_and_the_live_view_shows_them(tmp_path: Path) -> None:
    from orchestrator.fleet.joblog import JobLog
    from orchestrator.fleet.progress import FleetView
    from orchestrator.fleet.summary import SubjectRecord

    path = tmp_path / "fleet.log"
    path.write_text("▶ old (from an earlier run)\n")
    log = JobLog(path)
    assert log.update() == "starting"  # what was there before the job started is not this run's
    with open(path, "a") as f:
        f.write("plan: ...\n▶ rgb (20 views, 768 px, predicted 7.1 GiB) ...\n… GPU 0 has 3.0 GiB free and unre")
    assert log.update() == "rgb"
    with open(path, "a") as f:
        f.write("served, rgb needs 7.1 GiB; waiting for job bob (normal, 6.0 GiB)\n")
    assert log.update() == "rgb (waiting for memory)"
    buf = io.StringIO()
    view = FleetView(Console(file=buf, force_terminal=True, color_system=None, width=150), live=True)
    recs = [SubjectRecord("ann", tmp_path, "running", "GPU 1", plan_label="20 views", started_s=0.0,
                          activity=log.activity), SubjectRecord("ben", tmp_path), SubjectRecord("cid", tmp_path, "ok")]
    view.update(recs, 12.0)
    view.close(recs, 13.0)
    text = buf.getvalue()
    assert "ann" in text and "GPU 1" in text and "rgb (waiting for memory)" in text and "13 s" in text
    assert "1 finished (0 already done), 0 failed, 1 waiting, 1 running" in text


def test_a_subject_that_fits_no_gpu_fails_with_the_planner_reason(tmp_path: Path, fleet_env) -> None:
    fleet_env.write_text(json.dumps({"gpus": [{"total": GiB, "name": "Tiny A"}, {"total": GiB, "name": "Tiny B"}]}))
    root = _subjects(tmp_path / "subjects", ["ann"])
    result = run_fleet(detect_subjects(root), tmp_path / "out", OPTS, FleetOptions(poll_s=0.05),
                       console=Console(file=io.StringIO()), live=False)  # fmt: skip
    (row,) = result.rows
    assert result.exit_code == 1 and row["outcome"] == "failed" and row["exit_code"] == 2
    assert row["message"].startswith("--vram 8GB: ") and "below the minimum of any plan" in row["message"]
    assert not (tmp_path / "out" / "ann" / "run.json").exists()  # no job was started


def test_job_command_round_trips_through_the_cli_with_absolute_paths(capsys, tmp_path: Path, monkeypatch) -> None:
    from orchestrator.fleet.command import job_command

    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "people" / "ann")
    opts = RunOptions(vram="12GB", device="cpu", tiny=True, views=6, steps=3, thg_interval=2, max_retries=1,
                      wait_for_vram_s=90, overrides=(("mesh_iters", 5),))  # fmt: skip
    cmd = job_command(Path("people/ann"), Path("out/ann"), None, opts)
    assert cmd[1:4] == ["-m", "stages.lifeline", "cli"]
    assert cmd[4] == str(tmp_path / "people" / "ann") and cmd[cmd.index("--out") + 1] == str(tmp_path / "out" / "ann")
    assert "--gpu" not in cmd and "--gpu" in job_command(Path("a"), Path("b"), 1, opts)
    assert cli.main([*cmd[4:], "--plan", "--json"]) == 0  # every option the fleet passes is the CLI's
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["views"], plan["steps"], plan["thg_interval"], plan["mesh_iters"]) == (6, 3, 2, 5)
    real = job_command(Path("a"), Path("b"), 0, RunOptions())
    assert real[real.index("--weights") + 1] == str(tmp_path / "weights")  # the default, made absolute
