"""GPU memory and time of the multi-view diffusion stages (profile full-random: full-size SD 2.1-base +
UP2You adapters with random weights), per plan configuration, for the budget table.

    python benchmarks/gpu_diffusion.py                   # all configurations (< ~6 min on an H100)
    python benchmarks/gpu_diffusion.py --attention-only  # one 96^2 attn1 layer: shared-key vs upstream layout
    OUT=/some/dir python benchmarks/gpu_diffusion.py --only 20x768 --steps 3

Each configuration runs the whole sampler (prompts, reference VAE encode, chunked reference pass, pose
adapter, `steps` denoising steps, VAE decode) on a fresh copy of the models and records torch's peak
allocated/reserved, the device-wide peak used memory (NVML, polled every 2 ms) and the phase timings;
the per-step time extrapolates a 50-step run. Writes gpu_diffusion.json (or attention.json) to $OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from up2you.diffusion.models import DiffusionModels, random_sd21  # noqa: E402
from up2you.diffusion.pipeline import RGB_PROMPT, MultiViewSampler, SamplerOptions  # noqa: E402
from up2you.diffusion.processors import row_attention  # noqa: E402
from up2you.diffusion.reference import upstream_row_attention  # noqa: E402

MIB = 2**20
N_REFS = 4

# (label, views, resolution, sampler options)
CONFIGS: list[tuple[str, int, int, dict[str, Any]]] = [
    ("20x768 cfg-batched vae-sliced", 20, 768, {}),
    ("20x768 cfg-sequential vae-sliced", 20, 768, {"cfg_mode": "sequential"}),
    ("20x768 cfg-batched vae-batched", 20, 768, {"vae_mode": "batched"}),
    ("20x768 cfg-batched vae-tiled", 20, 768, {"vae_mode": "tiled"}),
    ("20x768 cfg-sequential offload-model", 20, 768, {"cfg_mode": "sequential", "offload": "model"}),
    ("20x768 cfg-sequential offload-sequential", 20, 768, {"cfg_mode": "sequential", "offload": "sequential"}),
    ("12x768 cfg-batched vae-sliced", 12, 768, {}),
    ("12x768 cfg-sequential vae-sliced", 12, 768, {"cfg_mode": "sequential"}),
    ("6x768 cfg-batched vae-sliced", 6, 768, {}),
    ("20x512 cfg-batched vae-sliced", 20, 512, {}),
    ("20x512 cfg-sequential vae-sliced", 20, 512, {"cfg_mode": "sequential"}),
    ("12x512 cfg-batched vae-sliced", 12, 512, {}),
    ("6x512 cfg-batched vae-sliced", 6, 512, {}),
]
# THG vs CFG wall time over `thg_steps` steps (20 views, 768 px)
THG_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("cfg", {"thg_schedule": "off"}),
    ("thg-fixed-3", {"thg_schedule": "fixed", "thg_interval": 3}),
    ("thg-fixed-3 cfg-sequential", {"thg_schedule": "fixed", "thg_interval": 3, "cfg_mode": "sequential"}),
    ("thg-paper", {"thg_schedule": "paper"}),
]


class UsedMemoryPoller:
    """Peak device-wide used memory (what NVML and other tenants see), polled in a thread."""

    def __init__(self, device: torch.device, period_s: float = 0.002) -> None:
        self.device, self.period, self.peak = device, period_s, 0
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - fall back to the CUDA runtime's view of the same number
            self._used = lambda: (lambda f, t: t - f)(*torch.cuda.mem_get_info(device))
            self.source = "cudaMemGetInfo"

    def __enter__(self) -> UsedMemoryPoller:
        self.peak = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.period)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def inputs(views: int, res: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(views, 3, res, res, generator=g), torch.rand(N_REFS, 3, res, res, generator=g),
            torch.rand(views, N_REFS, 37, 37, generator=g))


def measure(master: DiffusionModels, views: int, res: int, steps: int, opts: dict[str, Any],
            device: torch.device) -> dict[str, Any]:
    """One sampler run on a fresh copy of the (host) models; peaks relative to an empty device."""
    models = copy.deepcopy(master)
    control, refs, wm = inputs(views, res)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    options = SamplerOptions(steps=steps, **{"vae_mode": "sliced", "ref_chunk": N_REFS, **opts})
    row: dict[str, Any] = {"views": views, "resolution": res, "steps": steps, "refs": N_REFS, **opts}
    t = time.perf_counter()
    try:
        with UsedMemoryPoller(device) as poll:
            result = MultiViewSampler(models, device, torch.float16, options)(RGB_PROMPT, control, refs, wm)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(oom=str(exc).splitlines()[0])
        return row
    finally:
        del models
    st = result.stats
    row.update(
        wall_s=round(time.perf_counter() - t, 3),
        torch_peak_allocated_MiB=round((torch.cuda.max_memory_allocated(device) - base) / MIB, 1),
        torch_peak_reserved_MiB=round(torch.cuda.max_memory_reserved(device) / MIB, 1),
        used_peak_MiB=round(poll.peak / MIB, 1), used_source=poll.source,
        step_s=round(st["denoise_s"] / steps, 4), nfe=st["nfe"], nfe_saved=st["nfe_saved"],
        extrapolated_50_steps_s=round(st["denoise_s"] / steps * 50 + sum(
            v for k, v in st.items() if k.endswith("_s") and k != "denoise_s"), 2),
        ref_cache_MiB=round(st["ref_cache_bytes"] / MIB, 1),
        phases_s={k[:-2]: v for k, v in st.items() if k.endswith("_s")},
        cumulative_peak_after_MiB={k[len("peak_after_"):]: round((v - base) / MIB, 1)
                                   for k, v in st.items() if k.startswith("peak_after_")},
    )
    return row


def attention_only(device: torch.device) -> list[dict[str, Any]]:
    """One attn1 row-attention op at 96^2, C=320 (5 heads of 64), CFG batch 2N: upstream's
    repeat_interleave'd keys vs one shared key set per (sample, row)."""
    rows = []
    for n in (6, 12, 20):
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(2 * n, 96 * 96, 320, device=device, dtype=torch.float16, generator=g) for _ in range(3))
        outs = {}
        row: dict[str, Any] = {"views": n, "batch": 2 * n}
        for name, fn in (("upstream", upstream_row_attention), ("shared_key", row_attention)):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn(q, k, v, n, 5)
            torch.cuda.synchronize(device)
            row[f"{name}_extra_peak_MiB"] = round((torch.cuda.max_memory_allocated(device) - before) / MIB, 1)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn(q, k, v, n, 5)
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            row[f"{name}_ms"] = round(min(times) * 1000, 2)
            outs[name] = out
        row["max_abs_diff"] = float((outs["upstream"] - outs["shared_key"]).abs().max())
        rows.append(row)
        del q, k, v, outs
    return rows




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--thg-steps", type=int, default=6)
    ap.add_argument("--only", default="", help="run the configurations whose label contains this text")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip what would start after this")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda:0")
    t0 = time.perf_counter()
    meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "total_MiB": torch.cuda.get_device_properties(device).total_memory // MIB}
    if args.attention_only:
        result = {**meta, "attention": attention_only(device)}
        (out_dir / "attention.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    master = random_sd21()
    master_fp16 = {"unet": master.unet, "vae": master.vae, "adapter": master.pose_adapter, "text": master.text_encoder}
    for m in master_fp16.values():
        m.to(torch.float16)  # host copy in the compute dtype: half the copy and transfer per run
    meta["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"models built in {meta['build_s']} s", flush=True)
    rows, skipped = [], []
    jobs = [(label, v, r, o, args.steps) for label, v, r, o in CONFIGS]
    jobs += [(f"20x768 {label} ({args.thg_steps} steps)", 20, 768, o, args.thg_steps) for label, o in THG_CONFIGS]
    for label, views, res, opts, steps in jobs:
        if args.only and args.only not in label:
            continue
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(label)
            continue
        row = {"label": label, **measure(master, views, res, steps, opts, device)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        (out_dir / "gpu_diffusion.json").write_text(json.dumps({**meta, "rows": rows, "skipped": skipped}, indent=1))
    result = {**meta, "rows": rows, "skipped": skipped, "total_s": round(time.perf_counter() - t0, 1)}
    (out_dir / "gpu_diffusion.json").write_text(json.dumps(result, indent=1))
    print(f"done in {result['total_s']} s; skipped: {skipped}")


if __name__ == "__main__":
    main()
