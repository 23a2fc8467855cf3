"""Stage `segment`: photos -> mattes -> upstream's canonical gray-background references at 768 px.

Reads JOB/inputs.msgpack; writes outputs.safetensors {ref_rgbs (Nr,3,768,768), ref_alphas (Nr,768,768)}
and ref_XX.png (the 1024^2 RGBA canvas, upstream's `ref_imgs/{i}.png`).
GPU use: BiRefNet alone (fp32, as upstream), one photo at a time at 1024^2; photos that already carry
an alpha never reach it. Profile full-random has no honest full-size BiRefNet (its architecture is
its remote code), so it uses the photo's own alpha or a full one and records that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from stages.harness import BadInputError, StageContext, stage_main
from stages.jobfs import shown
from stages.spec import MAX_PHOTO_PIXELS
from up2you.encoders.preprocess import PhotoError, attach_alpha, canonicalise, open_photo, reference_tensors

if TYPE_CHECKING:
    import torch

NAME = "segment"
# "No person": the matte (BiRefNet's, or the photo's own alpha) is at least half opaque on fewer than
# this fraction of the photo's pixels. A person far away in a wide shot still covers a few per cent;
# BiRefNet's mattes of empty scenes are near zero almost everywhere.
MIN_PERSON_COVERAGE = 0.005


def prepare(ctx: StageContext) -> Any:
    """BiRefNet into host memory (real/tiny) unless every photo brings its own alpha; nothing for
    full-random. Segment is the first stage: nothing hides its start-up, so it loads only what it needs."""
    if ctx.profile == "full-random" or _all_have_alpha(ctx):
        return None  # and no torch: the harness imports it only where it is needed
    return _load_matte(ctx)


def _load_matte(ctx: StageContext) -> torch.nn.Module:
    import torch

    from up2you.encoders.birefnet import load_birefnet

    return load_birefnet(ctx.ckpt("birefnet"), "cpu", torch.float32)


def _all_have_alpha(ctx: StageContext) -> bool:
    """True when the job's inputs are known and every photo keeps its own alpha (no matting needed)."""
    try:
        photos = ctx.input_photos()
        return bool(photos) and all(open_photo(p).mode == "RGBA" for p in photos)
    except (OSError, ValueError, KeyError, PhotoError):  # unknown yet or unreadable: `run` says which
        return False


def _open_all(photos: list[Path]) -> list[Image.Image]:
    images = []
    for path in photos:
        try:
            images.append(open_photo(path, MAX_PHOTO_PIXELS))
        except PhotoError as exc:
            raise BadInputError(f"{shown(path)}: {exc}; replace or remove this photo") from exc
    return images


def person_coverage(rgba: Image.Image) -> float:
    """Fraction of the photo where the alpha is at least half opaque."""
    return float((np.asarray(rgba.getchannel("A")) >= 128).mean())


def _matte(model: torch.nn.Module | None, im: Image.Image) -> torch.Tensor | np.ndarray:
    """BiRefNet's alpha for an RGB photo; a full alpha when there is no model (full-random)."""
    if model is None:
        return np.ones((im.size[1], im.size[0]), np.float32)
    import torch

    from up2you.encoders.birefnet import predict_alpha

    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return predict_alpha(model, pixels)[0]


def run(ctx: StageContext, prepared: Any) -> None:
    photos = ctx.input_photos()
    if not photos:
        raise BadInputError("inputs.msgpack: no photos; give at least one photo of the person")
    images = _open_all(photos)  # every photo decoded before the GPU is touched
    model: torch.nn.Module | None = prepared
    to_matte = sum(im.mode != "RGBA" for im in images)
    if model is None and to_matte and ctx.profile != "full-random":  # the inputs changed after prepare
        model = _load_matte(ctx)
    if model is not None and to_matte:
        model.to(ctx.use_device())  # only now a CUDA context: photos with their own alpha never need one
    rgbs, alphas = [], []
    for i, (path, im) in enumerate(zip(photos, images, strict=True)):
        source = "its own alpha" if im.mode == "RGBA" else "the matte"
        if im.mode != "RGBA":
            im = attach_alpha(im, _matte(model, im))
        coverage = person_coverage(im)
        if coverage < MIN_PERSON_COVERAGE:
            raise BadInputError(f"{shown(path)}: no person found ({source} covers {coverage:.2%} of the photo, below "
                                f"{MIN_PERSON_COVERAGE:.1%}); use a photo in which the person is clearly visible, "
                                "or remove it")  # fmt: skip
        try:
            canvas = canonicalise(im)
        except PhotoError as exc:
            raise BadInputError(f"{shown(path)}: {exc}; use a photo in which the person is clearly visible") from exc
        ctx.save_image(f"ref_{i:02d}.png", np.asarray(canvas, dtype=np.uint8))
        rgb, alpha = reference_tensors(canvas)
        rgbs.append(rgb)
        alphas.append(alpha)
    if model is not None:
        model.to("cpu")
        ctx.free_memory()
    ctx.save_tensors("outputs.safetensors", {"ref_rgbs": np.stack(rgbs), "ref_alphas": np.stack(alphas)})
    ctx.record(n_refs=len(photos), alpha_kept=len(photos) - to_matte,
               birefnet_runs=to_matte if model is not None else 0)
    if model is None and ctx.profile == "full-random":
        ctx.record(birefnet="not measured (full-random: the photo's alpha or a full alpha)")
    elif model is None:
        ctx.record(birefnet="not loaded: every photo has its own alpha")


if __name__ == "__main__":
    stage_main(NAME, run, prepare, lazy_device=True)
