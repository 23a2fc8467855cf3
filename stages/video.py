"""Stage `video`: turntables of the coloured mesh and of its normals, and a contact sheet of the views.

Frames are rasterised `plan.video_chunk` at a time and streamed into the encoders, so memory is
bounded by the chunk, not the frame count (upstream rendered all 64 frames at 1024^2 in one batch).
The circle is full: frame i is at i*360/frames degrees. Each encoder is fed from its own thread
(`FrameSink`), so rendering, the two ffmpeg processes and their final flush overlap; frames become
bytes on the GPU (4x less to copy); the contact sheet is drawn in a thread meanwhile.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from stages.harness import BadInputError, StageContext, import_ahead, stage_main
from up2you.geometry.mesh_ops import normalize_to_bound, vertex_normals
from up2you.render import get_rasterizer
from up2you.render.camera import orbit_mvps
from up2you.render.draw import normal_attr, render_attr
from up2you.views import view_yaws

NAME = "video"
BOUND, RADIUS, FPS = 0.925, 1.0, 24


# what `run` imports only when it gets there (rasterizer, encoders, contact sheet)
RUN_IMPORTS = ("up2you.render.nvdiffrast_backend", "nvdiffrast.torch", "imageio.v2", "imageio.plugins.ffmpeg",
               "imageio_ffmpeg", "PIL.ImageDraw")  # fmt: skip


def prepare(ctx: StageContext) -> None:
    """`run`'s imports, while the stages before run (pre-start)."""
    import_ahead(*RUN_IMPORTS)


def run(ctx: StageContext, _: Any) -> None:
    plan, dev = ctx.plan, ctx.device
    m = ctx.load_tensors("mesh")
    if any(k not in m for k in ("verts", "faces", "colors")) or m["faces"].numel() == 0:
        raise BadInputError("mesh/outputs.safetensors: need non-empty verts, faces, colors; rerun the mesh stage")
    verts, _, _ = normalize_to_bound(m["verts"].float(), BOUND)
    verts, faces, colors = verts.to(dev), m["faces"].long().to(dev), m["colors"].float().to(dev)
    normals = normal_attr(vertex_normals(verts, faces))
    raster = get_rasterizer(dev)
    frames = plan.video_frames
    yaws = [i * 360.0 / frames for i in range(frames)]
    chunk = max(1, plan.video_chunk)
    with ThreadPoolExecutor(1, thread_name_prefix="contact-sheet") as pool:
        sheet = pool.submit(_contact_sheet, ctx)
        with ctx.write_file("turntable.mp4") as t_rgb, ctx.write_file("normals.mp4") as t_nrm:
            sinks = [FrameSink(_writer(t_rgb)), FrameSink(_writer(t_nrm))]
            try:
                for start in range(0, frames, chunk):
                    mvps = orbit_mvps(yaws[start : start + chunk], RADIUS).to(dev)
                    with torch.no_grad():
                        for attr, sink in zip((colors, normals), sinks, strict=True):
                            img, _ = render_attr(raster, verts, faces, attr, mvps, plan.video_resolution, 1.0)
                            sink.put(_to_uint8(img))
                            del img
            finally:
                for sink in sinks:  # both encoders flush at once
                    sink.end()
                errors = [sink.wait() for sink in sinks]
            if any(errors):
                raise next(e for e in errors if e is not None)
        ctx.save_image("contact_sheet.png", sheet.result())
    ctx.record(frames=frames, chunk=chunk, fps=FPS)


class FrameSink:
    """Feeds one video writer from its own thread. `put` hands over a (N,H,W,3) uint8 chunk and returns at
    once unless `depth` chunks still wait (a write to ffmpeg's pipe lets go of the GIL, so encoding and
    rendering overlap); `end` says no more frames come, and the thread then closes the writer (its
    flush); `wait` joins and returns what the writer raised, if anything. `put` raises that at once."""

    def __init__(self, writer: Any, depth: int = 2) -> None:
        self.writer = writer
        self.chunks: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="frame-sink", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            while (chunk := self.chunks.get()) is not None:
                for frame in chunk:
                    self.writer.append_data(frame)
        except BaseException as exc:  # noqa: BLE001 - raised again in the stage's thread
            self.error = exc
            while self.chunks.get() is not None:  # so that `put` and `end` never block
                pass
        finally:
            try:
                self.writer.close()
            except BaseException as exc:  # noqa: BLE001
                self.error = self.error or exc

    def put(self, chunk: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.chunks.put(chunk)

    def end(self) -> None:
        self.chunks.put(None)

    def wait(self) -> BaseException | None:
        self.thread.join()
        return self.error


def _writer(path: Any) -> Any:
    import imageio.v2 as imageio

    return imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=FPS, codec="libx264", quality=8)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(N,C,H,W) in [0,1] -> (N,H,W,C) uint8, rounded; on the tensor's device (the same bytes as in numpy:
    float32 multiply and add, then truncation)."""
    return (img.clamp(0, 1).permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _contact_sheet(ctx: StageContext, tile: int = 256, cols: int = 10) -> np.ndarray:
    """Generated RGB views (and normal views when present) on white, each labelled with its yaw."""
    from PIL import Image, ImageDraw

    rows_of: list[tuple[str, dict[str, torch.Tensor]]] = [("rgb", ctx.load_tensors("rgb"))]
    if ctx.job.path("normal", "outputs.safetensors").exists():
        rows_of.append(("normal", ctx.load_tensors("normal")))
    n = rows_of[0][1]["images"].shape[0]
    yaws = view_yaws(n)
    cols = min(cols, n)
    per = -(-n // cols)
    size = min(tile, rows_of[0][1]["images"].shape[-1])
    sheet = Image.new("RGB", (cols * size, per * len(rows_of) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for block, (kind, t) in enumerate(rows_of):
        imgs = t["images"].float().clamp(0, 1)
        alphas = t["alphas"].float().clamp(0, 1)[:, None]
        on_white = imgs * alphas + (1 - alphas)
        small = torch.nn.functional.interpolate(on_white, size=(size, size), mode="bilinear", antialias=True)
        for i in range(min(n, small.shape[0])):
            r, k = divmod(i, cols)
            x, y = k * size, (block * per + r) * size
            sheet.paste(Image.fromarray(_to_uint8(small[i : i + 1])[0]), (x, y))
            draw.text((x + 4, y + 4), f"{kind} {yaws[i]:g}°", fill=(0, 0, 0))
    return np.asarray(sheet)


if __name__ == "__main__":
    stage_main(NAME, run, prepare)
