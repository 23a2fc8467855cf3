"""UP2You's shape predictor: DINOv2 tokens of all references -> SMPL-X betas (1,10).

Architecture (upstream `up2you/models/shape_predictor.py`, `heads/shape_head.py`; fact sheet §4.1):
one learned query token cross-attends to every reference token through 6 CrossAttnBlocks (qk-norm,
16 heads, LayerScale 0.01); a ShapeHead then refines a 10-d estimate in 4 rounds, each round
modulating the normalised token DiT-style (shift/scale/gate from the previous estimate), running a
2-block self-attention trunk and adding the `shape_branch` delta. 104,482,836 parameters at full size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from up2you.encoders.vit import CrossAttnBlock, Mlp, SelfAttnBlock, count_blocks
from up2you.state_dict import CheckpointMismatchError, build_and_load, read_state_dict

NUM_HEADS = 16
NUM_BETAS = 10
REFINE_ROUNDS = 4
FULL_PARAMS = 104_482_836


class ShapeHead(nn.Module):
    """Iterative refinement of the betas from the aggregated shape token."""

    def __init__(self, dim: int, trunk_depth: int = 2, target_dim: int = NUM_BETAS, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(SelfAttnBlock(dim, NUM_HEADS, mlp_ratio=mlp_ratio, init_values=0.01)
                                     for _ in range(trunk_depth)))
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_shape_tokens = nn.Parameter(torch.zeros(1, 1, target_dim))
        self.embed_shape = nn.Linear(target_dim, dim)
        self.shapeLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))  # noqa: N815 - checkpoint name
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.shape_branch = Mlp(dim, dim // 2, target_dim)

    def forward(self, tokens: torch.Tensor, rounds: int = REFINE_ROUNDS) -> torch.Tensor:
        tokens = self.token_norm(tokens)
        b, s, _ = tokens.shape
        estimate: torch.Tensor | None = None
        for _ in range(rounds):
            prev = self.empty_shape_tokens.expand(b, s, -1) if estimate is None else estimate
            shift, scale, gate = self.shapeLN_modulation(self.embed_shape(prev)).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.shape_branch(self.trunk_norm(self.trunk(x)))
            estimate = delta if estimate is None else estimate + delta
        assert estimate is not None
        return estimate  # linear activation


class ShapePredictor(nn.Module):
    """(B,Nr,H,W,C) DINOv2 tokens -> (B,1,10) betas."""

    def __init__(self, dim: int = 1024, num_blocks: int = 6, trunk_depth: int = 2, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            CrossAttnBlock(dim, NUM_HEADS, mlp_ratio=mlp_ratio, qk_norm=True, init_values=0.01)
            for _ in range(num_blocks)
        )
        self.shape_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.shape_head = ShapeHead(dim, trunk_depth, mlp_ratio=mlp_ratio)

    def forward(self, ref_feats: torch.Tensor) -> torch.Tensor:
        b, _, _, _, c = ref_feats.shape
        context = ref_feats.reshape(b, -1, c)
        tokens = self.shape_tokens.expand(b, -1, -1)
        for block in self.blocks:
            tokens = block(tokens, context)
        return self.shape_head(tokens)


def shape_predictor_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "shape_predictor") -> ShapePredictor:
    """Build the architecture the file describes (width, block counts) and load it strictly."""
    try:
        dim = sd["shape_tokens"].shape[-1]
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except KeyError as exc:
        raise CheckpointMismatchError(f"{source}: not a shape-predictor state dict (no {exc.args[0]})") from exc
    keys = set(sd)
    blocks, trunk = count_blocks(keys, "blocks."), count_blocks(keys, "shape_head.trunk.")
    return build_and_load(lambda: ShapePredictor(dim, blocks, trunk, mlp_ratio), sd, source)


def load_shape_predictor(path: Path | str) -> ShapePredictor:
    """Load `pretrained_models/shape_predictor.pt` on the CPU (weights_only), eval mode."""
    return shape_predictor_from_state_dict(read_state_dict(path), str(path)).eval()
