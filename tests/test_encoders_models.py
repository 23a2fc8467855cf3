"""Encoder architectures and loaders: full-size layouts match the released checkpoints, loading is strict,
and the re-derived maths (position-embedding resize, collapsed OutAttention) equals the upstream form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from up2you.checkpoints import MissingWeightsError
from up2you.encoders.dinov2 import DinoV2, dinov2_vitl14, load_dinov2
from up2you.encoders.feature_aggregator import (
    FeatureAggregator,
    OutAttention,
    alphas_to_grid,
    load_feature_aggregator,
)
from up2you.encoders.shape_predictor import FULL_PARAMS, ShapePredictor, load_shape_predictor
from up2you.encoders.tiny import write_tiny_encoders
from up2you.state_dict import CheckpointMismatchError, read_state_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_encoders(root, seed=0)
    return root


def _meta(builder):  # full-size modules without allocating their weights
    with torch.device("meta"):
        return builder()


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_dinov2_vitl14_layout_matches_hub_checkpoint() -> None:
    sd = _meta(dinov2_vitl14).state_dict()
    assert _count(_meta(dinov2_vitl14)) == 304_368_640
    assert tuple(sd["pos_embed"].shape) == (1, 1370, 1024)
    assert tuple(sd["cls_token"].shape) == (1, 1, 1024) and tuple(sd["mask_token"].shape) == (1, 1024)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1024, 3, 14, 14)
    per_block = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"}
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"} | {f"blocks.{i}.{k}" for i in range(24) for k in per_block}
    assert set(sd) == expected


def test_shape_predictor_full_size_matches_fact_sheet() -> None:
    model = _meta(ShapePredictor)
    assert _count(model) == FULL_PARAMS == 104_482_836
    keys = set(model.state_dict())
    for i in range(6):
        for k in ("norm1.weight", "attn.q_proj.weight", "attn.kv_proj.weight", "attn.q_norm.weight",
                  "attn.k_norm.weight", "attn.proj.weight", "ls1.gamma", "mlp.fc1.weight", "ls2.gamma"):
            assert f"blocks.{i}.{k}" in keys
    assert "blocks.6.norm1.weight" not in keys
    for j in range(2):
        assert f"shape_head.trunk.{j}.attn.qkv.weight" in keys
        assert f"shape_head.trunk.{j}.attn.q_norm.weight" not in keys  # the trunk has no qk-norm
    for k in ("shape_tokens", "shape_head.token_norm.weight", "shape_head.trunk_norm.weight",
              "shape_head.empty_shape_tokens", "shape_head.embed_shape.weight",
              "shape_head.shapeLN_modulation.1.weight", "shape_head.shape_branch.fc1.weight",
              "shape_head.shape_branch.fc2.weight"):
        assert k in keys
    assert tuple(model.state_dict()["shape_head.shape_branch.fc2.weight"].shape) == (10, 512)


def test_feature_aggregator_full_size_matches_fact_sheet() -> None:
    model = _meta(FeatureAggregator)
    assert abs(_count(model) - 54.45e6) < 0.01e6
    keys = set(model.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "blocks.2.attn.q_proj.weight",
            "blocks.3.attn.kv_proj.weight", "blocks.3.attn.q_norm.weight", "out_attn.q_proj.bias",
            "out_attn.k_proj.bias", "pose_patch_embed.stem.0.weight", "pose_patch_embed.stem.1.running_var",
            "pose_patch_embed.layer1.0.shortcut.0.weight", "pose_patch_embed.layer4.1.conv2.depthwise.weight",
            "pose_patch_embed.final_proj.0.weight", "pose_patch_embed.final_proj.1.running_mean"} <= keys
    assert "pose_patch_embed.layer1.1.shortcut.0.weight" not in keys  # no shortcut when the shape is kept
    tokens = _meta(lambda: FeatureAggregator().pose_patch_embed)(torch.empty(1, 3, 512, 512, device="meta"))
    assert tuple(tokens.shape) == (1, 1024, 1024)  # 32x32 tokens of width 1024


def test_tiny_files_load_with_inferred_sizes(tiny: Path) -> None:
    dino = load_dinov2(tiny / "dinov2/dinov2_vitl14_pretrain.pth")
    assert (dino.embed_dim, len(dino.blocks), dino.patch_size, dino.img_size) == (64, 2, 14, 518)
    shape = load_shape_predictor(tiny / "pretrained_models/shape_predictor.pt")
    assert len(shape.blocks) == 6 and len(shape.shape_head.trunk) == 2
    agg = load_feature_aggregator(tiny / "pretrained_models/feature_aggregator.pt")
    assert [type(b).__name__ for b in agg.blocks] == ["SelfAttnBlock", "SelfAttnBlock", "CrossAttnBlock",
                                                       "CrossAttnBlock"]
    assert not agg.training  # BatchNorm uses the stored statistics
    sd = read_state_dict(tiny / "pretrained_models/feature_aggregator.pt")
    assert torch.equal(agg.state_dict()["pose_patch_embed.stem.1.running_var"], sd["pose_patch_embed.stem.1.running_var"])


@pytest.mark.parametrize("which,loader", [
    ("dinov2/dinov2_vitl14_pretrain.pth", load_dinov2),
    ("pretrained_models/shape_predictor.pt", load_shape_predictor),
    ("pretrained_models/feature_aggregator.pt", load_feature_aggregator),
])
def test_files_become_the_parameters_without_an_initialisation(tiny: Path, tmp_path: Path, which: str, loader) -> None:
    """Built on meta and assigned: every value is the file's, none is left on meta, and a half-precision
    file still gives the float32 model the loader always gave (cast, as a copying load would)."""
    sd = read_state_dict(tiny / which)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(half, tmp_path / Path(which).name)
    for model, want in ((loader(tiny / which), sd), (loader(tmp_path / Path(which).name), half)):
        got = model.state_dict()
        assert all(t.device.type == "cpu" for t in got.values())
        assert all(got[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype) for k, v in want.items())
        assert all(torch.equal(got[k].to(v.dtype), v) for k, v in want.items())
        assert not model.training


@pytest.mark.parametrize("edit", ["rename", "drop", "extra"])
@pytest.mark.parametrize("which,loader", [
    ("dinov2/dinov2_vitl14_pretrain.pth", load_dinov2),
    ("pretrained_models/shape_predictor.pt", load_shape_predictor),
    ("pretrained_models/feature_aggregator.pt", load_feature_aggregator),
])
def test_strict_loading_rejects_edited_checkpoints(tiny: Path, tmp_path: Path, which: str, loader, edit: str) -> None:
    sd = read_state_dict(tiny / which)
    victim = "blocks.1.mlp.fc2.bias"
    if edit == "rename":
        sd["blocks.1.mlp.fc_2.bias"] = sd.pop(victim)
    elif edit == "drop":
        del sd[victim]
    else:
        sd["blocks.1.mlp.extra"] = torch.zeros(3)
    path = tmp_path / Path(which).name
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError):
        loader(path)


def test_dinov2_position_embedding_like_the_hub() -> None:
    torch.manual_seed(0)
    model = DinoV2(embed_dim=32, depth=1, patch_size=14, img_size=518)
    torch.nn.init.normal_(model.pos_embed)
    assert model.interpolate_pos_encoding(518, 518) is model.pos_embed  # trained size: stored table as is
    pos = model.interpolate_pos_encoding(224, 224)
    assert tuple(pos.shape) == (1, 1 + 16 * 16, 32)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # class token never resized
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    # the hub's interpolate_offset: the scale factor (16.1/37) sets the sampling grid, not the output size
    by_scale = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False)
    assert torch.allclose(pos[0, 1:], by_scale.permute(0, 2, 3, 1).reshape(-1, 32))
    assert not torch.allclose(pos[0, 1:], by_size.permute(0, 2, 3, 1).reshape(-1, 32))
    out = model(torch.randn(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 16, 16, 32)


def test_out_attention_collapse_equals_per_head_logits() -> None:
    torch.manual_seed(0)
    attn = OutAttention(64, num_heads=16)
    x, ctx = torch.randn(2, 50, 64), torch.randn(2, 3 * 49, 64)
    q = attn.q_proj(x).reshape(2, 50, 16, 4).transpose(1, 2)
    k = attn.k_proj(ctx).reshape(2, 147, 16, 4).transpose(1, 2)
    upstream = ((q * 4 ** -0.5) @ k.transpose(-2, -1)).mean(dim=1).mean(dim=1)  # heads, then queries
    assert torch.allclose(attn(x, ctx), upstream, atol=1e-5)


def test_aggregator_weights_are_masked_and_non_negative(tiny: Path) -> None:
    agg = load_feature_aggregator(tiny / "pretrained_models/feature_aggregator.pt")
    alphas = torch.zeros(2, 768, 768)
    alphas[0, 100:700, 200:500] = 1.0  # reference 1 is empty
    grid = alphas_to_grid(alphas, 37)
    with torch.no_grad():
        w = agg.forward_view(torch.rand(1, 3, 768, 768), torch.randn(1, 2 * 37 * 37, 64), grid)
    assert tuple(w.shape) == (2, 37, 37)
    assert (w >= 0).all() and (w[1] == 0).all() and (w[0][grid[0] == 0] == 0).all()


def test_birefnet_remote_code_loads_strictly_and_predicts(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from up2you.encoders.birefnet import load_birefnet, predict_alpha

    model = load_birefnet(tiny / "BiRefNet", "cpu", torch.float32)
    assert next(model.parameters()).dtype == torch.float32  # file is fp16; upstream runs fp32
    alpha = predict_alpha(model, torch.rand(2, 3, 90, 70))
    assert tuple(alpha.shape) == (2, 90, 70) and alpha.dtype == torch.float32
    assert 0.0 <= float(alpha.min()) and float(alpha.max()) <= 1.0

    broken = tmp_path / "BiRefNet"
    broken.mkdir()
    for f in (tiny / "BiRefNet").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(broken / "model.safetensors"))
    sd["heads.0.weightt"] = sd.pop("heads.0.weight")
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="heads.0.weight"):
        load_birefnet(broken, "cpu", torch.float32)
    (broken / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError):
        load_birefnet(broken, "cpu", torch.float32)
