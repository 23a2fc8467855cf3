"""Upstream's photo canonicalisation on synthetic RGBA photos: crop, 947-px longer side, placement, gray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from up2you.encoders.preprocess import PhotoError, attach_alpha, canonicalise, open_photo, reference_tensors


def _rgba(w: int, h: int, box: tuple[int, int, int, int], color=(200, 40, 40)) -> Image.Image:
    a = np.zeros((h, w, 4), np.uint8)
    a[..., :3] = (10, 200, 10)  # background colour must vanish
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1, :3] = color
    a[y0:y1, x0:x1, 3] = 255
    return Image.fromarray(a, "RGBA")


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_portrait_crop_is_scaled_to_947_and_centred_in_virtual_square() -> None:
    # 100x200 photo, person 40x100 at x 10..50, y 50..150: taller than wide -> height 947
    canvas = canonicalise(_rgba(100, 200, (10, 50, 50, 150)))
    assert canvas.size == (1024, 1024) and canvas.mode == "RGBA"
    x0, y0, x1, y1 = _bbox(np.asarray(canvas)[..., 3] > 0)
    assert y1 - y0 == 947 and abs((x1 - x0) - int(40 * 947 / 100)) <= 1
    # crop centre (30, 100) in a 200-px virtual square: x offset 50 -> (80/200, 100/200) of 1024
    cx, cy = int(80 / 200 * 1024), int(100 / 200 * 1024)
    assert abs(x0 - (cx - (x1 - x0) // 2)) <= 1
    assert y0 == max(0, min(cy - 947 // 2, 1024 - 947))


def test_landscape_crop_clamped_inside_canvas_and_gray_outside() -> None:
    canvas = canonicalise(_rgba(300, 120, (0, 10, 200, 60)))  # wider than tall, touching the left edge
    arr = np.asarray(canvas)
    x0, y0, x1, y1 = _bbox(arr[..., 3] > 0)
    assert x1 - x0 == 947 and x0 == 0  # would start left of the canvas: clamped
    outside = arr[..., 3] == 0
    assert (arr[outside][:, :3] == 127).all()  # gray 0.5 as upstream's int(0.5*255)
    inside = arr[..., 3] == 255
    assert np.abs(arr[inside][:, :3].astype(int) - (200, 40, 40)).max() <= 2  # the photo's own background gone


def test_reference_tensors_are_768_on_gray() -> None:
    rgb, alpha = reference_tensors(canonicalise(_rgba(100, 200, (10, 50, 50, 150))))
    assert tuple(rgb.shape) == (3, 768, 768) and tuple(alpha.shape) == (768, 768)
    assert 0.0 <= float(rgb.min()) and float(rgb.max()) <= 1.0
    assert float(alpha[0, 0]) == 0.0 and float(rgb[0, 0, 0]) == 0.5  # float composite on exactly 0.5
    assert float(alpha.max()) == 1.0


def test_reference_tensors_in_numpy_round_as_torch_did() -> None:
    """segment computes these without torch now; the bytes are those of the torch formula it replaced."""
    import torch

    canvas = canonicalise(_rgba(100, 200, (10, 50, 50, 150)))
    rgb, alpha = reference_tensors(canvas)
    arr = torch.from_numpy(np.asarray(canvas.resize((768, 768)), dtype=np.float32) / 255.0)
    a = arr[..., 3]
    want = (arr[..., :3] * a[..., None] + 0.5 * (1.0 - a[..., None])).permute(2, 0, 1).contiguous()
    assert rgb.dtype == np.float32 and rgb.tobytes() == want.numpy().tobytes()
    assert alpha.tobytes() == a.contiguous().numpy().tobytes()


def test_existing_alpha_is_kept_and_opaque_alpha_is_not(tmp_path: Path) -> None:
    _rgba(60, 80, (10, 10, 30, 70)).save(tmp_path / "cut.png")
    kept = open_photo(tmp_path / "cut.png")
    assert kept.mode == "RGBA" and kept.getchannel("A").getbbox() == (10, 10, 30, 70)
    Image.new("RGBA", (60, 80), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    assert open_photo(tmp_path / "opaque.png").mode == "RGB"  # masks nothing: goes to BiRefNet
    Image.new("RGB", (60, 80)).save(tmp_path / "plain.jpg")
    assert open_photo(tmp_path / "plain.jpg").mode == "RGB"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (60, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_photo(tmp_path / "rot.jpg").size == (30, 60)


def test_corrupt_and_empty_photos_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PhotoError, match="cannot decode"):
        open_photo(tmp_path / "bad.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])  # truncated
    with pytest.raises(PhotoError):
        open_photo(tmp_path / "cut.png")
    empty = attach_alpha(Image.new("RGB", (64, 64)), np.zeros((64, 64), np.float32))
    with pytest.raises(PhotoError, match="no person"):
        canonicalise(empty)
