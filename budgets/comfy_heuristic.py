"""What ComfyUI's memory heuristics would predict for the same work: the anchor our table must beat.

Sources (read for facts, see ../shared/research/anchors.md §1.2-1.3): `comfy/model_base.py`
`BaseModel.memory_required` (area x dtype_size x 0.01 x memory_usage_factor MiB with efficient
attention; SD2.x factor 1.0), `comfy/sampler_helpers.py` `prepare_sampling` (batch x 2 for CFG),
`comfy/sd.py` `VAE.memory_used_decode` (2178 x latent_h x latent_w x 64 x dtype_size bytes per image),
`comfy/model_management.py` `minimum_inference_memory` (0.8 GiB + 0.4 GiB reserve on Linux).
ComfyUI has no term for UP2You's multi-view or reference attention.
"""

from __future__ import annotations

MiB = 2**20
GiB = 2**30
MIN_INFERENCE = int(1.2 * GiB)
UNET_FACTOR_SD2 = 1.0


def unet_sampling_bytes(views: int, latent: int, cfg_batched: bool, dtype_size: int = 2,
                        factor: float = UNET_FACTOR_SD2) -> int:
    """Activation memory ComfyUI reserves for one sampling step of `views` images."""
    batch = views * (2 if cfg_batched else 1)
    area = batch * latent * latent
    return int(area * dtype_size * 0.01 * factor * MiB)


def vae_decode_bytes(images: int, latent: int, dtype_size: int = 2) -> int:
    """ComfyUI's decode estimate for `images` latents decoded in one batch."""
    return int(2178 * latent * latent * 64 * dtype_size * images)


def diffusion_stage_bytes(views: int, resolution: int, weights_bytes: int, cfg_batched: bool = True,
                          vae_sliced: bool = True) -> int:
    """Peak ComfyUI would plan for a diffusion stage: weights + max(sampling, decode) + its fixed reserve."""
    latent = resolution // 8
    sampling = unet_sampling_bytes(views, latent, cfg_batched)
    decode = vae_decode_bytes(1 if vae_sliced else views, latent)
    return weights_bytes + max(sampling, decode) + MIN_INFERENCE
