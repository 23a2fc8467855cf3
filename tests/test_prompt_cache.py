"""Prompt embeddings kept between jobs: a later job reads the bits an earlier one computed, and only those."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from up2you.diffusion.pipeline import RGB_PROMPT, MultiViewSampler, SamplerOptions
from up2you.diffusion.prompt_cache import PromptCache

OPTIONS = SamplerOptions(steps=2, guidance=3.0, seed=42, vae_mode="batched")


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from up2you.diffusion.tiny import write_tiny_diffusion

    root = tmp_path_factory.mktemp("tiny_diffusion")
    write_tiny_diffusion(root, seed=0)
    return root


def _sample(root: Path, cache: PromptCache | None) -> tuple[torch.Tensor, dict]:
    from up2you.diffusion.models import load_sd21

    models = load_sd21(root / "stable-diffusion-2-1-base", root / "pretrained_models" / "rgb_adapter.safetensors")
    g = torch.Generator().manual_seed(7)
    control, refs, maps = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 2, 37, 37, generator=g)
    with torch.no_grad():
        result = MultiViewSampler(models, "cpu", torch.float32, OPTIONS, prompt_cache=cache)(RGB_PROMPT, control, refs, maps)
    return result.images, result.stats


def test_a_second_job_reads_the_embeddings_back_and_makes_the_same_images(sd_root: Path, tmp_path: Path) -> None:
    plain, stats = _sample(sd_root, None)
    assert "prompt_cache" not in stats
    cache = PromptCache(tmp_path / "prompts")
    first, s1 = _sample(sd_root, cache)
    second, s2 = _sample(sd_root, cache)
    assert (s1["prompt_cache"], s2["prompt_cache"]) == ("stored", "hit")
    assert len(list(cache.folder.glob("*.safetensors"))) == 1
    assert torch.equal(plain, first) and torch.equal(first, second)  # bit for bit


def test_other_files_or_dtype_miss_and_a_damaged_entry_is_computed_again(sd_root: Path, tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "prompts")
    sd = sd_root / "stable-diffusion-2-1-base"
    files = (sd / "text_encoder" / "config.json", sd / "tokenizer" / "vocab.json")
    key = cache.key(["a", ""], files, torch.float16, torch.device("cpu"))
    assert key == cache.key(["a", ""], files, torch.float16, torch.device("cpu"))
    assert key != cache.key(["b", ""], files, torch.float16, torch.device("cpu"))
    assert key != cache.key(["a", ""], files, torch.float32, torch.device("cpu"))
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the tokenizer file was replaced
    try:
        assert key != cache.key(["a", ""], files, torch.float16, torch.device("cpu"))
    finally:
        os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))

    cache.store(key, torch.ones(1, 77, 8), torch.zeros(1, 77, 8))
    cond, uncond = cache.load(key)
    assert torch.equal(cond, torch.ones(1, 77, 8)) and torch.equal(uncond, torch.zeros(1, 77, 8))
    cache.path(key).write_bytes(cache.path(key).read_bytes()[:40])  # damaged (cut short) by some other hand
    assert cache.load(key) is None
