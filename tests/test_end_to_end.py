"""The real UP2You stages under the real orchestrator, on CPU with tiny random weights in the released
layout: what a user gets from `up2you-budget --tiny --device cpu photos/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["segment", "features", "apose", "weights", "rgb", "normal", "mesh", "video"]


def _photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):  # a person-like cut-out with its own alpha
        im = Image.new("RGBA", (120, 180), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        d.ellipse((45, 8, 75, 38), fill=(220, 180, 150, 255))
        d.rectangle((38, 38, 82, 110), fill=(40 + 80 * i, 80, 160, 255))
        d.rectangle((42, 110, 58, 172), fill=(30, 30, 60, 255))
        d.rectangle((62, 110, 78, 172), fill=(30, 30, 60, 255))
        im.save(folder / f"photo_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", "import cli, sys; sys.exit(cli.main())", *args],
                          capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    base = tmp_path_factory.mktemp("e2e")
    photos = _photos(base / "photos")
    out = base / "out"
    env = {"UP2YOU_CACHE_DIR": str(base / "cache"), "UP2YOU_FAULTS": "rgb:oom:1"}
    proc = _cli("--tiny", "--device", "cpu", "--views", "6", str(photos), "--out", str(out), env=env)
    return photos, out, proc


@pytest.mark.slow
def test_smoke_run_delivers_mesh_views_and_video(finished: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    import imageio.v3 as iio
    import trimesh

    _, out, proc = finished
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE TEST" in proc.stderr
    glb = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(glb.vertices) > 100 and len(glb.faces) > 100
    assert len(sorted((out / "views").glob("view_*.png"))) == 6
    assert len(sorted((out / "views").glob("normal_*.png"))) == 6
    frames = iio.imread(out / "turntable.mp4", plugin="pyav") if _has_pyav() else iio.imread(out / "turntable.mp4")
    assert frames.shape[0] == 8
    assert (out / "contact_sheet.png").exists() and (out / "vram_timeline.png").exists()


@pytest.mark.slow
def test_injected_oom_in_rgb_is_retried_and_recorded(finished: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    _, out, proc = finished
    report = json.loads((out / "run.json").read_text())
    assert report["ok"] is True
    rgb_attempts = [a for a in report["attempts"] if a["stage"] == "rgb"]
    assert [a["exit_code"] for a in rgb_attempts] == [75, 0]
    # the stages before rgb ran once: the retry did not redo them
    assert all(sum(a["stage"] == s for a in report["attempts"]) == 1 for s in ["segment", "features", "apose"])


@pytest.mark.slow
def test_rerun_resumes_and_recomputes_nothing(finished: tuple[Path, Path, subprocess.CompletedProcess[str]],
                                              tmp_path: Path) -> None:
    photos, out, first = finished
    assert first.returncode == 0
    before = {s: (out / "job" / s / "outputs.safetensors").stat().st_mtime_ns for s in STAGES if s != "video"}
    env = {"UP2YOU_CACHE_DIR": str(out.parent / "cache")}
    again = _cli("--tiny", "--device", "cpu", "--views", "6", str(photos), "--out", str(out), env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    after = {s: (out / "job" / s / "outputs.safetensors").stat().st_mtime_ns for s in before}
    assert before == after
    report = json.loads((out / "run.json").read_text())
    assert report["attempts"] and all(a["outcome"] == "skipped" for a in report["attempts"])


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
