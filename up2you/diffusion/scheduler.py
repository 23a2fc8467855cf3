"""UP2You's sampler schedule: DDPM with the "interpolated" SNR shift of MV-Adapter (shift scale 8).

The shift divides SNR(t) by 8^(t/999) (log-space interpolation between the base schedule at t=0 and
SNR/8 at t=999), then rebuilds betas from alpha_bar = SNR / (1 + SNR). The result is a plain diffusers
`DDPMScheduler` built from SD 2.1-base's scheduler config with those betas as `trained_betas`, so
spacing ("leading", steps_offset 1: 981, 961, ..., 1 at 50 steps), epsilon prediction and the
stochastic variance draws are diffusers' own.
"""

from __future__ import annotations

from typing import Any

import torch

SHIFT_SCALE = 8.0


def interpolated_shift_betas(alphas_cumprod: torch.Tensor, shift_scale: float = SHIFT_SCALE) -> torch.Tensor:
    """Betas whose SNR is the base SNR divided by shift_scale^(t/(T-1))."""
    t = torch.arange(alphas_cumprod.shape[0], dtype=torch.float32)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    w = t / (alphas_cumprod.shape[0] - 1)
    shifted = torch.exp(torch.log(snr) * (1 - w) + torch.log(snr / shift_scale) * w)
    abar = shifted / (1 + shifted)
    alphas = abar / torch.cat([torch.ones(1), abar[:-1]])
    return 1 - alphas


def make_scheduler(base_config: dict[str, Any], shift_scale: float = SHIFT_SCALE) -> Any:
    """A DDPMScheduler from SD 2.1-base's scheduler config (any class's) with the shifted betas."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    config["trained_betas"] = None
    base = DDPMScheduler.from_config(config)
    betas = interpolated_shift_betas(base.alphas_cumprod, shift_scale)
    return DDPMScheduler.from_config(config, trained_betas=betas.numpy())


SD21_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
"""SD 2.1-base's released scheduler config (used by the tiny and full-random profiles)."""
