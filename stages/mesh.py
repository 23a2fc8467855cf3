"""Stage `mesh`: the textured body — continuous remeshing from SMPL-X towards the generated normals,
SMPL-X hands swapped in, screened Poisson, vertex colours projected from the generated RGB views.

Everything runs in the normalised frame (body +/-1.8, cameras radius 2: the framing of the generated
+/-0.9 images); outputs are scaled back to SMPL-X metres.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.harness import BadInputError, StageContext, import_ahead, stage_main
from up2you.geometry.assets import hand_assets
from up2you.geometry.colors import project_colors
from up2you.geometry.hands import replace_hands
from up2you.geometry.mesh_ops import normalize_to_bound, vertex_normals
from up2you.geometry.poisson import PoissonUnavailable, poisson
from up2you.geometry.reconstruct import fit_goal, fit_mesh, normal_targets
from up2you.render import get_rasterizer
from up2you.views import color_weights

NAME = "mesh"
BOUND, RADIUS = 1.8, 2.0
POISSON_DEPTH = 10


# what `run` imports only when it gets there (rasterizer, k-d tree, Poisson): with the modules
# above, 2.3 s after `go` on the H200 before they moved ahead of it
RUN_IMPORTS = ("up2you.render.nvdiffrast_backend", "nvdiffrast.torch", "scipy.spatial", "scipy.sparse.csgraph",
               "pymeshlab")  # fmt: skip


def prepare(ctx: StageContext) -> Any:
    """Hand vertex ids (restricted unpickler) and per-vertex landmark ids; `run`'s imports."""
    import_ahead(*RUN_IMPORTS)
    return hand_assets(ctx.ckpt, ctx.profile)


def _views(ctx: StageContext, stage: str, n: int, required: bool) -> dict[str, torch.Tensor] | None:
    if not required and not ctx.job.path(stage, "outputs.safetensors").exists():
        return None
    t = ctx.load_tensors(stage)
    imgs, alphas = t.get("images"), t.get("alphas")
    if imgs is None or alphas is None or imgs.shape[0] != n or alphas.shape[0] != n or imgs.shape[1] != 3:
        raise BadInputError(f"{stage}/outputs.safetensors: need images (N,3,R,R) and alphas (N,R,R) for "
                            f"N={n} views; rerun the {stage} stage")
    return t


def run(ctx: StageContext, assets: Any) -> None:
    hand_ids, lmk = assets
    plan, dev = ctx.plan, ctx.device
    ap = ctx.load_tensors("apose")
    yaws = [float(y) for y in ap["yaws"]]
    rgb = _views(ctx, "rgb", len(yaws), required=True)
    nrm = _views(ctx, "normal", len(yaws), required=True)
    body_m, body_f = ap["smplx_verts"].float(), ap["smplx_faces"].long()
    if hand_ids.max(initial=0) >= body_m.shape[0] or lmk.shape[0] != body_m.shape[0]:
        raise BadInputError("apose/outputs.safetensors: SMPL-X vertex count does not match the hand/landmark "
                            "assets; rerun apose with the same weights")
    body_n, centre, scale = normalize_to_bound(body_m, BOUND)
    raster = get_rasterizer(dev)
    with ctx.timed("targets"):
        goal = fit_goal(*normal_targets(nrm["images"], nrm["alphas"], plan.mesh_resolution))
    del nrm

    def log(it: int, loss: float, n_faces: int) -> None:
        ctx.log(f"iter {it}: loss {loss:.4f}, {n_faces} faces")

    with ctx.timed("fit"):
        verts, faces, losses = fit_mesh(raster, body_n.to(dev), body_f.to(dev), goal.to(dev), yaws, plan.mesh_iters,
                                        RADIUS, view_chunk=plan.mesh_view_chunk, on_log=log)
    del goal
    ctx.free_memory()
    with ctx.timed("hands"):
        v, f = replace_hands(verts.cpu().numpy(), faces.cpu().numpy(), body_n.numpy(), body_f.numpy(), hand_ids, lmk)
        normals = vertex_normals(torch.from_numpy(v).float(), torch.from_numpy(f).long()).numpy()
    with ctx.timed("poisson"):
        try:
            pv, pf = poisson(v, normals, depth=POISSON_DEPTH)
            poisson_note = f"screened Poisson depth {POISSON_DEPTH}, largest component"
        except PoissonUnavailable as exc:  # keep the remeshed surface + hands: not watertight, but a mesh
            pv, pf = v.astype(np.float32), f.astype(np.int64)
            poisson_note = f"skipped: {exc}"
            ctx.log(f"warning: Poisson {poisson_note}; the mesh is the remeshed surface with the hands, not watertight")
    with ctx.timed("colors"):
        pv_t, pf_t = torch.from_numpy(pv).to(dev), torch.from_numpy(pf).to(dev)
        colors = project_colors(raster, pv_t, pf_t, rgb["images"].to(dev), rgb["alphas"].to(dev), yaws,
                                color_weights(yaws), RADIUS, plan.mesh_resolution).cpu()
    verts_m = torch.from_numpy(pv) / scale + centre
    with ctx.timed("write"):
        _write(ctx, verts_m.float(), torch.from_numpy(pf).long(), colors.float())
    ctx.record(iterations=plan.mesh_iters, view_chunk=plan.mesh_view_chunk, loss_first=losses[0] if losses else None,
               loss_last=losses[-1] if losses else None, remeshed_faces=int(faces.shape[0]),
               vertices=int(pv.shape[0]), faces=int(pf.shape[0]), poisson=poisson_note)


def _write(ctx: StageContext, verts: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor) -> None:
    """The tensors only: mesh.obj and mesh.glb are written from them by stages.export, beside the video stage."""
    ctx.save_tensors("outputs.safetensors", {"verts": verts, "faces": faces, "colors": colors})


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
