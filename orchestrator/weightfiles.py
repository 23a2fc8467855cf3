"""Where the released checkpoints are on this machine, and whether they are the right files.

`--weights` resolves per checkpoint in this order: the given folder, `$UP2YOU_WEIGHTS`, `./weights`,
then files already in the Hugging Face cache (`HF_HUB_CACHE`, or `HF_HOME/hub`) found with
huggingface_hub's local-only lookup, and for DINOv2 torch.hub's own cache. When everything is in one
folder the stages read that folder; otherwise they read a folder of symlinks in the layout they
expect (`<cache>/weights-links/<id>/`), so nothing is copied.

A file is verified against `up2you.checkpoints.EXPECTED` (size, then sha256 where known). Hashing
5 GB takes a while, so a verified (path, size, mtime) is remembered in `<cache>/verified.json`.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.corrections import cache_dir
from up2you import checkpoints
from up2you.checkpoints import CHECKPOINTS, DOWNLOADS, EXPECTED, Expected

ENV_WEIGHTS = "UP2YOU_WEIGHTS"
HF_CACHE = "Hugging Face cache"
TORCH_HUB = "torch.hub cache"


@dataclass(frozen=True)
class Location:
    """A place checkpoints may be: a weights folder (the stages' layout) or a cache."""

    label: str  # --weights, $UP2YOU_WEIGHTS, ./weights, Hugging Face cache, torch.hub cache
    path: Path


@dataclass(frozen=True)
class Found:
    key: str
    location: Location
    path: Path  # the checkpoint's file or folder

    def to_dict(self) -> dict[str, str]:
        return {"found_in": self.location.label, "path": str(self.path)}


@dataclass
class Resolution:
    """Where each checkpoint is; `root` is the folder to hand the stages."""

    root: Path
    primary: Path  # the first folder looked in: where a missing file should go
    found: dict[str, Found] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # keys found nowhere
    looked_in: list[Location] = field(default_factory=list)


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def torch_hub_checkpoints() -> Path:
    """torch.hub's download folder ($TORCH_HOME/hub/checkpoints), where upstream's DINOv2 load puts the file."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    return Path(home) / "hub" / "checkpoints"


def folder_candidates(given: Path | None) -> list[Location]:
    """The weights folders to look in, in order, without duplicates."""
    out: list[Location] = []
    for label, p in (("--weights", given), (f"${ENV_WEIGHTS}", os.environ.get(ENV_WEIGHTS) or None),
                     ("./weights", Path("weights"))):  # fmt: skip
        if p is None:
            continue
        path = Path(p).expanduser().resolve()
        if all(loc.path != path for loc in out):
            out.append(Location(label, path))
    return out


def in_hf_cache(key: str, cache: Path | None = None) -> Path | None:
    """The checkpoint's file or folder inside the Hugging Face cache, if every file of it is there."""
    from huggingface_hub import try_to_load_from_cache

    d = DOWNLOADS.get(key)
    if d is None or not d.repo:
        return None
    cache = cache or hf_cache_dir()
    for revision in dict.fromkeys((d.revision, None)):  # the pinned revision, then whatever main points at
        paths = [try_to_load_from_cache(d.repo, f, cache_dir=str(cache), revision=revision) for f in d.files]
        if all(isinstance(p, str) for p in paths):
            first = Path(str(paths[0]))
            if CHECKPOINTS[key].path.endswith("/"):  # a folder checkpoint is the snapshot folder itself
                return Path(str(first)[: -len(d.files[0])].rstrip("/"))
            return first
    return None


def resolve(given: Path | None, keys: Iterable[str] | None = None, use_caches: bool = True) -> Resolution:
    """Find every named checkpoint (all of them by default); see the module docstring for the order."""
    keys = list(CHECKPOINTS) if keys is None else list(keys)
    folders = folder_candidates(given)
    hf, th = Location(HF_CACHE, hf_cache_dir()), Location(TORCH_HUB, torch_hub_checkpoints())
    res = Resolution(folders[0].path, folders[0].path, looked_in=folders + ([hf, th] if use_caches else []))
    for key in keys:
        spec = CHECKPOINTS[key]
        hit = next((Found(key, loc, loc.path / spec.path.rstrip("/")) for loc in folders if not spec.missing(loc.path)),
                   None)  # fmt: skip
        if hit is None and use_caches:
            p = in_hf_cache(key, hf.path)
            if p is None and key == "dinov2" and (th.path / Path(spec.path).name).is_file():
                hit = Found(key, th, th.path / Path(spec.path).name)
            elif p is not None:
                hit = Found(key, hf, p)
        if hit is None:
            res.missing.append(key)
        else:
            res.found[key] = hit
    places = {f.location for f in res.found.values()}
    if len(places) == 1 and next(iter(places)) in folders:
        res.root = next(iter(places)).path
    elif res.found:
        res.root = _link_farm(res.found.values())
    return res


def missing_message(res: Resolution) -> str:
    """A first line that says what is missing, where we looked and the fix; then each file and its source."""
    items = checkpoints.missing(res.primary, res.missing)
    looked = ", ".join(f"{loc.label} ({loc.path})" for loc in res.looked_in)
    head = (f"{len(items)} weight file(s) missing, first {items[0][0]} (looked in {looked}); get them with "
            "`up2you-budget weights fetch --accept-smplx-license`, or run with --tiny for a smoke test")  # fmt: skip
    return "\n".join([head] + [f"  {path}\n    get it from {source}" for path, source in items])


def _link_farm(found: Iterable[Found]) -> Path:
    """A folder of symlinks in the stages' layout, one per found checkpoint (stable name: same links, same id)."""
    links = sorted((CHECKPOINTS[f.key].path.rstrip("/"), str(f.path)) for f in found)
    root = cache_dir() / "weights-links" / hashlib.sha256(json.dumps(links).encode()).hexdigest()[:16]
    for rel, target in links:
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=Path(target).is_dir())
    return root


# ---------------------------------------------------------------------------------------------------
# verification


@dataclass(frozen=True)
class Verification:
    """One file checked against its expected size/sha256."""

    path: Path
    ok: bool
    checked: str  # "sha256", "size", "exists" (nothing known), "missing"
    size: int | None = None
    sha256: str | None = None
    problem: str = ""  # one line when not ok

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "ok": self.ok, "checked": self.checked, "size": self.size,
                "sha256": self.sha256, **({"problem": self.problem} if self.problem else {})}  # fmt: skip


def _stamps_file() -> Path:
    return cache_dir() / "verified.json"


def _load_stamps() -> dict[str, list[object]]:
    try:
        return json.loads(_stamps_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_stamp(real: Path, size: int, mtime_ns: int, digest: str) -> None:
    stamps = _load_stamps()
    stamps[str(real)] = [size, mtime_ns, digest]
    f = _stamps_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stamps, indent=0))
    tmp.replace(f)


def sha256_of(path: Path, on_progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
            if on_progress:
                on_progress(len(chunk))
    return h.hexdigest()


def verify_file(path: Path, expected: Expected | None, fix: str, hash_unknown: bool = False) -> Verification:
    """Size first (cheap), then sha256 where expected (remembered per path/size/mtime).

    With `hash_unknown`, a file without a known hash is hashed anyway so the hash can be recorded.
    """
    if not path.is_file():
        return Verification(path, False, "missing", problem=f"{path}: missing — {fix}")
    real = path.resolve()
    st = real.stat()
    if expected and expected.size is not None and st.st_size != expected.size:
        return Verification(path, False, "size", st.st_size, None,
                            f"{path}: size {st.st_size:,} bytes, expected {expected.size:,} "
                            f"(from {expected.read_from}) — {fix}")  # fmt: skip
    want = expected.sha256 if expected else None
    if want is None and not hash_unknown:
        return Verification(path, True, "size" if expected and expected.size else "exists", st.st_size)
    stamp = _load_stamps().get(str(real))
    if stamp and stamp[:2] == [st.st_size, st.st_mtime_ns]:
        digest = str(stamp[2])
    else:
        digest = sha256_of(real)
        _save_stamp(real, st.st_size, st.st_mtime_ns, digest)
    if want is not None and digest != want:
        return Verification(path, False, "sha256", st.st_size, digest,
                            f"{path}: sha256 {digest[:16]}…, expected {want[:16]}… (from {expected.read_from}) "  # type: ignore[union-attr]
                            f"— {fix}")  # fmt: skip
    return Verification(path, True, "sha256" if want else "size" if expected and expected.size else "exists",
                        st.st_size, digest)  # fmt: skip


REFETCH = "delete it and run `up2you-budget weights fetch` again"


def verify_checkpoint(key: str, root: Path, fix: str = REFETCH, hash_unknown: bool = False) -> list[Verification]:
    """Every file of one checkpoint under a weights folder (symlinks followed)."""
    return [verify_file(root / rel, EXPECTED.get(rel), fix, hash_unknown) for rel in checkpoints.files_of(key)]


def weights_record(res: Resolution, verifications: dict[str, list[Verification]]) -> dict[str, object]:
    """What run.json says about the weights: where each checkpoint was found and what was verified."""
    out: dict[str, object] = {"root": str(res.root), "missing": list(res.missing)}
    for key, found in res.found.items():
        out[key] = {**found.to_dict(), "files": [v.to_dict() for v in verifications.get(key, [])]}
    return out
