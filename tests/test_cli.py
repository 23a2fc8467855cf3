"""The command line: one-line errors with exit code 2 and no traceback; --plan runs nothing."""

from pathlib import Path

import pytest
from PIL import Image

import cli
from tests.conftest import write_photos


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _one_line_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_missing_folder(capsys, tmp_path: Path) -> None:
    code, text = _run(capsys, "--vram", "12GB", str(tmp_path / "nope"), "--device", "cpu")
    assert code == 2
    assert "does not exist" in _one_line_error(text)


def test_empty_folder(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, text = _run(capsys, "--vram", "12GB", str(tmp_path / "empty"), "--device", "cpu")
    assert code == 2 and "is empty" in _one_line_error(text)


def test_folder_without_images(capsys, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "readme.txt").write_text("hi")
    code, text = _run(capsys, "--vram", "12GB", str(d), "--device", "cpu")
    assert code == 2 and "has no images" in _one_line_error(text) and "readme.txt" in text


def test_corrupt_image_is_named(capsys, tmp_path: Path) -> None:
    d = write_photos(tmp_path / "p", n=1)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, text = _run(capsys, "--vram", "12GB", str(d), "--device", "cpu")
    assert code == 65  # a photo's content is bad (EX_DATAERR), as when a stage finds it
    line = _one_line_error(text)
    assert "broken.png" in line and "re-export" in line


def test_huge_image_suggests_resizing(capsys, tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    Image.new("L", (8000, 6000)).save(d / "huge.png")
    code, text = _run(capsys, "--vram", "12GB", str(d), "--device", "cpu")
    assert code == 65
    line = _one_line_error(text)
    assert "huge.png" in line and "48.0 Mpx" in line and "resize" in line


@pytest.mark.parametrize("vram", ["12XB", "twelve", "-1GB", "0"])
def test_bad_vram_strings(capsys, photos: Path, vram: str) -> None:
    code, text = _run(capsys, "--vram", vram, str(photos), "--device", "cpu", "--plan")
    assert code == 2
    assert "--vram" in text and "12GB" in text and "Traceback" not in text


def test_budget_below_minimum_names_the_minimum(capsys, photos: Path) -> None:
    code, text = _run(capsys, "--vram", "2GB", str(photos), "--device", "cpu", "--plan")
    assert code == 2
    line = _one_line_error(text)
    assert "--vram 2GB" in line and "below the minimum" in line and "GiB" in line


def test_plan_prints_a_table_and_runs_nothing(capsys, photos: Path, tmp_path: Path) -> None:
    code, text = _run(capsys, "--vram", "12GB", str(photos), "--device", "cpu", "--plan")
    assert code == 0
    assert "rgb" in text and "predicted peak" in text and "sequential" in text
    assert not (photos.parent / f"{photos.name}_up2you").exists()
    code, text = _run(capsys, "plan", "--vram", "24GB", str(photos), "--device", "cpu", "--json")
    assert code == 0 and '"views": 20' in text


def test_non_images_are_ignored_with_a_note(capsys, photos: Path) -> None:
    (photos / "notes.txt").write_text("x")
    code, text = _run(capsys, "--vram", "12GB", str(photos), "--device", "cpu", "--plan")
    assert code == 0 and "notes.txt is not an image, ignored" in text


def test_missing_weights_are_listed_before_anything_starts(capsys, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, text = _run(capsys, "--vram", "12GB", str(photos), "--device", "cpu", "--weights", str(tmp_path / "w"),
                      "--out", str(out))  # fmt: skip
    assert code == 66
    assert "missing" in text and "huggingface.co/Co2y/UP2You" in text and "--tiny" in text
    assert not (out / "job").exists()


def test_gpus_without_nvml_says_so(capsys) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("NVML works here: this test is for machines without a GPU")
    except pynvml.NVMLError:
        pass
    code, text = _run(capsys, "gpus")
    assert code == 69 and "--device cpu" in _one_line_error(text)


def test_setup_without_cuda_says_why_it_cannot_build(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: this test is for machines without a GPU")
    code, text = _run(capsys, "setup")
    assert code == 69 and "no CUDA GPU" in text and "Traceback" not in text
