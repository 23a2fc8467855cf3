"""The released adapter files load strictly: all 198 keys land, a renamed/missing/extra key is caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from up2you.diffusion.adapter import AdapterBundle, build_pose_adapter, expected_keys
from up2you.diffusion.models import UNET_FULL
from up2you.diffusion.processors import AttentionContext, install_processors
from up2you.diffusion.tiny import TINY_CHANNELS, UNET_TINY, write_tiny_diffusion
from up2you.state_dict import CheckpointMismatchError


def _bundle(config: dict) -> AdapterBundle:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    procs = install_processors(unet, AttentionContext())
    return AdapterBundle(procs, build_pose_adapter(tuple(config["block_out_channels"]), 2))


def test_full_size_layout_matches_the_fact_sheet_names_and_shapes() -> None:
    with torch.device("meta"):
        bundle = _bundle(UNET_FULL)
    sd = bundle.state_dict()
    expected = expected_keys((320, 640, 1280, 1280))
    assert len(expected) == 198 and set(sd) == set(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 176_517_440  # x4 bytes = the released 706,069,760
    assert sum(".processor." in k for k in sd) == 160 and sum(k.startswith("adapter.") for k in sd) == 38


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_adapter")
    write_tiny_diffusion(root, seed=0)
    return root / "pretrained_models" / "rgb_adapter.safetensors"


def test_tiny_file_has_the_released_names_and_every_value_lands(tiny_file: Path) -> None:
    sd = load_file(str(tiny_file))
    assert len(sd) == 198 and {k: tuple(v.shape) for k, v in sd.items()} == expected_keys(TINY_CHANNELS)
    bundle = _bundle(UNET_TINY)
    bundle.load_file(tiny_file)
    for k, v in bundle.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("damage", ["rename", "missing", "extra", "shape"])
def test_strict_load_catches_a_bad_key(tiny_file: Path, tmp_path: Path, damage: str) -> None:
    sd = load_file(str(tiny_file))
    key = "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_k_ref.weight"
    if damage == "rename":
        sd[key.replace("to_k_ref", "to_k_refs")] = sd.pop(key)
    elif damage == "missing":
        del sd["adapter.body.2.in_conv.bias"]
    elif damage == "extra":
        sd["adapter.body.3.in_conv.weight"] = torch.zeros(64, 64, 1, 1)
    else:
        sd[key] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointMismatchError, match="missing|unexpected|wrong shape"):
        _bundle(UNET_TINY).load_file(bad)
