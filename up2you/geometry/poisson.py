"""Screened Poisson surface reconstruction through pymeshlab (instead of upstream's Open3D)."""

from __future__ import annotations

import numpy as np

from up2you.geometry.mesh_ops import largest_component


class PoissonUnavailable(ImportError):
    """pymeshlab is not installed: the caller may keep the un-Poissoned mesh and say so."""


def poisson(verts: np.ndarray, normals: np.ndarray, depth: int = 10, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Watertight surface through oriented points (vertices + unit normals); largest component only.

    One thread by default: the multithreaded solver's sums depend on thread timing, so two runs on the
    same points gave different vertices (a resumed run must give the same bytes as an uninterrupted
    one). Returns float32 vertices and int64 faces.
    """
    try:
        import pymeshlab
    except ImportError as exc:
        raise PoissonUnavailable("pymeshlab is not installed (pip install pymeshlab)") from exc

    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(verts, np.float64),
                               v_normals_matrix=np.asarray(normals, np.float64)))
    ms.generate_surface_reconstruction_screened_poisson(depth=depth, preclean=True,
                                                        threads=max(1, threads))
    m = ms.current_mesh()
    v = m.vertex_matrix().astype(np.float32)
    f = m.face_matrix().astype(np.int64)
    return largest_component(v, f)
