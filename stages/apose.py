"""Stage `apose`: SMPL-X in the A-pose with the predicted betas, rendered as normal maps at N yaws.

The renders are the control images of both diffusion stages and the pose input of the feature
aggregator: raw object-space vertex normals encoded (n+1)/2, antialiased, on gray 0.5, from upstream's
orthographic turntable cameras (radius 1) around the body normalised to +/-0.9 — the exact encoding
the adapters were trained on.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.harness import BadInputError, StageContext, stage_main

NAME = "apose"


def prepare(ctx: StageContext) -> Any:
    """The body model in host memory (smplx builds it from the .npz)."""
    from up2you.geometry.assets import body_model

    return body_model(ctx.ckpt, ctx.profile)


def run(ctx: StageContext, model: Any) -> None:
    from up2you.geometry.body import apose_mesh
    from up2you.geometry.mesh_ops import normalize_to_bound, vertex_normals
    from up2you.render import get_rasterizer
    from up2you.render.camera import orbit_mvps
    from up2you.render.draw import normal_attr, render_attr
    from up2you.views import view_yaws

    betas = ctx.load_tensors("features").get("betas")
    if betas is None or betas.numel() < 10 or not torch.isfinite(betas).all():
        raise BadInputError("features/outputs.safetensors: `betas` missing, shorter than 10 or not finite; "
                            "rerun the features stage")
    verts, faces = apose_mesh(model, betas.reshape(1, -1))
    norm, _, _ = normalize_to_bound(verts, 0.9)
    yaws = view_yaws(ctx.plan.views)
    dev = ctx.device
    norm, faces_d = norm.to(dev), faces.to(dev)
    with torch.no_grad():
        poses, _ = render_attr(get_rasterizer(dev), norm, faces_d, normal_attr(vertex_normals(norm, faces_d)),
                               orbit_mvps(yaws, 1.0).to(dev), ctx.plan.resolution, 0.5)
    poses = poses.clamp(0.0, 1.0).float().cpu()
    ctx.save_tensors("outputs.safetensors", {
        "poses": poses, "yaws": torch.tensor(yaws, dtype=torch.float32),
        "smplx_verts": verts.float(), "smplx_faces": faces.long(),
    })
    _save_obj(ctx, verts, faces)
    ctx.save_image("poses.png", _grid(poses))
    ctx.record(views=len(yaws), vertices=int(verts.shape[0]), faces=int(faces.shape[0]))


def _save_obj(ctx: StageContext, verts: torch.Tensor, faces: torch.Tensor) -> None:
    from up2you.geometry.objfile import write_obj

    with ctx.write_file("smplx_mesh.obj") as tmp:
        write_obj(tmp, verts.numpy(), faces.numpy())


def _grid(images: torch.Tensor, cols: int = 10) -> torch.Tensor:
    """(N,3,H,W) -> one (3, rows*H, cols*W) image, gray where there is no view."""
    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    out = torch.full((c, rows * h, cols * w), 0.5)
    for i in range(n):
        r, k = divmod(i, cols)
        out[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return out


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
