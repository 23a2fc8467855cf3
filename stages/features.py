"""Stage `features`: DINOv2 ViT-L/14 patch tokens of every reference, then SMPL-X betas.

Reads JOB/segment (ref_rgbs); writes outputs.safetensors {ref_feats (Nr,37,37,1024) f32, betas (1,10) f32}.
GPU use, in sequence: DINOv2 in the plan's dtype (fp16 as upstream) over `plan.ref_chunk` references
at a time; DINOv2 leaves the GPU before the shape predictor (fp32, as upstream) arrives.
"""

from __future__ import annotations

import time

import torch

from stages.harness import BadInputError, StageContext, stage_main
from up2you.encoders.dinov2 import DinoV2, dinov2_vitl14, encode_patch_tokens, load_dinov2
from up2you.encoders.shape_predictor import ShapePredictor, load_shape_predictor
from up2you.meta_init import materialize, meta_parameters

NAME = "features"


def prepare(ctx: StageContext) -> tuple[DinoV2, ShapePredictor]:
    """Both models into host memory: loaded strictly from the files, or full-size random."""
    if ctx.profile == "full-random":  # shapes only (meta); `run` materialises them (up2you.meta_init)
        with meta_parameters():
            return dinov2_vitl14().eval(), ShapePredictor().eval()
    return load_dinov2(ctx.ckpt("dinov2")), load_shape_predictor(ctx.ckpt("shape_predictor"))


@torch.no_grad()
def run(ctx: StageContext, prepared: tuple[DinoV2, ShapePredictor]) -> None:
    dino, shape = prepared
    if ctx.profile == "full-random":
        t = time.time()
        materialize(dino, "cpu", seed=0, dtype=ctx.dtype)
        materialize(shape, "cpu", seed=1)
        ctx.timings["materialize_s"] = time.time() - t
    ref_rgbs = ctx.load_tensors("segment")["ref_rgbs"]
    if ref_rgbs.ndim != 4 or ref_rgbs.shape[1] != 3:
        raise BadInputError(f"segment/outputs.safetensors: ref_rgbs has shape {tuple(ref_rgbs.shape)}, "
                            "expected (Nr,3,H,W); rerun the segment stage")
    dino.to(ctx.device, ctx.dtype)
    feats = encode_patch_tokens(dino, ref_rgbs, ctx.dtype, chunk=ctx.plan.ref_chunk)
    dino.to("cpu")
    del dino
    ctx.free_memory()
    shape.to(ctx.device, torch.float32)
    betas = shape(feats[None].to(ctx.device)).reshape(1, -1).float()
    shape.to("cpu")
    ctx.save_tensors("outputs.safetensors", {"ref_feats": feats.contiguous(), "betas": betas})
    ctx.record(n_refs=int(feats.shape[0]), token_grid=int(feats.shape[1]), feat_dim=int(feats.shape[-1]),
               dinov2_dtype=str(ctx.dtype).removeprefix("torch."))


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
