"""Images of a mesh: vertex attributes (normals, colours) rendered on a background, antialiased.

Shared by the A-pose renderer (normals on gray 0.5), the reconstructor's loss (normals on black) and
the turntable video (normals and colours on white), so all three encode images identically.
"""

from __future__ import annotations

import torch

from up2you.render.base import Rasterizer
from up2you.render.camera import to_clip


def render_attr(
    rast_backend: Rasterizer,
    verts: torch.Tensor,
    faces: torch.Tensor,
    attr: torch.Tensor,
    mvps: torch.Tensor,
    resolution: int,
    background: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render per-vertex `attr` (V,C) from every camera -> (image (N,C,R,R), alpha (N,R,R)).

    Image = antialias(attr * mask + background * (1 - mask)); alpha = antialias(mask). Both carry
    gradients to `verts` (through barycentrics and the antialias step) and to `attr`.
    """
    tri = faces.int().contiguous()
    pos = to_clip(verts, mvps).contiguous()
    rast = rast_backend.rasterize(pos, tri, (resolution, resolution))
    mask = (rast[..., 3:] > 0).to(verts.dtype)
    val = rast_backend.interpolate(attr.contiguous(), rast, tri)
    both = torch.cat([val * mask + background * (1.0 - mask), mask], dim=-1)
    both = rast_backend.antialias(both.contiguous(), rast, pos, tri)
    return both[..., :-1].permute(0, 3, 1, 2), both[..., -1]


def normal_attr(vert_normals: torch.Tensor) -> torch.Tensor:
    """The object-space normal encoding the adapters were trained on: (n + 1) / 2."""
    return (vert_normals + 1.0) * 0.5
