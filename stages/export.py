"""The deliverable files of a finished stage, written from its tensors off the critical path.

    python -m stages.export JOB_DIR STAGE

A stage's outputs for the next stage are its tensors (`outputs.safetensors`); the files a person opens
(the views as RGBA PNGs, the mesh as OBJ and GLB) are read by no later stage. Writing them took 0.8 s
of rgb, 0.8 s of normal and 3.6 s of mesh on the H200 (20 views; a 945k-vertex mesh), on the critical
path. The runner starts this process as soon as a stage's manifest is written and lets the next stage
run meanwhile: it is torch-free (numpy, safetensors.numpy, PIL, trimesh), so it starts in a fraction of
a second, takes no GPU memory, and the runner waits for every export before the job ends.

Each file is written atomically; `export.msgpack` comes last, with the manifest key the files were made
from and their sha256 (`JobDir.is_exported`), so a job killed mid-export writes them again on resume
and a stage run again with another plan never keeps files of the old one. Exit codes are the stages'; `UP2YOU_FAULTS=export-rgb:enospc` fails one as a full disk would (tests).
"""

from __future__ import annotations

import contextlib
import errno
import io
import multiprocessing
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from stages import lifeline
from stages.jobfs import JobDir, atomic_path, sha256_file, shown
from stages.spec import EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_OK

VIEW_PREFIX = {"rgb": "view", "normal": "normal"}


def png_bytes(image: np.ndarray) -> bytes:
    """HxWxC (C 1, 3 or 4) in [0,1] float or uint8, encoded as PNG."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _load(job: JobDir, stage: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = job.path(stage, "outputs.safetensors")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ExportError(f"{shown(path)} is missing; rerun the {stage} stage", EXIT_BAD_INPUT) from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
        raise ExportError(f"{shown(path)} cannot be read ({type(exc).__name__}); rerun the {stage} stage",
                          EXIT_BAD_INPUT) from None  # fmt: skip


class ExportError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def view_pngs(stage: str) -> Callable[[JobDir], list[str]]:
    """The stage's views as `<prefix>_XX.png` (RGBA: the image and its BiRefNet alpha)."""
    prefix = VIEW_PREFIX[stage]

    def export(job: JobDir) -> list[str]:
        t = _load(job, stage)
        images, alphas = t.get("images"), t.get("alphas")
        if images is None or alphas is None or images.ndim != 4 or alphas.shape != (images.shape[0], *images.shape[2:]):
            raise ExportError(f"{stage}/outputs.safetensors: need images (N,3,R,R) and alphas (N,R,R); rerun the "
                              f"{stage} stage", EXIT_BAD_INPUT)  # fmt: skip
        rgba = [np.concatenate([img, a[None]]).transpose(1, 2, 0) for img, a in zip(images, alphas, strict=True)]
        # zlib lets go of the GIL: the PNGs are encoded side by side, then written in order
        with ThreadPoolExecutor(max(1, min(len(rgba), os.cpu_count() or 1))) as pool:
            encoded = list(pool.map(png_bytes, rgba))
        names = [f"{prefix}_{i:02d}.png" for i in range(len(encoded))]
        for name, data in zip(names, encoded, strict=True):
            with atomic_path(job.path(stage, name)) as tmp:
                tmp.write_bytes(data)
        _remove_stale(job, stage, re.compile(rf"{prefix}_\d+\.png"), set(names))
        return names

    return export


def _write_glb(path: str, verts: np.ndarray, faces: np.ndarray, rgba: np.ndarray) -> None:
    import trimesh

    trimesh.Trimesh(verts, faces, vertex_colors=rgba, process=False).export(path, file_type="glb")


def mesh_files(job: JobDir) -> list[str]:
    """mesh.obj and mesh.glb: the same vertices, faces and 8-bit vertex colours.

    Formatting the OBJ holds the GIL (1.9 s for 945k vertices and 1.9M faces on the H200 host), so the face
    lines, half the vertex lines and the GLB are made in three forked workers while this process formats the
    other half: the text is the same, and the export no longer outlasts the video stage beside it.
    """
    from up2you.geometry.objfile import face_lines, vertex_lines

    t = _load(job, "mesh")
    verts, faces, colors = t.get("verts"), t.get("faces"), t.get("colors")
    if verts is None or faces is None or colors is None or colors.shape != verts.shape:
        raise ExportError("mesh/outputs.safetensors: need verts (V,3), faces (F,3) and colors (V,3); rerun the mesh "
                          "stage", EXIT_BAD_INPUT)  # fmt: skip
    rgba = np.concatenate([(colors * 255 + 0.5).astype(np.uint8), np.full((len(colors), 1), 255, np.uint8)], axis=1)
    # torch-free, no threads yet: forking is safe and starts at once; each worker dies with this process, as it
    # dies with the orchestrator (a fork does not inherit the death signal)
    fork = multiprocessing.get_context("fork")
    colours = rgba[:, :3] / 255.0  # the GLB's colour bytes
    half = len(verts) // 2
    with (atomic_path(job.path("mesh", "mesh.obj")) as obj, atomic_path(job.path("mesh", "mesh.glb")) as glb,
          ProcessPoolExecutor(3, mp_context=fork, initializer=lifeline.guard, initargs=(os.getpid(),)) as pool):  # fmt: skip
        glb_done = pool.submit(_write_glb, str(glb), verts, faces, rgba)
        second_half = pool.submit(vertex_lines, verts[half:], colours[half:])
        face_text = pool.submit(face_lines, faces)
        text = vertex_lines(verts[:half], colours[:half])
        obj.write_text(text + second_half.result() + face_text.result())
        glb_done.result()
    return ["mesh.obj", "mesh.glb"]


EXPORTS: dict[str, Callable[[JobDir], list[str]]] = {
    "rgb": view_pngs("rgb"), "normal": view_pngs("normal"), "mesh": mesh_files,
}  # fmt: skip


def _remove_stale(job: JobDir, stage: str, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Files of an earlier plan (a 20-view run's view_12..19 after a 12-view rerun) would pass as this one's."""
    for path in job.stage_dir(stage).iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def export_stage(job: JobDir, stage: str) -> list[str]:
    """Write `stage`'s deliverables and its export record; returns the file names."""
    manifest = job.read_manifest(stage)
    if manifest is None:
        raise ExportError(f"{shown(job.path(stage, 'manifest.msgpack'))} is missing: the {stage} stage has not "
                          "finished; rerun the job", EXIT_BAD_INPUT)  # fmt: skip
    job.clear_export(stage)
    job.sweep_temporaries(stage)  # what a killed export left half-written (its stage is done: nothing else writes)
    names = EXPORTS[stage](job)
    job.write_export(stage, {"stage": stage, "key": manifest.get("key", ""),
                             "files": {n: sha256_file(job.path(stage, n)) for n in names}})  # fmt: skip
    return names


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in EXPORTS:
        print(f"usage: python -m stages.export JOB_DIR {{{','.join(EXPORTS)}}}", file=sys.stderr)
        return 2
    job, stage = JobDir(args[0]), args[1]
    with contextlib.suppress(OSError):
        os.nice(10)  # background work: the stage running beside it (on a small CPU, its threads) comes first
    try:
        if f"export-{stage}:enospc" in os.environ.get("UP2YOU_FAULTS", "").split(","):  # tests: a full disk
            raise OSError(errno.ENOSPC, "No space left on device (UP2YOU_FAULTS)")
        names = export_stage(job, stage)
    except ExportError as exc:
        print(f"[export {stage}] {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"[export {stage}] disk full writing {stage}'s deliverables in {shown(job.stage_dir(stage))}; "
                  "free space and rerun: finished stages are kept", file=sys.stderr, flush=True)  # fmt: skip
            return EXIT_DISK_FULL
        raise
    print(f"[export {stage}] wrote {len(names)} file(s)", file=sys.stderr, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
