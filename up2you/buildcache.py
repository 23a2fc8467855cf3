"""Where torch extensions (nvdiffrast's CUDA plugin) are built: torch-free, so `doctor` can look there."""

from __future__ import annotations

import os
from pathlib import Path


def extensions_dir() -> Path:
    """`$TORCH_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/up2you-budget/torch_extensions` (default ~/.cache/...)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "up2you-budget" / "torch_extensions"
