"""Stage `normal`: N normal maps, each conditioned on the generated RGB view of the same index.

Reads apose (poses) and rgb (images, alphas); the reference of view i is RGB view i composited on gray
0.5 with its alpha (as upstream), pixel-aligned, so no token selection. Writes outputs.safetensors
{images (N,3,R,R), alphas (N,R,R)} and normal_XX.png (RGBA).
"""

from __future__ import annotations

import torch

from stages.harness import StageContext, stage_main
from stages.rgb import Prepared, expect, finish, load_models, read_poses, sample
from up2you.diffusion.pipeline import NORMAL_PROMPT

NAME = "normal"


def prepare(ctx: StageContext) -> Prepared:
    return load_models(ctx, "normal_adapter")


def run(ctx: StageContext, prepared: Prepared) -> None:
    p = ctx.plan
    poses = read_poses(ctx)
    rgb = ctx.load_tensors("rgb")
    matte_load = prepared.start_matte_load()
    images, alphas = rgb["images"].float(), rgb["alphas"].float()
    fix = "rerun stage rgb with this plan"
    expect("rgb/outputs.safetensors images", images, (p.views, 3, p.resolution, p.resolution), fix)
    expect("rgb/outputs.safetensors alphas", alphas, (p.views, p.resolution, p.resolution), fix)
    a = alphas[:, None]
    references = images * a + 0.5 * (1 - a)
    with torch.inference_mode():
        normals = sample(ctx, prepared.models, NORMAL_PROMPT, poses, references, None)
    finish(ctx, normals, matte_load)


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
