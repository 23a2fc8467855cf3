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
  (diffusers' LoRA backend), scikit-learn (a metric of transformers' assisted generation) and scipy
  (transformers' object-detection loss imports `scipy.optimize`; 0.9 s with `scipy.stats`). They are
  marked absent in this process (`sys.modules[name] = None`, which `importlib.util.find_spec` reports as
  not installed). The mesh stage, which uses scipy, is another process.
- `torch._dynamo`, the compiler's front end (sympy and much of torch.distributed come with it: 1.5-2 s on
  the 2-core machine). diffusers and transformers import it at import time only for decorators that tell
  the compiler what to do with a function (`allow_in_graph`, `torch.compiler.disable`,
  `assume_constant_result`), which change nothing when nothing is compiled, and no stage compiles. A
  stand-in answers those by returning the function unchanged and `is_compiling` with False; asked for
  anything else, it imports the real compiler, leaves `sys.modules` to it and answers from it. So a newer
  library that needs more of the compiler gets it, only later. Together with scipy this took the imports
  of rgb's `prepare` from 5.9-6.0 s (6.6-6.7 s with none of this module) to 2.4-2.7 s on the 2-core machine,
  and on the lent H200 (2026-12-03, torch 2.11) from 7.2 s to 3.3-4.3 s (libraries and model classes).

The model code that runs is the same either way, so outputs are bit for bit the same. `UP2YOU_LEAN_IMPORTS=0`
turns this off (benchmarks/import_profile.py measures both).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

DEFERRED_PACKAGES = ("diffusers.models.transformers", "diffusers.models.unets", "diffusers.models.autoencoders")
UNUSED_OPTIONAL = ("peft", "sklearn", "scipy")
DYNAMO = "torch._dynamo"
# Submodules that import nothing of the compiler when imported, and that the libraries import at import
# time: loaded on their own under the stand-in. (transformers' masking_utils: `TransformGetItemToIndex`.)
STANDALONE_SUBMODULES = ("torch._dynamo._trace_wrapped_higher_order_op",)
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


def _unchanged(fn: Any = None, *args: Any, **kwargs: Any) -> Any:
    """A compiler decorator, used bare or with arguments, when nothing is compiled: the function as it is."""
    if fn is None or not callable(fn):
        return _unchanged
    return fn


_STEP_ASIDE = threading.Lock()


class CompilerStandIn(types.ModuleType):
    """torch._dynamo until something needs more of it than the decorators a no-compile process meets."""

    allow_in_graph = staticmethod(_unchanged)
    disable = staticmethod(_unchanged)
    assume_constant_result = staticmethod(_unchanged)
    needed_for: str | None = None

    @staticmethod
    def is_compiling() -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.step_aside(name), name)

    def step_aside(self, reason: str) -> types.ModuleType:
        """Import the real compiler in place of this stand-in (once) and return it, with the standalone
        submodules loaded under the stand-in as its attributes too. BiRefNet's load thread and the sampler
        may both ask at once: the lock covers only taking the stand-in out (the import machinery's own locks
        make one thread import the compiler and the other wait for it)."""
        with _STEP_ASIDE:
            mine = sys.modules.get(DYNAMO) is self
            if mine:
                del sys.modules[DYNAMO]
                self.needed_for = f"{reason} (from {_caller()})"
        real = importlib.import_module(DYNAMO)
        if not mine:
            return real
        for key, value in list(self.__dict__.items()):
            if isinstance(value, types.ModuleType) and value.__name__ == f"{DYNAMO}.{key}":
                real.__dict__.setdefault(key, value)
        return real


def _caller() -> str:
    """file:line of the code that asked, outside the import machinery and this module."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    return f"{path.split('site-packages/')[-1]}:{frame.f_lineno}"


class _CompilerSubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import torch._dynamo.<sub>` while the stand-in is there: the real compiler first (it imports its
    submodules itself), then the submodule it registered, not a second copy of it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        stand_in = sys.modules.get(DYNAMO)
        if not name.startswith(DYNAMO + ".") or not isinstance(stand_in, CompilerStandIn):
            return None
        if name in STANDALONE_SUBMODULES:
            return None  # found in the real folder and loaded under the stand-in, as any submodule
        stand_in.step_aside(name)
        if name in sys.modules:
            return importlib.machinery.ModuleSpec(name, self)
        return importlib.util.find_spec(name)  # a submodule the compiler does not import itself

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return sys.modules[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:
        """Already executed by the compiler's own import."""


_HELD_BACK: list[CompilerStandIn] = []  # the stand-in this process put in place, if any


def hold_back_compiler() -> list[str]:
    """Put the stand-in in place of torch._dynamo (not yet imported); returns [DYNAMO] if it did."""
    if DYNAMO in sys.modules:
        return []
    try:
        spec = importlib.util.find_spec(DYNAMO)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    stand_in = CompilerStandIn(DYNAMO)
    stand_in.__path__ = list(spec.submodule_search_locations)  # where a standalone submodule is found
    sys.modules[DYNAMO] = stand_in
    _HELD_BACK[:] = [stand_in]
    if not any(isinstance(f, _CompilerSubmoduleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CompilerSubmoduleFinder())
    return [DYNAMO]


def compiler_state() -> str:
    """What became of the stand-in, for a stage's record: in place, or which name made it step aside."""
    module = sys.modules.get(DYNAMO)
    if isinstance(module, CompilerStandIn):
        return "held back"
    if module is None:
        return "not imported"
    reason = _HELD_BACK[0].needed_for if _HELD_BACK else None
    return f"imported for {reason}" if reason else "imported"


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("0", "false", "no")


def lean_imports() -> dict[str, list[str]]:
    """Apply all three (unless UP2YOU_LEAN_IMPORTS=0); returns what was deferred, what was marked absent
    and what was held back. The compiler goes first: finding the deferred packages imports diffusers."""
    if not enabled():
        return {"deferred": [], "absent": [], "held_back": []}
    absent, held_back = mark_absent(), hold_back_compiler()
    return {"absent": absent, "held_back": held_back, "deferred": defer_packages()}
