"""Small triangle-mesh operations in torch (scatter ops only; no torch_scatter, pytorch3d or kaolin)."""

from __future__ import annotations

import numpy as np
import torch


def face_normals(verts: torch.Tensor, faces: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """(F,3) face normals (area-weighted unless normalized), counter-clockwise = outward."""
    v0, v1, v2 = verts[faces].unbind(1)
    n = torch.cross(v1 - v0, v2 - v0, dim=1)
    return torch.nn.functional.normalize(n, dim=1, eps=1e-12) if normalize else n


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V,3) unit vertex normals: area-weighted sum of the incident face normals."""
    fn = face_normals(verts, faces)
    acc = torch.zeros_like(verts).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(acc, dim=1, eps=1e-12)


def unique_edges(faces: torch.Tensor, n_verts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,2) edges with the lower index first, and (F,3) face -> edge index (edge k = corner k -> k+1).

    Edges come sorted by (lower, higher) index. Pass `n_verts` (any bound above the largest index, such
    as the vertex count) to save the host sync of finding the largest index; the result is the same.
    """
    a, b = faces.reshape(-1), faces.roll(-1, dims=1).reshape(-1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    if n_verts is None:
        n_verts = int(hi.max()) + 1 if hi.numel() else 1
    keys, inverse = torch.unique(lo * n_verts + hi, return_inverse=True)  # 1-D unique: much faster than dim=0
    edges = torch.stack([torch.div(keys, n_verts, rounding_mode="floor"), keys % n_verts], dim=1)
    return edges, inverse.view(-1, 3)


def count_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of 0..size-1 occurs in `index` (int64): `torch.bincount(index, minlength=size)`
    for indices < size, without the host sync bincount spends on finding the largest index.

    Counted in int32: a GPU adds int32 with one atomic instruction, while torch adds int64 with a
    compare-and-swap loop that retries under contention (8.5 ms an iteration at 1.9 M faces, H200)."""
    flat = index.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.int32, device=index.device)
    return torch.zeros(size, dtype=torch.int32, device=index.device).index_add_(0, flat, ones).long()


def neighbor_mean(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean of each vertex's edge neighbours' values (V,D); isolated vertices get 0."""
    src = torch.cat([edges[:, 1], edges[:, 0]])
    dst = torch.cat([edges[:, 0], edges[:, 1]])
    acc = torch.zeros_like(values).index_add(0, dst, values[src])
    cnt = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    cnt = cnt.index_add(0, dst, torch.ones_like(dst, dtype=values.dtype))
    return acc / cnt.clamp_min(1.0).view(-1, *([1] * (values.dim() - 1)))


def normalize_to_bound(verts: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centre on the bbox centre and scale the largest extent to 2*bound (upstream normalize_vertices).

    Returns (normalised verts, centre, scale) with verts_normalised = (verts - centre) * scale.
    """
    lo, hi = verts.min(0).values, verts.max(0).values
    centre = (lo + hi) * 0.5
    scale = 2.0 * bound / float((hi - lo).max())
    return (verts - centre) * scale, centre, scale


def largest_component(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the connected component with the most faces; drop unreferenced vertices."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(faces) == 0:
        return verts, faces
    n = len(verts)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    best = np.bincount(face_label).argmax()
    return compact(verts, faces[face_label == best])


def compact(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices no face references and renumber the faces."""
    used = np.zeros(len(verts), dtype=bool)
    used[faces.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return verts[used], remap[faces]
