"""Local remeshing for continuous remeshing (Palfinger 2022): collapse short edges, split long ones,
flip edges towards valence 6 — all in parallel on the GPU with torch scatter ops.

Every operation picks a conflict-free subset by "local maximum of priority in a neighbourhood" so
that many edits happen per call without two touching the same vertices. Vertex data (position in
columns 0:3 plus optimiser state) travels with the vertices: merged and split vertices get the mean
of their parents' rows.

Host syncs: an operation whose output size depends on the data (how many edges collapse, how many
faces a split adds) must read a count back from the GPU. This module reads one count per such
decision and no more: sizes that are known on the host are passed in (`unique_edges(faces, n_verts)`),
counts go through `index_add_` (bincount syncs to find its length), several compactions share one
read-back (`torch.nonzero_static`), and writes whose targets are a data-dependent subset go to a
scratch row instead of a compacted index. The decisions are the same as the straightforward form
(`up2you/geometry/reference.py`; tested): same edges, same order, same ranks, same random draws.
"""

from __future__ import annotations

import torch

from up2you.geometry.mesh_ops import count_index, face_normals, unique_edges

Topology = tuple[torch.Tensor, torch.Tensor]  # (edges, face -> edge) of `unique_edges`


def _edge_lengths(pos: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return (pos[edges[:, 0]] - pos[edges[:, 1]]).norm(dim=1)


def _local_max(rank: torch.Tensor, groups: torch.Tensor, n_verts: int, rounds: int) -> torch.Tensor:
    """True where an item's rank is the largest among items sharing a vertex, `rounds` rings out.
    Ranks are distinct and below 2^31: the maxima run in int32 (see count_index)."""
    rank = rank.int()
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


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` True entries of a 1-D mask, in order, without a host sync."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (NotImplementedError, RuntimeError):  # a backend without nonzero_static: same result, one sync
        return torch.nonzero(mask).squeeze(1)


def collapse_short_edges(
    vdata: torch.Tensor, faces: torch.Tensor, min_len: torch.Tensor, area_ratio: float = 0.5,
    shortest_probability: float = 0.8, topology: Topology | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse edges shorter than their vertices' min length and edges of tiny or flipped faces.

    `topology` is `unique_edges(faces)` if the caller has it already (the optimiser step does).
    """
    pos = vdata[:, :3]
    n_verts = pos.shape[0]
    edges, f2e = topology if topology is not None else unique_edges(faces, n_verts)
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
    nominated = torch.zeros(edges.shape[0], dtype=torch.int32, device=faces.device).index_add_(
        0, chosen, bad_face.int()) > 0  # int32: see count_index
    shortness = (1.0 - elen / min_len[edges].mean(1)).clamp_min(0.0)
    priority = nominated.float() + shortness
    cand = _local_max(_ranks(priority), edges, n_verts, rounds=3) & (priority > 0)
    cand &= _common_neighbours(edges, cand, n_verts) <= 2  # keep the mesh manifold
    cand_edges = edges[cand]
    if cand_edges.numel() == 0:
        return vdata, faces
    vdata = vdata.clone()
    vdata[cand_edges[:, 0]] = vdata[cand_edges].mean(dim=1)
    dest = torch.arange(n_verts, device=faces.device)
    dest[cand_edges[:, 1]] = cand_edges[:, 0]
    faces = dest[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    return vdata, faces[keep]


def _common_neighbours(edges: torch.Tensor, cand: torch.Tensor, n_verts: int) -> torch.Tensor:
    """Per edge, how many vertices neighbour both its ends; meaningful where `cand` (vertex-disjoint).

    Every half-edge leaving a candidate's end gets the key (candidate, other end); a vertex that
    neighbours both ends shows up as a duplicate key. Only those half-edges are sorted: candidates are
    local maxima over three rings, a few per cent of the edges, so one host sync for their count buys
    a sort of some 12 keys per candidate instead of 4 per edge (11 M at 1.9 M faces).
    """
    n_edges = edges.shape[0]
    ids = torch.where(cand, torch.arange(n_edges, device=edges.device), -1)
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    owners = []
    for end in (0, 1):
        owner = torch.full((n_verts,), -1, dtype=torch.long, device=edges.device)
        owner.scatter_reduce_(0, edges[:, end], ids, reduce="amax")  # at most one candidate per vertex
        owners.append(owner[src])
    o = torch.cat(owners)
    keys = o * n_verts + torch.cat([dst, dst])
    mine = o >= 0
    keys = keys[_true_indices(mine, int(mine.sum()))].sort().values
    dup = keys[1:] == keys[:-1]
    at = torch.div(keys[1:], n_verts, rounding_mode="floor")
    counts = torch.zeros(n_edges, dtype=torch.int32, device=edges.device)  # int32: see count_index
    return counts.index_add_(0, at, dup.int()).long()


def split_long_edges(
    vdata: torch.Tensor, faces: torch.Tensor, max_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every edge longer than its vertices' max length at its midpoint (1-to-2/3/4 face splits)."""
    n_verts = vdata.shape[0]
    edges, f2e = unique_edges(faces, n_verts)
    split = _edge_lengths(vdata[:, :3], edges) > max_len[edges].mean(1)
    corner_split = split[f2e]  # (F,3): edge k = corner k -> k+1 splits
    n_split, n_corners = torch.stack([split.sum(), corner_split.sum()]).tolist()  # the one host sync
    if n_split == 0:
        return vdata, faces
    split_idx = _true_indices(split, n_split)
    mid = torch.full((edges.shape[0],), -1, dtype=torch.long, device=faces.device)
    mid[split_idx] = torch.arange(n_verts, n_verts + n_split, device=faces.device)
    vdata = torch.cat([vdata, vdata[edges[split_idx]].mean(dim=1)])
    side = mid[f2e]  # (F,3): midpoint of edge k = corner k -> k+1, or -1
    # corner k is replaced by the midpoint of edge k when that edge splits; each split edge k adds the
    # corner triangle (c_k, m_k, previous corner-or-midpoint)
    shrunk = torch.where(corner_split, side, faces)
    new = torch.stack([faces, side, shrunk.roll(1, dims=1)], dim=-1).reshape(-1, 3)
    new = new[_true_indices(corner_split.reshape(-1), n_corners)]
    return vdata, torch.cat([shrunk, new])


def flip_edges(pos: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Flip interior edges where that brings the four vertices' valences closer to 6."""
    n_verts = pos.shape[0]
    n_faces = faces.shape[0]
    edges, f2e = unique_edges(faces, n_verts)
    n_edges = edges.shape[0]
    corner_from = faces.reshape(-1)
    opposite = faces.roll(-2, dims=1).reshape(-1)  # the corner not on edge k
    forward = corner_from == edges[f2e.reshape(-1), 0]
    face_id = torch.arange(n_faces, device=faces.device).repeat_interleave(3)
    e_flat = f2e.reshape(-1)
    uses = count_index(e_flat, n_edges)
    side_face = torch.full((n_edges, 2), -1, dtype=torch.long, device=faces.device)
    side_opp = torch.full((n_edges, 2), -1, dtype=torch.long, device=faces.device)
    side_face[e_flat, (~forward).long()] = face_id
    side_opp[e_flat, (~forward).long()] = opposite
    degree = count_index(edges, n_verts)
    interior = (uses == 2) & (side_face >= 0).all(1) & (side_opp[:, 0] != side_opp[:, 1])
    gain = 2 + degree[side_opp].sum(1) - degree[edges].sum(1)  # change of sum((deg-6)^2) / 2
    cand = interior & (gain < 0)
    # the new edge must not exist already (unique_edges returns the edges sorted by this key)
    key_all = edges[:, 0] * n_verts + edges[:, 1]
    new_e = torch.stack([side_opp.amin(dim=1), side_opp.amax(dim=1)], dim=1)  # sorted pairs, without a sort
    key_new = new_e[:, 0] * n_verts + new_e[:, 1]
    at = torch.searchsorted(key_all, key_new).clamp_max(n_edges - 1)
    cand &= key_all[at] != key_new
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
    # winners rewrite their two faces (vertex-disjoint quads: no face is written twice); the others
    # write to a scratch row past the end, so no compaction (and no host sync) is needed
    out = torch.cat([faces, faces.new_zeros(1, 3)])
    out.index_copy_(0, torch.where(win, side_face[idx, 0], n_faces), torch.stack([a, c_b, c_f], dim=1))
    out.index_copy_(0, torch.where(win, side_face[idx, 1], n_faces), torch.stack([b, c_f, c_b], dim=1))
    return out[:n_faces]


def drop_unused(vdata: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove vertices no face uses and renumber."""
    used = torch.zeros(vdata.shape[0], dtype=torch.bool, device=faces.device)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1
    return vdata[used], remap[faces]


@torch.no_grad()
def remesh(
    vdata: torch.Tensor, faces: torch.Tensor, min_len: torch.Tensor, max_len: torch.Tensor,
    flip: bool = True, max_vertices: int = 1_000_000, topology: Topology | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One remeshing pass: collapse, split (below max_vertices), drop unused, flip.

    `topology` is `unique_edges(faces)` if the caller has it (it saves recomputing it for the collapse).
    """
    extra = torch.stack([min_len, max_len], dim=1)
    vdata_ext = torch.cat([vdata, extra], dim=1)
    vdata_ext, faces = collapse_short_edges(vdata_ext, faces, vdata_ext[:, -2], topology=topology)
    if vdata_ext.shape[0] < max_vertices:
        vdata_ext, faces = split_long_edges(vdata_ext, faces, vdata_ext[:, -1])
    vdata_ext, faces = drop_unused(vdata_ext, faces)
    if flip:
        faces = flip_edges(vdata_ext[:, :3], faces)
    return vdata_ext[:, :-2].contiguous(), faces
