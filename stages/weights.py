"""Stage `weights`: the feature aggregator (PCFA) -> per-view weights over all reference tokens.

Reads JOB/segment (ref_alphas), JOB/features (ref_feats), JOB/apose (poses); writes
outputs.safetensors {weight_maps (N,Nr,g,g) f32} (g=37) and weight_maps.png (jet heatmaps, a row per view).
GPU use: the aggregator in fp32 (as upstream) and the Nr*g*g reference tokens; views one at a time.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from stages.harness import BadInputError, StageContext, stage_main
from up2you.encoders.feature_aggregator import FeatureAggregator, alphas_to_grid, load_feature_aggregator
from up2you.meta_init import materialize, meta_parameters

NAME = "weights"


def prepare(ctx: StageContext) -> FeatureAggregator:
    if ctx.profile == "full-random":  # shapes only (meta); `run` materialises them (up2you.meta_init)
        with meta_parameters():
            return FeatureAggregator().eval()
    return load_feature_aggregator(ctx.ckpt("feature_aggregator"))


def _inputs(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alphas = ctx.load_tensors("segment")["ref_alphas"]
    feats = ctx.load_tensors("features")["ref_feats"]
    poses = ctx.load_tensors("apose")["poses"]
    if feats.ndim != 4 or alphas.ndim != 3 or alphas.shape[0] != feats.shape[0]:
        raise BadInputError(f"features/outputs.safetensors: ref_feats {tuple(feats.shape)} does not match "
                            f"segment ref_alphas {tuple(alphas.shape)}; rerun segment and features")
    if poses.ndim != 4 or poses.shape[1] != 3:
        raise BadInputError(f"apose/outputs.safetensors: poses {tuple(poses.shape)}, expected (N,3,R,R); rerun apose")
    return alphas, feats, poses


@torch.no_grad()
def run(ctx: StageContext, prepared: FeatureAggregator) -> None:
    alphas, feats, poses = _inputs(ctx)
    if ctx.profile == "full-random":
        t = time.time()
        materialize(prepared, "cpu")
        ctx.timings["materialize_s"] = time.time() - t
    model = prepared.to(ctx.device, torch.float32)
    n_refs, grid = feats.shape[0], feats.shape[1]
    tokens = feats.reshape(1, -1, feats.shape[-1]).to(ctx.device, torch.float32)
    alpha_grid = alphas_to_grid(alphas, grid).to(ctx.device)
    maps = [model.forward_view(poses[v:v + 1].to(ctx.device, torch.float32), tokens, alpha_grid).cpu()
            for v in range(poses.shape[0])]
    model.to("cpu")
    weight_maps = torch.stack(maps)
    ctx.save_tensors("outputs.safetensors", {"weight_maps": weight_maps})
    ctx.save_image("weight_maps.png", heatmap_grid(weight_maps))
    ctx.record(n_views=int(weight_maps.shape[0]), n_refs=int(n_refs),
               nonzero_fraction=float((weight_maps > 0).float().mean()))


def heatmap_grid(weight_maps: torch.Tensor, zoom: int = 4) -> np.ndarray:
    """(N,Nr,g,g) -> uint8 RGB image: a row per view, a jet heatmap per reference, each view scaled to its max."""
    from matplotlib import colormaps

    n, nr, g, _ = weight_maps.shape
    peak = weight_maps.reshape(n, -1).amax(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
    norm = (weight_maps / peak).numpy()
    tiles = colormaps["jet"](norm)[..., :3]  # (N,Nr,g,g,3)
    tiles = tiles.repeat(zoom, axis=2).repeat(zoom, axis=3)
    image = tiles.transpose(0, 2, 1, 3, 4).reshape(n * g * zoom, nr * g * zoom, 3)
    return (image * 255.0 + 0.5).astype(np.uint8)


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
