"""Which layout an input folder has: photos of one person (one job), or one folder of photos per person.

A folder whose photos lie at its top is one job, as it always was. A folder with no photos at its top
and at least one subfolder holding an image is a folder of subjects: every non-hidden subfolder is one
subject (one without images fails on its own, with the usual input message). Photos at the top *and*
subject folders beside them are ambiguous and stop the run with one line saying how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.inputs import IMAGE_SUFFIXES, InputError


@dataclass(frozen=True)
class Subject:
    """One person: a name (the folder's) and the folder of their photos."""

    name: str
    folder: Path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip


def detect_subjects(folder: Path | str, exclude: Path | None = None) -> list[Subject] | None:
    """The subjects of a folder of subject folders, or None when `folder` is (or may be) one job's photos.

    `exclude` is a folder not to count as a subject (the output folder, when it lies inside the input).
    """
    root = Path(folder)
    if not root.is_dir():
        return None  # the single-job path reports a missing folder or a file in its own words
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if exclude is not None:
        dirs = [d for d in dirs if d.resolve() != exclude.resolve()]
    with_images = [d for d in dirs if _images(d)]
    if not with_images:
        return None
    top = _images(root)
    if top:
        photos = ", ".join(p.name for p in top[:2]) + (" ..." if len(top) > 2 else "")
        people = ", ".join(f"{d.name}/" for d in with_images[:2]) + (" ..." if len(with_images) > 2 else "")
        raise InputError(f"{root} mixes photos ({photos}) with subject folders ({people}): move the photos "
                         "into a folder of their own (one folder per person), or pass a folder of one person")  # fmt: skip
    return [Subject(d.name, d) for d in dirs]
