"""The job folder: the only state shared between the orchestrator and the stage processes.

Layout::

    JOB/inputs.msgpack              photo list (path, size, sha256) written by the orchestrator
    JOB/<stage>/request.msgpack     what the runner asks of this attempt (plan, key, cap, attempt)
    JOB/<stage>/*.safetensors|png   outputs, each written to a temporary name and renamed
    JOB/<stage>/error.msgpack       why the last attempt failed (kind, message, peak)
    JOB/<stage>/manifest.msgpack    written last: its presence with the right key means "done"
    JOB/<stage>/export.msgpack      the deliverables (PNG, OBJ, GLB) stages.export wrote from those outputs

The manifest holds the sha256 of every output: a truncated or garbage artifact (or manifest) is
"not done", so that stage alone runs again, and nothing crashes on it.

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
EXPORT = "export.msgpack"


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


def _read_record(path: Path) -> dict[str, Any] | None:
    """A msgpack map, or None when the file is absent, truncated or not a map."""
    try:
        obj = read_msgpack(path)
    except (OSError, ValueError, msgpack.UnpackException):  # absent, truncated, garbage
        return None
    return obj if isinstance(obj, dict) else None


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def shown(path: Path | str) -> str:
    """A path as it can be printed and serialised: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(str(path)).decode("utf-8", "replace")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_digests: dict[tuple[str, int, int, int], str] = {}


def _digest(path: Path) -> str | None:
    """sha256 of a file, remembered per (path, inode, size, mtime) so repeated checks read it once."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def remember_digest(path: Path, hexdigest: str) -> None:
    """Record the sha256 of a file just written from bytes already hashed, so `_digest` need not read it back."""
    st = path.stat()
    _digests[(str(path), st.st_ino, st.st_size, st.st_mtime_ns)] = hexdigest


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
        return _read_record(self.path(stage, MANIFEST))  # a corrupt manifest means "not done"

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        """Write the manifest last, with the sha256 of each listed output."""
        sums = {f: _digest(self.path(stage, f)) for f in manifest.get("outputs", [])}
        write_msgpack(self.path(stage, MANIFEST), {**manifest, "sha256": sums})

    def is_done(self, stage: str, key: str) -> bool:
        """The manifest has this key and every output is there with the bytes it had when written."""
        m = self.read_manifest(stage)
        if not m or m.get("key") != key:
            return False
        outputs, sums = m.get("outputs", []), m.get("sha256")
        if not isinstance(outputs, list) or not isinstance(sums, dict):
            return False
        return all(isinstance(f, str) and _digest(self.path(stage, f)) == sums.get(f) for f in outputs)

    def is_written(self, stage: str, key: str) -> bool:
        """The manifest has this key and every output it lists exists: what a stage that has just exited 0 must
        leave. Not re-hashed: the stage hashed them as it wrote the manifest (`is_done` checks them on resume)."""
        m = self.read_manifest(stage)
        outputs = m.get("outputs") if m and m.get("key") == key else None
        return isinstance(outputs, list) and all(isinstance(f, str) and self.path(stage, f).is_file() for f in outputs)

    def damaged_outputs(self, stage: str) -> list[str]:
        """Outputs whose bytes no longer match the manifest (for messages); [] when none or no manifest."""
        m = self.read_manifest(stage) or {}
        sums = m.get("sha256") if isinstance(m.get("sha256"), dict) else {}
        return [f for f in m.get("outputs", []) if isinstance(f, str) and _digest(self.path(stage, f)) != sums.get(f)]

    def invalidate(self, stage: str) -> None:
        """Forget a stage's result (its manifest, and the deliverables' record); outputs are overwritten by
        the next run."""
        for name in (MANIFEST, EXPORT):
            with contextlib.suppress(FileNotFoundError):
                self.path(stage, name).unlink()

    def write_export(self, stage: str, record: dict[str, Any]) -> None:
        write_msgpack(self.path(stage, EXPORT), record)

    def clear_export(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(stage, EXPORT).unlink()

    def is_exported(self, stage: str) -> bool:
        """The deliverables were written from the outputs the manifest stands for, and are unchanged since."""
        m, e = self.read_manifest(stage), _read_record(self.path(stage, EXPORT))
        if not m or not e or e.get("key") != m.get("key") or not isinstance(e.get("files"), dict):
            return False
        return all(isinstance(f, str) and _digest(self.path(stage, f)) == h for f, h in e["files"].items())

    def sweep_temporaries(self, stage: str) -> None:
        """Remove `.tmp-*` files of this stage: a writer killed by SIGKILL never reached its own cleanup."""
        for tmp in self.stage_dir(stage).glob(".tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def read_error(self, stage: str) -> dict[str, Any] | None:
        return _read_record(self.path(stage, ERROR))

    def write_error(self, stage: str, error: dict[str, Any]) -> None:
        write_msgpack(self.path(stage, ERROR), error)

    def clear_error(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(stage, ERROR).unlink()
