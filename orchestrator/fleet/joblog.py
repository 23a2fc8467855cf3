"""What a running job is doing, read from its own progress lines (its stderr, kept in OUT/NAME/fleet.log).

The job prints `▶ STAGE (...)` when a stage starts and a line `… ... waiting ...` when it waits for GPU
memory (orchestrator.console.ProgressPrinter); these two shapes are the only thing parsed here.
"""

from __future__ import annotations

import re
from pathlib import Path

_START = re.compile(r"^\s*▶ (\S+)")
_WAIT = re.compile(r"^\s*… .*\bwaiting\b")


class JobLog:
    """Follows one log file; `update()` reads what was appended and returns the current activity."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0  # what is there already is an earlier run's
        self._partial = ""
        self.activity = "starting"
        self.last_line = ""

    def update(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return self.activity
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if m := _START.match(line):
                self.activity = m.group(1)
            elif _WAIT.match(line):
                self.activity = f"{self.activity.split(' ')[0]} (waiting for memory)"
            if line.strip():
                self.last_line = line.strip()
        return self.activity
