"""Wavefront OBJ writing for large meshes.

trimesh's OBJ export took 8.6 s of a 49-s mesh stage on the H200 (943k vertices, 1.9M faces from
random-weight normals) and 3.5 s for a 655k-vertex sphere on a 2-core CPU: it formats row by row with
extra passes. One `%` format over all rows at once formats in C and writes the same text in 0.9 s
(the same sphere). The file is what trimesh writes and reads: `v x y z r g b` (colour in [0, 1]) and
`f a b c` (1-based).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITION_DECIMALS = 6  # 1 micrometre in metres, below the remesher's smallest edge (~1 mm)
COLOR_DECIMALS = 4  # 8-bit colours: neighbouring bytes differ by 1/255 = 0.0039, so each byte reads back


def vertex_lines(verts: np.ndarray, colors: np.ndarray | None = None) -> str:
    """The `v` lines: verts (V,3), colors (V,3) in [0, 1] or None."""
    verts = np.asarray(verts, np.float64).reshape(-1, 3)
    p, c = f"%.{POSITION_DECIMALS}f", f"%.{COLOR_DECIMALS}f"
    if colors is None:
        rows, row = verts, f"v {p} {p} {p}\n"
    else:
        rows = np.concatenate([verts, np.asarray(colors, np.float64).reshape(-1, 3)], axis=1)
        row = f"v {p} {p} {p} {c} {c} {c}\n"
    return (row * len(rows)) % tuple(rows.ravel().tolist())


def face_lines(faces: np.ndarray) -> str:
    """The `f` lines of faces (F,3), 0-based."""
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    return ("f %d %d %d\n" * len(faces)) % tuple((faces + 1).ravel().tolist())


def obj_text(verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> str:
    """OBJ text of a triangle mesh: verts (V,3), faces (F,3) 0-based, colors (V,3) in [0, 1] or None."""
    return vertex_lines(verts, colors) + face_lines(faces)


def write_obj(path: Path | str, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write `obj_text` to `path` (the caller makes it atomic)."""
    Path(path).write_text(obj_text(verts, faces, colors))
