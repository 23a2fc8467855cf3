"""apose -> mesh -> video as the runner starts them (subprocesses, CPU, tiny body, few iterations)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.jobfs import JobDir
from stages.plan import Plan
from up2you.geometry.tiny import write_tiny_body_model

ROOT = Path(__file__).resolve().parents[1]
PLAN = Plan(views=6, resolution=128, mesh_iters=6, mesh_resolution=128, video_frames=8, video_resolution=128,
            video_chunk=3, device="cpu", profile="tiny")


def _run_stage(name: str, job: Path, weights: Path) -> subprocess.CompletedProcess:
    plan = PLAN.replace(weights_dir=str(weights))
    JobDir(job).write_request(name, {"plan": plan.to_dict(), "key": f"k-{name}", "attempt": 1, "cap_bytes": None})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}", str(job), "--weights", str(weights),
                           "--profile", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _fake_views(job: Path, poses: torch.Tensor) -> None:
    """rgb/normal outputs as the diffusion stages would write them, derived from the A-pose renders."""
    alphas = ((poses - 0.5).abs().amax(1) > 1e-4).float()
    _, _, h, w = poses.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    colours = torch.stack([yy, 0.5 * torch.ones_like(yy), xx])[None].expand(poses.shape[0], -1, -1, -1)
    for stage, images in (("rgb", colours), ("normal", poses)):
        (job / stage).mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous(), "alphas": alphas}, str(job / stage / "outputs.safetensors"))


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("geom")
    weights, job = tmp / "weights", tmp / "job"
    write_tiny_body_model(weights, seed=0)
    JobDir(job).write_inputs({"photos": []})
    (job / "features").mkdir(parents=True)
    save_file({"ref_feats": torch.zeros(1, 37, 37, 1024), "betas": torch.zeros(1, 10)},
              str(job / "features" / "outputs.safetensors"))
    for name in ("apose", "mesh", "video"):
        if name == "mesh":
            _fake_views(job, load_file(str(job / "apose" / "outputs.safetensors"))["poses"])
        proc = _run_stage(name, job, weights)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert JobDir(job).read_manifest(name) is not None
        if name == "mesh":  # the runner starts its export (mesh.obj, mesh.glb) beside the video stage
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run([sys.executable, "-m", "stages.export", str(job), "mesh"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert JobDir(job).is_exported("mesh")
    return job


def test_apose_outputs(finished_job: Path) -> None:
    out = load_file(str(finished_job / "apose" / "outputs.safetensors"))
    assert out["poses"].shape == (6, 3, 128, 128)
    assert out["yaws"].tolist() == [0.0, 45.0, 90.0, 180.0, 270.0, 315.0]
    assert out["smplx_verts"].shape == (10475, 3) and out["smplx_faces"].dtype == torch.int64
    poses = out["poses"]
    assert float(poses.min()) >= 0.0 and float(poses.max()) <= 1.0
    assert torch.allclose(poses[:, :, 0, 0], torch.full((6, 3), 0.5))  # gray background in the corner
    front = poses[0]
    body = (front - 0.5).abs().amax(0) > 1e-4
    assert 0.05 < float(body.float().mean()) < 0.6
    # front view: the body faces +z, so its normals' z encoding is mostly > 0.5; the back view's < 0.5
    assert float(front[2][body].mean()) > 0.55
    back = poses[3]
    assert float(back[2][(back - 0.5).abs().amax(0) > 1e-4].mean()) < 0.45
    # head at the top of the image: the top rows are covered, near the centre column
    rows = torch.nonzero(body.any(1)).squeeze(1)
    assert rows.min() < 20 and rows.max() > 100
    assert trimesh.load(finished_job / "apose" / "smplx_mesh.obj", process=False).vertices.shape == (10475, 3)
    assert Image.open(finished_job / "apose" / "poses.png").size == (6 * 128, 128)


def test_mesh_outputs(finished_job: Path) -> None:
    out = load_file(str(finished_job / "mesh" / "outputs.safetensors"))
    v, f, c = out["verts"], out["faces"], out["colors"]
    assert v.shape[1] == 3 and f.shape[1] == 3 and c.shape == v.shape and f.dtype == torch.int64
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
    smplx = load_file(str(finished_job / "apose" / "outputs.safetensors"))["smplx_verts"]
    # back in SMPL-X metres, inside the fitted body's box. (The synthetic body is a soup of overlapping
    # closed ellipsoids; Poisson separates them at the overlaps and the largest piece, legs + pelvis,
    # is kept, so only a lower bound on the height holds here. Real SMPL-X is one surface.)
    lo, hi = smplx.min(0).values, smplx.max(0).values
    margin = 0.1 * (hi - lo)
    assert bool((v.min(0).values > lo - margin).all() and (v.max(0).values < hi + margin).all())
    assert float(v[:, 1].max() - v[:, 1].min()) > 0.25 * float(hi[1] - lo[1])
    glb = trimesh.load(finished_job / "mesh" / "mesh.glb", force="mesh", process=False)
    assert len(glb.vertices) == len(v) and len(glb.faces) == len(f)
    assert trimesh.load(finished_job / "mesh" / "mesh.obj", process=False).vertices.shape == tuple(v.shape)
    # the colour pattern (red = image row, blue = image column) reaches the mesh: red grows downwards
    top = c[v[:, 1] > v[:, 1].quantile(0.9), 0].mean()
    bottom = c[v[:, 1] < v[:, 1].quantile(0.1), 0].mean()
    assert float(bottom - top) > 0.1  # the kept component varies (see above), the direction does not
    manifest = JobDir(finished_job).read_manifest("mesh")
    assert manifest["extras"]["iterations"] == 6


def test_video_outputs(finished_job: Path) -> None:
    for name in ("turntable.mp4", "normals.mp4"):
        frames = iio.imread(finished_job / "video" / name, plugin="pyav") if _has_pyav() else _ffmpeg_frames(
            finished_job / "video" / name)
        assert frames.shape[0] == 8 and frames.shape[1:3] == (128, 128)
        assert frames[0].std() > 5  # not a blank frame
    sheet = np.asarray(Image.open(finished_job / "video" / "contact_sheet.png"))
    assert sheet.shape == (2 * 128, 6 * 128, 3)  # one row of rgb, one of normals
    first = sheet[:128, :128].astype(float)
    assert first.std() > 10  # the view, not an empty tile


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _ffmpeg_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])  # list(reader) asks len() = inf
