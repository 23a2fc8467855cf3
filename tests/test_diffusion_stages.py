"""Stages `rgb` and `normal` run as the runner runs them: subprocesses on a job folder, tiny weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.plan import Plan
from stages.spec import EXIT_MISSING_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
N, NR, R = 2, 2, 64


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb(obj, use_bin_type=True))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    birefnet = pytest.importorskip("up2you.encoders.tiny", reason="BiRefNet tiny writer (colleague) not present")
    from up2you.diffusion.tiny import write_tiny_diffusion

    root = tmp_path_factory.mktemp("weights")
    write_tiny_diffusion(root, seed=0)
    birefnet.write_tiny_birefnet(root / "BiRefNet", seed=0)
    return root


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake upstream artifacts with the contract's names, shapes and ranges."""
    job = tmp_path_factory.mktemp("job")
    g = torch.Generator().manual_seed(0)
    save_file({"ref_rgbs": torch.rand(NR, 3, 768, 768, generator=g), "ref_alphas": torch.ones(NR, 768, 768)},
              str((job / "segment").mkdir() or job / "segment" / "outputs.safetensors"))
    save_file({"poses": torch.rand(N, 3, R, R, generator=g), "yaws": torch.tensor([0.0, 180.0])},
              str((job / "apose").mkdir() or job / "apose" / "outputs.safetensors"))
    save_file({"weight_maps": torch.rand(N, NR, 37, 37, generator=g)},
              str((job / "weights").mkdir() or job / "weights" / "outputs.safetensors"))
    _write(job / "inputs.msgpack", {"photos": [{"path": f"/x/{i}.png", "size": 1, "sha256": "0"} for i in range(NR)]})
    return job


def _run_stage(name: str, job: Path, weights: Path, **knobs) -> subprocess.CompletedProcess:
    plan = Plan(views=N, resolution=R, steps=2, device="cpu", profile="tiny", weights_dir=str(weights),
                thg_schedule="fixed", thg_interval=2, **knobs)
    _write(job / name / "request.msgpack", {"plan": plan.to_dict(), "key": f"k-{name}", "attempt": 1,
                                           "cap_bytes": None})
    return subprocess.run([sys.executable, "-m", f"stages.{name}", str(job), "--weights", str(weights),
                           "--profile", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _check_outputs(job: Path, name: str, prefix: str) -> dict:
    out = load_file(str(job / name / "outputs.safetensors"))
    assert out["images"].shape == (N, 3, R, R) and out["alphas"].shape == (N, R, R)
    assert out["images"].dtype == torch.float32 and out["alphas"].dtype == torch.float32
    for t in out.values():
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0 and torch.isfinite(t).all()
    from PIL import Image

    # the RGBA PNGs come from stages.export (the runner starts it beside the next stage), from these tensors
    proc = subprocess.run([sys.executable, "-m", "stages.export", str(job), name], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(N):
        with Image.open(job / name / f"{prefix}_{i:02d}.png") as im:
            assert im.mode == "RGBA" and im.size == (R, R)
            px = np.asarray(im)
        want = (torch.cat([out["images"][i], out["alphas"][i][None]]).permute(1, 2, 0).numpy() * 255 + 0.5)
        assert np.array_equal(px, want.astype(np.uint8))
    manifest = msgpack.unpackb((job / name / "manifest.msgpack").read_bytes(), raw=False)
    assert manifest["key"] == f"k-{name}"
    return manifest["extras"]


def test_rgb_then_normal_stage(job: Path, weights: Path) -> None:
    proc = _run_stage("rgb", job, weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extras = _check_outputs(job, "rgb", "view")
    assert extras["diffusion_nfe"] == 3 and extras["diffusion_nfe_saved"] == 1 and extras["alpha"] == "birefnet"
    assert extras["compiler"] == "held back"  # loading, sampling and matting never needed torch._dynamo
    proc = _run_stage("normal", job, weights, cfg_mode="sequential", vae_mode="tiled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _check_outputs(job, "normal", "normal")["compiler"] == "held back"


def test_missing_adapter_exits_66(job: Path, weights: Path, tmp_path: Path) -> None:
    partial = tmp_path / "w"
    (partial / "pretrained_models").mkdir(parents=True)
    (partial / "stable-diffusion-2-1-base").symlink_to(weights / "stable-diffusion-2-1-base")
    proc = _run_stage("rgb", job, partial)
    assert proc.returncode == EXIT_MISSING_WEIGHTS, proc.stderr[-2000:]
    assert "rgb_adapter.safetensors" in proc.stderr
