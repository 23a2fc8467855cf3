"""DINOv2 ViT (facebookresearch/dinov2) rebuilt to load the torch.hub checkpoint file directly.

Why our own: torch.hub needs the network (or a warm cache) and its code; the checkpoint
`dinov2_vitl14_pretrain.pth` is a plain state dict we can load strictly with weights_only=True.

How it matches the hub model `dinov2_vitl14` (hub/backbones.py -> vision_transformer.vit_large):
- weights layout: `cls_token (1,1,D)`, `pos_embed (1,1+M*M,D)` (M=37 for 518 px at patch 14),
  `mask_token (1,D)` (training only; kept so the load is strict), `patch_embed.proj` (Conv2d 3->D,
  kernel=stride=14, bias), 24 pre-LN blocks `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
  mlp.fc1,mlp.fc2,ls2.gamma}` (LayerNorm eps 1e-6, qkv/proj/ffn biases, LayerScale, exact GELU, 16
  heads of 64), final `norm`. No registers, no head parameters (the hub's head is Identity).
- position embeddings: at the trained size (518 -> 37x37 patches) the stored table is used as is (the
  hub returns it unchanged when the patch count matches and the input is square). At other sizes the
  hub resizes the 37x37 patch grid bicubically, `antialias=False`, with `interpolate_offset=0.1`: it
  passes scale_factor=((h0+0.1)/M, (w0+0.1)/M) rather than an output size, so the sampling positions
  follow that scale factor. `interpolate_pos_encoding` reproduces exactly that; the class token's
  embedding is never resized.
- output: `x_norm_patchtokens` = final LayerNorm of all tokens, without the class token.
UP2You resizes its 768 px references to 518 with torchvision's Resize (bilinear, antialias=True for
tensors since torchvision 0.17) and ImageNet-normalises them; `encode_patch_tokens` does the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from up2you.encoders.vit import SelfAttnBlock, count_blocks
from up2you.state_dict import CheckpointMismatchError, build_and_load, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1  # the hub's `interpolate_offset` default
HEAD_DIM = 64  # every DINOv2 size uses 64-wide heads (S 6, B 12, L 16, g 24)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (`proj` is the hub's Conv2d name)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 backbone that returns normalised patch tokens (`x_norm_patchtokens`) as a grid."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, patch_size: int = 14, img_size: int = 518,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        grid = img_size // patch_size
        heads = max(1, embed_dim // HEAD_DIM)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            SelfAttnBlock(embed_dim, heads, mlp_ratio=mlp_ratio, init_values=1.0, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, 1+h0*w0, D) for an input of h x w pixels, as the hub computes them."""
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = self.grid
        if h0 == w0 == m:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((h0 + INTERPOLATE_OFFSET) / m, (w0 + INTERPOLATE_OFFSET) / m)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
        if patch.shape[-2:] != (h0, w0):
            raise ValueError(f"position grid {tuple(patch.shape[-2:])} != {(h0, w0)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B,3,H,W) -> patch tokens (B, H/14, W/14, D)."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        patches = self.norm(tokens)[:, 1:]
        return patches.reshape(b, h // self.patch_size, w // self.patch_size, self.embed_dim)


def dinov2_vitl14() -> DinoV2:
    """The hub's `dinov2_vitl14` architecture (304,368,640 parameters)."""
    return DinoV2(embed_dim=1024, depth=24, patch_size=14, img_size=518)


def dinov2_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "dinov2") -> DinoV2:
    """Build the architecture the file describes (width, depth, patch, trained size) and load it strictly."""
    try:
        embed_dim = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    except KeyError as exc:
        raise CheckpointMismatchError(f"{source}: not a DINOv2 state dict (no {exc.args[0]})") from exc
    depth = count_blocks(set(sd), "blocks.")
    return build_and_load(lambda: DinoV2(embed_dim, depth, patch, grid * patch, mlp_ratio), sd, source)


def load_dinov2(path: Path | str) -> DinoV2:
    """Load `dinov2_vitl14_pretrain.pth` (or a tiny file of the same layout) on the CPU, eval mode."""
    return dinov2_from_state_dict(read_state_dict(path), str(path)).eval()


@torch.no_grad()
def encode_patch_tokens(model: DinoV2, images: torch.Tensor, dtype: torch.dtype, chunk: int = 4) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] -> float32 patch tokens (B, g, g, D) at the model's trained size.

    Runs `chunk` images at a time in `dtype` on the model's device, so activations scale with the chunk,
    not with the number of references.
    """
    param = next(model.parameters())
    mean = torch.tensor(IMAGENET_MEAN, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=param.device).view(1, 3, 1, 1)
    out = []
    for start in range(0, images.shape[0], max(1, chunk)):
        x = images[start:start + max(1, chunk)].to(param.device, torch.float32)
        x = F.interpolate(x, size=(model.img_size, model.img_size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = ((x - mean) / std).to(dtype)
        out.append(model(x).float().cpu())
    return torch.cat(out)
