"""Geometry on the GPU: nvdiffrast build time, torch-vs-nvdiffrast agreement, peak memory and time of
apose (20 views, 768), mesh fitting (20 views, 1024^2, a few iterations, extrapolated) and video
(64 frames at 1024^2, chunk 8 vs 64). Uses the synthetic SMPL-X-sized body (no licensed files).

    OUT=/some/dir python benchmarks/gpu_geometry.py [--mesh-iters 50]

Writes $OUT/gpu_geometry.json (OUT defaults to "."). Peaks: torch's allocator (max_memory_allocated /
reserved, reset per measurement) and NVML's used memory for this device (includes the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from up2you.geometry.assets import body_model  # noqa: E402
from up2you.geometry.body import apose_mesh  # noqa: E402
from up2you.geometry.mesh_ops import normalize_to_bound, vertex_normals  # noqa: E402
from up2you.geometry.reconstruct import fit_goal, fit_mesh, normal_targets  # noqa: E402
from up2you.render.camera import orbit_mvps, to_clip  # noqa: E402
from up2you.render.draw import normal_attr, render_attr  # noqa: E402
from up2you.render.nvdiffrast_backend import NvdiffrastRasterizer, load_nvdiffrast  # noqa: E402
from up2you.render.torch_raster import TorchRasterizer  # noqa: E402
from up2you.views import view_yaws  # noqa: E402

GiB = 2**30


def _nvml_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:  # noqa: BLE001 - NVML is optional here
        return None


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn once; report seconds and torch peaks (GiB) above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.time()
    out = fn()
    torch.cuda.synchronize()
    return out, {
        "seconds": time.time() - t,
        "peak_allocated_gib": (torch.cuda.max_memory_allocated() - base) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "nvml_used_gib_after": (_nvml_used() or 0) / GiB,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh-iters", type=int, default=50)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda:0")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                              "nvml_used_gib_start": (_nvml_used() or 0) / GiB}

    _, build_s = load_nvdiffrast()
    report["nvdiffrast_load_or_build_s"] = build_s
    nv = NvdiffrastRasterizer(dev)

    model = body_model(None, "full-random")
    verts_m, faces = apose_mesh(model, torch.zeros(1, 10))
    report["body"] = {"vertices": int(verts_m.shape[0]), "faces": int(faces.shape[0])}

    # agreement on the body at 512^2, 6 views
    body9, _, _ = normalize_to_bound(verts_m, 0.9)
    v, f = body9.to(dev), faces.to(dev)
    mvps = orbit_mvps(view_yaws(6), 1.0).to(dev)
    attr = normal_attr(vertex_normals(v, f))
    (img_t, a_t), (img_n, a_n) = (render_attr(r, v, f, attr, mvps, 512, 0.5) for r in (TorchRasterizer(dev), nv))
    cov_t, cov_n = a_t > 0.999, a_n > 0.999
    both = cov_t & cov_n
    rast_t = TorchRasterizer(dev).rasterize(to_clip(v, mvps), f.int(), (512, 512))
    rast_n = nv.rasterize(to_clip(v, mvps), f.int(), (512, 512))
    hit = (rast_t[..., 3] > 0) & (rast_n[..., 3] > 0)
    report["agreement_512_6views"] = {
        "coverage_mismatch_fraction": float((cov_t != cov_n).float().mean()),
        "normal_max_abs_diff_interior": float((img_t - img_n).abs().permute(0, 2, 3, 1)[both].max()),
        "alpha_mean_abs_diff": float((a_t - a_n).abs().mean()),
        "depth_max_abs_diff": float((rast_t[..., 2] - rast_n[..., 2]).abs()[hit].max()),
        "same_triangle_fraction": float((rast_t[..., 3] == rast_n[..., 3])[hit].float().mean()),
    }
    del img_t, a_t, img_n, a_n, rast_t, rast_n

    # apose: 20 views at 768
    yaws20 = view_yaws(20)

    def apose() -> torch.Tensor:
        with torch.no_grad():
            return render_attr(nv, v, f, attr, orbit_mvps(yaws20, 1.0).to(dev), 768, 0.5)[0]

    poses, report["apose_20x768"] = measure(apose)

    # mesh: targets = the body's own normal renders at 1024 (a fit from a shrunken start)
    body18, _, _ = normalize_to_bound(verts_m, 1.8)
    b = body18.to(dev)
    with torch.no_grad():
        tgt_img, tgt_a = render_attr(nv, b, f, normal_attr(vertex_normals(b, f)), orbit_mvps(yaws20, 2.0).to(dev),
                                     1024, 0.0)
    target, mask = normal_targets(tgt_img, tgt_a, 1024)
    del tgt_img, tgt_a, poses

    def mesh() -> list[float]:
        return fit_mesh(nv, b * 0.97, f, fit_goal(target, mask), yaws20, args.mesh_iters, 2.0)[2]

    losses, m = measure(mesh)
    m["iterations"] = args.mesh_iters
    m["seconds_per_iteration"] = m["seconds"] / args.mesh_iters
    m["extrapolated_700_iterations_s"] = m["seconds_per_iteration"] * 700
    m["loss_first_last"] = [losses[0], losses[-1]]
    report["mesh_20x1024"] = m
    target = mask = None  # free before the video measurement

    # video: 64 frames at 1024, chunk 8 vs 64 (colours + normals as the stage does)
    colors = torch.rand_like(v)
    frame_yaws = [i * 360.0 / 64 for i in range(64)]
    for chunk in (8, 64):
        def video(chunk: int = chunk) -> int:
            n = 0
            with torch.no_grad():
                for s in range(0, 64, chunk):
                    mv = orbit_mvps(frame_yaws[s : s + chunk], 1.0).to(dev)
                    for a in (colors, attr):
                        img, _ = render_attr(nv, v, f, a, mv, 1024, 1.0)
                        n += int(img.shape[0])
                        del img
            return n

        _, report[f"video_64x1024_chunk{chunk}"] = measure(video)

    path = out_dir / "gpu_geometry.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
