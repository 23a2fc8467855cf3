"""The multi-view sampler shared by the RGB and normal stages (upstream `UP2YouI2MVSDPipeline` and
`UP2YouMV2NormalPipeline`, fact sheet §4.4-4.7), arranged for a memory budget.

Order of work (and of the seeded generator's draws, as upstream: initial latents, then the reference
VAE posterior sample, then the per-step DDPM noise):
1. prompts -> CLIP embeddings (text encoder on the device once, then freed);
2. initial latents (N, 4, R/8, R/8);
3. references -> VAE posterior sample (one image at a time, then the encoder is freed);
4. reference-UNet pass at t=0 with the positive prompt, in chunks of `ref_chunk` references; each attn1
   layer keeps its input; RGB: top-K selection per view, normal: view i <- reference i;
5. pose adapter on the N control images, once (the features are reused every step, never cloned);
6. the denoising loop: CFG batched (2N) or sequential (N + N), THG holding Delta between refreshes;
7. UNet freed, VAE decode batched, sliced or tiled.

Unconditional samples use the empty prompt, the pose adapter and ZERO reference states (never stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from up2you.diffusion.guidance import GuidanceSchedule, GuidedPrediction
from up2you.diffusion.models import DiffusionModels
from up2you.diffusion.prompt_cache import PromptCache
from up2you.diffusion.scheduler import make_scheduler
from up2you.diffusion.selector import select_topk

RGB_PROMPT = "Multi-view Human, Full Body, High Quality, HDR"
NORMAL_PROMPT = "Multi-view Human, Full Body, Normal Map, High Quality, HDR"
TILE_SAMPLE = 256  # pixel tile of the tiled VAE decode (diffusers' default equals the image: no tiling)


@dataclass(frozen=True)
class SamplerOptions:
    """The plan's knobs as the sampler needs them."""

    steps: int = 50
    guidance: float = 3.0
    seed: int = 42
    thg_schedule: str = "off"
    thg_interval: int = 1
    cfg_mode: str = "batched"
    vae_mode: str = "sliced"
    offload: str = "none"
    ref_chunk: int = 4

    @classmethod
    def from_plan(cls, plan: Any) -> SamplerOptions:
        return cls(plan.steps, plan.guidance, plan.seed, plan.thg_schedule, plan.thg_interval, plan.cfg_mode,
                   plan.vae_mode, plan.offload, plan.ref_chunk)

    @property
    def schedule(self) -> GuidanceSchedule:
        return GuidanceSchedule.from_plan(self.thg_schedule, self.steps, self.guidance, self.thg_interval)


@dataclass
class SamplerResult:
    images: torch.Tensor  # (N, 3, R, R) float32 in [0, 1], on the CPU
    stats: dict[str, Any] = field(default_factory=dict)


class MultiViewSampler:
    """Runs one multi-view generation; consumes the models (each is freed once it is no longer needed)."""

    def __init__(self, models: DiffusionModels, device: torch.device | str, dtype: torch.dtype,
                 options: SamplerOptions, log: Callable[[str], None] | None = None,
                 prompt_cache: PromptCache | None = None) -> None:
        self.m = models
        self.prompt_cache = prompt_cache
        self.device = torch.device(device)
        self.dtype = dtype
        self.opt = options
        self.log = log or (lambda msg: None)
        self.stats: dict[str, Any] = {}
        self._on_gpu = self.device.type == "cuda"

    # public ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, prompt: str, control: torch.Tensor, references: torch.Tensor,
                 weight_maps: torch.Tensor | None = None) -> SamplerResult:
        """control (N,3,R,R) and references (Nr,3,R,R) in [0,1]; weight_maps (N,Nr,h,w) selects reference
        tokens per view (RGB); without it reference i serves view i (normal, Nr == N)."""
        n, _, res, _ = control.shape
        if weight_maps is None and references.shape[0] != n:
            raise ValueError(f"pixel-aligned references need one per view: {references.shape[0]} != {n}")
        gen = torch.Generator(self.device).manual_seed(self.opt.seed)
        if self.opt.offload == "none":
            self._timed("place_vae", self.m.vae.to, self.device, self.dtype)
        cond_emb, uncond_emb = self._timed("encode_prompt", self._encode_prompts, prompt)
        latents = self._randn((n, self.m.unet.config.in_channels, res // 8, res // 8), gen)
        ref_latents = self._timed("encode_refs", self._encode_references, references, gen)
        self._timed("place_unet", self._place_unet)
        self._timed("reference_pass", self._reference_pass, ref_latents, cond_emb, weight_maps, n)
        del ref_latents
        features = self._timed("pose_adapter", self._pose_features, control)
        latents = self._timed("denoise", self._denoise, latents, cond_emb, uncond_emb, features, gen)
        del features
        self._free_unet()
        images = self._timed("decode", self._decode, latents)
        return SamplerResult(images, self.stats)

    # stages of the run ----------------------------------------------------------------------------
    def _encode_prompts(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) CLIP embeddings: read back from the prompt cache when an earlier job on this machine
        computed them from the same files (the same bits), else computed here and stored for the next job."""
        te = self.m.text_encoder
        assert te is not None, "prompts are encoded once per sampler"
        cache = self.prompt_cache if self.m.text_files else None  # full-random has no files: nothing to key on
        key = cache.key([prompt, ""], self.m.text_files, self.dtype, self.device) if cache is not None else ""
        hit = cache.load(key) if cache is not None else None
        if hit is not None:
            self.m.text_encoder = None
            self.stats["prompt_cache"] = "hit"
            return hit[0].to(self.device, self.dtype), hit[1].to(self.device, self.dtype)
        te.to(self.device, self.dtype)
        ids = self._token_ids([prompt, ""]).to(self.device)
        emb = te(ids)[0].to(self.dtype)
        self.m.text_encoder = None
        del te
        self._empty_cache()
        if cache is not None:
            cache.store(key, emb[:1], emb[1:])
            self.stats["prompt_cache"] = "stored"
        return emb[:1], emb[1:]

    def _token_ids(self, prompts: list[str]) -> torch.Tensor:
        tok = self.m.tokenizer
        if tok is None:  # full-random: fixed dummy ids (BOS, a few tokens, EOS, padding); no tokenizer
            cfg = self.m.text_encoder.config  # type: ignore[union-attr]
            ids = torch.full((len(prompts), cfg.max_position_embeddings), cfg.pad_token_id, dtype=torch.long)
            ids[:, 0] = cfg.bos_token_id
            ids[0, 1:9] = torch.arange(1000, 1008)
            ids[0, 9] = ids[1, 1] = cfg.eos_token_id
            return ids
        out = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        return out.input_ids

    def _encode_references(self, references: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """VAE posterior sample of each reference (one image at a time; the draw covers the whole batch
        at once, as upstream's single `latent_dist.sample(generator)`). Frees the encoder."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.m.vae
        vae.encoder.to(self.device, self.dtype)
        vae.quant_conv.to(self.device, self.dtype)
        moments = [vae.quant_conv(vae.encoder(img[None].to(self.device, self.dtype) * 2 - 1)) for img in references]
        latents = DiagonalGaussianDistribution(torch.cat(moments)).sample(gen) * vae.config.scaling_factor
        vae.encoder = None  # never used again (decode needs only post_quant_conv + decoder)
        vae.quant_conv = None
        self._empty_cache()
        return latents

    def _reference_pass(self, ref_latents: torch.Tensor, cond_emb: torch.Tensor,
                        weight_maps: torch.Tensor | None, n: int) -> None:
        """UNet at t=0 over the references in chunks; keep each attn1 input, select, store cond-only."""
        ctx = self.m.context
        ctx.capture = {}
        t0 = torch.zeros((), dtype=torch.long, device=self.device)
        try:
            for chunk in ref_latents.split(max(1, self.opt.ref_chunk)):
                self.m.unet(chunk, t0, encoder_hidden_states=cond_emb.expand(chunk.shape[0], -1, -1),
                            return_dict=False)
            captured = ctx.capture
        finally:
            ctx.capture = None
        pin = self.opt.offload != "none" and self._on_gpu
        for name in list(captured):
            raw = torch.cat(captured.pop(name))  # (Nr, HW, C)
            ref = select_topk(raw, weight_maps) if weight_maps is not None else raw
            del raw
            ctx.ref[name] = ref.to("cpu").pin_memory() if pin else ref
        self.stats["ref_cache_bytes"] = sum(v.numel() * v.element_size() for v in ctx.ref.values())
        self.stats["ref_cache_on"] = "cpu-pinned" if pin else str(self.device)
        self._empty_cache()

    def _pose_features(self, control: torch.Tensor) -> list[torch.Tensor]:
        adapter = self.m.pose_adapter.to(self.device, self.dtype)
        feats = adapter(control.to(self.device, self.dtype))
        self.m.pose_adapter = nn.Identity()
        del adapter
        self._empty_cache()
        return list(feats)

    def _denoise(self, latents: torch.Tensor, cond_emb: torch.Tensor, uncond_emb: torch.Tensor,
                 features: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        scheduler = make_scheduler(self.m.scheduler_config)
        scheduler.set_timesteps(self.opt.steps, device=self.device)
        schedule = self.opt.schedule
        guide = GuidedPrediction(schedule)
        n = latents.shape[0]
        self.m.context.num_views = n
        cond = cond_emb.expand(n, -1, -1)
        uncond = uncond_emb.expand(n, -1, -1)
        nfe = 0
        for i, t in enumerate(scheduler.timesteps):
            if not schedule.needs_uncond(i):
                eps_c, eps_u = self._unet(latents, t, cond, features, 0), None
                nfe += 1
            elif self.opt.cfg_mode == "batched":
                eps = self._unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond]),
                                 [torch.cat([f, f]) for f in features], n)
                eps_u, eps_c = eps.chunk(2)
                nfe += 2
            else:
                eps_u = self._unet(latents, t, uncond, features, n)
                eps_c = self._unet(latents, t, cond, features, 0)
                nfe += 2
            eps = guide(i, eps_c, eps_u)
            latents = scheduler.step(eps, t, latents, generator=gen, return_dict=False)[0]
        self.stats.update(nfe=nfe, nfe_cfg=2 * self.opt.steps, nfe_saved=2 * self.opt.steps - nfe,
                          refresh_steps=sorted(i for i in range(self.opt.steps) if schedule.needs_uncond(i)))
        return latents

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, features: list[torch.Tensor],
              n_uncond: int) -> torch.Tensor:
        self.m.context.n_uncond = n_uncond
        return self.m.unet(x, t, encoder_hidden_states=emb, down_intrablock_additional_residuals=list(features),
                           return_dict=False)[0]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.m.vae.to(self.device, self.dtype)
        return decode_latents(vae, latents, self.opt.vae_mode).cpu()

    # placement ------------------------------------------------------------------------------------
    def _place_unet(self) -> None:
        unet = self.m.unet
        if self.opt.offload == "sequential" and self._on_gpu:
            unet.to(self.dtype)
            unet.enable_group_offload(self.device, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True)
        else:
            unet.to(self.device, self.dtype)

    def _free_unet(self) -> None:
        self.m.unet = nn.Identity()
        self.m.context.ref.clear()
        self.m.processors.clear()
        self._empty_cache()

    # helpers --------------------------------------------------------------------------------------
    def _randn(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=gen, device=self.device, dtype=self.dtype)

    def _timed(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._on_gpu:
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        out = fn(*args)
        if self._on_gpu:
            torch.cuda.synchronize(self.device)
            self.stats[f"peak_after_{name}"] = int(torch.cuda.max_memory_allocated(self.device))
        self.stats[f"{name}_s"] = round(time.perf_counter() - t, 4)
        self.log(f"{name}: {self.stats[f'{name}_s']:.2f} s")
        return out

    def _empty_cache(self) -> None:
        if self._on_gpu:
            torch.cuda.empty_cache()


def decode_latents(vae: nn.Module, latents: torch.Tensor, mode: str, tile: int = TILE_SAMPLE) -> torch.Tensor:
    """Latents -> images in [0,1] (float32). `batched`: one call (peak grows with N); `sliced`: one image
    at a time; `tiled`: one image at a time in `tile`-px tiles with diffusers' overlap blending (the tile
    must be smaller than the image, else diffusers decodes it whole)."""
    z = latents / vae.config.scaling_factor
    if mode == "tiled":
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 8
    if mode == "batched":
        images = vae.decode(z, return_dict=False)[0]
    else:
        images = torch.cat([vae.decode(zi[None], return_dict=False)[0] for zi in z])
    return (images.float() / 2 + 0.5).clamp(0, 1)
