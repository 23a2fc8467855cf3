"""UP2You's geometry fit: continuous remeshing of the A-pose SMPL-X towards the generated normal maps.

All views are rendered in one batch per iteration (as upstream), so the transient is linear in
views x mesh_resolution^2; targets are resized to mesh_resolution once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from up2you.geometry.mesh_ops import vertex_normals
from up2you.geometry.optimizer import MeshOptimizer, RemeshSettings
from up2you.render.base import Rasterizer
from up2you.render.camera import orbit_mvps
from up2you.render.draw import normal_attr, render_attr


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


def fit_mesh(
    rast_backend: Rasterizer, verts: torch.Tensor, faces: torch.Tensor, target: torch.Tensor,
    mask: torch.Tensor, yaws: list[float], iters: int, radius: float = 2.0,
    settings: RemeshSettings | None = None, on_step: Callable[[int, float, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimise `verts`/`faces` (normalised frame) so their normal renders match `target`/`mask`.

    Loss = L1(rendered (n+1)/2 x alpha, target) + L1(alpha, mask), means over all pixels; every
    iteration is a step and a remesh. Returns (verts, faces, loss per iteration).
    """
    res = target.shape[-1]
    mvps = orbit_mvps(yaws, radius).to(verts.device)
    opt = MeshOptimizer(verts.float(), faces, settings or RemeshSettings())
    losses: list[float] = []
    for it in range(iters):
        v, f = opt.vertices, opt.faces
        img, alpha = render_attr(rast_backend, v, f, normal_attr(vertex_normals(v, f)), mvps, res, 0.0)
        loss = (img - target).abs().mean() + (alpha - mask).abs().mean()
        loss.backward()
        opt.step()
        opt.remesh()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(it, losses[-1], int(opt.faces.shape[0]))
        del img, alpha, loss
    return opt.vertices.detach(), opt.faces, losses
