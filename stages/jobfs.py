"""The job folder: the only state shared between the orchestrator and the stage processes.

Layout::

    JOB/inputs.msgpack              photo list (path, size, sha256) written by the orchestrator
    JOB/<stage>/request.msgpack     what the runner asks of this attempt (plan, key, cap, attempt)
    JOB/<stage>/*.safetensors|png   outputs, each written to a temporary name and renamed
    JOB/<stage>/error.msgpack       why the last attempt failed (kind, message, peak)
    JOB/<stage>/manifest.msgpack    written last: its presence with the right key means "done"

Torch-free (msgpack + os): both sides use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

INPUTS = "inputs.msgpack"
REQUEST = "request.msgpack"
MANIFEST = "manifest.msgpack"
ERROR = "error.msgpack"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    A killed writer leaves only a `.tmp-*` file behind, never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_msgpack(path: Path, obj: Any) -> None:
    write_bytes(path, msgpack.packb(obj, use_bin_type=True, default=_default))


def read_msgpack(path: Path) -> Any:
    return msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=False)


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class JobDir:
    """Paths and small records of one job folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path(self, stage: str, name: str) -> Path:
        return self.root / stage / name

    # records --------------------------------------------------------------------------------
    def read_inputs(self) -> dict[str, Any]:
        return read_msgpack(self.root / INPUTS)

    def write_inputs(self, record: dict[str, Any]) -> None:
        write_msgpack(self.root / INPUTS, record)

    def read_request(self, stage: str) -> dict[str, Any]:
        return read_msgpack(self.path(stage, REQUEST))

    def write_request(self, stage: str, request: dict[str, Any]) -> None:
        write_msgpack(self.path(stage, REQUEST), request)

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        p = self.path(stage, MANIFEST)
        if not p.exists():
            return None
        try:
            return read_msgpack(p)
        except Exception:  # a corrupt manifest means "not done"
            return None

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        write_msgpack(self.path(stage, MANIFEST), manifest)

    def is_done(self, stage: str, key: str) -> bool:
        m = self.read_manifest(stage)
        if not m or m.get("key") != key:
            return False
        return all(self.path(stage, f).exists() for f in m.get("outputs", []))

    def invalidate(self, stage: str) -> None:
        """Forget a stage's result (its manifest); outputs are overwritten by the next run."""
        with contextlib.suppress(FileNotFoundError):
            self.path(stage, MANIFEST).unlink()

    def read_error(self, stage: str) -> dict[str, Any] | None:
        p = self.path(stage, ERROR)
        return read_msgpack(p) if p.exists() else None

    def write_error(self, stage: str, error: dict[str, Any]) -> None:
        write_msgpack(self.path(stage, ERROR), error)

    def clear_error(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(stage, ERROR).unlink()
