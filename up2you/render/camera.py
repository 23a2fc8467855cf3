"""Upstream UP2You's orthographic turntable cameras, reproduced exactly.

Per view, extrinsic[:3,:3] = R_y(angle) (Rodrigues about +y) with w = radius, and intrinsic R_x(pi)
flips y and z; the visible volume is [-radius, radius]^3. Yaws are fed as (-yaw) mod 360 as upstream
does. The result: yaw 0 looks at the +z (front) side with the head at the top row of the image.
"""

from __future__ import annotations

import math

import torch


def rotation_y(angle_deg: float) -> torch.Tensor:
    """R_y as Rodrigues' formula about +y gives it: [[c,0,s],[0,1,0],[-s,0,c]]."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float32)


def orbit_mvps(yaws_deg: list[float], radius: float) -> torch.Tensor:
    """(N,4,4) model-view-projection matrices for views at the given yaws (degrees)."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    mats = []
    for yaw in yaws_deg:
        ext = torch.eye(4)
        ext[:3, :3] = rotation_y((-yaw) % 360.0)
        ext[3, 3] = radius
        mats.append(flip @ ext)
    return torch.stack(mats)


def toward_camera(yaws_deg: list[float]) -> torch.Tensor:
    """(N,3) unit vectors in object space pointing from the object to each camera."""
    return torch.stack([rotation_y((-yaw) % 360.0)[2] for yaw in yaws_deg])


def to_clip(verts: torch.Tensor, mvps: torch.Tensor) -> torch.Tensor:
    """verts (V,3), mvps (N,4,4) -> clip-space positions (N,V,4) (row vectors times mvp^T)."""
    homo = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)
    return torch.einsum("vk,njk->nvj", homo, mvps.to(verts))
