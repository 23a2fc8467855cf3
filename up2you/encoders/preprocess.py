"""Upstream's photo canonicalisation: any photo -> a person centred on a gray 768^2 square.

Follows `preprocess_ref_imgs` / `process_image_rgba` / `load_image` of zcai0612/UP2You
(`inference_low_gpu.py`, `up2you/utils/img_utils.py`), with PIL doing the resampling, pasting and
compositing so rounding matches:
1. open, EXIF-transpose;
2. alpha: an existing alpha channel that masks something is kept (the 20-view derivative's rule;
   upstream always re-mattes), otherwise BiRefNet's matte (quantised to 8 bits like upstream's
   `ToPILImage`);
3. crop to the alpha's bounding box (any non-zero alpha), resize the longer side to
   int(1024 * 1.85/2) = 947 px (LANCZOS), and paste it onto a transparent 1024^2 canvas centred at the
   crop centre mapped into a virtual square of the photo's longer side (clamped inside the canvas);
   the paste uses the crop as its own mask, so the canvas holds rgb*a and alpha a*a/255 (upstream quirk,
   kept: the checkpoints were trained on it);
4. composite the canvas rgb on gray 0.5 with the canvas alpha (PIL `Image.composite`);
5. resize that RGBA to 768 (PIL's default BICUBIC) and composite on gray 0.5 once more in float.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

CANVAS = 1024
RATIO = 1.85 / 2
REF_SIZE = 768
GRAY = 0.5


class PhotoError(ValueError):
    """A photo cannot be used (unreadable, or nothing to segment); the message says which and why."""


def open_photo(path: Path | str, max_pixels: int | None = None) -> Image.Image:
    """Decode fully (so truncated files fail here), EXIF-transpose; RGBA if it carries a useful alpha, else RGB.

    Any mode goes in: grey, 16-bit (scaled to 8 bits, not clipped), CMYK, palette; an animation gives
    its first frame. Above `max_pixels` (read from the header) nothing is decoded.
    """
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise PhotoError(f"{im.size[0]}x{im.size[1]} px is above the {max_pixels / 1e6:.0f} Mpx limit")
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_8bit(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else "RGB")
    except PhotoError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard fired while reading the header
        raise PhotoError(f"{str(exc).split(' exceeds')[0]} is far above the pixel limit") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PhotoError(f"cannot decode the image ({type(exc).__name__}: {exc})") from exc
    if im.mode == "RGBA" and im.getchannel("A").getextrema()[0] == 255:
        im = im.convert("RGB")  # a fully opaque alpha masks nothing: segment it like any photo
    return im


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and integer/float grey as 8-bit grey; PIL's own convert would clip everything above 255."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    top = 65535.0 if a.max() > 255 or im.mode.startswith("I;16") else 255.0
    return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def attach_alpha(rgb: Image.Image, alpha: torch.Tensor | np.ndarray) -> Image.Image:
    """RGBA from an RGB photo and a float matte (H,W) in [0,1], quantised as upstream (floor of a*255)."""
    a = np.asarray(alpha) if isinstance(alpha, np.ndarray) else alpha.detach().cpu().numpy()
    rgba = rgb.convert("RGB").copy()
    rgba.putalpha(Image.fromarray((np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L"))
    return rgba


def canonicalise(rgba: Image.Image, res: int = CANVAS, ratio: float = RATIO) -> Image.Image:
    """Steps 3-4: the person cropped, scaled and placed on a res^2 RGBA canvas over gray."""
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise PhotoError("no person found (the alpha matte is empty)")
    crop = rgba.crop(bbox)
    cw, ch = crop.size
    target = int(res * ratio)
    if cw > ch:
        nw, nh = target, int(ch * target / cw)
    else:
        nw, nh = int(cw * target / ch), target
    crop = crop.resize((nw, nh), Image.Resampling.LANCZOS)
    w, h = rgba.size
    side = max(w, h)
    cx = int(((bbox[0] + bbox[2]) / 2 + (side - w) / 2) / side * res)
    cy = int(((bbox[1] + bbox[3]) / 2 + (side - h) / 2) / side * res)
    x = max(0, min(cx - nw // 2, res - nw))
    y = max(0, min(cy - nh // 2, res - nh))
    canvas = Image.new("RGBA", (res, res), (0, 0, 0, 0))
    canvas.paste(crop, (x, y), crop)
    alpha = canvas.getchannel("A")
    gray = Image.new("RGB", (res, res), (int(GRAY * 255),) * 3)
    rgb = Image.composite(canvas.convert("RGB"), gray, alpha)
    return Image.merge("RGBA", (*rgb.split(), alpha))


def reference_tensors(canvas: Image.Image, size: int = REF_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Step 5: (3,size,size) rgb on gray in [0,1] and (size,size) alpha, float32. numpy, so segment needs no
    torch for photos with their own alpha; each float32 operation rounds as torch's does (tested)."""
    arr = np.asarray(canvas.resize((size, size)), dtype=np.float32) / np.float32(255.0)
    alpha = arr[..., 3]
    rgb = arr[..., :3] * alpha[..., None] + np.float32(GRAY) * (np.float32(1.0) - alpha[..., None])
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)), np.ascontiguousarray(alpha)
