"""Vertex colours projected from the generated RGB views (replaces upstream's pytorch3d projection).

Per view, a vertex contributes its bilinearly sampled colour with weight
view_weight(yaw) x cos^2(normal, view) x alpha, if it passes a depth test against the rendered depth
and faces the camera (cos > 0.05). Vertices whose total weight stays under `confidence` are unseen and
get colours by Laplacian diffusion from their seen neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from up2you.geometry.mesh_ops import neighbor_mean, unique_edges, vertex_normals
from up2you.render.base import Rasterizer
from up2you.render.camera import orbit_mvps, to_clip, toward_camera


@torch.no_grad()
def project_colors(
    rast_backend: Rasterizer, verts: torch.Tensor, faces: torch.Tensor, images: torch.Tensor,
    alphas: torch.Tensor, yaws: list[float], weights: list[float], radius: float,
    resolution: int, confidence: float = 0.2, fill_iters: int = 200,
) -> torch.Tensor:
    """Colours (V,3) in [0,1] for vertices in the normalised frame of the views (bound < radius)."""
    n_views = len(yaws)
    normals = vertex_normals(verts, faces)
    towards = toward_camera(yaws).to(verts)
    acc = torch.zeros_like(verts)
    wsum = torch.zeros(verts.shape[0], dtype=verts.dtype, device=verts.device)
    tol = 4.0 / resolution + 1e-3  # depth tolerance in NDC: ~2 pixels of surface
    for i in range(n_views):
        mvp = orbit_mvps([yaws[i]], radius).to(verts)
        pos = to_clip(verts, mvp)
        rast = rast_backend.rasterize(pos.contiguous(), faces.int().contiguous(), (resolution, resolution))
        zbuf = torch.where(rast[..., 3] > 0, rast[..., 2], torch.full_like(rast[..., 2], 2.0))  # (1,R,R)
        grid = (pos[..., :2] / pos[..., 3:]).view(1, 1, -1, 2)  # NDC x,y == grid_sample coords (row 0 = y -1)
        z_seen = F.grid_sample(zbuf[:, None], grid, mode="nearest", align_corners=False).view(-1)
        img = images[i : i + 1].to(verts)
        rgb = F.grid_sample(img, grid, mode="bilinear", align_corners=False).view(3, -1).T
        a = F.grid_sample(alphas[i : i + 1, None].to(verts), grid, mode="bilinear", align_corners=False).view(-1)
        cos = normals @ towards[i]
        visible = (pos[0, :, 2] <= z_seen + tol) & (cos > 0.05)
        w = weights[i] * cos.clamp_min(0) ** 2 * a * visible
        acc += w[:, None] * rgb
        wsum += w
    seen = wsum >= confidence
    colors = torch.where(seen[:, None], acc / wsum.clamp_min(1e-8)[:, None], torch.zeros_like(acc))
    return fill_unseen(colors, seen, faces, fill_iters)


def fill_unseen(colors: torch.Tensor, known: torch.Tensor, faces: torch.Tensor, iters: int) -> torch.Tensor:
    """Diffuse known colours into unknown vertices (known ones stay fixed); leftovers become mid-gray."""
    edges, _ = unique_edges(faces)
    known_f = known.to(colors.dtype)[:, None]
    filled = known.clone()
    c = colors.clone()
    for _ in range(iters):
        if bool(filled.all()):
            break
        num = neighbor_mean(c * filled[:, None], edges)
        den = neighbor_mean(filled.to(c.dtype)[:, None], edges)
        reach = (den[:, 0] > 0) & ~known
        c = torch.where(reach[:, None], num / den.clamp_min(1e-8), c) * (1 - known_f) + colors * known_f
        filled = filled | reach
    return torch.where(filled[:, None], c, torch.full_like(c, 0.5)).clamp(0.0, 1.0)
