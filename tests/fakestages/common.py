"""The body every fake stage shares: deterministic tensors from the plan and the upstream outputs."""

from __future__ import annotations

import os
import time
import zlib

import torch

from stages.harness import StageContext


def run_fake(ctx: StageContext, reads: tuple[str, ...]) -> torch.Tensor:
    """Allocate, compute and save `outputs.safetensors`; the result depends only on the plan and inputs."""
    started = time.time()  # wall clock, comparable across stage processes: when this stage held the "GPU"
    plan = ctx.plan
    g = torch.Generator().manual_seed(zlib.crc32(ctx.name.encode()) + plan.seed)
    upstream = sum(float(ctx.load_tensors(r)["out"].double().sum()) for r in reads if r != "inputs")
    if "inputs" in reads:
        upstream += sum(p.stat().st_size for p in ctx.input_photos())
    ballast = torch.ones(plan.views * plan.resolution * 64)  # a real allocation that scales with the plan
    out = torch.rand(plan.views, 8, 8, generator=g) + (upstream % 1000.0) / 1000.0 + ballast.mean()
    time.sleep(_run_seconds(ctx.name))
    ctx.save_tensors("outputs.safetensors", {"out": out.float()})
    ctx.record(views=plan.views, resolution=plan.resolution, cfg_mode=plan.cfg_mode, run_window=[started, time.time()],
               # what a CPU-fallback test checks: the request said CPU, and the process saw no GPU and made no context
               cpu_fallback=bool(ctx.request.get("cpu_fallback")), cuda_initialized=torch.cuda.is_initialized(),
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return out


def _run_seconds(stage: str) -> float:
    """FAKE_RUN_S="views=6,mesh=1": how long named stages take (timing tests); others take no extra time."""
    for item in filter(None, os.environ.get("FAKE_RUN_S", "").split(",")):
        name, _, seconds = item.partition("=")
        if name == stage:
            return float(seconds)
    return 0.0
