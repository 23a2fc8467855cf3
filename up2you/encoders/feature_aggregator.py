"""UP2You's pose-conditioned feature aggregator (PCFA): per target view, a weight for every reference
patch token (N views -> (N,Nr,37,37)), later used to pick the reference tokens the RGB UNet attends to.

Architecture (upstream `feature_aggregator.py`, `pose_encoder.py`, `layers/attention.py`; §4.2):
- PoseEncoder: the A-pose normal render (resized to 512) -> 32x32 tokens of width 1024 through a
  MobileNet-like CNN (BatchNorm in eval mode, so its running statistics come from the checkpoint);
- blocks 0,1 self-attention over the view's tokens, blocks 2,3 cross-attention to all Nr*1369 DINO
  tokens (qk-norm, 16 heads, LayerScale);
- OutAttention: scaled q.k logits, averaged over heads and then over queries, ReLU, times the
  reference alpha nearest-resized to the token grid. No softmax, no smoothing (upstream inference
  leaves `spatial_smooth` False; the RoPE it builds never receives positions).

Memory: averaging logits is linear, so mean_{h,i} (q_hi . k_hj) * s = (s/H) * (mean_i q_i) . k_j over the
full width. `OutAttention` computes that form: O(Nr*1369*C) instead of the (16, 1024, Nr*1369) logit
tensor upstream builds (0.9 GB at Nr=10). Same value up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from up2you.encoders.vit import CrossAttnBlock, SelfAttnBlock, count_blocks
from up2you.state_dict import CheckpointMismatchError, build_and_load, read_state_dict

NUM_HEADS = 16
POSE_SIZE = 512  # pose renders are resized to this before the PoseEncoder (32x32 tokens at stride 16)
POSE_WIDTHS = (32, 64, 128, 256, 512)  # stem, layer1..layer4
FULL_PARAMS_APPROX = 54.45e6


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise (stride s) + 1x1 pointwise, BN, ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.pointwise(self.depthwise(x))))


class LightweightResBlock(nn.Module):
    """Two separable convs plus a shortcut (1x1 conv + BN when shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = DepthwiseSeparableConv(cin, cout, stride)
        self.conv2 = DepthwiseSeparableConv(cout, cout, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class PoseEncoder(nn.Module):
    """(B,3,512,512) pose image -> (B, 1024, dim) tokens (stride 16)."""

    def __init__(self, dim: int = 1024, widths: tuple[int, ...] = POSE_WIDTHS) -> None:
        super().__init__()
        stem, w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6())
        self.layer1 = self._layer(stem, w1, 1)
        self.layer2 = self._layer(w1, w2, 2)
        self.layer3 = self._layer(w2, w3, 2)
        self.layer4 = self._layer(w3, w4, 2)
        self.final_proj = nn.Sequential(nn.Conv2d(w4, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU6())

    @staticmethod
    def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(LightweightResBlock(cin, cout, stride), LightweightResBlock(cout, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.final_proj(x).flatten(2).transpose(1, 2)


class OutAttention(nn.Module):
    """Per-reference-token weights from the view tokens (queries) and the DINO tokens (keys)."""

    def __init__(self, dim: int, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B,Nq,C), context (B,Nk,C) -> (B,Nk) head- and query-averaged logits, before ReLU."""
        q_mean = self.q_proj(x).mean(dim=1)  # (B,C)
        k = self.k_proj(context)  # (B,Nk,C)
        return torch.einsum("bkc,bc->bk", k, q_mean) * (self.scale / self.num_heads)


class FeatureAggregator(nn.Module):
    """Weight maps for one target view at a time (views are independent)."""

    def __init__(self, dim: int = 1024, aa_order: tuple[str, ...] = ("self", "self", "cross", "cross"),
                 pose_widths: tuple[int, ...] = POSE_WIDTHS, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.pose_patch_embed = PoseEncoder(dim, pose_widths)
        block = {"self": SelfAttnBlock, "cross": CrossAttnBlock}
        self.blocks = nn.ModuleList(
            block[kind](dim, NUM_HEADS, mlp_ratio=mlp_ratio, qk_norm=True, init_values=0.01) for kind in aa_order
        )
        self.out_attn = OutAttention(dim)

    def forward_view(self, pose: torch.Tensor, ref_tokens: torch.Tensor, alphas_grid: torch.Tensor) -> torch.Tensor:
        """One view.

        pose (1,3,H,W) in [0,1]; ref_tokens (1, Nr*h*w, C); alphas_grid (Nr,h,w) already at the token grid.
        Returns (Nr,h,w) non-negative weights, zero outside the references' silhouettes.
        """
        if pose.shape[-2:] != (POSE_SIZE, POSE_SIZE):
            pose = F.interpolate(pose, size=(POSE_SIZE, POSE_SIZE), mode="bilinear", align_corners=False,
                                 antialias=True)
        tokens = self.pose_patch_embed(pose)
        for blk in self.blocks:
            tokens = blk(tokens, ref_tokens) if isinstance(blk, CrossAttnBlock) else blk(tokens)
        weights = F.relu(self.out_attn(tokens, ref_tokens))
        return weights.reshape(alphas_grid.shape) * alphas_grid


def alphas_to_grid(ref_alphas: torch.Tensor, grid: int) -> torch.Tensor:
    """(Nr,H,W) alphas -> (Nr,grid,grid), nearest (torch's legacy 'nearest', as upstream)."""
    return F.interpolate(ref_alphas[:, None].float(), size=(grid, grid), mode="nearest")[:, 0]


def feature_aggregator_from_state_dict(sd: Mapping[str, torch.Tensor],
                                       source: str = "feature_aggregator") -> FeatureAggregator:
    """Build the architecture the file describes (width, pose-CNN widths, block kinds) and load it strictly."""
    try:
        dim = sd["out_attn.q_proj.weight"].shape[0]
        widths = (sd["pose_patch_embed.stem.0.weight"].shape[0],
                  *(sd[f"pose_patch_embed.layer{i}.0.conv1.pointwise.weight"].shape[0] for i in range(1, 5)))
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except KeyError as exc:
        raise CheckpointMismatchError(f"{source}: not a feature-aggregator state dict (no {exc.args[0]})") from exc
    order = tuple("cross" if f"blocks.{i}.attn.q_proj.weight" in sd else "self"
                  for i in range(count_blocks(set(sd), "blocks.")))
    return build_and_load(lambda: FeatureAggregator(dim, order, widths, mlp_ratio), sd, source)


def load_feature_aggregator(path: Path | str) -> FeatureAggregator:
    """Load `pretrained_models/feature_aggregator.pt` on the CPU (weights_only), eval mode (BatchNorm stats)."""
    return feature_aggregator_from_state_dict(read_state_dict(path), str(path)).eval()
