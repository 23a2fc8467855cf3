"""The mesh fit as it was before issue 9 (commit e5f57ea): a frozen reference, not used by any stage.

`tests/test_mesh_fit_equivalence.py` checks that `up2you.geometry.reconstruct.fit_mesh` (fewer host
syncs, shared topology, views in chunks) gives the same loss curve and mesh as this code, and
`benchmarks/mesh_profile.py` times both. Do not "improve" this file: its value is that it does not
change. Only the `phase` hook (a no-op unless a profiler passes one) was added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from up2you.geometry.mesh_ops import face_normals, neighbor_mean, vertex_normals
from up2you.geometry.optimizer import RemeshSettings, _lerp_unbiased, ref_len_interval
from up2you.render.base import Rasterizer
from up2you.render.camera import orbit_mvps, to_clip
from up2you.render.draw import normal_attr

Phase = Callable[[str], Any]


def _no_phase(name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def unique_edges(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,2) edges with the lower index first, and (F,3) face -> edge index (edge k = corner k -> k+1)."""
    a, b = faces.reshape(-1), faces.roll(-1, dims=1).reshape(-1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    n = int(hi.max()) + 1 if hi.numel() else 1
    keys, inverse = torch.unique(lo * n + hi, return_inverse=True)  # 1-D unique: much faster than dim=0
    edges = torch.stack([torch.div(keys, n, rounding_mode="floor"), keys % n], dim=1)
    return edges, inverse.view(-1, 3)


def render_attr(
    rast_backend: Rasterizer,
    verts: torch.Tensor,
    faces: torch.Tensor,
    attr: torch.Tensor,
    mvps: torch.Tensor,
    resolution: int,
    background: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    tri = faces.int().contiguous()
    pos = to_clip(verts, mvps).contiguous()
    rast = rast_backend.rasterize(pos, tri, (resolution, resolution))
    mask = (rast[..., 3:] > 0).to(verts.dtype)
    val = rast_backend.interpolate(attr.contiguous(), rast, tri)
    both = torch.cat([val * mask + background * (1.0 - mask), mask], dim=-1)
    both = rast_backend.antialias(both.contiguous(), rast, pos, tri)
    return both[..., :-1].permute(0, 3, 1, 2), both[..., -1]


def _edge_lengths(pos: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return (pos[edges[:, 0]] - pos[edges[:, 1]]).norm(dim=1)


def _local_max(rank: torch.Tensor, groups: torch.Tensor, n_verts: int, rounds: int) -> torch.Tensor:
    """True where an item's rank is the largest among items sharing a vertex, `rounds` rings out."""
    item_rank = rank
    for _ in range(rounds):
        vert_rank = torch.full((n_verts,), -1, dtype=rank.dtype, device=rank.device)
        vert_rank.scatter_reduce_(0, groups.reshape(-1), item_rank[:, None].expand_as(groups).reshape(-1),
                                  reduce="amax")
        item_rank = vert_rank[groups].max(dim=1).values
    return item_rank == rank


def _ranks(priority: torch.Tensor) -> torch.Tensor:
    order = priority.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def collapse_short_edges(
    vdata: torch.Tensor, faces: torch.Tensor, min_len: torch.Tensor, area_ratio: float = 0.5,
    shortest_probability: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse edges shorter than their vertices' min length and edges of tiny or flipped faces."""
    pos = vdata[:, :3]
    n_verts = pos.shape[0]
    edges, f2e = unique_edges(faces)
    elen = _edge_lengths(pos, edges)
    fn = face_normals(pos, faces)
    vn = torch.zeros_like(pos).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    flipped = (fn * vn[faces].sum(1)).sum(1) < 0
    face_min = min_len[faces].mean(1)
    tiny = fn.norm(dim=1) < face_min**2 * area_ratio * 2.0
    bad_face = flipped | tiny
    # each bad face nominates one of its edges: usually the shortest, sometimes another (avoids stalls)
    flen = elen[f2e]
    by_len = flen.argsort(dim=1, descending=True)
    pick = torch.randint(0, max(3, round(2 / (1 - shortest_probability))), (faces.shape[0],),
                         device=faces.device).clamp_max(2)
    chosen = f2e.gather(1, by_len.gather(1, pick[:, None]))[:, 0]
    nominated = torch.zeros(edges.shape[0], dtype=torch.bool, device=faces.device)
    nominated[chosen[bad_face]] = True
    shortness = (1.0 - elen / min_len[edges].mean(1)).clamp_min(0.0)
    priority = nominated.float() + shortness
    cand = _local_max(_ranks(priority), edges, n_verts, rounds=3) & (priority > 0)
    cand_edges = edges[cand]
    cand_edges = cand_edges[_common_neighbours(edges, cand_edges, n_verts) <= 2]  # keep the mesh manifold
    if cand_edges.numel() == 0:
        return vdata, faces
    vdata = vdata.clone()
    vdata[cand_edges[:, 0]] = vdata[cand_edges].mean(dim=1)
    dest = torch.arange(n_verts, device=faces.device)
    dest[cand_edges[:, 1]] = cand_edges[:, 0]
    faces = dest[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    return vdata, faces[keep]


def _common_neighbours(edges: torch.Tensor, pairs: torch.Tensor, n_verts: int) -> torch.Tensor:
    """For each (a, b) in `pairs` (vertex-disjoint), how many vertices neighbour both a and b."""
    if pairs.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=edges.device)
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    keys = []
    for end in (0, 1):
        owner = torch.full((n_verts,), -1, dtype=torch.long, device=edges.device)
        owner[pairs[:, end]] = torch.arange(pairs.shape[0], device=edges.device)
        hit = owner[src] >= 0
        keys.append(owner[src][hit] * n_verts + dst[hit])
    both = torch.cat(keys).sort().values
    dup = both[1:][both[1:] == both[:-1]]
    return torch.bincount(torch.div(dup, n_verts, rounding_mode="floor"), minlength=pairs.shape[0])


def split_long_edges(
    vdata: torch.Tensor, faces: torch.Tensor, max_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every edge longer than its vertices' max length at its midpoint (1-to-2/3/4 face splits)."""
    edges, f2e = unique_edges(faces)
    split = _edge_lengths(vdata[:, :3], edges) > max_len[edges].mean(1)
    n_split = int(split.sum())
    if n_split == 0:
        return vdata, faces
    n_verts = vdata.shape[0]
    mid = torch.full((edges.shape[0],), -1, dtype=torch.long, device=faces.device)
    mid[split] = torch.arange(n_verts, n_verts + n_split, device=faces.device)
    vdata = torch.cat([vdata, vdata[edges[split]].mean(dim=1)])
    side = mid[f2e]  # (F,3): midpoint of edge k = corner k -> k+1, or -1
    is_split = side >= 0
    # corner k is replaced by the midpoint of edge k when that edge splits; each split edge k adds the
    # corner triangle (c_k, m_k, previous corner-or-midpoint)
    shrunk = torch.where(is_split, side, faces)
    new = torch.stack([faces, side, shrunk.roll(1, dims=1)], dim=-1)[is_split]
    return vdata, torch.cat([shrunk, new])


def flip_edges(pos: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Flip interior edges where that brings the four vertices' valences closer to 6."""
    n_verts = pos.shape[0]
    n_faces = faces.shape[0]
    edges, f2e = unique_edges(faces)
    n_edges = edges.shape[0]
    corner_from = faces.reshape(-1)
    opposite = faces.roll(-2, dims=1).reshape(-1)  # the corner not on edge k
    forward = corner_from == edges[f2e.reshape(-1), 0]
    face_id = torch.arange(n_faces, device=faces.device).repeat_interleave(3)
    e_flat = f2e.reshape(-1)
    uses = torch.bincount(e_flat, minlength=n_edges)
    side_face = torch.full((n_edges, 2), -1, dtype=torch.long, device=faces.device)
    side_opp = torch.full((n_edges, 2), -1, dtype=torch.long, device=faces.device)
    side_face[e_flat, (~forward).long()] = face_id
    side_opp[e_flat, (~forward).long()] = opposite
    degree = torch.bincount(edges.reshape(-1), minlength=n_verts)
    interior = (uses == 2) & (side_face >= 0).all(1) & (side_opp[:, 0] != side_opp[:, 1])
    gain = 2 + degree[side_opp].sum(1) - degree[edges].sum(1)  # change of sum((deg-6)^2) / 2
    cand = interior & (gain < 0)
    # the new edge must not exist already
    key_all = edges[:, 0] * n_verts + edges[:, 1]
    new_e = side_opp.sort(dim=1).values
    key_new = new_e[:, 0] * n_verts + new_e[:, 1]
    sorted_keys = key_all.sort().values
    at = torch.searchsorted(sorted_keys, key_new).clamp_max(n_edges - 1)
    cand &= sorted_keys[at] != key_new
    idx = torch.nonzero(cand).squeeze(1)
    if idx.numel() == 0:
        return faces
    quad = torch.cat([edges[idx], side_opp[idx]], dim=1)  # a, b, c_forward, c_backward
    win = _local_max(_ranks(-gain[idx].float()), quad, n_verts, rounds=1)
    a, b, c_f, c_b = quad.unbind(1)
    p = pos
    n_old = torch.cross(p[b] - p[a], p[c_f] - p[a], dim=1) + torch.cross(p[a] - p[b], p[c_b] - p[b], dim=1)
    n1 = torch.cross(p[c_b] - p[a], p[c_f] - p[a], dim=1)
    n2 = torch.cross(p[c_f] - p[b], p[c_b] - p[b], dim=1)
    win &= ((n_old * n1).sum(1) > 0) & ((n_old * n2).sum(1) > 0)
    idx, a, b, c_f, c_b = idx[win], a[win], b[win], c_f[win], c_b[win]
    faces = faces.clone()
    faces[side_face[idx, 0]] = torch.stack([a, c_b, c_f], dim=1)
    faces[side_face[idx, 1]] = torch.stack([b, c_f, c_b], dim=1)
    return faces


def drop_unused(vdata: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove vertices no face uses and renumber."""
    used = torch.zeros(vdata.shape[0], dtype=torch.bool, device=faces.device)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1
    return vdata[used], remap[faces]


@torch.no_grad()
def remesh(
    vdata: torch.Tensor, faces: torch.Tensor, min_len: torch.Tensor, max_len: torch.Tensor,
    flip: bool = True, max_vertices: int = 1_000_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One remeshing pass: collapse, split (below max_vertices), drop unused, flip."""
    extra = torch.stack([min_len, max_len], dim=1)
    vdata_ext = torch.cat([vdata, extra], dim=1)
    vdata_ext, faces = collapse_short_edges(vdata_ext, faces, vdata_ext[:, -2])
    if vdata_ext.shape[0] < max_vertices:
        vdata_ext, faces = split_long_edges(vdata_ext, faces, vdata_ext[:, -1])
    vdata_ext, faces = drop_unused(vdata_ext, faces)
    if flip:
        faces = flip_edges(vdata_ext[:, :3], faces)
    return vdata_ext[:, :-2].contiguous(), faces


class MeshOptimizer:
    """Use like a torch optimiser on `.vertices`; after `step()`, call `remesh()` and re-read both."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, settings: RemeshSettings) -> None:
        self.s = settings
        self.step_count = 0
        self._state = torch.zeros(vertices.shape[0], 9, dtype=torch.float32, device=vertices.device)
        self._state[:, :3] = vertices.detach()
        self._state[:, 8] = settings.edge_len_lims[1]
        self.faces = faces.long()
        self.vertices = self._state[:, :3].clone().requires_grad_(True)

    @torch.no_grad()
    def step(self) -> None:
        """One update from `self.vertices.grad`."""
        s, st = self.s, self._state
        eps = 1e-8
        self.step_count += 1
        k = self.step_count
        pos, m1, m2, nu, ref = st[:, :3], st[:, 3:6], st[:, 6], st[:, 7], st[:, 8]
        grad = self.vertices.grad if self.vertices.grad is not None else torch.zeros_like(pos)
        edges, _ = unique_edges(self.faces)
        laplace = pos - neighbor_mean(pos, edges)
        grad = grad + s.laplacian_weight * nu[:, None] * laplace
        if k > 1:
            lim = m1.abs() * s.grad_lim
            grad = torch.maximum(torch.minimum(grad, lim), -lim)
        m1 = _lerp_unbiased(m1, grad, s.betas[0], k)
        m2 = _lerp_unbiased(m2, (grad**2).sum(1), s.betas[1], k)
        velocity = m1 / (m2.sqrt()[:, None] + eps)
        speed = velocity.norm(dim=1)
        nu = _lerp_unbiased(nu, speed, s.betas[2], k) if s.betas[2] else speed
        lr = s.lr * min(1.0, k * (1.0 - s.betas[0]) / s.ramp)
        pos = pos - lr * velocity * ref[:, None]
        if k % ref_len_interval(k) == 0:
            rel = nu if s.local_edgelen else nu.mean().expand_as(nu)
            ref = (ref * (1.0 + (rel - s.nu_ref) * s.gain)).clamp(*s.edge_len_lims)
        self._state = torch.cat([pos, m1, m2[:, None], nu[:, None], ref[:, None]], dim=1)

    def remesh(self, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Collapse / split / flip around the reference edge lengths; returns (vertices, faces)."""
        ref = self._state[:, 8]
        self._state, self.faces = remesh(
            self._state, self.faces, ref * (1.0 - self.s.edge_len_tol), ref * (1.0 + self.s.edge_len_tol), flip
        )
        self.vertices = self._state[:, :3].clone().requires_grad_(True)
        return self.vertices, self.faces


def fit_mesh(
    rast_backend: Rasterizer, verts: torch.Tensor, faces: torch.Tensor, target: torch.Tensor,
    mask: torch.Tensor, yaws: list[float], iters: int, radius: float = 2.0,
    settings: RemeshSettings | None = None, on_step: Callable[[int, float, int], None] | None = None,
    phase: Phase = _no_phase,
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
        with phase("render"):
            img, alpha = render_attr(rast_backend, v, f, normal_attr(vertex_normals(v, f)), mvps, res, 0.0)
        with phase("loss"):
            loss = (img - target).abs().mean() + (alpha - mask).abs().mean()
        with phase("backward"):
            loss.backward()
        with phase("step"):
            opt.step()
        with phase("remesh"):
            opt.remesh()
        with phase("log"):
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(it, losses[-1], int(opt.faces.shape[0]))
        del img, alpha, loss
    return opt.vertices.detach(), opt.faces, losses
