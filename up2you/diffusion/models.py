"""SD 2.1-base components for the multi-view stages: from the released diffusers folder, or full-size
with random weights (profile `full-random`, GPU memory calibration without any file).

Everything is built in HOST memory (fp32, as stored; full-random via `meta` + a cheap fill); the sampler moves each module to the device, in
the compute dtype, only while it is needed. The pose adapter and the attn1 processors are created
here too and filled from the released adapter file through `AdapterBundle` (strict, 198 keys).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from up2you.diffusion.adapter import AdapterBundle, build_pose_adapter
from up2you.diffusion.processors import AttentionContext, MVRefAttnProcessor, install_processors
from up2you.diffusion.prompt_cache import text_files
from up2you.diffusion.scheduler import SD21_SCHEDULER_CONFIG
from up2you.meta_init import materialize, meta_parameters
from up2you.pages import make_resident

PhaseTimer = Callable[[str], AbstractContextManager[None]]  # e.g. a stage's `ctx.timed`


def _untimed(phase: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


# SD 2.1-base's UNet: 3 CrossAttnDown + DownBlock2D, UpBlock2D + 3 CrossAttnUp, linear projections.
# (diffusers reads attention_head_dim as the number of heads for this model: 5/10/20/20 heads of 64.)
UNET_FULL: dict[str, Any] = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True,
)  # fmt: skip
VAE_FULL: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)  # fmt: skip
# OpenCLIP ViT-H/14's text tower as transformers' CLIPTextModel (SD 2.x uses the penultimate layer by
# shipping 23 of its 24 layers).
TEXT_FULL: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=1,
)  # fmt: skip


@dataclass
class DiffusionModels:
    """The modules one multi-view stage needs, in host memory until the sampler moves them.

    text_encoder/tokenizer are None once prompts are encoded; tokenizer is None in `full-random`
    (prompts are then dummy token ids: random embeddings of the right shape, (1, 77, 1024)).
    """

    unet: nn.Module
    vae: nn.Module
    pose_adapter: nn.Module
    text_encoder: nn.Module | None
    tokenizer: Any | None
    scheduler_config: dict[str, Any]
    context: AttentionContext
    processors: dict[str, MVRefAttnProcessor]
    text_files: tuple[Path, ...] = ()  # what the prompt embeddings depend on (none in full-random: not cached)

    @property
    def bundle(self) -> AdapterBundle:
        return AdapterBundle(self.processors, self.pose_adapter)


def _attach_adapters(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer: Any,
                     scheduler_config: dict[str, Any]) -> DiffusionModels:
    context = AttentionContext()
    processors = install_processors(unet, context)
    pose_adapter = build_pose_adapter(tuple(unet.config.block_out_channels), unet.config.layers_per_block)
    return DiffusionModels(unet.eval(), vae.eval(), pose_adapter.eval(), text_encoder, tokenizer,
                           scheduler_config, context, processors)


def load_sd21(folder: Path | str, adapter_file: Path | str, timed: PhaseTimer | None = None) -> DiffusionModels:
    """SD 2.1-base from its diffusers folder (local files only) plus a released UP2You adapter file.

    The caller checks the files first (ctx.ckpt raises MissingWeightsError); sizes come from the configs,
    so the same code loads the real and the tiny checkpoints. `timed(phase)` (a stage's `ctx.timed`) times
    each part: this is the start-up that pre-start must hide, and where it goes decides what to shorten.
    """
    timed = timed or _untimed
    with timed("import_models"):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    local = dict(local_files_only=True)
    with timed("load_unet"):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local)
    with timed("load_vae"):
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
    with timed("load_text_encoder"):
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32, **local)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **local)
    with timed("make_resident"):
        for module in (unet, vae, text_encoder):  # their parameters are the memory-mapped files
            make_resident(module.parameters())
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    with timed("load_adapter"):
        with meta_parameters():  # the adapters' parameters come from the file: no default initialisation
            models = _attach_adapters(unet, vae, text_encoder, tokenizer, scheduler_config)
        models.bundle.load_file(adapter_file)
    models.text_files = text_files(folder)
    return models


def random_sd21(seed: int = 0, materialize: bool = True) -> DiffusionModels:
    """Full-size SD 2.1-base + UP2You adapters with random weights: memory calibration, no files.

    Built on `meta` (up2you.meta_init: ~1 s instead of ~34 s of default init); with `materialize` the
    parameters get host memory (fp32, as real weights are) and a cheap deterministic fill, otherwise
    the caller does that with `materialize_models` (e.g. later, in a pre-started process).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with meta_parameters():
        unet = UNet2DConditionModel(**UNET_FULL)
        vae = AutoencoderKL(**VAE_FULL)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_FULL))
        models = _attach_adapters(unet, vae, text_encoder, None, dict(SD21_SCHEDULER_CONFIG))
    return materialize_models(models, seed=seed) if materialize else models


def materialize_models(models: DiffusionModels, device: torch.device | str = "cpu", seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> DiffusionModels:
    """Storage + cheap random fill for every `meta` parameter of a `random_sd21(materialize=False)` set.

    Host memory by default: the sampler places each module on the GPU itself (offload modes, text
    encoder freed before the UNet arrives), and that placement is what calibration measures.
    """
    for i, module in enumerate((models.unet, models.vae, models.pose_adapter, models.text_encoder)):
        if module is not None:
            materialize(module, device, seed=seed + i, dtype=dtype)
    return models


def load_for_profile(profile: str, sd_folder: Path | None, adapter_file: Path | None,
                     timed: PhaseTimer | None = None) -> DiffusionModels:
    """`real`/`tiny` load files with the same code; `full-random` builds the full-size layout."""
    if profile == "full-random":
        return random_sd21()
    if sd_folder is None or adapter_file is None:
        raise ValueError(f"profile {profile!r} needs the SD 2.1 folder and the adapter file")
    return load_sd21(sd_folder, adapter_file, timed)
