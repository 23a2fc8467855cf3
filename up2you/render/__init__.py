"""Rendering: one rasterizer interface, two backends (nvdiffrast on CUDA, pure torch elsewhere)."""

from __future__ import annotations

import torch

from up2you.render.base import Rasterizer


def get_rasterizer(device: torch.device | str) -> Rasterizer:
    """nvdiffrast for a CUDA device, the pure-torch rasterizer for anything else."""
    device = torch.device(device)
    if device.type == "cuda":
        from up2you.render.nvdiffrast_backend import NvdiffrastRasterizer

        return NvdiffrastRasterizer(device)
    from up2you.render.torch_raster import TorchRasterizer

    return TorchRasterizer(device)


__all__ = ["Rasterizer", "get_rasterizer"]
