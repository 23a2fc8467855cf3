"""A pure-torch rasterizer behind the `Rasterizer` interface, so every stage also runs on CPU (CI).

Visibility is found without gradients by enumerating, per triangle, the pixel centres in its
bounding box and keeping the nearest fragment per pixel with one `scatter_reduce(amin)` on a packed
int64 key (quantised depth << 23 | triangle id): one pass, no second resolve. Barycentrics of the
winning triangle are then recomputed from `pos` with autograd on, which makes `interpolate`
differentiable w.r.t. positions exactly as nvdiffrast's is. `antialias` follows nvdiffrast's idea
(analytic silhouette coverage between neighbouring pixels) in a simplified form: enough for a mask
loss to pull silhouettes, not a bit-exact copy. Cost is O(sum of triangle bounding-box areas), so it
is meant for small resolutions; the GPU uses nvdiffrast.
"""

from __future__ import annotations

import torch

_TRI_BITS = 23  # up to 8.4 M triangles per batch item
_Z_BITS = 39
_EMPTY = torch.iinfo(torch.int64).max
_PAIRS_PER_CHUNK = 1 << 22  # bounds the transient (triangle, pixel) candidate list


def _screen(pos: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip -> continuous pixel coordinates (integer values are pixel centres) and z/w."""
    inv_w = 1.0 / pos[..., 3]
    x = (pos[..., 0] * inv_w + 1.0) * (w * 0.5) - 0.5
    y = (pos[..., 1] * inv_w + 1.0) * (h * 0.5) - 0.5
    return x, y, pos[..., 2] * inv_w


def _cross(ax: torch.Tensor, ay: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    return ax * by - ay * bx


def _screen_bary(
    px: torch.Tensor, py: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen-space barycentrics of points (px, py) in triangles with corners vx, vy (..., 3)."""
    e1x, e1y = vx[..., 1] - vx[..., 0], vy[..., 1] - vy[..., 0]
    e2x, e2y = vx[..., 2] - vx[..., 0], vy[..., 2] - vy[..., 0]
    dx, dy = px - vx[..., 0], py - vy[..., 0]
    den = _cross(e1x, e1y, e2x, e2y)
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    s1 = _cross(dx, dy, e2x, e2y) / den
    s2 = _cross(e1x, e1y, dx, dy) / den
    return 1.0 - s1 - s2, s1, s2


class TorchRasterizer:
    """CPU (or any device) rasterizer in plain torch ops."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # visibility ---------------------------------------------------------------------------
    @torch.no_grad()
    def _visible(self, pos: torch.Tensor, tri: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Packed nearest-fragment key per pixel, (B*H*W,) int64, _EMPTY where nothing is drawn."""
        b_count = pos.shape[0]
        tri = tri.long()
        n_tri = tri.shape[0]
        if n_tri >= 1 << _TRI_BITS:
            raise ValueError(f"{n_tri} triangles exceed the torch rasterizer's limit of {1 << _TRI_BITS}")
        keys = torch.full((b_count * h * w,), _EMPTY, dtype=torch.int64, device=pos.device)
        sx, sy, sz = _screen(pos.float(), h, w)
        for b in range(b_count):
            vx, vy, vz = sx[b][tri], sy[b][tri], sz[b][tri]  # (F,3)
            x0 = vx.min(1).values.ceil().clamp(0, w - 1).long()
            x1 = vx.max(1).values.floor().clamp(-1, w - 1).long()
            y0 = vy.min(1).values.ceil().clamp(0, h - 1).long()
            y1 = vy.max(1).values.floor().clamp(-1, h - 1).long()
            bw = (x1 - x0 + 1).clamp_min(0)
            bh = (y1 - y0 + 1).clamp_min(0)
            area = _cross(vx[:, 1] - vx[:, 0], vy[:, 1] - vy[:, 0], vx[:, 2] - vx[:, 0], vy[:, 2] - vy[:, 0])
            count = torch.where(area.abs() > 1e-12, bw * bh, torch.zeros_like(bw))
            ids = torch.nonzero(count > 0).squeeze(1)
            if ids.numel() == 0:
                continue
            cum = torch.cumsum(count[ids], 0)
            start = 0
            while start < ids.numel():
                base = int(cum[start - 1]) if start > 0 else 0
                stop = int(torch.searchsorted(cum, base + _PAIRS_PER_CHUNK, right=True))
                stop = max(stop, start + 1)
                chunk = ids[start:stop]
                self._scatter_chunk(keys, b * h * w, chunk, count[chunk], x0, y0, bw, vx, vy, vz, w)
                start = stop
        return keys

    @staticmethod
    def _scatter_chunk(
        keys: torch.Tensor, offset: int, chunk: torch.Tensor, counts: torch.Tensor, x0: torch.Tensor,
        y0: torch.Tensor, bw: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor, vz: torch.Tensor, w: int,
    ) -> None:
        t = torch.repeat_interleave(chunk, counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(t.numel(), device=t.device) - torch.repeat_interleave(first, counts)
        px = (x0[t] + local % bw[t]).float()
        py = (y0[t] + torch.div(local, bw[t], rounding_mode="floor")).float()
        s0, s1, s2 = _screen_bary(px, py, vx[t], vy[t])
        z = s0 * vz[t, 0] + s1 * vz[t, 1] + s2 * vz[t, 2]
        keep = (s0 >= 0) & (s1 >= 0) & (s2 >= 0) & (z >= -1.0) & (z <= 1.0)
        zq = ((z[keep].double() + 1.0) * (0.5 * ((1 << _Z_BITS) - 1))).long()
        key = (zq << _TRI_BITS) | t[keep]
        pix = offset + py[keep].long() * w + px[keep].long()
        keys.scatter_reduce_(0, pix, key, reduce="amin")

    # public API ----------------------------------------------------------------------------
    def rasterize(self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        """(u, v, z/w, id+1) per pixel; u, v carry gradients to `pos`."""
        h, w = resolution
        b_count = pos.shape[0]
        keys = self._visible(pos, tri, h, w)
        hit = keys != _EMPTY
        rast = torch.zeros(b_count * h * w, 4, dtype=pos.dtype, device=pos.device)
        if not bool(hit.any()):
            return rast.view(b_count, h, w, 4)
        pix = torch.nonzero(hit).squeeze(1)
        tid = keys[pix] & ((1 << _TRI_BITS) - 1)
        bidx = torch.div(pix, h * w, rounding_mode="floor")
        rem = pix - bidx * (h * w)
        py = torch.div(rem, w, rounding_mode="floor").to(pos.dtype)
        px = (rem % w).to(pos.dtype)
        corner = pos[bidx[:, None], tri.long()[tid]]  # (P,3,4), differentiable
        cx, cy, cz = _screen(corner, h, w)
        s0, s1, s2 = _screen_bary(px, py, cx, cy)
        # perspective-correct barycentrics, as nvdiffrast reports them
        inv_w = 1.0 / corner[..., 3]
        q0, q1, q2 = s0 * inv_w[:, 0], s1 * inv_w[:, 1], s2 * inv_w[:, 2]
        qs = q0 + q1 + q2
        z = s0 * cz[:, 0] + s1 * cz[:, 1] + s2 * cz[:, 2]
        vals = torch.stack((q0 / qs, q1 / qs, z, (tid + 1).to(pos.dtype)), dim=1)
        rast.index_put_((pix,), vals)  # in place: an out-of-place put would copy the whole image once more
        return rast.view(b_count, h, w, 4)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        b_count, h, w, _ = rast.shape
        flat = rast.reshape(-1, 4)
        tid = flat[:, 3].long() - 1
        pix = torch.nonzero(tid >= 0).squeeze(1)
        c = attr.shape[-1]
        out = torch.zeros(b_count * h * w, c, dtype=attr.dtype, device=attr.device)
        if pix.numel() == 0:
            return out.view(b_count, h, w, c)
        corners = tri.long()[tid[pix]]  # (P,3)
        if attr.dim() == 2:
            a = attr[corners]
        else:
            bidx = torch.div(pix, h * w, rounding_mode="floor")
            a = attr.expand(b_count, -1, -1)[bidx[:, None], corners]
        u = flat[pix, 0:1]
        v = flat[pix, 1:2]
        val = u * a[:, 0] + v * a[:, 1] + (1.0 - u - v) * a[:, 2]
        out.index_put_((pix,), val)
        return out.view(b_count, h, w, c)

    def reserve(self, batch: int, triangles: int, resolution: tuple[int, int]) -> None:
        """Nothing to reserve: buffers are ordinary tensors of each call."""

    def topology(self, tri: torch.Tensor) -> None:
        """Nothing to precompute: `antialias` compares triangle corners directly."""
        return None

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
        topology: None = None,
    ) -> torch.Tensor:
        """Blend each silhouette pixel pair by where the front triangle's edge crosses between them."""
        b_count, h, w, c = color.shape
        tri_l = tri.long()
        sx, sy, _ = _screen(pos, h, w)
        flat_c = color.reshape(-1, c)
        tid = rast[..., 3].long().reshape(-1) - 1
        zz = rast[..., 2].detach().reshape(-1)
        out = flat_c.clone()  # one copy, then added to in place (the same sums, in the same order)
        idx = torch.arange(b_count * h * w, device=color.device).view(b_count, h, w)
        for a_idx, q_idx in ((idx[:, :, :-1], idx[:, :, 1:]), (idx[:, :-1, :], idx[:, 1:, :])):
            a_idx, q_idx = a_idx.reshape(-1), q_idx.reshape(-1)
            ta, tq = tid[a_idx], tid[q_idx]
            pair = (ta != tq) & ((ta >= 0) | (tq >= 0))
            a_idx, q_idx, ta, tq = a_idx[pair], q_idx[pair], ta[pair], tq[pair]
            if a_idx.numel() == 0:
                continue
            both = (ta >= 0) & (tq >= 0)
            shared = (tri_l[ta.clamp_min(0)][:, :, None] == tri_l[tq.clamp_min(0)][:, None, :]).sum((1, 2))
            keep = ~(both & (shared >= 2))  # neighbours across a mesh edge are not a silhouette
            a_front = (tq < 0) | ((ta >= 0) & (zz[a_idx] <= zz[q_idx]))
            p_idx = torch.where(a_front, a_idx, q_idx)[keep]
            o_idx = torch.where(a_front, q_idx, a_idx)[keep]
            t_front = torch.where(a_front, ta, tq)[keep]
            if p_idx.numel() == 0:
                continue
            bidx = torch.div(p_idx, h * w, rounding_mode="floor")
            corners = tri_l[t_front]
            vx, vy = sx[bidx[:, None], corners], sy[bidx[:, None], corners]
            px, py = (p_idx % w).to(pos.dtype), torch.div(p_idx % (h * w), w, rounding_mode="floor").to(pos.dtype)
            ox, oy = (o_idx % w).to(pos.dtype), torch.div(o_idx % (h * w), w, rounding_mode="floor").to(pos.dtype)
            sp = torch.stack(_screen_bary(px, py, vx, vy), 1)
            so = torch.stack(_screen_bary(ox, oy, vx, vy), 1)
            leaving = so < 0
            t_cross = torch.where(leaving, sp / (sp - so).clamp_min(1e-12), torch.full_like(sp, 2.0)).min(1).values
            ok = leaving.any(1)
            t_cross = t_cross.clamp(0.0, 1.0)
            cp, co = flat_c[p_idx], flat_c[o_idx]
            grow = (t_cross - 0.5).clamp_min(0.0)[:, None] * ok[:, None]
            shrink = (0.5 - t_cross).clamp_min(0.0)[:, None] * ok[:, None]
            out.index_add_(0, o_idx, grow * (cp - co))
            out.index_add_(0, p_idx, shrink * (co - cp))
        return out.view(b_count, h, w, c)
