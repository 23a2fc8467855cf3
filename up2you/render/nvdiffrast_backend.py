"""nvdiffrast (CUDA) behind the `Rasterizer` interface, with a build that happens once per machine.

How nvdiffrast gets built (for the README):

- We depend on `diffrp-nvdiffrast` (PyPI), which ships nvdiffrast's C++/CUDA sources; nvdiffrast
  JIT-compiles its plugin with `torch.utils.cpp_extension.load` on first use (about 24 s on an H100;
  it needs nvcc and a host compiler).
- The build goes to a persistent folder, `$TORCH_EXTENSIONS_DIR` if set, else
  `$XDG_CACHE_HOME/up2you-budget/torch_extensions` (default `~/.cache/up2you-budget/torch_extensions`),
  so the first stage process on a machine builds it and every later process (and run) only imports
  it. `torch.utils.cpp_extension` holds a file lock in the build folder, so concurrent first builds
  wait for each other; a build killed at the wrong moment can leave a stale `lock` file there that
  makes later builds wait forever: delete that file.
- Newer torch (seen with 2.11) builds the plugin but no longer puts the build folder on `sys.path`,
  so nvdiffrast's final `importlib.import_module(plugin)` fails with ModuleNotFoundError. We put the
  folder on `sys.path` before nvdiffrast looks, which is harmless on torch versions that did it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from up2you.buildcache import extensions_dir

__all__ = ["NvdiffrastRasterizer", "extensions_dir", "load_nvdiffrast"]

_STATE: dict[str, Any] = {}
RESERVE_GROWTH = 1.25  # reserve this much more than the triangles seen, so growth reallocates rarely


def load_nvdiffrast() -> tuple[Any, float]:
    """Import nvdiffrast.torch with its CUDA plugin built and importable; returns (module, seconds).

    Idempotent within a process; the seconds are those spent here (the build, if it happened).
    """
    if "dr" in _STATE:
        return _STATE["dr"], 0.0
    t0 = time.time()
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    import nvdiffrast
    import nvdiffrast.torch as dr
    import torch.utils.cpp_extension as cpp_ext
    from nvdiffrast.torch import ops

    plugin = ops.sanitize_name(f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    build_dir = cpp_ext._get_build_directory(plugin, False)
    if build_dir not in sys.path:
        sys.path.insert(0, build_dir)
    ops._get_plugin(gl=False)
    _STATE["dr"] = dr
    return dr, time.time() - t0


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasterizer; one context per process (no display or EGL needed)."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self._dr, self.build_seconds = load_nvdiffrast()
        self._ctx = self._dr.RasterizeCudaContext(device=self.device)
        self._reserved_triangles = 0

    def reserve(self, batch: int, triangles: int, resolution: tuple[int, int]) -> None:
        """Grow nvdiffrast's triangle buffers ahead of a mesh that grows a little every iteration.

        Its CUDA rasterizer sizes them (cudaMalloc, outside torch's allocator) to the largest triangle
        count seen plus a fixed slack and frees and reallocates them at every new maximum: a remeshed
        mesh that grows by a few hundred faces per iteration would pay that (and the device sync of
        cudaFree) at every iteration. One draw of degenerate triangles at 1.25x the count makes the
        next reallocation wait for 25 % more growth.
        """
        if triangles <= self._reserved_triangles:
            return
        target = int(triangles * RESERVE_GROWTH) + 1
        pos = torch.zeros(batch, 3, 4, device=self.device)
        pos[..., 3] = 1.0
        tri = torch.zeros(target, 3, dtype=torch.int32, device=self.device)  # degenerate: nothing is drawn
        self._dr.rasterize(self._ctx, pos, tri, list(resolution), grad_db=False)
        self._reserved_triangles = target

    def rasterize(self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        rast, _ = self._dr.rasterize(self._ctx, pos.contiguous(), tri.int().contiguous(), list(resolution),
                                     grad_db=False)
        return rast

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        out, _ = self._dr.interpolate(attr.contiguous(), rast, tri.int().contiguous())
        return out

    def topology(self, tri: torch.Tensor) -> Any:
        """nvdiffrast's edge hash of `tri`: built by one kernel, reusable while `tri` does not change."""
        return self._dr.antialias_construct_topology_hash(tri.int().contiguous())

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
        topology: Any = None,
    ) -> torch.Tensor:
        return self._dr.antialias(color.contiguous(), rast, pos.contiguous(), tri.int().contiguous(),
                                  topology_hash=topology)


class CannotBuild(RuntimeError):
    """nvdiffrast cannot be built on this machine (no CUDA GPU, no nvcc, not installed); says why."""


def build_nvdiffrast() -> tuple[Path, float]:
    """Build (or find built) nvdiffrast's CUDA plugin once for this machine: (folder, seconds spent).

    Raises CannotBuild with the reason and the fix when this machine cannot build it.
    """
    if not torch.cuda.is_available():
        raise CannotBuild(f"torch {torch.__version__} sees no CUDA GPU, so there is nothing to build: runs on this "
                          "machine use --device cpu (the pure-torch rasterizer)")  # fmt: skip
    try:
        import nvdiffrast  # noqa: F401
    except ImportError:
        raise CannotBuild("nvdiffrast is not installed: pip install -e '.[gpu]' (diffrp-nvdiffrast)") from None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        raise CannotBuild(f"no CUDA toolkit (nvcc) found: install the one matching torch's CUDA {torch.version.cuda} "
                          "and set CUDA_HOME")  # fmt: skip
    _, seconds = load_nvdiffrast()
    return extensions_dir(), seconds


if __name__ == "__main__":  # `python -m up2you.render.nvdiffrast_backend`: `up2you-budget setup` runs this
    try:
        folder, spent = build_nvdiffrast()
    except CannotBuild as exc:
        print(f"cannot build nvdiffrast: {exc}", file=sys.stderr, flush=True)
        sys.exit(69)  # stages.spec.EXIT_NO_DEVICE
    except Exception as exc:  # noqa: BLE001 - a compiler error: its last line says most
        lines = [s for s in str(exc).strip().splitlines() if s.strip()] or [type(exc).__name__]
        print(f"nvdiffrast build failed: {lines[-1]}", file=sys.stderr, flush=True)
        sys.exit(1)
    verb = f"built in {spent:.0f} s" if spent >= 1.0 else "already built"
    print(f"nvdiffrast {verb} in {folder}", flush=True)
