"""A synthetic SMPL-X body model in the released file formats, for tests, `--tiny` and calibration.

SMPL-X itself is licensed, so tests cannot ship it. This writes a closed low-poly humanoid (16
ellipsoids, T-pose, metres, y up, facing +z, left = +x) as `SMPLX_NEUTRAL.npz` with every key
`smplx.SMPLX` reads, in SMPL-X's shapes (55 joints, 20 shape+expression directions, 486 pose
directions), plus `MANO_SMPLX_vertex_ids.pkl` and `smplx_vertex_lmkid.npy` in their real formats.

It has exactly SMPL-X's 10475 vertices (20886 faces vs the real 20908: our parts are closed), which
matters twice: smplx's joint selector indexes vertices up to 9929, so a smaller body could not be
loaded by the real code path; and the `full-random` calibration profile uses this body so rendering
and remeshing memory is measured at the real vertex count.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from up2you.checkpoints import CHECKPOINTS

N_JOINTS = 55
N_VERTS = 10475

# SMPL-X kinematic tree: parents of joints 0..54 (body 0-21, jaw/eyes 22-24, hands 25-54).
_BODY_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15]
PARENTS = _BODY_PARENTS + [
    20 if k % 3 == 0 else 25 + 3 * (k // 3) + k % 3 - 1 for k in range(15)
] + [21 if k % 3 == 0 else 40 + 3 * (k // 3) + k % 3 - 1 for k in range(15)]

# (name, joint, centre, radii (x, y, z), long axis, rings, segments, landmark id)
_PARTS = [
    ("torso", 9, (0.0, 0.28, 0.0), (0.16, 0.26, 0.10), 1, 61, 55, 1),
    ("pelvis", 0, (0.0, 0.0, 0.0), (0.15, 0.14, 0.10), 1, 14, 40, 0),
    ("neck", 12, (0.0, 0.56, 0.0), (0.05, 0.07, 0.05), 1, 8, 24, 2),
    ("head", 15, (0.0, 0.72, 0.01), (0.09, 0.115, 0.10), 1, 24, 40, 3),
]
for _side, _sx, _j, _lm in (("l", 1.0, 0, 0), ("r", -1.0, 1, 1)):
    _PARTS += [
        (f"{_side}_upperarm", 16 + _j, (0.30 * _sx, 0.47, 0.0), (0.14, 0.045, 0.045), 0, 20, 24, 4 + _lm),
        (f"{_side}_forearm", 18 + _j, (0.56 * _sx, 0.47, 0.0), (0.13, 0.038, 0.038), 0, 20, 24, 6 + _lm),
        (f"{_side}_hand", 20 + _j, (0.77 * _sx, 0.47, 0.0), (0.08, 0.02, 0.045), 0, 12, 20, 20 + _lm),
        (f"{_side}_thigh", 1 + _j, (0.09 * _sx, -0.30, 0.0), (0.075, 0.22, 0.075), 1, 24, 28, 8 + _lm),
        (f"{_side}_shin", 4 + _j, (0.095 * _sx, -0.72, 0.0), (0.055, 0.22, 0.055), 1, 24, 24, 10 + _lm),
        (f"{_side}_foot", 7 + _j, (0.095 * _sx, -0.95, 0.05), (0.045, 0.035, 0.11), 2, 12, 20, 12 + _lm),
    ]


def _joint_positions() -> np.ndarray:
    """T-pose joint locations (55,3) matching the parts above."""
    j = np.zeros((N_JOINTS, 3))
    j[0], j[3], j[6], j[9] = (0, -0.02, 0), (0, 0.08, 0), (0, 0.2, 0), (0, 0.32, 0)
    j[12], j[15], j[22] = (0, 0.52, 0), (0, 0.62, 0), (0, 0.68, 0.05)
    j[23], j[24] = (0.03, 0.74, 0.09), (-0.03, 0.74, 0.09)
    for s, sx in ((0, 1.0), (1, -1.0)):
        j[1 + s], j[4 + s], j[7 + s], j[10 + s] = (
            (0.09 * sx, -0.08, 0), (0.095 * sx, -0.51, 0), (0.095 * sx, -0.92, 0), (0.095 * sx, -0.96, 0.1))
        j[13 + s], j[16 + s], j[18 + s], j[20 + s] = (
            (0.07 * sx, 0.46, 0), (0.17 * sx, 0.47, 0), (0.43 * sx, 0.47, 0), (0.69 * sx, 0.47, 0))
        for finger in range(5):
            for k in range(3):
                j[25 + 15 * s + 3 * finger + k] = ((0.73 + 0.035 * k) * sx, 0.47, -0.03 + 0.015 * finger)
    return j


def _ellipsoid(centre, radii, axis: int, rings: int, segs: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed UV ellipsoid with its poles on `axis`; rings*segs+2 vertices, outward CCW faces."""
    theta = np.pi * (np.arange(rings) + 1) / (rings + 1)
    phi = 2 * np.pi * np.arange(segs) / segs
    t, p = np.meshgrid(theta, phi, indexing="ij")
    local = np.stack([np.cos(t), np.sin(t) * np.cos(p), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    local = np.concatenate([[[1.0, 0, 0]], local, [[-1.0, 0, 0]]])
    order = [axis, (axis + 1) % 3, (axis + 2) % 3]
    v = np.zeros_like(local)
    v[:, order] = local
    v = v * np.asarray(radii) + np.asarray(centre)
    grid = 1 + np.arange(rings * segs).reshape(rings, segs)
    nxt = np.roll(grid, -1, axis=1)
    faces = [np.stack([np.zeros(segs, int), nxt[0], grid[0]], 1)]
    for r in range(rings - 1):
        a, b, c, d = grid[r], nxt[r], grid[r + 1], nxt[r + 1]
        faces += [np.stack([a, b, d], 1), np.stack([a, d, c], 1)]
    last = rings * segs + 1
    faces.append(np.stack([np.full(segs, last), grid[-1], nxt[-1]], 1))
    f = np.concatenate(faces)
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum()
    return v, (f if vol > 0 else f[:, ::-1].copy())


def _regressor(verts: np.ndarray, joints: np.ndarray, k: int = 8) -> np.ndarray:
    """J_regressor (55,V): affine weights (summing to 1) of the k nearest vertices reproducing each joint."""
    reg = np.zeros((len(joints), len(verts)))
    for i, p in enumerate(joints):
        near = np.argsort(((verts - p) ** 2).sum(1))[:k]
        a = np.concatenate([verts[near].T, np.ones((1, k))])
        w, *_ = np.linalg.lstsq(a, np.concatenate([p, [1.0]]), rcond=None)
        reg[i, near] = w
    return reg


def synthetic_body(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(SMPLX_NEUTRAL.npz arrays, MANO vertex ids, per-vertex landmark ids) of the synthetic humanoid.

    The seed draws the shape directions and hand means (small, random); template and skinning are fixed.
    """
    rng = np.random.default_rng(seed)
    verts, faces, joint_of, lmk = [], [], [], []
    hands: dict[str, np.ndarray] = {}
    for name, joint, centre, radii, axis, rings, segs, lmk_id in _PARTS:
        v, f = _ellipsoid(centre, radii, axis, rings, segs)
        start = sum(len(x) for x in verts)
        if name.endswith("_hand"):
            hands["left_hand" if name[0] == "l" else "right_hand"] = np.arange(start, start + len(v), dtype=np.int64)
        verts.append(v)
        faces.append(f + start)
        joint_of.append(np.full(len(v), joint))
        lmk.append(np.full(len(v), lmk_id, dtype=np.int64))
    v = np.concatenate(verts)
    f = np.concatenate(faces)
    assert len(v) == N_VERTS, len(v)
    joints = _joint_positions()
    weights = np.zeros((N_VERTS, N_JOINTS))
    weights[np.arange(N_VERTS), np.concatenate(joint_of)] = 1.0
    head_faces = np.nonzero(np.isin(f[:, 0], np.nonzero(np.concatenate(joint_of) == 15)[0]))[0]
    scale = np.abs(v).max(0)
    shapedirs = rng.normal(0.0, 0.004, (N_VERTS, 3, 20)) * scale[None, :, None]
    shapedirs[:, 1, 0] = v[:, 1] * 0.03  # beta 0 makes the body taller, as SMPL-X's first component does
    kintree = np.stack([np.array(PARENTS, dtype=np.int64) % (2**32), np.arange(N_JOINTS)]).astype(np.int64)
    body = {
        "v_template": v.astype(np.float64),
        "f": f.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": np.zeros((N_VERTS, 3, 9 * (N_JOINTS - 1)), dtype=np.float32),  # no pose correctives
        "J_regressor": _regressor(v, joints),
        "kintree_table": kintree,
        "weights": weights,
        "hands_componentsl": np.eye(45),
        "hands_componentsr": np.eye(45),
        "hands_meanl": rng.normal(0.0, 0.1, 45),
        "hands_meanr": rng.normal(0.0, 0.1, 45),
        "lmk_faces_idx": rng.choice(head_faces, 51).astype(np.int64),
        "lmk_bary_coords": np.full((51, 3), 1.0 / 3.0),
        "dynamic_lmk_faces_idx": rng.choice(head_faces, (79, 17)).astype(np.int64),
        "dynamic_lmk_bary_coords": np.full((79, 17, 3), 1.0 / 3.0),
    }
    return body, hands, np.concatenate(lmk)


def write_tiny_body_model(root: Path | str, seed: int = 0) -> None:
    """Write the synthetic body's three files where up2you.checkpoints expects the real ones."""
    root = Path(root)
    body, hands, lmk = synthetic_body(seed)
    paths = {k: root / CHECKPOINTS[k].path for k in ("smplx", "mano_ids", "smplx_lmkid")}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(paths["smplx"], **body)  # np.load reads it like the plain .npz
    buf = io.BytesIO()
    pickle.dump(hands, buf, protocol=2)  # writing is safe; reading goes through geometry.safe_pickle
    paths["mano_ids"].write_bytes(buf.getvalue())
    np.save(paths["smplx_lmkid"], lmk)

