"""What every committed benchmark result records about where it ran: the commit and the torch build.

The device machine's copy of the repo can report an older HEAD than the working tree it ran (its .git is
copied once a session); `git_commit` therefore says when the tree differs from that HEAD, so a stale
commit is never passed off as the code measured.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD, plus how many tracked files differ from it ("" without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.splitlines()  # fmt: skip
    except OSError:
        return ""
    return f"{head} + changes in {len(dirty)} tracked files" if head and dirty else head


def torch_version() -> str:
    """torch and its CUDA build, read in a child process (the caller may not import torch)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()
