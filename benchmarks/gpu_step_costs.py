"""What one denoising step costs, branch by branch, and the THG speed-up that follows (GPU only).

    OUT=/some/dir python benchmarks/gpu_step_costs.py [--views 20] [--res 768] [--steps 10] [--compile]

Full-size SD 2.1-base + UP2You adapters with random weights (profile full-random). The sampler is run up
to its denoising loop (prompts, reference VAE encode, reference pass, pose adapter); then, with CUDA events
after a warm-up, one UNet evaluation is timed as
  cond     the conditional branch, a batch of N with reference attention (what THG runs every step),
  uncond   the unconditional branch alone, a batch of N WITHOUT reference attention,
  cfg      both as one batch of 2N (batched CFG; what a refresh step costs in batched mode),
under several SDPA backends (default, flash, efficient, math) and channels-last, and optionally
torch.compile. FLOPs of each branch come from torch's FlopCounterMode. The THG ceiling for fixed-k over S
steps is T_cfg / T_thg with T_cfg = S*t_cfg and T_thg = (S - r)*t_cond + r*t_cfg (r refresh steps),
and the measured ratio comes from the real denoising loop (THG fixed-3 vs THG off) over `--steps` steps.
Writes step_costs.json to $OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from up2you.diffusion.guidance import GuidanceSchedule  # noqa: E402
from up2you.diffusion.models import random_sd21  # noqa: E402
from up2you.diffusion.pipeline import RGB_PROMPT, MultiViewSampler, SamplerOptions  # noqa: E402

N_REFS = 4
BACKENDS: dict[str, Any] = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
                            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                            "math": SDPBackend.MATH}  # fmt: skip


class PreparedSampler(MultiViewSampler):
    """The sampler stopped before its loop: everything a step needs, on the GPU."""

    def prepare(self, control: torch.Tensor, references: torch.Tensor, weight_maps: torch.Tensor) -> None:
        n, _, res, _ = control.shape
        gen = torch.Generator(self.device).manual_seed(self.opt.seed)
        self.m.vae.to(self.device, self.dtype)
        self.cond_emb, self.uncond_emb = self._encode_prompts(RGB_PROMPT)
        self.latents = self._randn((n, self.m.unet.config.in_channels, res // 8, res // 8), gen)
        ref_latents = self._encode_references(references, gen)
        self._place_unet()
        self._reference_pass(ref_latents, self.cond_emb, weight_maps, n)
        self.features = self._pose_features(control)
        self.m.context.num_views = n
        self.n = n

    def branch(self, which: str) -> torch.Tensor:
        n, x, t = self.n, self.latents, torch.tensor(500, device=self.device)
        cond, uncond = self.cond_emb.expand(n, -1, -1), self.uncond_emb.expand(n, -1, -1)
        if which == "cond":
            return self._unet(x, t, cond, self.features, 0)
        if which == "uncond":
            return self._unet(x, t, uncond, self.features, n)
        return self._unet(torch.cat([x, x]), t, torch.cat([uncond, cond]), [torch.cat([f, f]) for f in self.features], n)


def time_ms(fn: Any, repeats: int) -> float:
    """Median of `repeats` timed calls (CUDA events) after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def inputs(views: int, res: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(views, 3, res, res, generator=g), torch.rand(N_REFS, 3, res, res, generator=g),
            torch.rand(views, N_REFS, 37, 37, generator=g))


def loop_s(master: Any, views: int, res: int, steps: int, thg: str, device: torch.device) -> dict[str, Any]:
    """The real sampler's denoising time over `steps` steps (fresh copy of the models)."""
    models = copy.deepcopy(master)
    opts = SamplerOptions(steps=steps, thg_schedule=thg, thg_interval=3, ref_chunk=N_REFS)
    result = MultiViewSampler(models, device, torch.float16, opts)(RGB_PROMPT, *inputs(views, res))
    del models
    torch.cuda.empty_cache()
    return {"denoise_s": result.stats["denoise_s"], "nfe": result.stats["nfe"]}


def measure_branches(master: Any, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, int], dict[str, Any]]:
    """FLOPs and median milliseconds of each branch, per SDPA backend and layout (the models are a copy)."""
    sampler = PreparedSampler(copy.deepcopy(master), device, torch.float16, SamplerOptions(ref_chunk=N_REFS))
    branches = ("cond", "uncond", "cfg")

    def timed(reference: torch.Tensor) -> dict[str, float]:
        out = {b: time_ms(lambda b=b: sampler.branch(b), args.repeats) for b in branches}
        # how far this variant's conditional prediction is from the default's (equal maths, other rounding)
        out["cond_max_abs_diff"] = float((sampler.branch("cond").float() - reference).abs().max())
        return out

    costs: dict[str, Any] = {}
    with torch.inference_mode():
        sampler.prepare(*inputs(args.views, args.res))
        reference = sampler.branch("cond").float()
        counted = {b: flops(lambda b=b: sampler.branch(b)) for b in branches}
        for name, backend in BACKENDS.items():
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            try:
                with ctx:
                    costs[name] = timed(reference)
            except RuntimeError as exc:  # a backend that cannot run these shapes
                costs[name] = {"error": str(exc).splitlines()[0]}
            print(name, costs[name], flush=True)
        sampler.m.unet.to(memory_format=torch.channels_last)
        costs["channels_last"] = timed(reference)
        print("channels_last", costs["channels_last"], flush=True)
        sampler.m.unet.to(memory_format=torch.contiguous_format)
        if args.compile:
            t = time.perf_counter()
            sampler.m.unet = torch.compile(sampler.m.unet)
            costs["compile"] = {**timed(reference), "compile_and_time_s": round(time.perf_counter() - t, 1)}
            print("compile", costs["compile"], flush=True)
    torch.cuda.empty_cache()
    return counted, costs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--res", type=int, default=768)
    ap.add_argument("--steps", type=int, default=10, help="steps of the real THG-vs-CFG loops")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd UNet (slow to compile)")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda:0")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    t0 = time.perf_counter()
    master = random_sd21()
    for m in (master.unet, master.vae, master.pose_adapter, master.text_encoder):
        m.to(torch.float16)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d"), "views": args.views, "resolution": args.res}  # fmt: skip
    result["flops"], costs = measure_branches(master, args, device)
    result["branch_ms"] = costs
    default = costs["default"]
    tflops = {b: result["flops"][b] / (default[b] / 1000) / 1e12 for b in ("cond", "uncond", "cfg")}
    result["achieved_tflops_default"] = {b: round(v, 1) for b, v in tflops.items()}
    s = 50
    refresh = sum(GuidanceSchedule.from_plan("fixed", s, 3.0, 3).needs_uncond(i) for i in range(s))
    t_cfg, t_thg = s * default["cfg"], (s - refresh) * default["cond"] + refresh * default["cfg"]
    result["thg_fixed3_50_steps"] = {"refresh_steps": refresh, "cfg_ms": round(t_cfg, 1), "thg_ms": round(t_thg, 1),
                                     "ceiling": round(t_cfg / t_thg, 3),
                                     "uncond_share_of_cfg_step": round(1 - default["cond"] / default["cfg"], 3)}  # fmt: skip
    with torch.inference_mode():
        cfg = loop_s(master, args.views, args.res, args.steps, "off", device)
        thg = loop_s(master, args.views, args.res, args.steps, "fixed", device)
    r = sum(GuidanceSchedule.from_plan("fixed", args.steps, 3.0, 3).needs_uncond(i) for i in range(args.steps))
    ceiling_s = args.steps * default["cfg"] / ((args.steps - r) * default["cond"] + r * default["cfg"])
    measured = cfg["denoise_s"] / thg["denoise_s"]
    result["loop"] = {"steps": args.steps, "cfg": cfg, "thg_fixed3": thg, "measured_ratio": round(measured, 3),
                      "ceiling_at_these_steps": round(ceiling_s, 3), "of_ceiling": round(measured / ceiling_s, 3)}  # fmt: skip
    result["total_s"] = round(time.perf_counter() - t0, 1)
    (out_dir / "step_costs.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
