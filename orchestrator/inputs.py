"""Check the input folder before anything starts: every problem becomes one line naming the file and the fix.

Torch-free (PIL reads headers and verifies files). The photo list and its key are what the stages
and the cache keys see: the key changes when a photo is added, removed or edited.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from stages.jobfs import sha256_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 40_000_000
EXIT_USAGE = 2


class InputError(ValueError):
    """The input folder cannot be used; the message is one line a user can act on."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Photo:
    path: Path
    size: int
    sha256: str
    width: int
    height: int

    def record(self) -> dict[str, object]:
        return {"path": str(self.path), "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class InputSet:
    photos: tuple[Photo, ...]
    ignored: tuple[Path, ...]  # files that are not images (reported as a note)

    @property
    def key(self) -> str:
        """Content key of the photo set: what the first stage's cache key depends on."""
        h = hashlib.sha256()
        for p in self.photos:
            h.update(p.sha256.encode())
        return h.hexdigest()[:16]

    def record(self) -> dict[str, object]:
        return {"photos": [p.record() for p in self.photos]}


def scan_inputs(folder: Path | str) -> InputSet:
    """The photos in `folder` (sorted by name), validated; InputError for the first unusable thing."""
    root = Path(folder)
    if not root.exists():
        raise InputError(f"input folder {root} does not exist: pass a folder of photos of one person")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a folder: put the photos in a folder and pass the folder")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"input folder {root} is empty: add photos of one person (JPEG or PNG)")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = tuple(p for p in files if p not in images)
    if not images:
        names = ", ".join(p.name for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise InputError(f"input folder {root} has no images (found {names}): add JPEG or PNG photos "
                         f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")  # fmt: skip
    return InputSet(tuple(_check_photo(p) for p in images), ignored)


def _check_photo(path: Path) -> Photo:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise InputError(_too_big(path, width, height))
                im.verify()
    except Image.DecompressionBombError:
        raise InputError(_too_big(path, 0, 0)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path} cannot be read as an image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'}): "
                         "re-export it as JPEG or PNG, or remove it") from None  # fmt: skip
    return Photo(path.resolve(), path.stat().st_size, sha256_file(path), width, height)


def _too_big(path: Path, width: int, height: int) -> str:
    size = f"{width}x{height} = {width * height / 1e6:.1f} Mpx" if width else "far above 40 Mpx"
    return (f"{path} is {size}, above the {MAX_PIXELS // 1_000_000} Mpx limit: resize it "
            "(e.g. to 4000 px on the long side) and run again")  # fmt: skip
