"""UP2You's geometry fit: continuous remeshing of the A-pose SMPL-X towards the generated normal maps.

Targets are resized to mesh_resolution once. Views are rendered `view_chunk` at a time (0 = all in
one batch, as upstream), each chunk's loss is backpropagated before the next chunk is rendered and
the gradients add up in the vertices: exact up to float rounding (tested), and the transient memory
of rasterisation is that of one chunk instead of all views. One optimiser step and one remesh per
iteration either way.

What keeps the loop fast on a GPU: the loss of each iteration stays on the device (read back only
when logged), the normals are computed once per iteration and not once per chunk, the faces are
converted to int32 and the antialias topology built once per iteration for all chunks, the
rasterizer's buffers are grown ahead of the growing mesh (`Rasterizer.reserve`), the loss is one
fused pass over a channels-last (N,R,R,4) target, and the optimiser and remesher share one edge list
and read back only the counts they must (see `up2you/geometry/remesh.py`). Equal chunks are best
(the planner only picks divisors of the view count): nvdiffrast reallocates its buffers whenever
the number of images per call changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from up2you.geometry.mesh_ops import vertex_normals
from up2you.geometry.optimizer import MeshOptimizer, RemeshSettings
from up2you.render.base import Rasterizer
from up2you.render.camera import orbit_mvps
from up2you.render.draw import normal_attr, render_attr_alpha

Phase = Callable[[str], Any]  # a profiler's hook: phase("render") -> context manager timing that span


def _no_phase(name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def normal_targets(normals: torch.Tensor, alphas: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target = normal x mask, mask) at `resolution`; mask = alpha > 0.5 eroded twice with a 3x3 kernel.

    Erosion keeps the soft, often haloed matte border of generated images out of the loss.
    """
    n = F.interpolate(normals.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    a = F.interpolate(alphas.float()[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    mask = (a > 0.5).float()
    for _ in range(2):
        mask = -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)
    return n * mask, mask[:, 0]


def view_chunks(n_views: int, view_chunk: int) -> list[slice]:
    """The view ranges rendered together: all views when `view_chunk` is 0 or >= n_views."""
    k = view_chunk if 0 < view_chunk < n_views else n_views
    return [slice(s, min(s + k, n_views)) for s in range(0, n_views, k)]


def fit_mesh(
    rast_backend: Rasterizer, verts: torch.Tensor, faces: torch.Tensor, target: torch.Tensor,
    mask: torch.Tensor, yaws: list[float], iters: int, radius: float = 2.0,
    settings: RemeshSettings | None = None, view_chunk: int = 0,
    on_log: Callable[[int, float, int], None] | None = None, log_every: int = 50, phase: Phase = _no_phase,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimise `verts`/`faces` (normalised frame) so their normal renders match `target`/`mask`.

    Loss = L1(rendered (n+1)/2 x alpha, target) + L1(alpha, mask), means over all pixels of all
    views; every iteration is a step and a remesh. `on_log(iteration, loss, faces)` is called every
    `log_every` iterations and after the last (each call reads the loss back from the device).
    Returns (verts, faces, loss per iteration).
    """
    n_views, res = target.shape[0], target.shape[-1]
    dev = verts.device
    mvps = orbit_mvps(yaws, radius).to(dev)
    goal = torch.cat([target.permute(0, 2, 3, 1), mask[..., None]], dim=-1).contiguous()  # (N,R,R,4)
    # the two means as one weighted sum: 1/(3 N R^2) on the normal channels, 1/(N R^2) on alpha
    weight = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], device=dev) / (n_views * res * res)
    chunks = view_chunks(n_views, view_chunk)
    opt = MeshOptimizer(verts.float(), faces, settings or RemeshSettings())
    losses = torch.zeros(iters, device=dev)
    for it in range(iters):
        v, f = opt.vertices, opt.faces
        with phase("render"):
            tri = f.int().contiguous()
            rast_backend.reserve(chunks[0].stop - chunks[0].start, tri.shape[0], (res, res))
            topology = rast_backend.topology(tri)
            normals = normal_attr(vertex_normals(v, f))
            # with several chunks the normals are a leaf per chunk; their gradient is passed on once
            attr = normals.detach().requires_grad_(True) if len(chunks) > 1 else normals
        for views in chunks:
            with phase("render"):
                both = render_attr_alpha(rast_backend, v, tri, attr, mvps[views], res, 0.0, topology)
            with phase("loss"):
                loss = ((both - goal[views]).abs() * weight).sum()
            with phase("backward"):
                loss.backward()
            losses[it] += loss.detach()
            del both, loss
        with phase("backward"):
            if attr is not normals:
                normals.backward(attr.grad)
            del attr, normals
        with phase("step"):
            opt.step()
        with phase("remesh"):
            opt.remesh()
        if on_log is not None and (it % log_every == 0 or it == iters - 1):
            with phase("log"):
                on_log(it, float(losses[it]), int(opt.faces.shape[0]))
    return opt.vertices.detach(), opt.faces, losses.tolist()
