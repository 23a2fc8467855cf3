"""Tiny random encoder checkpoints in the released on-disk formats, for tests and `--tiny` runs.

Every file is written with the same names and key layout as the released one, only narrower and
shallower, so the real loaders (which infer widths and depths from the files) are what the tests run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The BiRefNet repository folder holds its own architecture as Python files; transformers imports them
# through `auto_map` when loading with trust_remote_code. Ours keeps the interface that matters:
# a PreTrainedModel whose forward returns a list of logit maps, coarse to fine, the last at input size.
_TINY_BIREFNET_CONFIG_PY = '''\
"""Config of the BiRefNet stand-in (same class name and module name as the real repository)."""

from transformers import PretrainedConfig


class BiRefNetConfig(PretrainedConfig):
    model_type = "SegformerForSemanticSegmentation"

    def __init__(self, bb_pretrained=False, widths=(8, 8), depths=(1, 1), mlp_ratio=2, **kwargs):
        self.bb_pretrained = bb_pretrained
        self.widths = list(widths)
        self.depths = list(depths)
        self.mlp_ratio = mlp_ratio
        super().__init__(**kwargs)
'''

_TINY_BIREFNET_PY = '''\
"""BiRefNet stand-in: a convolutional pyramid with BiRefNet's output contract (list of logit maps).

At its full-size config (widths 192..1536, depths 2/2/18/2, as Swin-L) it has BiRefNet's parameter
count and file size; the values are random, so its mattes mean nothing.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig


class Block(nn.Module):
    """Depthwise 7x7 conv, GroupNorm, pointwise MLP, residual."""

    def __init__(self, width, mlp_ratio):
        super().__init__()
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.GroupNorm(1, width)
        self.fc1 = nn.Conv2d(width, width * mlp_ratio, 1)
        self.fc2 = nn.Conv2d(width * mlp_ratio, width, 1)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(self.dw(x)))))


class BiRefNet(PreTrainedModel):
    config_class = BiRefNetConfig

    def __init__(self, config):
        super().__init__(config)
        widths, depths = list(config.widths), list(config.depths)
        # a drop-path schedule computed with .item() in __init__, as the real Swin backbone does
        self.drop_path = [x.item() for x in torch.linspace(0, 0.1, sum(depths))]
        self.stem = nn.Conv2d(3, widths[0], 4, stride=4)
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in zip(widths[:-1], widths[1:]))
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(w, config.mlp_ratio) for _ in range(d)]) for w, d in zip(widths, depths))
        self.heads = nn.ModuleList(nn.Conv2d(w, 1, 1) for w in reversed(widths))  # coarse to fine
        self.post_init()

    def forward(self, x):
        size = x.shape[-2:]
        feats, h = [], self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                h = self.downs[i - 1](h)
            h = stage(h)
            feats.append(h)
        outs, n = [], len(feats)
        for i, (head, feat) in enumerate(zip(self.heads, reversed(feats))):
            scale = 2 ** (n - 1 - i)
            target = (size[0] // scale, size[1] // scale)
            outs.append(F.interpolate(head(feat), size=target, mode="bilinear", align_corners=False))
        return outs
'''

# Swin-L's widths and depths with a 7x MLP: 226 M parameters, a 452 MB fp16 file (the release: 444 MB)
BIREFNET_FULL = {"widths": (192, 384, 768, 1536), "depths": (2, 2, 18, 2), "mlp_ratio": 7}
BIREFNET_TINY = {"widths": (8, 8), "depths": (1, 1), "mlp_ratio": 2}
FULL_MATTE_LOGIT = 5.0  # sigmoid(5) = 0.993: the full-size stand-in's matte is (nearly) full, as full-random's


def write_tiny_birefnet(folder: Path | str, seed: int = 0) -> Path:
    """The tiny stand-in in the released folder layout (tests, `--tiny`)."""
    return write_birefnet(folder, seed, BIREFNET_TINY)


def write_birefnet(folder: Path | str, seed: int = 0, arch: dict | None = None, fast: bool = False) -> Path:
    """Write a BiRefNet-compatible repository folder: config.json (auto_map), code, model.safetensors.

    The weights are produced by instantiating the written code through transformers' own remote-code
    path, so the folder is exactly what `load_birefnet` will read. Stored as fp16, like the release.
    `fast` (full size): cheap tiled fill (up2you.meta_init) and a constant, nearly full matte from the
    finest head, so the stages after it see a silhouette, as in profile full-random.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageSegmentation

    from up2you.meta_init import random_module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "BiRefNet_config.py").write_text(_TINY_BIREFNET_CONFIG_PY)
    (folder / "birefnet.py").write_text(_TINY_BIREFNET_PY)
    arch = arch or BIREFNET_TINY
    config = {
        "architectures": ["BiRefNet"],
        "auto_map": {
            "AutoConfig": "BiRefNet_config.BiRefNetConfig",
            "AutoModelForImageSegmentation": "birefnet.BiRefNet",
        },
        "bb_pretrained": False,
        "widths": list(arch["widths"]),
        "depths": list(arch["depths"]),
        "mlp_ratio": arch["mlp_ratio"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)

    def build() -> torch.nn.Module:
        return AutoModelForImageSegmentation.from_config(cfg, trust_remote_code=True)

    if fast:
        sd = {k: v.to(torch.float16) for k, v in random_module(build, seed).state_dict().items()}
        last = len(arch["widths"]) - 1
        sd[f"heads.{last}.weight"].zero_()
        sd[f"heads.{last}.bias"].fill_(FULL_MATTE_LOGIT)
    else:
        gen = torch.Generator().manual_seed(seed)
        sd = {k: (torch.randn(v.shape, generator=gen) * 0.3).to(torch.float16) for k, v in build().state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with seeded random values everywhere (zero-initialised tokens and BN statistics too)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight", "bn.weight", "1.weight")) \
                and value.ndim == 1:
            out[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            out[key] = torch.randn(value.shape, generator=gen) * (0.5 / fan_in ** 0.5 if value.ndim > 1 else 0.05)
    return out


def _random_state(build: Callable[[], torch.nn.Module], seed: int, fast: bool) -> dict[str, torch.Tensor]:
    """Seeded random weights of `build()`: per-key scaled draws (tiny), or the cheap tiled fill of
    up2you.meta_init (full size: minutes of RNG and default init saved, memory is the same)."""
    if fast:
        from up2you.meta_init import random_module

        return random_module(build, seed).state_dict()
    return _randomise(build(), seed)


def write_tiny_dinov2(path: Path | str, seed: int = 0, embed_dim: int = 64, depth: int = 2, fast: bool = False) -> Path:
    """`dinov2_vitl14_pretrain.pth` layout, narrow and shallow, still patch 14 at 518 (37x37 tokens)."""
    from up2you.encoders.dinov2 import DinoV2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(lambda: DinoV2(embed_dim, depth, 14, 518), seed, fast), path)
    return path


def write_tiny_shape_predictor(path: Path | str, seed: int = 0, dim: int = 64, fast: bool = False) -> Path:
    """`shape_predictor.pt` layout: 6 cross blocks + 2 trunk blocks, width `dim` (= DINOv2's)."""
    from up2you.encoders.shape_predictor import ShapePredictor

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(lambda: ShapePredictor(dim, 6, 2), seed, fast), path)
    return path


def write_tiny_feature_aggregator(path: Path | str, seed: int = 0, dim: int = 64,
                                  pose_widths: tuple[int, ...] = (8, 8, 16, 16, 32), fast: bool = False) -> Path:
    """`feature_aggregator.pt` layout: self,self,cross,cross blocks and a pose CNN (narrow by default)."""
    from up2you.encoders.feature_aggregator import FeatureAggregator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(lambda: FeatureAggregator(dim, pose_widths=pose_widths), seed, fast), path)
    return path


@dataclass(frozen=True)
class EncoderSizes:
    """Widths and depths of the four encoder checkpoints (tiny for tests; up2you.fullsize has the real ones)."""

    dim: int = 64  # DINOv2 width = the shape predictor's and the aggregator's
    dinov2_depth: int = 2
    pose_widths: tuple[int, ...] = (8, 8, 16, 16, 32)
    birefnet: dict = field(default_factory=lambda: dict(BIREFNET_TINY))


def write_tiny_encoders(root: Path | str, seed: int = 0, sizes: EncoderSizes | None = None, fast: bool = False) -> None:
    """Write BiRefNet/, dinov2/dinov2_vitl14_pretrain.pth and pretrained_models/{shape_predictor,
    feature_aggregator}.pt under the weights folder `root` (paths from up2you.checkpoints)."""
    from up2you.checkpoints import resolve

    z = sizes or EncoderSizes()
    write_birefnet(resolve(root, "birefnet"), seed, z.birefnet, fast=fast)
    write_tiny_dinov2(resolve(root, "dinov2"), seed + 1, z.dim, z.dinov2_depth, fast=fast)
    write_tiny_shape_predictor(resolve(root, "shape_predictor"), seed + 2, z.dim, fast=fast)
    write_tiny_feature_aggregator(resolve(root, "feature_aggregator"), seed + 3, z.dim, z.pose_widths, fast=fast)
