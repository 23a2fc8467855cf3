"""The full-files writer: full-size configs, written once, loaded back strictly by the real loaders.

Written at divisor 16 (every width / 16: the same code and file layout, a 40 MB folder) so the round
trip runs on a CPU; divisor 1 is what the benchmark writes on the GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from up2you import checkpoints
from up2you.diffusion.models import TEXT_FULL, UNET_FULL, VAE_FULL
from up2you.fullsize import MARKER, FullSizes, is_written, write_full_weights

DIVISOR = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_full_weights(tmp_path_factory.mktemp("full_files"), divisor=DIVISOR)


def test_divisor_one_is_exactly_the_released_architectures() -> None:
    full = FullSizes(1)
    assert full.unet == {**UNET_FULL, "norm_num_groups": 32}  # 32: diffusers' default, what SD 2.1 uses
    assert full.vae == {**VAE_FULL, "norm_num_groups": 32}
    assert {**full.text, "vocab_size": full.vocab_size} == {k: v for k, v in TEXT_FULL.items()
                                                            if not k.endswith("token_id")}  # fmt: skip
    enc = full.encoders
    assert (enc.dim, enc.dinov2_depth, enc.pose_widths) == (1024, 24, (32, 64, 128, 256, 512))
    with pytest.raises(ValueError, match="divisor 3"):
        FullSizes(3)


def test_every_file_is_in_the_released_layout_and_the_marker_skips_a_rewrite(files: Path) -> None:
    keys = list(checkpoints.CHECKPOINTS)
    assert checkpoints.missing(files, keys) == []
    assert is_written(files, DIVISOR) and not is_written(files, 1) and not (files / ".tiny").exists()
    unet_file = checkpoints.resolve(files, "sd21") / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet_file.stat().st_mtime_ns
    write_full_weights(files, divisor=DIVISOR)  # marker matches: nothing is rewritten
    assert unet_file.stat().st_mtime_ns == before
    damaged = files.parent / "damaged"
    damaged.mkdir()
    (damaged / MARKER).write_text('{"writer": "up2you.fullsize", "version": 0}\n')
    assert not is_written(damaged, DIVISOR)


def test_the_real_loaders_read_every_file_strictly(files: Path) -> None:
    from up2you.diffusion.models import load_sd21
    from up2you.encoders.birefnet import load_birefnet, predict_alpha
    from up2you.encoders.dinov2 import load_dinov2
    from up2you.encoders.feature_aggregator import load_feature_aggregator
    from up2you.encoders.shape_predictor import load_shape_predictor
    from up2you.geometry.assets import body_model, hand_assets

    sizes = FullSizes(DIVISOR)
    sd_folder = checkpoints.resolve(files, "sd21")
    for adapter in ("rgb_adapter", "normal_adapter"):  # AdapterBundle.load_file: all 198 keys, strict
        models = load_sd21(sd_folder, checkpoints.resolve(files, adapter))
        assert tuple(models.unet.config.block_out_channels) == sizes.unet["block_out_channels"]
    assert len(models.processors) == 16
    tok = models.tokenizer
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)  # SD 2.1's ids
    ids = tok(["a full body human"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = models.text_encoder(ids).last_hidden_state
    assert tuple(hidden.shape) == (1, 77, sizes.unet["cross_attention_dim"])  # feeds the UNet's cross-attention

    dino = load_dinov2(checkpoints.resolve(files, "dinov2"))
    assert dino.embed_dim == 1024 // DIVISOR and len(dino.blocks) == 1
    load_shape_predictor(checkpoints.resolve(files, "shape_predictor"))
    load_feature_aggregator(checkpoints.resolve(files, "feature_aggregator"))

    matte = load_birefnet(checkpoints.resolve(files, "birefnet"), "cpu", torch.float32)
    alpha = predict_alpha(matte, torch.rand(1, 3, 64, 48))
    assert tuple(alpha.shape) == (1, 64, 48) and float(alpha.min()) > 0.95  # a full matte, as full-random's

    def ckpt(key: str) -> Path:
        return checkpoints.resolve(files, key)

    body = body_model(ckpt, "real")
    assert body.v_template.shape[0] == 10475
    hands, lmk = hand_assets(ckpt, "real")
    assert hands.size > 0 and lmk.shape == (10475,)



def test_a_run_plans_on_stand_in_files_without_checking_release_hashes(files: Path, tmp_path: Path) -> None:
    """The random files can never hash like the release: preflight accepts the folder by its marker and says
    so in run.json's weights record; without the marker the same files are refused with the hash problem."""
    from orchestrator.job import JobError, RunOptions, _preflight, plan_job
    from stages.spec import UP2YOU
    from tests.conftest import write_photos

    photos = write_photos(tmp_path / "photos", 2)
    options = RunOptions(device="cpu", weights=files, views=6, resolution=512, steps=2)
    choice = plan_job(photos, options).choice
    record = _preflight(UP2YOU, choice, options, tmp_path / "out")
    assert "not checked" in record["stand_ins"] and record["root"] == str(files)
    (files / MARKER).rename(files / "marker.bak")
    try:
        with pytest.raises(JobError, match="expected"):
            _preflight(UP2YOU, choice, options, tmp_path / "out2")
    finally:
        (files / "marker.bak").rename(files / MARKER)
