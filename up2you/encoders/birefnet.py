"""BiRefNet matting through its own remote code, loaded the way upstream loads it.

BiRefNet (`ZhengPeng7/BiRefNet`) ships its architecture as Python files beside the weights, so the
honest loader is transformers' `trust_remote_code` path on a local copy of that repository folder.
We pin `local_files_only=True` (no hub) and an explicit dtype: transformers 5 defaults to
`dtype="auto"`, which would load the fp16-stored file as fp16, while upstream runs it in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from up2you.checkpoints import CHECKPOINTS, MissingWeightsError
from up2you.state_dict import CheckpointMismatchError

BIREFNET_SIZE = 1024  # upstream's transforms.Resize((1024, 1024)) before the model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")


def load_birefnet(folder: Path | str, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Load BiRefNet from a local repository folder (config.json + model.safetensors + code), eval mode.

    Raises MissingWeightsError when the folder or its required files are absent, and an ImportError
    naming the packages when BiRefNet's own code needs ones that are not installed.
    """
    from transformers import AutoModelForImageSegmentation

    folder = Path(folder)
    spec = CHECKPOINTS["birefnet"]
    missing = [(str(folder / f), spec.source) for f in spec.required_files if not (folder / f).exists()]
    if missing:
        raise MissingWeightsError(missing)
    try:
        with _remote_code_lock():
            model, info = AutoModelForImageSegmentation.from_pretrained(
                str(folder), trust_remote_code=True, local_files_only=True, dtype=dtype, output_loading_info=True
            )
    except ImportError as exc:  # its remote code imports timm/kornia/torchvision/einops
        raise ImportError(f"BiRefNet's code in {folder} needs packages that are not installed: {exc}") from exc
    # transformers only warns about missing/unexpected keys and initialises the missing ones at random
    problems = {k: sorted(map(str, v)) for k, v in info.items() if k in _LOADING_PROBLEMS and v}
    if problems:
        detail = "; ".join(f"{len(v)} {k}: {', '.join(v[:5])}" for k, v in problems.items())
        raise CheckpointMismatchError(f"{folder / 'model.safetensors'}: {detail}")
    return model.to(device=device, dtype=dtype).eval()


def _remote_code_lock() -> Any:
    """An inter-process lock around the load: transformers copies the repository's code into its modules
    cache with only a thread lock, and pre-started stages (segment, rgb, normal) load BiRefNet at once;
    a process could import a file another one is still copying."""
    from filelock import FileLock
    from transformers.utils import HF_MODULES_CACHE

    Path(HF_MODULES_CACHE).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(HF_MODULES_CACHE) / "up2you-birefnet.lock"))


@torch.no_grad()
def predict_alpha(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Alpha mattes (B,H,W) in [0,1] float32 for RGB images (B,3,H,W) in [0,1].

    As upstream: resize to 1024^2 (bilinear with antialias, like PIL), ImageNet normalisation, the
    sigmoid of the LAST (finest) output map, resized back to (H,W). One image at a time so that the
    1024^2 activations are paid once whatever the batch.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"predict_alpha expects (B,3,H,W), got {tuple(images.shape)}")
    param = next(model.parameters())
    mean = torch.tensor(IMAGENET_MEAN, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=param.device).view(1, 3, 1, 1)
    out = []
    for image in images:
        h, w = image.shape[-2:]
        x = image[None].to(param.device, torch.float32)
        x = F.interpolate(x, size=(BIREFNET_SIZE, BIREFNET_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = ((x - mean) / std).to(param.dtype)
        logits = model(x)[-1].float()
        alpha = torch.sigmoid(logits).reshape(1, 1, *logits.shape[-2:])
        alpha = F.interpolate(alpha, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        out.append(alpha[0, 0].clamp_(0.0, 1.0).to(images.device))
    return torch.stack(out)
