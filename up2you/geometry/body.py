"""The SMPL-X body in UP2You's A-pose: neutral model, flat hands, shoulders rotated -/+45 degrees."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

LEFT_SHOULDER, RIGHT_SHOULDER = 15, 16  # indices into body_pose (joints 16/17 of the full skeleton)


def load_smplx(npz_path: Path | str) -> torch.nn.Module:
    """smplx.SMPLX from a SMPLX_NEUTRAL.npz, configured as upstream's A-pose renderer (10 betas, flat hands).

    smplx prints a warning for 20-direction (v1.0) files; it goes to stderr so stdout stays the
    harness's channel to the runner.
    """
    import smplx

    with contextlib.redirect_stdout(sys.stderr):
        return smplx.SMPLX(str(npz_path), use_pca=False, flat_hand_mean=True, num_betas=10).eval()


def apose_body_pose(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 63) axis-angle body pose: zero except the shoulders, (0,0,-pi/4) left and (0,0,+pi/4) right."""
    pose = torch.zeros(1, 63, dtype=dtype)
    pose[0, 3 * LEFT_SHOULDER + 2] = -math.pi / 4
    pose[0, 3 * RIGHT_SHOULDER + 2] = math.pi / 4
    return pose


@torch.no_grad()
def apose_mesh(model: torch.nn.Module, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A-posed vertices (V,3) in metres and faces (F,3) int64 for betas (1,10)."""
    out = model(betas=betas.float().reshape(1, -1)[:, :10], body_pose=apose_body_pose(), return_verts=True)
    faces = torch.as_tensor(model.faces.astype("int64"))
    return out.vertices[0].float(), faces
