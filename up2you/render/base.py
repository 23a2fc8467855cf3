"""The rasterizer interface every renderer in this project is written against.

It is nvdiffrast's functional API reduced to what we use, so the CUDA backend is a thin wrapper and
the pure-torch backend (CPU, CI) a drop-in replacement. Conventions (nvdiffrast's):

- `pos` is clip space (B, V, 4); pixel (row i, col j) has its centre at NDC x = (2j+1)/W - 1,
  y = (2i+1)/H - 1, so row 0 is NDC y = -1; fragments with z/w outside [-1, 1] are clipped; the
  smallest z/w wins; no back-face culling.
- `rasterize` returns `rast` (B, H, W, 4) = (u, v, z/w, triangle_id + 1), 0 where empty; u and v
  are perspective-correct barycentrics of vertices 0 and 1 and are differentiable w.r.t. `pos`.
- `interpolate` returns u*a0 + v*a1 + (1-u-v)*a2 per pixel (0 where empty), differentiable w.r.t.
  the attributes and, through u and v, the positions.
- `antialias` blends colours across silhouette edges by the edge's sub-pixel position, which is
  what gives a mask loss its gradient w.r.t. vertex positions. It needs the mesh's edge topology;
  `topology(tri)` builds it once so that several `antialias` calls on one mesh (views in chunks)
  can share it. Passing None builds it inside the call.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Rasterizer(Protocol):
    """Rasterize / interpolate / antialias on one device."""

    device: torch.device

    def rasterize(self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        """pos (B,V,4) f32 clip space, tri (F,3) int32 -> rast (B,H,W,4)."""
        ...

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        """attr (V,C) or (B,V,C) -> (B,H,W,C)."""
        ...

    def reserve(self, batch: int, triangles: int, resolution: tuple[int, int]) -> None:
        """A hint before drawing a growing mesh: make room for at least `triangles` (no-op if not needed)."""
        ...

    def topology(self, tri: torch.Tensor) -> Any:
        """What `antialias` needs to know about `tri` (int32), built once; None if it needs nothing."""
        ...

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
        topology: Any = None,
    ) -> torch.Tensor:
        """color (B,H,W,C) -> antialiased (B,H,W,C); `topology` = `self.topology(tri)` or None."""
        ...
