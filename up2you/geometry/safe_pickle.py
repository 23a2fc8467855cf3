"""Load small pickled assets (e.g. MANO_SMPLX_vertex_ids.pkl) without letting them run code.

A pickle can name any importable callable and have the loader call it; an unrestricted load of a
downloaded pickle is arbitrary code execution. This unpickler resolves only what numpy arrays need to
rebuild themselves; containers (dict, list, tuple) and scalars need no lookup at all.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than numpy arrays and plain containers."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles call (`_codecs.encode`) to rebuild bytes; any other codec is refused."""
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to load {module}.{name}: only numpy arrays and containers are allowed")


def load_numpy_pickle(path: Path | str) -> Any:
    """Unpickle a file holding only numpy arrays in dict/list/tuple containers (latin1, as py2 pickles)."""
    return _NumpyOnlyUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()
