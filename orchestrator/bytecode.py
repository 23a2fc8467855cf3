"""Bytecode for what the stage processes import: without it every stage process compiles torch again.

`pip install` writes `.pyc` files, but a package copied, unpacked or installed with `--no-compile` has
none, and with `PYTHONDONTWRITEBYTECODE=1` Python keeps nothing it compiles: each of a job's eight
stage processes then compiles torch from source (the lent H200, torch 2.11, 2026-12-03: `import torch` 3.9-4.4 s
without bytecode, 1.6-2.5 s with it; `benchmarks/pyc_check.sh`). `doctor` counts the modules without
bytecode and `setup` compiles them, in place (where `sys.pycache_prefix` points, when it is set).

Torch-free: packages are found with `importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# what the stage processes import, heaviest first (those not installed are left out)
STAGE_PACKAGES = ("torch", "transformers", "diffusers", "numpy", "PIL", "safetensors", "huggingface_hub",
                  "smplx", "trimesh", "nvdiffrast", "imageio", "timm", "kornia", "einops",
                  "stages", "up2you", "orchestrator", "budgets")  # fmt: skip


@dataclass(frozen=True)
class PackageBytecode:
    """One package folder: how many of its modules have bytecode where this Python looks for it."""

    name: str
    folder: Path
    modules: int
    missing: int
    writable: bool  # can `setup` write the missing bytecode (its __pycache__ folders, or the prefix)?


def package_folder(name: str) -> Path | None:
    """The folder of an installed package (None if it is absent or a single module)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sources(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                yield Path(root) / f


def _writable(folder: Path) -> bool:
    if sys.pycache_prefix:
        prefix = Path(sys.pycache_prefix)
        return os.access(prefix if prefix.exists() else prefix.parent, os.W_OK)
    return os.access(folder, os.W_OK)


def survey(names: Sequence[str] = STAGE_PACKAGES) -> list[PackageBytecode]:
    """Each installed package of `names`, with its modules and those whose bytecode is absent."""
    out = []
    for name in names:
        folder = package_folder(name)
        if folder is None:
            continue
        sources = list(_sources(folder))
        missing = sum(not Path(importlib.util.cache_from_source(str(p))).exists() for p in sources)
        out.append(PackageBytecode(name, folder, len(sources), missing, _writable(folder)))
    return out


def compile_bytecode(packages: Sequence[PackageBytecode], jobs: int = 0) -> subprocess.CompletedProcess[str]:
    """`python -m compileall` over the writable packages with missing bytecode (all cores with jobs=0).

    compileall's own errors (a file that does not parse) do not stop it; its exit code says whether any."""
    folders = [str(p.folder) for p in packages if p.missing and p.writable]
    cmd = [sys.executable, "-m", "compileall", "-q", "-j", str(jobs), *folders]
    if not folders:
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return subprocess.run(cmd, capture_output=True, text=True)


def summary(packages: Sequence[PackageBytecode]) -> tuple[bool, str, str]:
    """(every module has bytecode, what doctor says, the fix)."""
    missing = [p for p in packages if p.missing]
    dont_write = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    keeps = "; PYTHONDONTWRITEBYTECODE is set, so Python keeps none of what it compiles" if dont_write else ""
    if not missing:
        n = sum(p.modules for p in packages)
        return True, f"all {n} modules of {', '.join(p.name for p in packages)} have bytecode", ""
    parts = ", ".join(f"{p.name} {p.missing} of {p.modules}" for p in missing)
    detail = f"modules without bytecode: {parts}{keeps}; each stage process compiles them (seconds each)"
    locked = [p for p in missing if not p.writable]
    fix = "up2you-budget setup (compiles them once, as pip install does)"
    if locked:
        fix += (
            f"; {', '.join(str(p.folder) for p in locked)} is not writable: its owner runs python -m compileall "
            "on it, or set PYTHONPYCACHEPREFIX to a folder of yours in every shell and rerun setup"
        )
    return False, detail, fix
