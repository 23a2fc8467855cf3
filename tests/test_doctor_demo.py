"""`doctor` on this CPU machine says what is missing; `demo` runs the whole chain on a bare machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_gpu() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("NVML works here: these tests are for a machine without a GPU")
    except pynvml.NVMLError:
        pass


def test_doctor_names_the_missing_gpu_and_weights(no_gpu: None, capsys, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "doctor", "--out", str(tmp_path))
    text = out + err
    assert code == 1 and "Traceback" not in text
    summary = [ln for ln in text.splitlines() if ln.strip()][-1]  # the table's cells wrap; the summary does not
    assert summary.startswith("not ready") and "NVML / NVIDIA driver" in summary
    assert "weights: 10 of 10 missing" in summary and "up2you-budget demo" in summary  # what runs without them
    assert "no GPU reachable" in text


def test_doctor_json_parses_and_says_not_ready(no_gpu: None, capsys, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "doctor", "--json", "--out", str(tmp_path))
    doc = json.loads(out)
    assert code == 1 and doc["ready"] is False
    rows = {r["name"]: r for r in doc["checks"]}
    assert rows["NVML / NVIDIA driver"]["ok"] is False and rows["NVML / NVIDIA driver"]["fix"]
    missing = next(r for n, r in rows.items() if n.startswith("weights:"))
    assert missing["ok"] is False and missing["tiny"] == "skip"
    assert missing["fix"] == "up2you-budget weights fetch --accept-smplx-license"
    assert rows["ffmpeg (videos)"]["ok"] is True and rows["host RAM"]["tiny"] == "needed"


def test_weights_verbs_and_bad_options(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "weights")
    assert code == 2 and "fetch|verify|where" in err
    code, _, err = _run(capsys, "weights", "fetch", "--only", "nope")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "unknown checkpoint" in lines[0] and "sd21" in lines[0]
    code, out, _ = _run(capsys, "weights", "verify", "--json")
    assert code == 66 and len(json.loads(out)["missing"]) == 10


@pytest.mark.slow
def test_demo_on_cpu_in_a_fresh_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import cli, sys; sys.exit(cli.main())", "demo", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "up2you_demo"
    assert (out / "mesh.obj").stat().st_size > 0 and (out / "mesh.glb").is_file()
    assert len(list((out / "views").glob("view_*.png"))) == 6
    report = json.loads((out / "run.json").read_text())
    assert report["ok"] and report["smoke_test"]
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "smoke test" in last and "doctor" in last and "weights fetch" in last
    assert str(out / "mesh.obj") in proc.stderr  # where each output lies
