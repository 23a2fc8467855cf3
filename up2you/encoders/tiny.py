"""Tiny random encoder checkpoints in the released on-disk formats, for tests and `--tiny` runs.

Every file is written with the same names and key layout as the released one, only narrower and
shallower, so the real loaders (which infer widths and depths from the files) are what the tests run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The BiRefNet repository folder holds its own architecture as Python files; transformers imports them
# through `auto_map` when loading with trust_remote_code. Ours keeps the interface that matters:
# a PreTrainedModel whose forward returns a list of logit maps, coarse to fine, the last at input size.
_TINY_BIREFNET_CONFIG_PY = '''\
"""Config of the tiny BiRefNet stand-in (same class name and module name as the real repository)."""

from transformers import PretrainedConfig


class BiRefNetConfig(PretrainedConfig):
    model_type = "SegformerForSemanticSegmentation"

    def __init__(self, bb_pretrained=False, width=8, **kwargs):
        self.bb_pretrained = bb_pretrained
        self.width = width
        super().__init__(**kwargs)
'''

_TINY_BIREFNET_PY = '''\
"""Tiny BiRefNet stand-in: a few convolutions with BiRefNet's output contract (list of logit maps)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig


class BiRefNet(PreTrainedModel):
    config_class = BiRefNetConfig

    def __init__(self, config):
        super().__init__(config)
        w = config.width
        # a drop-path schedule computed with .item() in __init__, as the real Swin backbone does
        self.drop_path = [x.item() for x in torch.linspace(0, 0.1, 2)]
        self.enc = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.heads = nn.ModuleList([nn.Conv2d(w, 1, 1) for _ in range(3)])
        self.post_init()

    def forward(self, x):
        feat = self.enc(x)
        size = x.shape[-2:]
        outs = []
        for i, head in enumerate(self.heads):
            scale = 2 ** (2 - i)
            target = (size[0] // scale, size[1] // scale)
            outs.append(F.interpolate(head(feat), size=target, mode="bilinear", align_corners=False))
        return outs
'''


def write_tiny_birefnet(folder: Path | str, seed: int = 0, width: int = 8) -> Path:
    """Write a BiRefNet-compatible repository folder: config.json (auto_map), code, model.safetensors.

    The weights are produced by instantiating the written code through transformers' own remote-code
    path, so the folder is exactly what `load_birefnet` will read. Stored as fp16, like the release.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageSegmentation

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "BiRefNet_config.py").write_text(_TINY_BIREFNET_CONFIG_PY)
    (folder / "birefnet.py").write_text(_TINY_BIREFNET_PY)
    config = {
        "architectures": ["BiRefNet"],
        "auto_map": {
            "AutoConfig": "BiRefNet_config.BiRefNetConfig",
            "AutoModelForImageSegmentation": "birefnet.BiRefNet",
        },
        "bb_pretrained": False,
        "width": width,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    model = AutoModelForImageSegmentation.from_config(cfg, trust_remote_code=True)
    gen = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.3).to(torch.float16) for k, v in model.state_dict().items()}
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


def write_tiny_dinov2(path: Path | str, seed: int = 0, embed_dim: int = 64, depth: int = 2) -> Path:
    """`dinov2_vitl14_pretrain.pth` layout, narrow and shallow, still patch 14 at 518 (37x37 tokens)."""
    from up2you.encoders.dinov2 import DinoV2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_randomise(DinoV2(embed_dim, depth, 14, 518), seed), path)
    return path


def write_tiny_shape_predictor(path: Path | str, seed: int = 0, dim: int = 64) -> Path:
    """`shape_predictor.pt` layout: 6 cross blocks + 2 trunk blocks, width `dim` (= DINOv2's)."""
    from up2you.encoders.shape_predictor import ShapePredictor

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_randomise(ShapePredictor(dim, 6, 2), seed), path)
    return path


def write_tiny_feature_aggregator(path: Path | str, seed: int = 0, dim: int = 64) -> Path:
    """`feature_aggregator.pt` layout: self,self,cross,cross blocks and a narrow pose CNN."""
    from up2you.encoders.feature_aggregator import FeatureAggregator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_randomise(FeatureAggregator(dim, pose_widths=(8, 8, 16, 16, 32)), seed), path)
    return path


def write_tiny_encoders(root: Path | str, seed: int = 0) -> None:
    """Write BiRefNet/, dinov2/dinov2_vitl14_pretrain.pth and pretrained_models/{shape_predictor,
    feature_aggregator}.pt under the weights folder `root` (paths from up2you.checkpoints)."""
    from up2you.checkpoints import resolve

    write_tiny_birefnet(resolve(root, "birefnet"), seed)
    write_tiny_dinov2(resolve(root, "dinov2"), seed + 1)
    write_tiny_shape_predictor(resolve(root, "shape_predictor"), seed + 2)
    write_tiny_feature_aggregator(resolve(root, "feature_aggregator"), seed + 3)
