"""Mesh fit profile: the pre-issue-9 fit (`up2you/geometry/reference.py`) against the fast fit
(`up2you/geometry/reconstruct.py`), per phase, on the same synthetic inputs and seed.

    OUT=/some/dir python benchmarks/mesh_profile.py          # about 3-4 minutes on an H100/H200
    options: --iters 700 --views 20 --resolution 768 --mesh-resolution 1024 --configs old,new,new10,new5
             --sync-iters 10 --no-post --device cuda:0     (--device cpu with tiny sizes: a smoke run)

Inputs, as the mesh stage sees them in the tests: the synthetic SMPL-X-sized body (`geometry.tiny`,
10475 vertices) in the A-pose, normalised to bound 1.8; as "generated" normal views (20 x 768 px,
(n+1)/2 on gray, with alphas) the renders of that body pushed out along its normals by 1-3 cm
(clothing), so the fit has real work to do and the mesh refines as in a run.

Each configuration runs in its own process (a clean CUDA context: NVML's per-process number then
includes nvdiffrast's own buffers, which torch does not see):
  old       the reference fit, all views in one batch
  new       the fast fit, all views in one batch (mesh_view_chunk 0)
  newK      the fast fit with views in chunks of K (e.g. new10: the chunk the planner takes at 6 GB)
Per configuration: wall time of the whole fit, per phase (render, loss, backward, step, remesh, log)
the GPU time between CUDA events recorded around the phase (no sync added; spans include the GPU
waiting for the host) and the host time spent in it, wall time and face count every 50 iterations,
torch's peak allocated/reserved, the process's NVML memory at the end (neither torch's cache nor
nvdiffrast's buffers shrink, so this is the peak) next to the budget table's prediction, and host
syncs per iteration per phase, counted in a separate short fit with `torch.cuda.set_sync_debug_mode`
("warn": every synchronising torch op warns; nvdiffrast's own stream sync, once per rasterize call,
is not a torch op and is reported as `rasterize_calls_per_iteration`). The `new` process then times
the rest of the stage on its mesh: hand replacement, screened Poisson (depth 10), colour projection,
OBJ+GLB export. The parent compares the loss curves and final meshes (old vs new, chunked vs not).

Writes $OUT/mesh_profile.json (OUT defaults to ".").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
BOUND, RADIUS = 1.8, 2.0  # stages/mesh.py's frame
POST_PHASES = ("hands", "poisson", "colours", "export_obj_glb")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class PhaseTimer:
    """The fits' `phase` hook: GPU spans between CUDA events, host seconds, and (when counting) syncs."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        self.host_s: dict[str, float] = defaultdict(float)
        self.syncs: dict[str, int] = defaultdict(int)
        self.caught: list[warnings.WarningMessage] | None = None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        n0 = len(self.caught) if self.caught is not None else 0
        start = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if start is not None:
            start.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host_s[name] += time.perf_counter() - t0
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events[name].append((start, end))
            if self.caught is not None:
                self.syncs[name] += sum(1 for w in self.caught[n0:] if "synchroniz" in str(w.message))

    def gpu_ms(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        return {k: round(sum(s.elapsed_time(e) for s, e in v), 1) for k, v in self.events.items()}


def _nvml_process_bytes() -> int | None:
    """This process's GPU memory as NVML sees it (context + torch + nvdiffrast), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == os.getpid():
                    return int(p.usedGpuMemory)
    except Exception:  # noqa: BLE001 - NVML is optional here (and pids differ in some containers)
        return None
    return None


def _nvml_device_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001
        return None


# --- worker: inputs -------------------------------------------------------------------------------

def job_inputs(job: Path, path: Path) -> dict[str, Any]:
    """A finished job's own mesh inputs (apose's body and yaws, normal's images and alphas), as the stage
    reads them: with random weights the normals are noise, and the mesh grows to ~1 M vertices."""
    from safetensors.torch import load_file

    from up2you.geometry.mesh_ops import normalize_to_bound

    ap = load_file(str(job / "apose" / "outputs.safetensors"))
    nrm = load_file(str(job / "normal" / "outputs.safetensors"))
    body, _, _ = normalize_to_bound(ap["smplx_verts"].float(), BOUND)
    yaws = [float(y) for y in ap["yaws"]]
    data = {"yaws": yaws, "body": body, "faces": ap["smplx_faces"].long(), "images": nrm["images"].float(),
            "alphas": nrm["alphas"].float()}
    torch.save(data, path)
    return {"from_job": str(job), "vertices": int(body.shape[0]), "faces": int(data["faces"].shape[0]),
            "views": len(yaws), "resolution": int(data["images"].shape[-1])}


def make_inputs(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    if args.from_job:
        return job_inputs(args.from_job, path)
    from up2you.geometry.assets import body_model
    from up2you.geometry.body import apose_mesh
    from up2you.geometry.mesh_ops import normalize_to_bound, vertex_normals
    from up2you.render import get_rasterizer
    from up2you.render.camera import orbit_mvps
    from up2you.render.draw import normal_attr, render_attr
    from up2you.views import view_yaws

    dev = torch.device(args.device)
    verts_m, faces = apose_mesh(body_model(None, "full-random"), torch.zeros(1, 10))
    body, _, _ = normalize_to_bound(verts_m, BOUND)
    b, f = body.to(dev), faces.to(dev)
    n = vertex_normals(b, f)
    # "clothing": 1-3 cm (0.02-0.06 normalised units) out along the normals, varying smoothly
    push = 0.04 + 0.02 * torch.sin(3.0 * b[:, 1]) * torch.cos(2.0 * b[:, 0])
    dressed = b + push[:, None] * n
    yaws = [float(y) for y in view_yaws(args.views)]
    with torch.no_grad():
        images, alphas = render_attr(get_rasterizer(dev), dressed, f, normal_attr(vertex_normals(dressed, f)),
                                     orbit_mvps(yaws, RADIUS).to(dev), args.resolution, 0.5)
    data = {"yaws": yaws, "body": body, "faces": faces, "images": images.clamp(0, 1).cpu(), "alphas": alphas.cpu()}
    torch.save(data, path)
    return {"vertices": int(body.shape[0]), "faces": int(faces.shape[0]), "views": len(yaws),
            "resolution": args.resolution}


# --- worker: one configuration ----------------------------------------------------------------------

def _config(name: str) -> tuple[str, int]:
    if name == "old":
        return "old", 0
    if name.startswith("new"):
        return "new", int(name[3:] or 0)
    raise SystemExit(f"--configs: unknown configuration {name!r} (old, new, newK)")


def _fit(impl: str, chunk: int, raster: Any, inputs: dict[str, Any], targets: tuple[torch.Tensor, ...],
         iters: int, timer: PhaseTimer, progress: dict[int, tuple[float, int]], t0: float) -> tuple[Any, ...]:
    """`targets`: (target, mask) for the reference fit, (goal,) for the fast one, as each stage holds them."""
    from up2you.geometry import reference
    from up2you.geometry.reconstruct import fit_mesh

    dev = targets[0].device
    body, faces = inputs["body"].to(dev), inputs["faces"].to(dev)

    def mark(it: int, loss: float, n_faces: int) -> None:
        if it % 50 == 0 or it == iters - 1:
            progress[it] = (round(time.perf_counter() - t0, 3), n_faces)

    torch.manual_seed(0)
    if impl == "old":
        return reference.fit_mesh(raster, body, faces, *targets, inputs["yaws"], iters, RADIUS,
                                  on_step=mark, phase=timer)
    return fit_mesh(raster, body, faces, targets[0], inputs["yaws"], iters, RADIUS, view_chunk=chunk,
                    on_log=mark, log_every=50, phase=timer)


def run_config(args: argparse.Namespace, name: str, inputs_path: Path, result_path: Path) -> dict[str, Any]:
    from budgets.table import load_table, predict
    from stages.plan import Plan
    from up2you.geometry.reconstruct import fit_goal, normal_targets, view_chunks
    from up2you.render import get_rasterizer

    impl, chunk = _config(name)
    dev = torch.device(args.device)
    before = _nvml_device_used()
    inputs = torch.load(inputs_path, weights_only=True)
    n_views = len(inputs["yaws"])
    t = time.perf_counter()
    raster = get_rasterizer(dev)
    load_s = time.perf_counter() - t
    targets = normal_targets(inputs["images"].to(dev), inputs["alphas"].to(dev), args.mesh_resolution)
    if impl == "new":
        targets = (fit_goal(*targets),)
    out: dict[str, Any] = {"config": name, "impl": impl, "view_chunk": chunk, "rasterizer_load_s": round(load_s, 2),
                           "rasterize_calls_per_iteration": 1 if impl == "old" else len(view_chunks(n_views, chunk))}

    # 1. host syncs, counted in a short fit of its own (the warnings slow it down)
    if dev.type == "cuda" and args.sync_iters > 0:
        counter = PhaseTimer(dev)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counter.caught = caught
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _fit(impl, chunk, raster, inputs, targets, args.sync_iters, counter, {}, time.perf_counter())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_per_iteration"] = {k: round(v / args.sync_iters, 2) for k, v in sorted(counter.syncs.items())}
        out["syncs_per_iteration_total"] = round(sum(counter.syncs.values()) / args.sync_iters, 2)
        out["sync_iters"] = args.sync_iters

    # 2. the timed fit
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timer = PhaseTimer(dev)
    progress: dict[int, tuple[float, int]] = {}
    _sync(dev)
    t0 = time.perf_counter()
    verts, faces, losses = _fit(impl, chunk, raster, inputs, targets, args.iters, timer, progress, t0)
    _sync(dev)
    wall = time.perf_counter() - t0
    out.update({
        "iterations": args.iters, "fit_s": round(wall, 2), "ms_per_iteration": round(1000 * wall / args.iters, 2),
        "phase_gpu_ms": timer.gpu_ms(), "phase_host_ms": {k: round(1000 * v, 1) for k, v in timer.host_s.items()},
        "progress": {str(k): {"wall_s": v[0], "faces": v[1]} for k, v in sorted(progress.items())},
        "final_vertices": int(verts.shape[0]), "final_faces": int(faces.shape[0]),
        "loss_first_last": [losses[0], losses[-1]],
    })  # fmt: skip
    plan = Plan(views=n_views, mesh_resolution=args.mesh_resolution, mesh_iters=args.iters, mesh_view_chunk=chunk)
    pred = predict("mesh", plan, 1, load_table())
    out["table_prediction_bytes"] = pred.total_bytes
    out["table_prediction_optimise_breakdown"] = pred.breakdown
    if dev.type == "cuda":
        proc = _nvml_process_bytes()
        used = _nvml_device_used()
        out.update({
            "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated(dev) / GiB, 3),
            "torch_peak_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / GiB, 3),
            "nvml_process_gib_end": round(proc / GiB, 3) if proc else None,
            "nvml_device_used_delta_gib_end": round((used - before) / GiB, 3) if used and before else None,
        })  # fmt: skip
        measured = proc or ((used - before) if used and before else None)
        if measured:
            out["table_error_pct"] = round(100 * (pred.total_bytes - measured) / measured, 1)
    torch.save({"verts": verts.cpu(), "faces": faces.cpu(), "losses": losses}, result_path)
    if impl == "new" and args.kernel_iters > 0 and dev.type == "cuda":
        out["kernels_at_final_mesh"] = kernel_profile(args, raster, inputs, targets[0], chunk)

    # 3. the rest of the stage on this mesh
    if impl == "new" and chunk == 0 and not args.no_post:
        out["post_s"] = time_post(args, inputs, verts, faces, raster, dev)
        out["stage_estimate_s"] = round(out["fit_s"] + sum(v for k, v in out["post_s"].items() if k in POST_PHASES), 2)
    return out


def kernel_profile(args: argparse.Namespace, raster: Any, inputs: dict[str, Any], goal: torch.Tensor,
                   chunk: int) -> dict[str, Any]:
    """Where the GPU time of an iteration goes once the mesh is grown: the same fit again, with
    torch.profiler on for its last `--kernel-iters` iterations; CUDA time per op (top 25) and per phase."""
    from torch.profiler import ProfilerActivity, profile

    from up2you.geometry.reconstruct import fit_mesh

    n, iters = args.kernel_iters, args.iters
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    timer = PhaseTimer(goal.device)
    marks: dict[str, Any] = {}

    def on_log(it: int, loss: float, n_faces: int) -> None:  # called after iteration `it`
        if it == iters - n - 1:
            marks["faces_start"] = n_faces
            _sync(goal.device)
            prof.start()
            marks["t"] = time.perf_counter()
        elif it == iters - 1:
            _sync(goal.device)
            marks["wall"] = time.perf_counter() - marks["t"]
            prof.stop()
            marks["faces_end"] = n_faces

    def phase(name: str) -> Any:
        return timer(name) if "t" in marks and "wall" not in marks else contextlib.nullcontext()

    torch.manual_seed(0)
    fit_mesh(raster, inputs["body"].to(goal.device), inputs["faces"].to(goal.device), goal, inputs["yaws"], iters,
             RADIUS, view_chunk=chunk, on_log=on_log, log_every=1, phase=phase)
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if dev_us > 0:
            rows.append((e.key, dev_us / n / 1000, e.count / n))
    rows.sort(key=lambda r: -r[1])
    return {"iterations": n, "faces_start": marks.get("faces_start"), "faces_end": marks.get("faces_end"),
            "ms_per_iteration_profiled": round(1000 * marks.get("wall", float("nan")) / n, 2),
            "phase_gpu_ms_per_iteration": {k: round(v / n, 2) for k, v in timer.gpu_ms().items()},
            "top_ops_gpu_ms_per_iteration": [[k, round(ms, 3), round(c, 1)] for k, ms, c in rows[:25]]}


def time_post(args: argparse.Namespace, inputs: dict[str, Any], verts: torch.Tensor, faces: torch.Tensor,
              raster: Any, dev: torch.device) -> dict[str, float]:
    import numpy as np
    import trimesh

    from up2you.geometry.assets import hand_assets
    from up2you.geometry.colors import project_colors
    from up2you.geometry.hands import replace_hands
    from up2you.geometry.mesh_ops import vertex_normals
    from up2you.geometry.poisson import PoissonUnavailable, poisson
    from up2you.views import color_weights

    times: dict[str, float] = {}
    t = time.perf_counter()
    hand_ids, lmk = hand_assets(None, "full-random")
    v, f = replace_hands(verts.cpu().numpy(), faces.cpu().numpy(), inputs["body"].numpy(), inputs["faces"].numpy(),
                         hand_ids, lmk)
    times["hands"] = time.perf_counter() - t
    t = time.perf_counter()
    normals = vertex_normals(torch.from_numpy(v).float(), torch.from_numpy(f).long()).numpy()
    poisson_ran = True
    try:
        pv, pf = poisson(v, normals, depth=10)
    except PoissonUnavailable:  # as the stage does: keep the remeshed surface
        pv, pf, poisson_ran = v.astype(np.float32), f.astype(np.int64), False
    times["poisson"] = time.perf_counter() - t
    t = time.perf_counter()
    yaws = inputs["yaws"]
    colors = project_colors(raster, torch.from_numpy(pv).to(dev), torch.from_numpy(pf).to(dev),
                            inputs["images"].to(dev), inputs["alphas"].to(dev), yaws, color_weights(yaws), RADIUS,
                            args.mesh_resolution).cpu()
    _sync(dev)
    times["colours"] = time.perf_counter() - t
    t = time.perf_counter()
    rgba = np.concatenate([(colors.numpy() * 255 + 0.5).astype(np.uint8), np.full((len(colors), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(pv, pf, vertex_colors=rgba, process=False)
    with tempfile.TemporaryDirectory() as tmp:
        mesh.export(Path(tmp) / "mesh.obj")
        mesh.export(Path(tmp) / "mesh.glb")
    times["export_obj_glb"] = time.perf_counter() - t
    return {k: round(s, 2) for k, s in times.items()} | {"poisson_ran": poisson_ran, "poisson_vertices": int(pv.shape[0])}


# --- parent: comparisons ----------------------------------------------------------------------------

def _chamfer(a: torch.Tensor, b: torch.Tensor, n: int = 10000) -> float:
    """Symmetric mean nearest-neighbour distance on (at most) n points of each, normalised units."""
    g = torch.Generator().manual_seed(0)
    a = a[torch.randperm(a.shape[0], generator=g)[:n]].double()
    b = b[torch.randperm(b.shape[0], generator=g)[:n]].double()

    def one_way(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.cat([torch.cdist(x[i:i + 1024], y).min(1).values for i in range(0, x.shape[0], 1024)]).mean())

    return (one_way(a, b) + one_way(b, a)) / 2


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    la, lb = a["losses"], b["losses"]
    rel = [abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True)]
    out: dict[str, Any] = {f"loss_rel_diff_max_first_{k}": max(rel[:k]) for k in (10, 50, 200) if len(rel) >= k}
    out["loss_rel_diff_max_all"] = max(rel)
    out["loss_last"] = [la[-1], lb[-1]]
    first_diff = next((i for i, r in enumerate(rel) if r > 1e-4), None)
    out["first_iteration_loss_differs_1e-4"] = first_diff
    out["vertices"] = [int(a["verts"].shape[0]), int(b["verts"].shape[0])]
    out["faces"] = [int(a["faces"].shape[0]), int(b["faces"].shape[0])]
    out["same_faces"] = bool(a["faces"].shape == b["faces"].shape and torch.equal(a["faces"], b["faces"]))
    out["chamfer"] = _chamfer(a["verts"], b["verts"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=700)
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=768, help="the generated views' size")
    ap.add_argument("--mesh-resolution", type=int, default=1024)
    ap.add_argument("--configs", default="old,new,new10,new5")
    ap.add_argument("--sync-iters", type=int, default=10)
    ap.add_argument("--no-post", action="store_true", help="skip timing hands/Poisson/colours/export")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--from-job", type=Path, help="a finished job folder: fit its own apose body and normal views")
    ap.add_argument("--kernel-iters", type=int, default=0,
                    help="fit again with torch.profiler on for the last N iterations (CUDA time per op)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "inputs":
        print(json.dumps(make_inputs(args, args.inputs)))
        return
    if args.worker:
        print(json.dumps(run_config(args, args.worker, args.inputs, args.result)))
        return

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        _config(c)
    report: dict[str, Any] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                       if k not in ("worker", "inputs", "result")}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        base = [sys.executable, __file__, "--device", args.device, "--iters", str(args.iters), "--views", str(args.views),
                "--resolution", str(args.resolution), "--mesh-resolution", str(args.mesh_resolution),
                "--sync-iters", str(args.sync_iters), "--kernel-iters", str(args.kernel_iters),
                "--inputs", str(tmp_p / "inputs.pt")] + (["--no-post"] if args.no_post else []) + (
                    ["--from-job", str(args.from_job)] if args.from_job else [])
        report["inputs"] = _worker(base + ["--worker", "inputs"])
        results: dict[str, dict[str, Any]] = {}
        for c in configs:
            t = time.perf_counter()
            report.setdefault("configs", {})[c] = _worker(base + ["--worker", c, "--result", str(tmp_p / f"{c}.pt")])
            report["configs"][c]["process_s"] = round(time.perf_counter() - t, 1)
            results[c] = torch.load(tmp_p / f"{c}.pt", weights_only=True)
            print(f"{c}: {json.dumps(report['configs'][c])[:400]}", flush=True)
    cmp: dict[str, Any] = {}
    if "old" in results and "new" in results:
        cmp["old_vs_new"] = compare(results["old"], results["new"])
        cmp["speedup_fit"] = round(report["configs"]["old"]["fit_s"] / report["configs"]["new"]["fit_s"], 2)
    for c in configs:
        if c.startswith("new") and c != "new" and "new" in results:
            cmp[f"new_vs_{c}"] = compare(results["new"], results[c])
    report["comparisons"] = cmp
    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    path = out_dir / "mesh_profile.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"comparisons": cmp, "fit_s": {c: report["configs"][c].get("fit_s") for c in configs}}, indent=1))
    print(f"wrote {path}")


def _worker(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {cmd[cmd.index('--worker') + 1]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
