"""Each memory rewrite of the multi-view diffusion gives the upstream result.

The straightforward upstream forms (repeat-interleaved row keys, zero reference states for the
unconditional half, cloned caches of every processor, one reference batch, batched CFG, batched VAE
decode) are written here as references and compared with what up2you.diffusion runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from up2you.diffusion.guidance import GuidanceSchedule, GuidedPrediction, thg_grid
from up2you.diffusion.models import DiffusionModels
from up2you.diffusion.pipeline import MultiViewSampler, SamplerOptions, decode_latents
from up2you.diffusion.processors import AttentionContext, MVRefAttnProcessor, row_attention
from up2you.diffusion.reference import upstream_row_attention
from up2you.diffusion.scheduler import SD21_SCHEDULER_CONFIG, make_scheduler
from up2you.diffusion.selector import select_topk


@pytest.fixture(autouse=True)
def _no_grad():  # per test, not at import: a global switch would leak into other test modules
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from up2you.diffusion.tiny import write_tiny_diffusion

    root = tmp_path_factory.mktemp("tiny_diffusion")
    write_tiny_diffusion(root, seed=0)
    return root


@pytest.fixture
def tiny_models(tiny_root: Path) -> Callable[[], DiffusionModels]:
    """Fresh tiny models from the released layout (the sampler consumes the ones it is given)."""
    from up2you.diffusion.models import load_sd21

    return lambda: load_sd21(tiny_root / "stable-diffusion-2-1-base",
                             tiny_root / "pretrained_models" / "rgb_adapter.safetensors")


# upstream forms ---------------------------------------------------------------------------------


def upstream_attn1(proc: MVRefAttnProcessor, attn: torch.nn.Module, x: torch.Tensor, ref_full: torch.Tensor,
                   n: int) -> torch.Tensor:
    """Upstream processor: self + row (repeated keys) + reference attention over `ref_full`, which holds
    zeros for the unconditional samples."""
    h = attn.heads

    def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, lq, c = q.shape
        s = [t.view(t.shape[0], -1, h, c // h).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*s).transpose(1, 2).reshape(b, lq, c)

    base = attn.to_out[0](mha(attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    mv = proc.to_out_mv[0](upstream_row_attention(proc.to_q_mv(x), proc.to_k_mv(x), proc.to_v_mv(x), n, h))
    ref = proc.to_out_ref[0](mha(proc.to_q_ref(x), proc.to_k_ref(ref_full), proc.to_v_ref(ref_full)))
    return base + mv + ref


def _attention(dim: int = 32, heads: int = 2) -> tuple[torch.nn.Module, MVRefAttnProcessor, AttentionContext]:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True).eval()
    ctx = AttentionContext()
    proc = MVRefAttnProcessor(dim, "layer", ctx)
    for p in proc.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    attn.set_processor(proc)
    return attn, proc, ctx


# attention ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch", [(6, 2), (3, 1), (1, 2)])
def test_shared_key_row_attention_equals_repeated_keys(n: int, batch: int) -> None:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(batch * n, 64, 32, generator=g) for _ in range(3))
    ours = row_attention(q, k, v, n, heads=2)
    ref = upstream_row_attention(q, k, v, n, heads=2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_uncond_reference_constant_equals_zero_states() -> None:
    """Storing only the conditional half == upstream's cat([zeros, ref]) for the 2N CFG batch."""
    attn, proc, ctx = _attention()
    n, hw = 3, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n, hw, 32, generator=g)
    ref = torch.randn(n, 2 * hw, 32, generator=g)
    ctx.num_views, ctx.ref, ctx.n_uncond = n, {"layer": ref}, n
    ours = attn(x)
    expected = upstream_attn1(proc, attn, x, torch.cat([torch.zeros_like(ref), ref]), n)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the unconditional half alone (sequential CFG) and the conditional half alone (THG skip step)
    ctx.n_uncond = n
    torch.testing.assert_close(attn(x[:n]), expected[:n], rtol=1e-5, atol=1e-5)
    ctx.n_uncond = 0
    torch.testing.assert_close(attn(x[n:]), expected[n:], rtol=1e-5, atol=1e-5)


def test_reference_pass_caches_attn1_inputs_only_without_copies(tiny_models) -> None:
    """attn1-only, clone-free cache == upstream's cloned cache of every processor, restricted to attn1."""
    models = tiny_models()
    unet = models.unet
    full: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: full.__setitem__(name, args[0].clone()))
             for name, m in unet.named_modules() if name.endswith((".attn1", ".attn2"))]
    ctx = models.context
    ctx.capture = {}
    x = torch.randn(2, 4, 8, 8)
    unet(x, torch.tensor(0), encoder_hidden_states=torch.randn(2, 77, 32), return_dict=False)
    for h in hooks:
        h.remove()
    assert len(full) == 32 and len(ctx.capture) == 16
    for name, (cached,) in ctx.capture.items():
        assert name.endswith(".attn1")
        assert torch.equal(cached, full[name])


# sampler-level exactness ---------------------------------------------------------------------------
def _inputs(n: int = 3, nr: int = 3, res: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (torch.rand(n, 3, res, res, generator=g), torch.rand(nr, 3, res, res, generator=g),
            torch.rand(n, nr, 37, 37, generator=g))


_BASE = dict(steps=3, guidance=3.0, seed=42, thg_schedule="off", ref_chunk=4, vae_mode="batched")
_RUNS: dict[tuple, tuple[torch.Tensor, dict]] = {}


def _run(tiny_models, weight_maps: bool = True, **opts) -> tuple[torch.Tensor, dict]:
    """One sampler run per distinct option set (memoised: the baseline is shared by several tests)."""
    key = (weight_maps, *sorted(opts.items()))
    if key not in _RUNS:
        control, refs, wm = _inputs()
        sampler = MultiViewSampler(tiny_models(), "cpu", torch.float32, SamplerOptions(**{**_BASE, **opts}))
        res = sampler("Multi-view Human, Full Body, High Quality, HDR", control, refs, wm if weight_maps else None)
        _RUNS[key] = (res.images, res.stats)
    return _RUNS[key]


def test_chunked_reference_pass_equals_one_batch(tiny_models) -> None:
    a, _ = _run(tiny_models, ref_chunk=1)
    b, _ = _run(tiny_models)  # ref_chunk 4 >= 3 references: one batch
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_sequential_cfg_equals_batched_cfg(tiny_models) -> None:
    a, sa = _run(tiny_models)
    b, sb = _run(tiny_models, cfg_mode="sequential")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert sa["nfe"] == sb["nfe"] == 6


def test_thg_interval_one_is_exactly_cfg(tiny_models) -> None:
    a, sa = _run(tiny_models)
    b, sb = _run(tiny_models, thg_schedule="fixed", thg_interval=1)
    assert torch.equal(a, b)  # same seed, separate runs: bit-identical
    assert sa["nfe"] == sb["nfe"] == 6 and sb["nfe_saved"] == 0


def test_thg_skips_unconditional_passes(tiny_models) -> None:
    a, _ = _run(tiny_models)
    b, sb = _run(tiny_models, thg_schedule="fixed", thg_interval=2)
    assert sb["nfe"] == 5 and sb["nfe_saved"] == 1 and sb["refresh_steps"] == [0, 2]
    assert not torch.equal(a, b)


def test_normal_mode_pixel_aligned_references(tiny_models) -> None:
    images, stats = _run(tiny_models, weight_maps=False)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match="one per view"):
        control, refs, _ = _inputs(nr=2)
        MultiViewSampler(tiny_models(), "cpu", torch.float32, SamplerOptions(steps=1))("p", control, refs, None)


def test_vae_sliced_and_tiled_match_batched(tiny_models) -> None:
    vae = tiny_models().vae
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    batched = decode_latents(vae, z, "batched")
    torch.testing.assert_close(decode_latents(vae, z, "sliced"), batched, rtol=0, atol=1e-5)
    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    tiled = decode_latents(vae, z, "tiled", tile=64)  # 128-px images in 64-px tiles
    hook.remove()
    assert len(calls) > 2 and all(s[-1] <= 8 for s in calls)  # really tiled: at most 8-latent tiles
    assert float((tiled - batched).abs().mean()) < 0.05


# schedules ----------------------------------------------------------------------------------------
def test_scheduler_is_leading_ddpm_with_interpolated_snr_shift() -> None:
    s = make_scheduler(SD21_SCHEDULER_CONFIG)
    s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and len(s.timesteps) == 50
    assert s.config.clip_sample is False and s.config.prediction_type == "epsilon"
    base = make_scheduler(SD21_SCHEDULER_CONFIG, shift_scale=1.0).alphas_cumprod.double()
    snr = base / (1 - base)
    ac = s.alphas_cumprod.double()
    ratio = (ac / (1 - ac)) / snr
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(ratio, 8.0 ** (-t / 999), rtol=2e-3, atol=0)


def test_thg_paper_grid_and_nfe() -> None:
    assert thg_grid(50) == (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17, 20, 23, 26, 28, 30, 32, 34, 36)
    assert GuidanceSchedule.from_plan("paper", 50, 3.0).nfe() == 70
    assert GuidanceSchedule.from_plan("fixed", 50, 3.0, 3).nfe() == 67
    assert GuidanceSchedule.from_plan("off", 50, 3.0).nfe() == 100
    assert len(thg_grid(50, rho=0.9)) > len(thg_grid(50)) >= len(thg_grid(50, rho=1.3))


def test_guided_prediction_keeps_the_guidance_scale() -> None:
    sched = GuidanceSchedule(3.0, 4, frozenset({0}), boost=1.1, cutoff=3)
    guide = GuidedPrediction(sched)
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert torch.equal(guide(0, cond, uncond), uncond + 3.0 * (cond - uncond))  # CFG, not cond + s*delta
    later = torch.tensor([5.0])
    torch.testing.assert_close(guide(1, later, None), later + 2.0 * 1.1 * (cond - uncond))
    assert torch.equal(guide(3, later, None), later)  # after the cutoff: conditional only


def test_select_topk_follows_upstream_rule() -> None:
    g = torch.Generator().manual_seed(5)
    nr, side, c = 3, 4, 8
    feats = torch.randn(nr, side * side, c, generator=g)
    wm = torch.rand(2, nr, 37, 37, generator=g)
    out = select_topk(feats, wm)
    assert out.shape == (2, 2 * side * side, c)
    w = F.interpolate(wm[1:2].transpose(0, 1), size=(side, side), mode="bilinear", align_corners=True).reshape(-1)
    idx = torch.topk(w, 2 * side * side).indices.sort().values
    torch.testing.assert_close(out[1], feats.reshape(-1, c)[idx] * w[idx, None])
    assert select_topk(feats[:1], wm[:, :1]).shape == (2, side * side, c)  # one photo: k = H*W
