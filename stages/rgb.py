"""Stage `rgb`: N RGB views of the person from the reference photos (UP2You's image-to-multi-view).

Reads segment (ref_rgbs), apose (poses) and weights (weight_maps); writes outputs.safetensors
{images (N,3,R,R), alphas (N,R,R)} and view_XX.png (RGBA). Each target view attends to the top-K
reference tokens chosen by its weight maps. The helpers here are shared with stage `normal`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.harness import BadInputError, StageContext, stage_main
from up2you.diffusion.lean_imports import compiler_state, lean_imports
from up2you.diffusion.models import DiffusionModels, load_for_profile, materialize_models, random_sd21
from up2you.diffusion.pipeline import RGB_PROMPT, MultiViewSampler, SamplerOptions
from up2you.diffusion.prompt_cache import PromptCache

NAME = "rgb"


def quiet_libraries() -> None:
    """diffusers/transformers warn on every dtype cast and draw progress bars; stage logs stay readable."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


@dataclass
class Prepared:
    """What `prepare` puts in host memory before `go`: the diffusion models, and where BiRefNet is (None
    in full-random, which has no matting model; its files are checked here, so a missing one fails now)."""

    models: DiffusionModels
    matte_folder: Path | None

    def start_matte_load(self) -> Future[torch.nn.Module] | None:
        """Load BiRefNet in a thread while the sampler runs: it is needed only for the alphas at the end.
        In `prepare` it lengthened the start-up that must hide behind earlier stages (rgb's was not hidden),
        and it waited there on the lock that segment and normal take for the same load."""
        if self.matte_folder is None:
            return None
        from up2you.encoders.birefnet import load_birefnet

        pool = ThreadPoolExecutor(1, thread_name_prefix="birefnet-load")
        future = pool.submit(load_birefnet, self.matte_folder, "cpu", torch.float32)
        pool.shutdown(wait=False)  # the load goes on; the pool takes no more work
        return future


def load_models(ctx: StageContext, adapter_key: str) -> Prepared:
    """Host-memory models for the profile; a missing file raises MissingWeightsError (exit 66)."""
    with ctx.timed("import_libraries"):
        lean = lean_imports()  # before the first import of diffusers/transformers; the same model code runs
        quiet_libraries()
    ctx.record(lean_imports="; ".join(f"{k}: {', '.join(v)}" for k, v in lean.items() if v) or "off")
    if ctx.profile == "full-random":  # shapes only (meta): `sample` materialises them in `run`
        return Prepared(random_sd21(materialize=False), None)
    models = load_for_profile(ctx.profile, ctx.ckpt("sd21"), ctx.ckpt(adapter_key), ctx.timed)
    return Prepared(models, ctx.ckpt("birefnet"))


def expect(name: str, t: torch.Tensor, shape: tuple[int | None, ...], fix: str) -> None:
    """Raise BadInputError unless t has `shape` (None matches any size)."""
    ok = t.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True))
    if not ok:
        raise BadInputError(f"{name}: shape {tuple(t.shape)}, expected {shape}; {fix}")


def to_resolution(images: torch.Tensor, res: int) -> torch.Tensor:
    """Refs are stored at 768 px; bring them to the plan's resolution."""
    if images.shape[-1] == res:
        return images
    return F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False, antialias=True)


def read_poses(ctx: StageContext) -> torch.Tensor:
    p = ctx.plan
    poses = ctx.load_tensors("apose")["poses"].float()
    expect("apose/outputs.safetensors poses", poses, (p.views, 3, p.resolution, p.resolution),
           "rerun stage apose with this plan's views and resolution")
    return poses


def sample(ctx: StageContext, models: DiffusionModels, prompt: str, control: torch.Tensor,
           references: torch.Tensor, weight_maps: torch.Tensor | None) -> torch.Tensor:
    """Run the sampler with the plan's knobs and record what it did (NFE, THG refreshes, timings)."""
    if ctx.profile == "full-random":
        materialize_random(ctx, models)
    sampler = MultiViewSampler(models, ctx.device, ctx.dtype, SamplerOptions.from_plan(ctx.plan), log=ctx.log,
                               prompt_cache=PromptCache.default())
    result = sampler(prompt, control, references, weight_maps)
    ctx.record(**{f"diffusion_{k}": v for k, v in result.stats.items()})
    return result.images


def materialize_random(ctx: StageContext, models: DiffusionModels) -> None:
    """Full-random weights get host memory in the compute dtype now (the plan is known only in `run`);
    the sampler then places each module itself, as with real weights. Timed as weight loading."""
    t = time.time()
    materialize_models(models, "cpu", dtype=ctx.dtype)
    ctx.timings["materialize_s"] = time.time() - t


def finish(ctx: StageContext, images: torch.Tensor,
           matte_load: Future[torch.nn.Module] | None) -> None:
    """Alpha of every view with BiRefNet (the UNet is gone by now), then the outputs."""
    with ctx.timed("matte_wait"):  # what the background load had not finished by now
        matte = matte_load.result() if matte_load is not None else None
    with ctx.timed("matte"):
        if matte is None:
            alphas = torch.ones(images.shape[0], *images.shape[-2:])
            ctx.record(alpha="skipped in profile full-random: all ones")
        else:
            from up2you.encoders.birefnet import predict_alpha

            matte.to(ctx.device)
            alphas = predict_alpha(matte, images.to(ctx.device)).float().cpu()
            matte.to("cpu")
            ctx.free_memory()
            ctx.record(alpha="birefnet")
    with ctx.timed("write"):  # the RGBA PNGs are written from these by stages.export, beside the next stage
        ctx.save_tensors("outputs.safetensors", {"images": images.float().contiguous(), "alphas": alphas.contiguous()})
    ctx.record(compiler=compiler_state())  # "held back" unless something in the run needed torch._dynamo


def prepare(ctx: StageContext) -> Prepared:
    return load_models(ctx, "rgb_adapter")


def run(ctx: StageContext, prepared: Prepared) -> None:
    p = ctx.plan
    poses = read_poses(ctx)
    refs = ctx.load_tensors("segment")["ref_rgbs"].float()
    expect("segment/outputs.safetensors ref_rgbs", refs, (None, 3, None, None), "rerun stage segment")
    nr = refs.shape[0]
    matte_load = prepared.start_matte_load()
    weight_maps = ctx.load_tensors("weights")["weight_maps"].float()
    expect("weights/outputs.safetensors weight_maps", weight_maps, (p.views, nr, None, None),
           "rerun stage weights (one map per view and reference photo)")
    with torch.inference_mode():
        images = sample(ctx, prepared.models, RGB_PROMPT, poses, to_resolution(refs, p.resolution), weight_maps)
    finish(ctx, images, matte_load)


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
