"""Import diffusers and transformers without the parts of them that a diffusion stage never uses.

rgb's and normal's start-up is the one that earlier stages cannot hide: on the H200 host their imports
took 10-14 s of a 15 s `prepare` (benchmarks/results/h200/h200_import_profile_2026-12-02.json). Much of
that is not the UNet, VAE or CLIP code but what the libraries import around it:

- packages whose `__init__` imports every model of its kind: `diffusers.models.transformers` (60-odd
  video, audio and image transformers, pulled in because the UNet blocks import two of its modules),
  `diffusers.models.unets` and `diffusers.models.autoencoders`. They are registered here as deferred
  packages: importing one of their submodules works as usual and runs only that submodule; asking the
  package itself for a name runs its real `__init__` then, so nothing is missing, only later.
- optional packages that the libraries import when they are installed, for features we never use: peft
  (diffusers' LoRA backend) and scikit-learn (a metric of transformers' assisted generation). They are
  marked absent (`sys.modules[name] = None`, which `importlib.util.find_spec` reports as not installed),
  the state CI's machines are in anyway.

The model code that runs is the same either way, so outputs are bit for bit the same. `UP2YOU_LEAN_IMPORTS=0`
turns this off (benchmarks/import_profile.py measures both).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

DEFERRED_PACKAGES = ("diffusers.models.transformers", "diffusers.models.unets", "diffusers.models.autoencoders")
UNUSED_OPTIONAL = ("peft", "sklearn")
ENV = "UP2YOU_LEAN_IMPORTS"


class DeferredPackage(types.ModuleType):
    """A package whose `__init__` runs only when a name is asked of the package itself."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("_init_done"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        try:  # a submodule (`from package import submodule`): import just that one
            found = importlib.util.find_spec(f"{self.__name__}.{name}") is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return importlib.import_module(f"{self.__name__}.{name}")
        self._init_done = True
        run_init(self)
        return getattr(self, name)


def run_init(module: types.ModuleType) -> None:
    """Execute the package's real `__init__.py` in its namespace (what the normal import would have done)."""
    origin = module.__spec__.origin if module.__spec__ is not None else None
    if origin and os.path.isfile(origin):
        with open(origin, "rb") as f:
            code = compile(f.read(), origin, "exec")
        exec(code, module.__dict__)  # noqa: S102 - the library's own __init__, as `import` runs it


def defer_packages(names: Sequence[str] = DEFERRED_PACKAGES) -> list[str]:
    """Register each package (not yet imported) as a DeferredPackage; returns the names registered.
    The parent packages are imported first (for diffusers these are lazy and cheap)."""
    done = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue  # not there, or not a package in this version: leave it to the normal import
        module = DeferredPackage(name)
        module.__spec__ = spec
        module.__file__ = spec.origin
        module.__path__ = list(spec.submodule_search_locations)
        module.__package__ = name
        module.__loader__ = spec.loader
        sys.modules[name] = module
        done.append(name)
    return done


def mark_absent(names: Sequence[str] = UNUSED_OPTIONAL) -> list[str]:
    """Make each package (installed, not yet imported) look not installed to this process."""
    done = []
    for name in names:
        if name in sys.modules:
            continue
        if importlib.util.find_spec(name) is not None:
            sys.modules[name] = None  # type: ignore[assignment]
            done.append(name)
    return done


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("0", "false", "no")


def lean_imports() -> dict[str, list[str]]:
    """Apply both (unless UP2YOU_LEAN_IMPORTS=0); returns what was deferred and what was marked absent."""
    if not enabled():
        return {"deferred": [], "absent": []}
    return {"absent": mark_absent(), "deferred": defer_packages()}
