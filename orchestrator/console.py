"""What a person sees in the terminal: the plan as a table, GPUs as a table, progress as the job runs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.planner import PlanChoice, StageFit
from orchestrator.probe import GpuInfo
from orchestrator.runner import Attempt, Replan
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
    t = Table(title=title, title_justify="left")
    for col in ("stage", "knobs", "predicted peak", "budget"):
        t.add_column(col, justify="right" if col in ("predicted peak", "budget") else "left")
    for fit in choice.fits:
        t.add_row(fit.stage, _stage_knobs(pipeline, fit.stage, choice), _need(fit), gib(choice.budget_bytes))
    return t


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

    def _end(self, a: Attempt) -> None:
        measured = a.measured_gpu_bytes if a.measured_gpu_bytes is not None else a.measured_rss_bytes
        what = "GPU" if a.measured_gpu_bytes is not None else "host RSS"
        line = f"{a.stage} {a.outcome} in {a.wall_s:.1f} s, peak {gib(measured or 0)} ({what})"
        if a.hidden_startup_s > 0:
            line += f", {a.hidden_startup_s:.1f} s of start-up hidden"
        if a.ready_s is not None and a.ready_s - a.started_s > 0.05:
            line += f", {a.ready_s - a.started_s:.1f} s waited for its start-up"
        style = "green" if a.outcome == "ok" else "red"
        self.console.print(f"[{style}]{'✓' if a.outcome == 'ok' else '✗'} {line}[/{style}]"
                           + ("" if a.outcome == "ok" else f"\n  {a.message}"))  # fmt: skip
