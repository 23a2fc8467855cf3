"""Where this machine's caches are: torch-free, so `doctor` and the orchestrator can look there too."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "UP2YOU_CACHE_DIR"


def cache_dir() -> Path:
    """`$UP2YOU_CACHE_DIR`, else ~/.cache/up2you-budget: learned corrections, tiny weights, prompt embeddings."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "up2you-budget")


def extensions_dir() -> Path:
    """`$TORCH_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/up2you-budget/torch_extensions` (default ~/.cache/...)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "up2you-budget" / "torch_extensions"
