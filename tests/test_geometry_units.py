"""Geometry building blocks: view yaws, colour weights, the restricted unpickler, the synthetic body,
remeshing ops and that continuous remeshing reduces a normal+mask loss."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from up2you.geometry.mesh_ops import unique_edges, vertex_normals
from up2you.geometry.optimizer import MeshOptimizer, RemeshSettings
from up2you.geometry.remesh import remesh, split_long_edges
from up2you.geometry.safe_pickle import UnsafePickleError, load_numpy_pickle
from up2you.geometry.tiny import PARENTS, _ellipsoid, synthetic_body
from up2you.render.camera import orbit_mvps
from up2you.render.draw import normal_attr, render_attr
from up2you.render.torch_raster import TorchRasterizer
from up2you.views import color_weights, view_yaws


def test_view_yaws() -> None:
    assert view_yaws(6) == [0, 45, 90, 180, 270, 315]
    assert view_yaws(4) == [0, 90, 180, 270]
    assert view_yaws(20)[1] == 18 and len(view_yaws(12)) == 12


@pytest.mark.parametrize("n", [12, 20])  # the six training views: tests/test_views.py
def test_color_weights_symmetric(n: int) -> None:
    yaws = view_yaws(n)
    w = dict(zip(yaws, color_weights(yaws), strict=True))
    for y, wy in w.items():
        assert color_weights([-y])[0] == pytest.approx(wy)  # left/right mirror
        assert color_weights([180 - y])[0] == pytest.approx(wy)  # front/back
    assert w[0] == pytest.approx(1.0) and w[180] == pytest.approx(1.0)
    if 90 in w:
        assert w[90] == pytest.approx(0.8) and w[270] == pytest.approx(0.8)


def test_restricted_unpickler(tmp_path: Path) -> None:
    good = tmp_path / "ids.pkl"
    good.write_bytes(pickle.dumps({"left_hand": np.arange(4), "right_hand": np.arange(4, 8)}, protocol=2))
    assert load_numpy_pickle(good)["right_hand"].tolist() == [4, 5, 6, 7]

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"left_hand": Evil()}))
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(bad)
    assert not (tmp_path / "pwned").exists()


def test_synthetic_body_format() -> None:
    body, hands, lmk = synthetic_body(0)
    assert body["v_template"].shape == (10475, 3) and body["J_regressor"].shape == (55, 10475)
    assert body["weights"].shape == (10475, 55) and body["posedirs"].shape == (10475, 3, 486)
    assert np.allclose(body["J_regressor"].sum(1), 1.0)
    assert PARENTS[25] == 20 and PARENTS[27] == 26 and PARENTS[40] == 21
    assert lmk.shape == (10475,) and lmk.dtype == np.int64 and (lmk[hands["left_hand"]] >= 20).all()
    assert (lmk < 20).sum() > 9000


def _sphere(rings: int = 10, segs: int = 16, radii=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    v, f = _ellipsoid((0, 0, 0), radii, 1, rings, segs)
    return torch.tensor(v, dtype=torch.float32), torch.tensor(f, dtype=torch.long)


def _is_closed_manifold(faces: torch.Tensor) -> bool:
    _, f2e = unique_edges(faces)
    return bool((torch.bincount(f2e.reshape(-1)) == 2).all())


def test_split_and_remesh_keep_a_closed_manifold() -> None:
    v, f = _sphere()
    vd, f2 = split_long_edges(v, f, torch.full((v.shape[0],), 0.05))
    assert f2.shape[0] == 4 * f.shape[0] and _is_closed_manifold(f2)
    assert torch.allclose(vd[: v.shape[0]], v)
    for ref in (0.1, 0.5):  # refine, then coarsen
        vd, f2 = remesh(vd, f2, torch.full((vd.shape[0],), ref * 0.5), torch.full((vd.shape[0],), ref * 1.5))
        assert _is_closed_manifold(f2)
        edges, _ = unique_edges(f2)
        lengths = (vd[edges[:, 0]] - vd[edges[:, 1]]).norm(dim=1)
        assert float(lengths.max()) < 3 * ref
    assert vd.shape[0] < 2000


def test_remeshing_reduces_loss_towards_a_target() -> None:
    torch.manual_seed(0)
    r = TorchRasterizer()
    mvps = orbit_mvps([0, 90, 180, 270], 2.0)
    vt, ft = _sphere(24, 32, (1.2, 1.5, 0.7))
    with torch.no_grad():
        target, mask = render_attr(r, vt, ft, normal_attr(vertex_normals(vt, ft)), mvps, 48, 0.0)
    opt = MeshOptimizer(*_sphere(), RemeshSettings())
    losses = []
    for _ in range(15):
        v, f = opt.vertices, opt.faces
        img, alpha = render_attr(r, v, f, normal_attr(vertex_normals(v, f)), mvps, 48, 0.0)
        loss = (img - target).abs().mean() + (alpha - mask).abs().mean()
        loss.backward()
        opt.step()
        opt.remesh()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert _is_closed_manifold(opt.faces)


def test_poisson_without_pymeshlab_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import numpy as np

    from up2you.geometry.poisson import PoissonUnavailable, poisson

    monkeypatch.setitem(sys.modules, "pymeshlab", None)  # import now fails, as on a machine without it
    with pytest.raises(PoissonUnavailable, match="pip install pymeshlab"):
        poisson(np.zeros((4, 3)), np.ones((4, 3)))


def test_obj_writer_reads_back_as_trimesh_wrote_it(tmp_path: Path) -> None:
    """The fast OBJ writer gives what trimesh's exporter gave: the same vertices (to 1e-6), faces, and
    8-bit colours, read back by trimesh; and the same text layout trimesh reads (v with colour, 1-based f)."""
    import trimesh

    from up2you.geometry.objfile import write_obj

    sphere = trimesh.creation.icosphere(subdivisions=3)
    verts, faces = sphere.vertices.astype(np.float32) * 0.9, sphere.faces.astype(np.int64)
    rgba = np.random.default_rng(0).integers(0, 256, (len(verts), 4), dtype=np.uint8)
    rgba[:, 3] = 255
    write_obj(tmp_path / "ours.obj", verts, faces, rgba[:, :3] / 255.0)
    trimesh.Trimesh(verts, faces, vertex_colors=rgba, process=False).export(tmp_path / "trimesh.obj")
    ours = trimesh.load(tmp_path / "ours.obj", process=False)
    theirs = trimesh.load(tmp_path / "trimesh.obj", process=False)
    np.testing.assert_allclose(ours.vertices, theirs.vertices, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ours.faces, theirs.faces)
    np.testing.assert_array_equal(ours.visual.vertex_colors, theirs.visual.vertex_colors)
    np.testing.assert_array_equal(ours.visual.vertex_colors, rgba)
    write_obj(tmp_path / "plain.obj", verts[:3], faces[:1] * 0 + [0, 1, 2])
    lines = (tmp_path / "plain.obj").read_text().splitlines()
    assert lines[0].startswith("v ") and len(lines[0].split()) == 4 and lines[3] == "f 1 2 3"


def test_replace_hands_cuts_what_an_exhaustive_search_cuts() -> None:
    """The bounded k-d tree search removes exactly the vertices an exhaustive distance computation
    removes: within `radius` of the hand surface samples and nearest to a hand-landmark body vertex."""
    from up2you.geometry.hands import (
        HAND_LANDMARK_MIN,
        _surface_samples,
        drop_small_components,
        hand_submesh,
        replace_hands,
    )
    from up2you.geometry.mesh_ops import compact

    body_v, body_f, hand_ids, lmk = _two_handed_body()
    rng = np.random.default_rng(1)
    verts = (body_v[rng.integers(0, len(body_v), 3000)] + rng.normal(0, 0.05, (3000, 3))).astype(np.float32)
    faces = np.stack([np.arange(0, 2997), np.arange(1, 2998), np.arange(2, 2999)], 1).astype(np.int64)
    radius = 0.08
    hv, hf = hand_submesh(body_v, body_f, hand_ids)
    samples = _surface_samples(hv, hf)
    dist = np.sqrt(((verts[:, None] - samples[None]) ** 2).sum(-1)).min(1)
    nearest = np.sqrt(((verts[:, None] - body_v[None]) ** 2).sum(-1)).argmin(1)
    remove = (dist < radius) & (lmk[nearest] >= HAND_LANDMARK_MIN)
    assert 0 < remove.sum() < len(verts)  # the case tests something: some vertices go, most stay
    v, f = replace_hands(verts, faces, body_v, body_f, hand_ids, lmk, radius)
    ev, ef = drop_small_components(*compact(verts, faces[~remove[faces].any(1)]))
    np.testing.assert_array_equal(v, np.concatenate([ev, hv]))
    np.testing.assert_array_equal(f, np.concatenate([ef, hf + len(ev)]))


def _two_handed_body() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A grid body whose two ends are 'hands' (ids and landmark ids >= 20 there)."""
    import trimesh

    box = trimesh.creation.box((1.8, 0.4, 0.2)).subdivide().subdivide().subdivide()
    v, f = np.asarray(box.vertices, np.float32), np.asarray(box.faces, np.int64)
    hands = np.flatnonzero(np.abs(v[:, 0]) > 0.7)
    lmk = np.zeros(len(v), np.int64)
    lmk[hands] = 25
    return v, f, hands, lmk
