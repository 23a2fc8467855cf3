"""The torch-free contracts between orchestrator and stages: Plan, cache keys, job folder, OOM classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.jobfs import JobDir, atomic_path, read_msgpack, write_msgpack
from stages.plan import Plan
from stages.spec import UP2YOU


def test_plan_round_trips_through_dict() -> None:
    p = Plan(views=12, resolution=512, cfg_mode="sequential", extra=(("note", "x"),))
    assert Plan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("bad", [{"cfg_mode": "both"}, {"vae_mode": "huge"}, {"resolution": 500}, {"thg_interval": 0}])
def test_plan_rejects_unknown_knob_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        Plan(**bad)


def test_fewer_views_invalidates_apose_and_everything_after_but_not_features() -> None:
    a = UP2YOU.keys(Plan(), "photos")
    b = UP2YOU.keys(Plan(views=12), "photos")
    changed = [s for s in UP2YOU.names if a[s] != b[s]]
    assert changed == ["apose", "weights", "rgb", "normal", "mesh", "video"]


def test_memory_only_knobs_keep_every_key() -> None:
    a = UP2YOU.keys(Plan(), "photos")
    b = UP2YOU.keys(Plan(cfg_mode="sequential", vae_mode="tiled", offload="model", ref_chunk=1), "photos")
    assert a == b


def test_new_photos_invalidate_everything() -> None:
    a = UP2YOU.keys(Plan(), "photos-1")
    b = UP2YOU.keys(Plan(), "photos-2")
    assert all(a[s] != b[s] for s in UP2YOU.names)


def test_atomic_write_leaves_old_file_when_writer_dies(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_manifest_with_missing_output_is_not_done(tmp_path: Path) -> None:
    job = JobDir(tmp_path)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "rgb" / "outputs.safetensors").write_bytes(b"x")
    job.write_manifest("rgb", {"key": "k1", "outputs": ["outputs.safetensors"]})
    assert job.is_done("rgb", "k1") and not job.is_done("rgb", "k2")
    (tmp_path / "rgb" / "outputs.safetensors").unlink()
    assert not job.is_done("rgb", "k1")


def test_msgpack_round_trip(tmp_path: Path) -> None:
    write_msgpack(tmp_path / "m.msgpack", {"a": [1, 2.5, "x"], "p": Path("/tmp")})
    assert read_msgpack(tmp_path / "m.msgpack") == {"a": [1, 2.5, "x"], "p": "/tmp"}


def test_orchestrator_and_contracts_import_no_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, orchestrator, budgets\n"
        "import stages.plan, stages.spec, stages.jobfs, up2you.checkpoints\n"
        "for pkg in (orchestrator, budgets):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "import cli\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_oom_classifier_knows_every_disguise() -> None:
    torch = pytest.importorskip("torch")
    from stages.harness import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_oom(RuntimeError("Cuda error: 2[cudaErrorMemoryAllocation];"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_import_ahead_imports_what_is_installed_and_leaves_the_rest_to_run() -> None:
    import subprocess
    import sys

    code = ("import sys; from stages.harness import import_ahead; "
            "import_ahead('colorsys', 'no_such_module_up2you', 'json.tool'); "
            "print('colorsys' in sys.modules, 'json.tool' in sys.modules, 'no_such_module_up2you' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]
