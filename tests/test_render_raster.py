"""The pure-torch rasterizer: coverage, depth order, barycentrics, gradients, and (GPU) nvdiffrast agreement."""

from __future__ import annotations

import pytest
import torch

from up2you.render.camera import orbit_mvps, to_clip
from up2you.render.draw import normal_attr, render_attr
from up2you.render.torch_raster import TorchRasterizer

TRI = torch.tensor([[0, 1, 2]], dtype=torch.int32)


def _pos(pts: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[p + [1.0] for p in pts]], dtype=torch.float32)


def test_coverage_and_barycentrics() -> None:
    r = TorchRasterizer()
    pos = _pos([[-1, -1, 0], [1, -1, 0], [-1, 1, 0]])  # lower-left half of the screen
    rast = r.rasterize(pos, TRI, (16, 16))
    cov = rast[0, ..., 3] > 0
    assert 0.4 < float(cov.float().mean()) < 0.6
    assert bool(cov[0, 0]) and not bool(cov[15, 15])  # row 0 is NDC y = -1 (nvdiffrast's convention)
    attr = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    out = r.interpolate(attr, rast, TRI)
    assert torch.allclose(out[0][cov].sum(-1), torch.ones(int(cov.sum())), atol=1e-5)
    # pixel (row 0, col 0) centre is NDC (-15/16, -15/16): barycentrics (15/16, 1/32, 1/32)
    assert torch.allclose(out[0, 0, 0], torch.tensor([15 / 16, 1 / 32, 1 / 32]), atol=1e-5)


def test_nearest_fragment_wins() -> None:
    r = TorchRasterizer()
    pos = torch.cat([_pos([[-1, -1, 0.5], [1, -1, 0.5], [0, 1, 0.5]]), ], 1)
    pos = torch.cat([pos, _pos([[-1, -1, -0.5], [1, -1, -0.5], [0, 1, -0.5]])], 1)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rast = r.rasterize(pos, tri, (8, 8))
    hit = rast[0, ..., 3] > 0
    assert (rast[0, ..., 3][hit] == 2).all() and torch.allclose(rast[0, ..., 2][hit], torch.tensor(-0.5))


def test_interpolate_and_antialias_gradients_reach_positions() -> None:
    r = TorchRasterizer()
    pos = _pos([[-0.6, -0.6, 0], [0.6, -0.6, 0], [0, 0.6, 0]]).requires_grad_(True)
    rast = r.rasterize(pos, TRI, (32, 32))
    mask = (rast[..., 3:] > 0).float()
    alpha = r.antialias(mask, rast, pos, TRI)
    # growing the triangle must increase the antialiased coverage: d(sum alpha)/d(x of right vertex) > 0
    alpha.sum().backward()
    assert float(pos.grad[0, 1, 0]) > 0 and float(pos.grad[0, 0, 0]) < 0
    pos.grad = None
    val = r.interpolate(pos[0, :, :1].contiguous(), rast, TRI)
    val.sum().backward()
    assert pos.grad is not None and float(pos.grad.abs().sum()) > 0


def test_camera_front_view_sees_front() -> None:
    verts = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, -0.5], [0.3, 0.8, 0.0]])
    clip = to_clip(verts, orbit_mvps([0.0, 180.0], 1.0))
    assert float(clip[0, 0, 2]) < float(clip[0, 1, 2])  # +z is nearer from the front
    assert float(clip[1, 0, 2]) > float(clip[1, 1, 2])
    assert float(clip[0, 2, 1]) < 0  # up (+y) maps to NDC y < 0, i.e. the top rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and nvdiffrast")
def test_torch_matches_nvdiffrast() -> None:
    from up2you.geometry.mesh_ops import vertex_normals
    from up2you.geometry.tiny import _ellipsoid
    from up2you.render.nvdiffrast_backend import NvdiffrastRasterizer

    v, f = _ellipsoid((0.1, 0, 0), (0.5, 0.8, 0.3), 1, 30, 40)
    v, f = torch.tensor(v, dtype=torch.float32).cuda(), torch.tensor(f).cuda()
    mvps = orbit_mvps([0, 45, 90, 180], 1.0).cuda()
    attr = normal_attr(vertex_normals(v, f))
    outs = [render_attr(rz, v, f, attr, mvps, 256, 0.5) for rz in (TorchRasterizer("cuda"), NvdiffrastRasterizer())]
    (img_t, a_t), (img_n, a_n) = outs
    rast_t = TorchRasterizer("cuda").rasterize(to_clip(v, mvps), f.int(), (256, 256))
    rast_n = NvdiffrastRasterizer().rasterize(to_clip(v, mvps), f.int(), (256, 256))
    cov_t, cov_n = rast_t[..., 3] > 0, rast_n[..., 3] > 0
    # coverage: the two differ only on pixel centres that lie on a triangle edge (tie rules)
    assert float((cov_t != cov_n).float().mean()) < 0.01
    # antialiased alpha: the CPU edge blend is a simplification of nvdiffrast's, close on average
    assert float((a_t - a_n).abs().mean()) < 0.01
    same = cov_t & cov_n & (rast_t[..., 3] == rast_n[..., 3])
    assert float(same.float().sum() / cov_n.float().sum()) > 0.95
    interior = same & (a_t > 0.999) & (a_n > 0.999)
    # nvdiffrast also antialiases occlusion edges inside the silhouette (alpha stays 1 there) and the CPU
    # rasterizer does not, so single pixels differ along those edges: compare the average
    assert float((img_t - img_n).abs().permute(0, 2, 3, 1)[interior].mean()) < 0.01
    assert float((rast_t[..., 2] - rast_n[..., 2]).abs()[same].max()) < 1e-3
