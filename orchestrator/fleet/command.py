"""The command line of one subject's job: the same `up2you-budget` run a person would type, one GPU, one OUT.

The fleet never reaches into a job: it starts this command and reads the job's run.json afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.job import RunOptions
from stages import lifeline

ROOT = Path(__file__).resolve().parents[2]  # where cli.py lies (the source tree or site-packages)


def job_args(options: RunOptions) -> list[str]:
    """The options every subject's job shares (not --gpu nor --out), as CLI arguments."""
    o = options
    # the job may run elsewhere (another cwd, a Ray worker): paths go absolute, the default weights folder too
    weights = o.weights or (None if o.tiny or o.full_random else Path("weights"))
    args = ["--vram", o.vram, "--max-retries", str(o.max_retries), "--wait-for-vram", f"{o.wait_for_vram_s:g}",
            "--wait-for-siblings", f"{o.wait_for_siblings_s:g}", "--prefer", o.prefer, "--device", o.device]  # fmt: skip
    if o.time_budget_s is not None:
        args += ["--time-budget", f"{o.time_budget_s:g}"]
    for flag, value in (("--views", o.views), ("--resolution", o.resolution), ("--steps", o.steps),
                        ("--thg-interval", o.thg_interval), ("--weights", weights and weights.resolve())):
        if value is not None:
            args += [flag, str(value)]
    if not o.cpu_fallback:  # auto is the default: left out, so earlier runs' fingerprints still match
        args += ["--cpu-fallback", "never"]
    if o.tiny:
        args.append("--tiny")
    if o.full_random:
        args.append("--full-random")
    for key, value in o.overrides:
        args += ["--set", f"{key}={value}"]
    return args


def job_command(folder: Path, out: Path, gpu_index: int | None, options: RunOptions) -> list[str]:
    """`python -m cli FOLDER --gpu INDEX --out OUT ...` under the lifeline (it dies with its starter)."""
    gpu = ["--gpu", str(gpu_index)] if gpu_index is not None else []
    return lifeline.command("cli", str(folder.resolve()), *gpu, "--out", str(out.resolve()), *job_args(options))


def job_env() -> dict[str, str]:
    """The job's environment: ours, with this source tree importable (so `-m cli` is this cli)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
