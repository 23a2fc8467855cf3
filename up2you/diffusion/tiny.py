"""Tiny random SD 2.1-base folder + UP2You adapter files in the released layout (tests, `--tiny`).

The UNet keeps SD 2.1's structure (3 CrossAttnDown + DownBlock2D, UpBlock2D + 3 CrossAttnUp,
2 layers per block, linear projections), so its 16 attn1 processors and the 198 adapter key names are
those of the full model; only widths shrink. The tokenizer is a byte-level CLIP BPE vocabulary
generated here (256 byte symbols, their word-final forms, a few merges, the two special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from up2you.diffusion.models import UNET_FULL, VAE_FULL
from up2you.diffusion.processors import AttentionContext, install_processors
from up2you.diffusion.scheduler import SD21_SCHEDULER_CONFIG

TINY_CHANNELS = (16, 32, 64, 64)  # a channel change at blocks 1 and 2, as (320, 640, 1280, 1280): 198 keys
UNET_TINY = {**UNET_FULL, "block_out_channels": TINY_CHANNELS, "attention_head_dim": (2, 4, 8, 8),
             "cross_attention_dim": 32, "sample_size": 8, "norm_num_groups": 8}
VAE_TINY = {**VAE_FULL, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "sample_size": 64,
            "norm_num_groups": 8}
# CLIPTextConfig fields; vocab size and special token ids come from the tokenizer written beside it
TEXT_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 32}
_MERGES = ("m u", "mu l", "mul t", "h u", "hu m", "hum a", "huma n</w>", "f u", "fu l", "ful l</w>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> unicode map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(folder: Path, vocab_size: int | None = None) -> int:
    """vocab.json + merges.txt + tokenizer_config.json; returns the vocabulary size.

    With `vocab_size` (49408 for SD 2.1's) unused filler entries pad the vocabulary so that the two
    special tokens get the real ids (49406, 49407), as the full-size text encoder's config says.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _MERGES]
    if vocab_size is not None:
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - 2 - len(dict.fromkeys(tokens)))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def write_tiny_diffusion(root: Path | str, seed: int = 0) -> Path:
    """Write `stable-diffusion-2-1-base/` (diffusers layout) and `pretrained_models/{rgb,normal}_adapter
    .safetensors` under root, tiny and random. Returns the SD folder."""
    return write_diffusion(root, seed, UNET_TINY, VAE_TINY, TEXT_TINY)


def write_diffusion(root: Path | str, seed: int, unet_config: dict[str, Any], vae_config: dict[str, Any],
                    text_config: dict[str, Any], vocab_size: int | None = None, fast: bool = False) -> Path:
    """The SD 2.1-base folder and both adapter files at the given sizes (tiny, or full in up2you.fullsize).

    `fast`: parameters built on `meta` and given the cheap tiled fill of up2you.meta_init (a full-size
    UNet's default init alone costs ~34 s); otherwise default init and N(0, 0.05) adapters.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from up2you.diffusion.adapter import AdapterBundle, build_pose_adapter
    from up2you.meta_init import random_module

    def build(make: Any, k: int) -> Any:
        return random_module(make, seed + k) if fast else make()

    root = Path(root)
    sd = root / "stable-diffusion-2-1-base"
    torch.manual_seed(seed)
    vocab = write_tiny_tokenizer(sd / "tokenizer", vocab_size)
    unet = build(lambda: UNet2DConditionModel(**unet_config), 0)
    unet.save_pretrained(sd / "unet", safe_serialization=True)
    build(lambda: AutoencoderKL(**vae_config), 1).save_pretrained(sd / "vae", safe_serialization=True)
    text = build(lambda: CLIPTextModel(CLIPTextConfig(
        **text_config, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)), 2)
    text.save_pretrained(sd / "text_encoder", safe_serialization=True)
    del text
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (sd / "model_index.json").write_text(json.dumps(index, indent=2))
    out = root / "pretrained_models"
    out.mkdir(parents=True, exist_ok=True)
    channels = tuple(unet_config["block_out_channels"])
    for name in ("rgb_adapter", "normal_adapter"):  # processors are built on the UNet's device: not on meta
        procs = install_processors(unet, AttentionContext())
        bundle = AdapterBundle(procs, build_pose_adapter(channels, unet_config["layers_per_block"]))
        with torch.no_grad():
            for p in bundle.parameters():  # visible effect: default init leaves near-silent outputs
                p.normal_(0.0, 0.02 if fast else 0.05)  # 0.02: meta_init's fill, as in profile full-random
        bundle.save_file(out / f"{name}.safetensors")
    return sd
