"""--weights resolution: the given folder, $UP2YOU_WEIGHTS, ./weights, then the Hugging Face cache (local only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import cli
from orchestrator.weightfiles import HF_CACHE, resolve, verify_checkpoint, weights_record
from up2you.checkpoints import CHECKPOINTS, UP2YOU_REPO, Expected

REV = "a" * 40
ADAPTER = b"tiny rgb adapter"


def _hf_cache(root: Path, repo: str, files: dict[str, bytes], rev: str = REV) -> Path:
    """A cache laid out as huggingface_hub lays it out: blobs by hash, snapshots of symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    return root


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = _hf_cache(tmp_path / "hf-cache", UP2YOU_REPO, {CHECKPOINTS["rgb_adapter"].path: ADAPTER})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # ./weights does not exist here
    return cache


def test_found_in_the_hf_cache_through_a_folder_of_links(hf_cache: Path) -> None:
    res = resolve(None, ["rgb_adapter"])
    assert res.missing == [] and res.found["rgb_adapter"].location.label == HF_CACHE
    linked = res.root / CHECKPOINTS["rgb_adapter"].path
    assert linked.read_bytes() == ADAPTER and linked.is_symlink()
    assert str(hf_cache) in str(res.found["rgb_adapter"].path)


def test_weights_folder_wins_over_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "pretrained_models").mkdir(parents=True)
    (mine / CHECKPOINTS["rgb_adapter"].path).write_bytes(b"my own copy")
    res = resolve(mine, ["rgb_adapter"])
    assert res.found["rgb_adapter"].location.label == "--weights" and res.root == mine.resolve()
    assert (res.root / CHECKPOINTS["rgb_adapter"].path).read_bytes() == b"my own copy"


def test_env_folder_comes_before_the_cache(hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "env-weights"
    (env / "pretrained_models").mkdir(parents=True)
    (env / CHECKPOINTS["rgb_adapter"].path).write_bytes(b"env copy")
    monkeypatch.setenv("UP2YOU_WEIGHTS", str(env))
    assert resolve(None, ["rgb_adapter"]).found["rgb_adapter"].location.label == "$UP2YOU_WEIGHTS"


def test_a_folder_checkpoint_resolves_to_its_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f: f.encode() for f in CHECKPOINTS["birefnet"].required_files}
    cache = _hf_cache(tmp_path / "hf2", "ZhengPeng7/BiRefNet", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    res = resolve(None, ["birefnet"])
    assert res.found["birefnet"].path.name == REV
    assert (res.root / "BiRefNet" / "config.json").read_bytes() == b"config.json"


def test_missing_everywhere_is_one_line_with_the_fix(hf_cache: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    from tests.conftest import write_photos

    write_photos(photos)
    code = cli.main(["--vram", "12GB", str(photos), "--device", "cpu", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().err
    assert code == 66 and "Traceback" not in text
    first = next(ln for ln in text.splitlines() if ln.startswith("error:"))
    assert "missing" in first and "weights fetch --accept-smplx-license" in first and "--tiny" in first
    assert "Hugging Face cache" in first
    assert "rgb_adapter.safetensors" not in text  # that one was found in the cache
    assert "normal_adapter.safetensors" in text and not (tmp_path / "out" / "job").exists()


def test_verification_and_what_run_json_records(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.weightfiles as wf

    rel = CHECKPOINTS["rgb_adapter"].path
    monkeypatch.setitem(wf.EXPECTED, rel, Expected(len(ADAPTER), hashlib.sha256(ADAPTER).hexdigest(), "test"))
    res = resolve(None, ["rgb_adapter"])
    checks = {"rgb_adapter": verify_checkpoint("rgb_adapter", res.root)}
    assert checks["rgb_adapter"][0].ok and checks["rgb_adapter"][0].checked == "sha256"
    record = json.loads(json.dumps(weights_record(res, checks)))
    assert record["rgb_adapter"]["found_in"] == HF_CACHE
    assert record["rgb_adapter"]["files"][0]["sha256"] == hashlib.sha256(ADAPTER).hexdigest()
    monkeypatch.setitem(wf.EXPECTED, rel, Expected(len(ADAPTER), "0" * 64, "test pointer"))
    bad = verify_checkpoint("rgb_adapter", res.root)[0]
    assert not bad.ok and "expected 0000000000000000" in bad.problem and "test pointer" in bad.problem
    assert "weights fetch" in bad.problem and "\n" not in bad.problem


def test_the_new_commands_never_import_torch(hf_cache: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, orchestrator.doctor, orchestrator.fetch, orchestrator.demo, orchestrator.weightfiles as w; "
            "w.resolve(None); sys.exit(1 if 'torch' in sys.modules else 0)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "torch was imported"
