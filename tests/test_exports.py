"""Deliverables written by stages.export beside the later stages: overlap, resume, failure, stale files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from orchestrator.job import RunOptions, run_job
from stages.export import export_stage
from stages.jobfs import JobDir
from tests.fakestages import FAKE

ROOT = Path(__file__).resolve().parent.parent
OPTS = RunOptions(vram="12GB", device="cpu")


def _run(photos: Path, out: Path, probe, table):  # noqa: ANN001
    return run_job(photos, out, OPTS, probe=probe, pipeline=FAKE, table=table)


def _view_pixels(out: Path, i: int) -> np.ndarray:
    with Image.open(out / "views" / f"view_{i:02d}.png") as im:
        assert im.mode == "RGBA"
        return np.asarray(im)


def test_views_are_exported_beside_the_next_stage_and_again_on_resume(photos, tmp_path, gpu24, fake_table,
                                                                      isolated_cache) -> None:  # fmt: skip
    out = tmp_path / "out"
    report = _run(photos, out, gpu24, fake_table)
    assert report.ok, report.message
    record = json.loads((out / "run.json").read_text())
    export = record["exports"]["stages"]["rgb"]
    mesh = next(a for a in report.pipeline_result.attempts if a.stage == "mesh")
    assert export["exit_code"] == 0 and export["started_s"] <= mesh.started_s  # started before mesh got `go`
    tensors = load_file(str(out / "job" / "rgb" / "outputs.safetensors"))
    n = tensors["images"].shape[0]
    assert sorted(p.name for p in (out / "views").glob("view_*.png")) == [f"view_{i:02d}.png" for i in range(n)]
    want = np.concatenate([tensors["images"][3], tensors["alphas"][3][None]]).transpose(1, 2, 0)
    assert np.array_equal(_view_pixels(out, 3), (want * 255 + 0.5).astype(np.uint8))
    assert "view_03.png" not in JobDir(out / "job").read_manifest("rgb")["outputs"]  # not a stage output

    # killed mid-export, in effect: a file gone and the record stale; every stage is kept, the files come back
    (out / "job" / "rgb" / "view_03.png").unlink()
    (out / "views" / "view_03.png").unlink()
    again = _run(photos, out, gpu24, fake_table)
    assert again.ok, again.message
    assert all(a.outcome == "skipped" for a in again.pipeline_result.attempts)
    assert np.array_equal(_view_pixels(out, 3), (want * 255 + 0.5).astype(np.uint8))
    assert JobDir(out / "job").is_exported("rgb")


def test_a_failed_export_fails_the_job_with_why_and_a_rerun_finishes_it(photos, tmp_path, gpu24, fake_table,
                                                                        isolated_cache, monkeypatch) -> None:  # fmt: skip
    out = tmp_path / "out"
    monkeypatch.setenv("UP2YOU_FAULTS", "export-rgb:enospc")
    report = _run(photos, out, gpu24, fake_table)
    assert not report.ok and report.exit_code == 74
    assert "deliverables of stage rgb" in report.message and "disk full" in report.message
    job = JobDir(out / "job")
    assert job.read_manifest("mesh") is not None and not job.is_exported("rgb")  # the stages after it ran
    assert not (out / "views").exists()  # no deliverables are handed out from a failed job
    monkeypatch.delenv("UP2YOU_FAULTS")
    again = _run(photos, out, gpu24, fake_table)
    assert again.ok, again.message
    assert all(a.outcome == "skipped" for a in again.pipeline_result.attempts)
    assert (out / "views" / "view_00.png").is_file()


def _finished_stage(job: JobDir, n: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 16, 16), dtype=np.float32)
    job.stage_dir("rgb").mkdir(parents=True, exist_ok=True)
    save_file({"images": images, "alphas": images[:, 0].copy()}, str(job.path("rgb", "outputs.safetensors")))
    job.write_manifest("rgb", {"stage": "rgb", "key": f"k{n}", "outputs": ["outputs.safetensors"]})


def test_an_export_removes_the_files_of_an_earlier_plan_and_its_record_follows_the_manifest(tmp_path) -> None:
    job = JobDir(tmp_path / "job")
    _finished_stage(job, 5)
    assert export_stage(job, "rgb") == [f"view_{i:02d}.png" for i in range(5)] and job.is_exported("rgb")
    _finished_stage(job, 2)  # the stage ran again with fewer views (another key)
    assert not job.is_exported("rgb")
    export_stage(job, "rgb")
    assert sorted(p.name for p in job.stage_dir("rgb").glob("view_*.png")) == ["view_00.png", "view_01.png"]
    assert job.is_exported("rgb")
    job.path("rgb", "view_01.png").write_bytes(b"not the png that was written")
    assert not job.is_exported("rgb")


def test_export_is_torch_free_and_says_what_is_missing(tmp_path) -> None:
    job = JobDir(tmp_path / "job")
    _finished_stage(job, 2)
    code = ("import sys; from stages.export import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(job.root), "rgb"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
    job.path("rgb", "outputs.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "stages.export", str(job.root), "rgb"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 65 and "outputs.safetensors is missing" in proc.stderr and "rerun" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["job"], ["job", "segment"]])
def test_export_usage(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "stages.export", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_mesh_export_writes_the_obj_text_of_one_pass_and_a_glb_with_the_same_colours(tmp_path) -> None:
    import trimesh

    from up2you.geometry.objfile import obj_text

    job = JobDir(tmp_path / "job")
    job.stage_dir("mesh").mkdir(parents=True)
    rng = np.random.default_rng(1)
    verts, colors = rng.random((1001, 3), dtype=np.float32), rng.random((1001, 3), dtype=np.float32)
    faces = rng.integers(0, 1001, (2000, 3)).astype(np.int64)
    save_file({"verts": verts, "faces": faces, "colors": colors}, str(job.path("mesh", "outputs.safetensors")))
    job.write_manifest("mesh", {"stage": "mesh", "key": "k", "outputs": ["outputs.safetensors"]})
    assert export_stage(job, "mesh") == ["mesh.obj", "mesh.glb"]
    bytes8 = (colors * 255 + 0.5).astype(np.uint8)
    assert job.path("mesh", "mesh.obj").read_text() == obj_text(verts, faces, bytes8 / 255.0)  # halves joined exactly
    glb = trimesh.load(job.path("mesh", "mesh.glb"), force="mesh", process=False)
    assert np.array_equal(glb.faces, faces) and np.allclose(glb.vertices, verts)
    assert np.array_equal(glb.visual.vertex_colors[:, :3], bytes8)
