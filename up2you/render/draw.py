"""Images of a mesh: vertex attributes (normals, colours) rendered on a background, antialiased.

Shared by the A-pose renderer (normals on gray 0.5), the reconstructor's loss (normals on black) and
the turntable video (normals and colours on white), so all three encode images identically.
"""

from __future__ import annotations

from typing import Any

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
    both = render_attr_alpha(rast_backend, verts, faces.int().contiguous(), attr, mvps, resolution, background)
    return both[..., :-1].permute(0, 3, 1, 2), both[..., -1]


def render_attr_alpha(
    rast_backend: Rasterizer, verts: torch.Tensor, tri: torch.Tensor, attr: torch.Tensor, mvps: torch.Tensor,
    resolution: int, background: float, topology: Any = None,
) -> torch.Tensor:
    """`render_attr` as one channels-last tensor (N,R,R,C+1), alpha last; `tri` int32 contiguous.

    For a caller that renders one mesh many times (views in chunks): it converts nothing per call
    and takes the antialias topology built once (`rast_backend.topology(tri)`). With background 0
    the blend is skipped: `interpolate` is already 0 where no triangle is.
    """
    pos = to_clip(verts, mvps).contiguous()
    rast = rast_backend.rasterize(pos, tri, (resolution, resolution))
    mask = (rast[..., 3:] > 0).to(verts.dtype)
    val = rast_backend.interpolate(attr.contiguous(), rast, tri)
    color = val if background == 0.0 else val * mask + background * (1.0 - mask)
    return rast_backend.antialias(torch.cat([color, mask], dim=-1), rast, pos, tri, topology)


def normal_attr(vert_normals: torch.Tensor) -> torch.Tensor:
    """The object-space normal encoding the adapters were trained on: (n + 1) / 2."""
    return (vert_normals + 1.0) * 0.5
