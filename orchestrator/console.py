"""What a person sees in the terminal: the plan as a table, GPUs as a table, progress as the job runs."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from budgets.timing import StageSeconds
from orchestrator.ledger import LedgerView
from orchestrator.planner import PlanChoice, StageFit
from orchestrator.probe import GpuInfo
from orchestrator.runner import HANDED_BACK, Attempt, Replan
from orchestrator.sizes import gib
from stages.spec import Pipeline

_MEMORY_KNOBS = ("cfg_mode", "vae_mode", "offload", "ref_chunk")


def _stage_knobs(pipeline: Pipeline, stage: str, choice: PlanChoice) -> str:
    """The knobs in the stage's key, plus the memory-only knobs for diffusion stages (those keyed on steps)."""
    spec = pipeline[stage]
    names = list(spec.knobs) + (list(_MEMORY_KNOBS) if "steps" in spec.knobs else [])
    skip = ("seed", "guidance", "thg_schedule")
    return ", ".join(f"{k}={getattr(choice.plan, k)}" for k in names if k not in skip) or "-"


def plan_table(pipeline: Pipeline, choice: PlanChoice, title: str) -> Table:
    """One row per stage: knobs, predicted peak against the budget and, where the table has a time model,
    predicted seconds; then the predicted total."""
    times = choice.times
    t = Table(title=title, title_justify="left")
    for col in ("stage", "knobs", "predicted peak", "budget") + (("predicted time",) if times else ()):
        t.add_column(col, justify="left" if col in ("stage", "knobs") else "right")
    for fit in choice.fits:
        row = [fit.stage, _stage_knobs(pipeline, fit.stage, choice), _need(fit), gib(choice.budget_bytes)]
        t.add_row(*row, *((_seconds(times.get(fit.stage)),) if times else ()))
    if times:
        t.add_row("total", "", "", "", f"{times.total_s:.0f} s", style="bold")
        t.caption = "time: wall per stage, start-up that pre-start cannot hide in brackets; a machine's first " \
                    "run also builds nvdiffrast (not included)"
        t.caption_justify = "left"
    return t


def _seconds(s: StageSeconds | None) -> str:
    """`45 s (22 s start-up)`: the predicted wall, and the start-up pre-start could not hide."""
    if s is None:
        return "-"
    unhidden = s.startup_s - s.hidden_s
    return f"{s.wall_s:.0f} s" + (f" ({unhidden:.0f} s start-up)" if unhidden >= 0.5 else "")


def _need(fit: StageFit) -> str:
    p = fit.prediction
    return f"{gib(p.total_bytes)} (+{gib(fit.need_bytes - p.total_bytes)} margin)"


def gpu_table(gpus: list[GpuInfo]) -> Table:
    t = Table(title="GPUs (NVML)", title_justify="left")
    for col in ("index", "name", "total", "used", "free", "processes"):
        t.add_column(col)
    for g in gpus:
        procs = "\n".join(f"{p.pid} {gib(p.used_bytes) if p.used_bytes is not None else '?'} {p.name}".strip()
                          for p in g.processes) or "-"  # fmt: skip
        t.add_row(str(g.index), g.name, gib(g.total), gib(g.used), gib(g.free), procs)
    return t


def ledger_table(views: list[LedgerView]) -> Table:
    """What up2you-budget jobs on this host have claimed, per GPU, and who waits (the ledger)."""
    from orchestrator.admission import job_label

    caption = "; ".join(f"GPU {v.gpu.index}: {gib(v.available())} free and unreserved" for v in views)
    t = Table(title="GPU ledger (up2you-budget jobs on this host)", title_justify="left", caption=caption,
              caption_justify="left")  # fmt: skip
    for col in ("GPU", "job", "stage", "state", "pid", "reserved", "allocated", "age"):
        t.add_column(col, justify="right" if col in ("reserved", "allocated", "age") else "left",
                     overflow="fold")  # fmt: skip
    now = time.time()
    for v in views:
        for h in v.holdings:
            r = h.reservation
            t.add_row(str(v.gpu.index), job_label(r.job_id), r.stage, "running" if h.alive else "exited",
                      str(r.pid), gib(r.nbytes), gib(h.allocated), f"{now - r.created:.0f} s")  # fmt: skip
        for k in v.tickets:
            t.add_row(str(v.gpu.index), job_label(k.job_id), k.stage, f"waiting #{k.number}", str(k.pid),
                      gib(k.nbytes), "-", f"{now - k.created:.0f} s")  # fmt: skip
    return t


class ProgressPrinter:
    """Turns runner events into one line each (works the same in a terminal, a log file and CI)."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet

    def __call__(self, kind: str, payload: Any) -> None:
        if self.quiet:
            return
        c = self.console
        if kind == "skipped":
            c.print(f"[dim]• {payload}: already done, kept[/dim]")
        elif kind == "start":
            stage, label, fit = payload
            pred = f", predicted {gib(fit.prediction.total_bytes)}" if fit else ""
            c.print(f"▶ {stage} ({label}{pred}) ...")
        elif kind == "end":
            self._end(payload)
        elif kind == "replan":
            r: Replan = payload
            c.print(f"[yellow]↻ re-plan after {r.after_stage}: {r.reason}\n  {r.before} -> {r.after}; "
                    f"recompute: {', '.join(r.invalidated) or 'only the failed stage'}[/yellow]")  # fmt: skip
        elif kind == "waiting":
            free, budget = payload
            c.print(f"[yellow]… waiting for GPU memory: {gib(free)} free, budget {gib(budget)}[/yellow]")
        elif kind == "wait":  # once per wait: who holds the GPU, how much is missing
            c.print(f"[yellow]… {escape(payload)}[/yellow]", highlight=False)
        elif kind == "exports":  # the last stage is done; some deliverable files are still being written
            c.print(f"[dim]… writing the deliverables of {', '.join(payload)}[/dim]")
        elif kind == "cpu":  # no GPU plan fits what is free: this stage runs on the CPU
            c.print(f"[yellow]⤓ {escape(payload)}[/yellow]", highlight=False)

    def _end(self, a: Attempt) -> None:
        measured = a.measured_gpu_bytes if a.measured_gpu_bytes is not None else a.measured_rss_bytes
        what = "GPU" if a.measured_gpu_bytes is not None else "host RSS"
        line = f"{a.stage} {a.outcome} in {a.wall_s:.1f} s, peak {gib(measured or 0)} ({what})"
        if a.hidden_startup_s > 0:
            line += f", {a.hidden_startup_s:.1f} s of start-up hidden"
        if a.ready_s is not None and a.ready_s - a.started_s > 0.05:
            line += f", {a.ready_s - a.started_s:.1f} s waited for its start-up"
        if a.outcome == HANDED_BACK:  # not a failure: the stage goes on, on the GPU
            self.console.print(f"[yellow]⤒ {line}[/yellow]")
            return
        style = "green" if a.outcome == "ok" else "red"
        self.console.print(f"[{style}]{'✓' if a.outcome == 'ok' else '✗'} {line}[/{style}]"
                           + ("" if a.outcome == "ok" else f"\n  {a.message}"))  # fmt: skip
