"""Check the input folder before anything starts: every problem becomes one line naming the file and the fix.

Torch-free (PIL reads headers and decodes). The photo list and its key are what the stages and the
cache keys see: the key changes when a photo is added, removed or edited.

What a user gets for odd inputs (the README's table lists them all):
- the folder is wrong (missing, a file, empty, no images): exit 2 (usage);
- a photo is unusable (0 bytes, truncated, corrupt, too small, above the pixel limit, fully
  transparent): exit 65 naming it; the limit is checked from the header, before any decoding, so a
  decompression bomb costs no memory;
- grey, 16-bit, CMYK, palette and animated images are accepted (converted by the segment stage; an
  animation gives its first frame, with a note);
- more than MAX_PHOTOS photos: MAX_PHOTOS of them, spread evenly over the name order, with a note;
- a link that leaves the folder (or points at something that is not a file) is ignored with a note:
  the job reads only what is in the folder, and a link to /dev/zero must not hang the scan;
- file names that are not UTF-8 work; they are printed with the undecodable bytes replaced.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from stages.jobfs import sha256_file, shown
from stages.spec import MAX_PHOTO_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_PIXELS = MAX_PHOTO_PIXELS
MIN_SIDE = 32  # px: below this a photo cannot show a person (the reference canvas is 947 px)
MAX_PHOTOS = 32  # more photos add run time and memory (features, weights) but no views; see README
EXIT_USAGE = 2
EXIT_BAD_PHOTO = 65  # stages.spec.EXIT_BAD_INPUT: the same code whether the scan or a stage finds it


class InputError(ValueError):
    """The input folder cannot be used; the message is one line a user can act on."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        self.exit_code = exit_code
        super().__init__(message)


@dataclass(frozen=True)
class Photo:
    path: Path
    size: int
    sha256: str
    width: int
    height: int
    frames: int = 1

    def record(self) -> dict[str, object]:
        # the path as the file system's bytes: a name that is not UTF-8 must reach the stage unchanged
        return {"path": os.fsencode(self.path), "name": shown(self.path), "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class InputSet:
    photos: tuple[Photo, ...]
    ignored: tuple[Path, ...]  # files that are not images (reported as a note)
    notes: tuple[str, ...] = ()  # what was done about odd inputs (links skipped, photos left out, animations)

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
        raise InputError(f"input folder {shown(root)} does not exist: pass a folder of photos of one person")
    if not root.is_dir():
        raise InputError(f"{shown(root)} is a file, not a folder: put the photos in a folder and pass the folder")
    notes: list[str] = []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        raise InputError(f"input folder {shown(root)} is empty: add photos of one person (JPEG or PNG)")
    files = [p for p in entries if _is_own_file(root, p, notes)]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = tuple(p for p in files if p not in images)
    if not images:
        found = [shown(p.name) + ("/" if p.is_dir() else "") for p in entries[:3]] + (["..."] if len(entries) > 3 else [])
        what = "found " + ", ".join(found)
        raise InputError(f"input folder {shown(root)} has no images ({what}): add JPEG or PNG photos "
                         f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")  # fmt: skip
    if len(images) > MAX_PHOTOS:
        step = len(images) / MAX_PHOTOS
        kept = [images[int(i * step)] for i in range(MAX_PHOTOS)]
        notes.append(f"{len(images)} photos: using {MAX_PHOTOS} of them (the limit), spread evenly over the "
                     f"name order; put your best {MAX_PHOTOS} in a folder to choose them yourself")  # fmt: skip
        images = kept
    photos = tuple(_check_photo(p) for p in images)
    notes += [f"{shown(p.path.name)} is animated ({p.frames} frames): using its first frame"
              for p in photos if p.frames > 1]  # fmt: skip
    return InputSet(photos, ignored, tuple(notes))


def _is_own_file(root: Path, p: Path, notes: list[str]) -> bool:
    """A regular file inside the folder; a link leaving it (or to a non-file) is skipped with a note."""
    if p.is_symlink():
        target = p.resolve()
        if not target.is_relative_to(root.resolve()) or not target.is_file():
            notes.append(f"{shown(p.name)} is a link to {shown(target)}, outside {shown(root)} or not a file: "
                         "ignored (copy the photo into the folder to use it)")  # fmt: skip
            return False
    return p.is_file()


def _check_photo(path: Path) -> Photo:
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{shown(path)} is empty (0 bytes): copy the photo again or remove it", EXIT_BAD_PHOTO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise InputError(_too_big(path, width * height, (width, height)), EXIT_BAD_PHOTO)
                frames = int(getattr(im, "n_frames", 1))
                _decode(im)
                transparent = _fully_transparent(im)
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 x 89 Mpx), hit while reading the header
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise InputError(_too_big(path, int(pixels.group(1)) if pixels else 0), EXIT_BAD_PHOTO) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, InputError):
            raise
        if isinstance(exc, UnidentifiedImageError):
            raise InputError(f"{shown(path)} is not an image in a format we read ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}): "
                             "re-export it as JPEG or PNG, or remove it", EXIT_BAD_PHOTO) from None  # fmt: skip
        why = str(exc).splitlines()[0] if str(exc) else "corrupt"
        if "truncated" in why.lower():
            raise InputError(f"{shown(path)} is truncated (the file ends before the image does): copy it again, "
                             "re-export it, or remove it", EXIT_BAD_PHOTO) from None  # fmt: skip
        raise InputError(f"{shown(path)} cannot be read as an image ({type(exc).__name__}: {why}): "
                         "re-export it as JPEG or PNG, or remove it", EXIT_BAD_PHOTO) from None  # fmt: skip
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{shown(path)} is {width}x{height} px, too small to show a person: use photos at least "
                         f"{MIN_SIDE} px on each side (512 px or more is best), or remove it", EXIT_BAD_PHOTO)  # fmt: skip
    if transparent:
        raise InputError(f"{shown(path)} is fully transparent (its alpha channel is 0 everywhere): export it "
                         "without the alpha channel, or remove it", EXIT_BAD_PHOTO)  # fmt: skip
    return Photo(path.absolute(), size, sha256_file(path), width, height, frames)


def _decode(im: Image.Image) -> None:
    """Decode the whole first frame, so a truncated file fails here and not in a stage; JPEGs at 1/8
    scale (the DCT decoder still reads every byte of the stream, at a 64th of the memory)."""
    if im.format == "JPEG":
        im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
    im.load()


def _fully_transparent(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A").getextrema()[1] == 0
    return False


def _too_big(path: Path, pixels: int, dims: tuple[int, int] | None = None) -> str:
    size = f"{dims[0]}x{dims[1]} = " if dims else ""
    size += f"{pixels / 1e6:.1f} Mpx" if pixels else f"far above {MAX_PIXELS // 1_000_000} Mpx"
    return (f"{shown(path)} is {size}, above the {MAX_PIXELS // 1_000_000} Mpx limit: resize it "
            "(e.g. to 4000 px on the long side) and run again")  # fmt: skip
