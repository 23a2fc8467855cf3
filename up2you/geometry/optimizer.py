"""Continuous remeshing's vertex optimiser (Palfinger 2022, "Continuous Remeshing for Inverse Rendering").

Why not Adam on vertex positions: steps there are in absolute units, so fine detail needs a small lr
and large moves a large one. Here every vertex steps by (Adam-normalised velocity) x (its own reference
edge length), and the reference edge length grows where vertices move fast relative to `nu_ref` and
shrinks where they settle: the mesh coarsens while it travels and refines where it converges, and
`remesh()` keeps actual edge lengths within `edge_len_tol` of the reference after every step.

State lives in one (V, 9) tensor [position 3 | m1 3 | m2 1 | nu 1 | ref_len 1] so remeshing carries
it along (new vertices get their parents' mean). The edge list of the current faces is computed once
per iteration and shared by the step (Laplacian) and the remesh's collapse, which see the same faces.
The reference implementation's spatial smoothing of
the moments ("gammas") is not implemented: UP2You runs with gammas = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from up2you.geometry.mesh_ops import neighbor_mean, unique_edges
from up2you.geometry.remesh import Topology, remesh


@dataclass(frozen=True)
class RemeshSettings:
    """UP2You's reconstructor settings (see the research fact sheet §6.1)."""

    lr: float = 0.3
    betas: tuple[float, float, float] = (0.8, 0.8, 0.0)
    nu_ref: float = 0.3
    edge_len_lims: tuple[float, float] = (0.01, 0.1)
    edge_len_tol: float = 0.5
    gain: float = 0.2
    laplacian_weight: float = 0.02
    ramp: float = 1.0
    grad_lim: float = 10.0
    local_edgelen: bool = True


def ref_len_interval(step: int) -> int:
    """UP2You updates reference edge lengths every 4 steps before 500, every 2 before 800, then always."""
    return 4 if step < 500 else 2 if step < 800 else 1


def _lerp_unbiased(avg: torch.Tensor, new: torch.Tensor, beta: float, step: int) -> torch.Tensor:
    """Exponential moving average with Adam's bias correction folded in."""
    c_prev = 1.0 - beta ** (step - 1)
    c = 1.0 - beta**step
    return avg * (beta * c_prev / c) + new * ((1.0 - beta) / c)


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
        self._topology: Topology | None = None  # unique_edges(self.faces), while the faces stay put

    def topology(self) -> Topology:
        """(edges, face -> edge) of the current faces, computed once until the faces change."""
        if self._topology is None:
            self._topology = unique_edges(self.faces, self._state.shape[0])
        return self._topology

    @torch.no_grad()
    def step(self) -> None:
        """One update from `self.vertices.grad`."""
        s, st = self.s, self._state
        eps = 1e-8
        self.step_count += 1
        k = self.step_count
        pos, m1, m2, nu, ref = st[:, :3], st[:, 3:6], st[:, 6], st[:, 7], st[:, 8]
        grad = self.vertices.grad if self.vertices.grad is not None else torch.zeros_like(pos)
        edges, _ = self.topology()
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
            self._state, self.faces, ref * (1.0 - self.s.edge_len_tol), ref * (1.0 + self.s.edge_len_tol), flip,
            topology=self.topology(),
        )
        self._topology = None
        self.vertices = self._state[:, :3].clone().requires_grad_(True)
        return self.vertices, self.faces
