"""The segment, features and weights stages as the runner starts them: subprocesses on tiny weights (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.jobfs import JobDir, sha256_file
from stages.plan import Plan
from stages.spec import EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS, EXIT_NO_DEVICE, EXIT_OK
from up2you.encoders.tiny import write_tiny_encoders

REPO = Path(__file__).resolve().parents[1]
N_VIEWS = 4


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_encoders(root, seed=1)
    return root


def _photos(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 128), (128, 96), (112, 112)]):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = folder / f"photo{i}.png"
        if i == 0:  # a cut-out with its own alpha: kept, never matted
            alpha = np.zeros((h, w, 1), np.uint8)
            alpha[20:110, 30:70] = 255
            Image.fromarray(np.concatenate([arr, alpha], axis=2), "RGBA").save(path)
        else:
            Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _job(tmp: Path, photos: list[Path], weights: Path, profile: str = "tiny", device: str = "cpu") -> JobDir:
    job = JobDir(tmp / "job")
    job.root.mkdir(parents=True, exist_ok=True)
    job.write_inputs({"photos": [{"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)}
                                 for p in photos]})
    plan = Plan(views=N_VIEWS, device=device, profile=profile, weights_dir=str(weights), ref_chunk=2)
    for stage in ("segment", "features", "weights"):
        job.write_request(stage, {"plan": plan.to_dict(), "key": f"k-{stage}", "attempt": 1, "cap_bytes": None})
    return job


def _run(stage: str, job: JobDir, weights: Path, profile: str = "tiny") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", str(job.root), "--weights", str(weights),
                           "--profile", profile], cwd=REPO, capture_output=True, text=True, timeout=300)


def _fake_apose(job: JobDir) -> None:
    poses = torch.full((N_VIEWS, 3, 768, 768), 0.5)
    poses[:, :, 200:600, 300:460] = torch.rand(N_VIEWS, 3, 400, 160)
    job.path("apose", "x").parent.mkdir(parents=True, exist_ok=True)
    save_file({"poses": poses, "yaws": torch.arange(N_VIEWS, dtype=torch.float32) * 90.0},
              str(job.path("apose", "outputs.safetensors")))


def test_segment_of_cut_outs_runs_without_torch(tmp_path: Path, weights: Path) -> None:
    """Photos that bring their own alpha need no BiRefNet: segment then never imports torch (1.4-2.4 s of the
    first stage's start-up on the H200 host), and writes the bytes that the torch path writes."""
    photos = [p for p in _photos(tmp_path) if Image.open(p).mode == "RGBA"]
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    job = _job(tmp_path, photos, weights)
    env = {**os.environ, "PYTHONPATH": f"{blocker}:{REPO}"}
    r = subprocess.run([sys.executable, "-m", "stages.segment", str(job.root), "--weights", str(weights),
                        "--profile", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == EXIT_OK, r.stderr
    seg = load_file(str(job.path("segment", "outputs.safetensors")))
    assert tuple(seg["ref_rgbs"].shape) == (1, 3, 768, 768) and seg["ref_rgbs"].dtype == torch.float32
    from safetensors.torch import save  # the same tensors written through torch: the same file

    data = job.path("segment", "outputs.safetensors").read_bytes()
    assert save({k: seg[k] for k in ("ref_rgbs", "ref_alphas")}) == data
    assert job.read_manifest("segment")["extras"]["birefnet_runs"] == 0


def test_three_stages_end_to_end(tmp_path: Path, weights: Path) -> None:
    photos = _photos(tmp_path)
    job = _job(tmp_path, photos, weights)
    for stage in ("segment", "features"):
        r = _run(stage, job, weights)
        assert r.returncode == EXIT_OK, r.stderr
    seg = load_file(str(job.path("segment", "outputs.safetensors")))
    assert tuple(seg["ref_rgbs"].shape) == (3, 3, 768, 768) and seg["ref_rgbs"].dtype == torch.float32
    assert tuple(seg["ref_alphas"].shape) == (3, 768, 768) and seg["ref_alphas"].dtype == torch.float32
    assert 0 <= float(seg["ref_rgbs"].min()) and float(seg["ref_rgbs"].max()) <= 1
    assert 0 <= float(seg["ref_alphas"].min()) and float(seg["ref_alphas"].max()) == 1.0
    # photo 0 kept its own (rectangular, opaque) alpha: a binary silhouette, 947/1024 of the canvas tall
    a0 = seg["ref_alphas"][0]
    rows = torch.nonzero(a0.amax(dim=1) > 0.5)
    assert abs(int(rows.max() - rows.min() + 1) - round(947 * 768 / 1024)) <= 2
    for i in range(3):
        with Image.open(job.path("segment", f"ref_{i:02d}.png")) as im:
            assert im.mode == "RGBA" and im.size == (1024, 1024)
    manifest = job.read_manifest("segment")
    assert manifest["extras"]["alpha_kept"] == 1 and manifest["extras"]["birefnet_runs"] == 2

    feats = load_file(str(job.path("features", "outputs.safetensors")))
    assert tuple(feats["ref_feats"].shape) == (3, 37, 37, 64) and feats["ref_feats"].dtype == torch.float32
    assert tuple(feats["betas"].shape) == (1, 10) and feats["betas"].dtype == torch.float32
    assert torch.isfinite(feats["betas"]).all() and torch.isfinite(feats["ref_feats"]).all()

    _fake_apose(job)
    r = _run("weights", job, weights)
    assert r.returncode == EXIT_OK, r.stderr
    wm = load_file(str(job.path("weights", "outputs.safetensors")))["weight_maps"]
    assert tuple(wm.shape) == (N_VIEWS, 3, 37, 37) and wm.dtype == torch.float32
    assert (wm >= 0).all() and torch.isfinite(wm).all()
    outside = torch.nn.functional.interpolate(seg["ref_alphas"][:, None], size=(37, 37), mode="nearest")[:, 0] == 0
    assert (wm[:, outside] == 0).all()  # nothing outside the silhouettes
    with Image.open(job.path("weights", "weight_maps.png")) as im:
        assert im.size == (3 * 37 * 4, N_VIEWS * 37 * 4)


def test_missing_checkpoint_exits_66(tmp_path: Path, weights: Path) -> None:
    partial = tmp_path / "w"
    (partial / "pretrained_models").mkdir(parents=True)
    (partial / "pretrained_models/shape_predictor.pt").write_bytes(
        (weights / "pretrained_models/shape_predictor.pt").read_bytes())
    job = _job(tmp_path, _photos(tmp_path), partial)
    save_file({"ref_rgbs": torch.rand(2, 3, 768, 768)}, str(job.path("segment", "outputs.safetensors")))
    r = _run("features", job, partial)
    assert r.returncode == EXIT_MISSING_WEIGHTS, r.stderr
    assert "dinov2_vitl14_pretrain.pth" in job.read_error("features")["message"]
    assert _run("segment", job, partial).returncode == EXIT_MISSING_WEIGHTS


def test_corrupt_photo_exits_65(tmp_path: Path, weights: Path) -> None:
    photos = _photos(tmp_path)
    photos[1].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    job = _job(tmp_path, photos, weights)
    r = _run("segment", job, weights)
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert str(photos[1]) in job.read_error("segment")["message"]


def test_empty_cutout_exits_65(tmp_path: Path, weights: Path) -> None:
    path = tmp_path / "empty.png"
    Image.new("RGBA", (64, 64), (9, 9, 9, 0)).save(path)  # an alpha that masks everything: no person
    job = _job(tmp_path, [path], weights)
    r = _run("segment", job, weights)
    assert r.returncode == EXIT_BAD_INPUT and "no person" in job.read_error("segment")["message"]


def test_segment_with_only_cutouts_never_loads_birefnet(tmp_path: Path) -> None:
    cutout = _photos(tmp_path)[0]  # its own alpha: nothing to matte
    no_birefnet = tmp_path / "no-weights"  # a BiRefNet load would exit 66 here
    job = _job(tmp_path, [cutout], no_birefnet)
    r = _run("segment", job, no_birefnet)
    assert r.returncode == EXIT_OK, r.stderr
    extras = job.read_manifest("segment")["extras"]
    assert extras["birefnet_runs"] == 0 and "not loaded" in extras["birefnet"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows that no CUDA call is made: needs a machine without CUDA")
def test_segment_on_a_gpu_plan_touches_cuda_only_for_photos_it_must_matte(tmp_path: Path, weights: Path) -> None:
    cutout, plain = _photos(tmp_path)[:2]
    job = _job(tmp_path / "a", [cutout], weights, device="cuda:0")  # own alpha: no BiRefNet, no CUDA context
    r = _run("segment", job, weights)
    assert r.returncode == EXIT_OK, r.stderr
    assert job.read_manifest("segment")["torch_peak_allocated"] == 0
    job = _job(tmp_path / "b", [cutout, plain], weights, device="cuda:0")  # one to matte: it asks for the GPU
    r = _run("segment", job, weights)
    assert r.returncode == EXIT_NO_DEVICE, r.stderr
    assert "no CUDA GPU" in job.read_error("segment")["message"]


def test_segment_full_random_uses_photo_alpha_and_says_so(tmp_path: Path) -> None:
    job = _job(tmp_path, _photos(tmp_path), tmp_path / "none", profile="full-random")
    r = _run("segment", job, tmp_path / "none", profile="full-random")
    assert r.returncode == EXIT_OK, r.stderr
    assert "not measured" in job.read_manifest("segment")["extras"]["birefnet"]
    assert tuple(load_file(str(job.path("segment", "outputs.safetensors")))["ref_rgbs"].shape) == (3, 3, 768, 768)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_random_features_and_weights_on_gpu(tmp_path: Path) -> None:
    none = tmp_path / "none"
    job = _job(tmp_path, _photos(tmp_path), none, profile="full-random")
    plan = Plan(views=N_VIEWS, device="cuda:0", profile="full-random", weights_dir=str(none))
    for stage in ("segment", "features", "weights"):
        job.write_request(stage, {"plan": plan.to_dict(), "key": stage, "attempt": 1, "cap_bytes": None})
    _fake_apose(job)
    for stage in ("segment", "features", "weights"):
        r = _run(stage, job, none, profile="full-random")
        assert r.returncode == EXIT_OK, r.stderr
    assert tuple(load_file(str(job.path("features", "outputs.safetensors")))["ref_feats"].shape) == (3, 37, 37, 1024)
    assert job.read_manifest("features")["torch_peak_allocated"] > 600e6  # DINOv2-L fp16 weights alone
