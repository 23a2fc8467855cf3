"""One view of the whole fleet: a line per running subject (stage, GPU, elapsed) and the counters.

In a terminal it is a rich Live table redrawn in place; elsewhere (a log file, CI) it prints a plain
line when a subject starts, changes stage or ends, with the counters after each end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.fleet.summary import SubjectRecord
from orchestrator.sizes import gib


def counters(records: Sequence[SubjectRecord]) -> str:
    n = {k: sum(r.outcome == k for r in records)
         for k in ("ok", "skipped", "failed", "waiting", "running", "interrupted")}  # fmt: skip
    return (f"{n['ok'] + n['skipped']} finished ({n['skipped']} already done), {n['failed']} failed, "
            f"{n['waiting']} waiting, {n['running']} running"
            + (f", {n['interrupted']} interrupted" if n["interrupted"] else ""))  # fmt: skip


class FleetView:
    """Call `update(records, now_s)` every poll; `close()` once at the end."""

    def __init__(self, console: Console, live: bool | None = None) -> None:
        self.console = console
        self.live_mode = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._seen: dict[str, tuple[str, str]] = {}  # subject -> (outcome, activity) last printed
        self._t0 = time.monotonic()

    def update(self, records: Sequence[SubjectRecord], now_s: float) -> None:
        if self.live_mode:
            if self._live is None:
                self._live = Live(self._table(records, now_s), console=self.console, refresh_per_second=4)
                self._live.start()
            else:
                self._live.update(self._table(records, now_s))
            return
        for r in records:
            state = (r.outcome, r.activity)
            if self._seen.get(r.subject) == state or r.outcome == "waiting":
                continue
            first = r.subject not in self._seen
            self._seen[r.subject] = state
            self._line(r, now_s, first, records)

    def _line(self, r: SubjectRecord, now_s: float, first: bool, records: Sequence[SubjectRecord]) -> None:
        c = self.console
        if r.outcome == "running":
            if first:
                c.print(f"▶ {r.subject} on {r.gpu} ({r.plan_label}, needs {gib(r.need_bytes)})", highlight=False)
            else:
                c.print(f"  {r.subject}: {r.activity} ({r.gpu}, {_elapsed(r, now_s)})",
                        highlight=False)  # fmt: skip
            return
        if r.outcome == "skipped":
            c.print(f"[dim]• {r.subject}: already done, kept[/dim]")
        elif r.outcome == "ok":
            c.print(f"[green]✓ {r.subject} ok on {r.gpu} in {_elapsed(r, now_s)}[/green]")
        else:
            c.print(f"[red]✗ {r.subject} {r.outcome} (exit {r.exit_code}): {r.message}[/red]", highlight=False)
        c.print(f"[dim]  [{counters(records)}][/dim]")

    def _table(self, records: Sequence[SubjectRecord], now_s: float) -> Table:
        t = Table(title=counters(records), title_justify="left")
        for col in ("subject", "GPU", "stage", "elapsed", "plan"):
            t.add_column(col)
        for r in records:
            if r.outcome == "running":
                t.add_row(r.subject, r.gpu, r.activity, _elapsed(r, now_s), r.plan_label)
        return t

    def close(self, records: Sequence[SubjectRecord], now_s: float) -> None:
        if self._live is not None:
            self._live.update(self._table(records, now_s))
            self._live.stop()
            self._live = None
        for r in records if self.live_mode else ():  # plain lines said it when it happened
            if r.outcome == "failed":
                self.console.print(f"[red]✗ {r.subject} (exit {r.exit_code}): {r.message}[/red]", highlight=False)
        self.console.print(counters(records), highlight=False)


def _elapsed(r: SubjectRecord, now_s: float) -> str:
    end = r.ended_s if r.ended_s is not None else now_s
    start = r.started_s if r.started_s is not None else end
    return f"{end - start:.0f} s"
