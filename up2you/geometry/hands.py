"""Hand replacement: optimised hands are blobs, so UP2You swaps in the SMPL-X hands.

Optimised-mesh vertices within `radius` of the SMPL-X hand surface whose nearest SMPL-X vertex has a
hand landmark id (>= 20) are deleted with their faces, floating fragments are dropped, and the SMPL-X
hand submesh is appended. Distances use a cKDTree over hand vertices, edge midpoints and face
centroids (a dense sample of the hand surface) instead of pytorch3d's point-to-face kernel.
"""

from __future__ import annotations

import numpy as np

from up2you.geometry.mesh_ops import compact

HAND_LANDMARK_MIN = 20


def hand_submesh(verts: np.ndarray, faces: np.ndarray, hand_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The faces of the body mesh whose three corners are all hand vertices."""
    is_hand = np.zeros(len(verts), dtype=bool)
    is_hand[hand_ids] = True
    return compact(verts, faces[is_hand[faces].all(1)])


def _surface_samples(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    mids = (tri + np.roll(tri, -1, axis=1)) * 0.5
    return np.concatenate([verts, tri.mean(1), mids.reshape(-1, 3)])


def drop_small_components(verts: np.ndarray, faces: np.ndarray, min_fraction: float = 0.005,
                          min_faces: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Remove connected components smaller than max(min_faces, min_fraction * all faces)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(faces) == 0:
        return verts, faces
    n = len(verts)
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    face_label = label[faces[:, 0]]
    sizes = np.bincount(face_label)
    keep = sizes[face_label] >= max(min_faces, min_fraction * len(faces))
    return compact(verts, faces[keep])


def replace_hands(
    verts: np.ndarray, faces: np.ndarray, body_verts: np.ndarray, body_faces: np.ndarray,
    hand_ids: np.ndarray, landmark_ids: np.ndarray, radius: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """Optimised mesh with its hands cut out and the SMPL-X hands appended (same normalised frame)."""
    from scipy.spatial import cKDTree

    hand_v, hand_f = hand_submesh(body_verts, body_faces, hand_ids)
    # only "within radius?" matters: the bounded search gives up early on the far side of the body (10x
    # faster on a 1M-vertex mesh), and only the vertices within it need their nearest body vertex
    dist, _ = cKDTree(_surface_samples(hand_v, hand_f)).query(verts, distance_upper_bound=radius, workers=-1)
    near = np.flatnonzero(dist < radius)
    _, nearest = cKDTree(body_verts).query(verts[near], workers=-1)
    remove = np.zeros(len(verts), dtype=bool)
    remove[near[landmark_ids[nearest] >= HAND_LANDMARK_MIN]] = True
    kept_faces = faces[~remove[faces].any(1)]
    v, f = drop_small_components(*compact(verts, kept_faces))
    return np.concatenate([v, hand_v]), np.concatenate([f, hand_f + len(v)])
