"""Test doubles for a job started as its own process (a fleet's jobs), chosen by environment variables.

In-process tests hand `run_job` a pipeline, a table and a probe directly; a job that a fleet starts as
`python -m cli ...` cannot be handed anything, so these two variables are read here, and only here:

- ``UP2YOU_TEST_PIPELINE=tests.fakestages``: run that module's ``FAKE`` pipeline with its ``TABLE_PATH``
  budget table instead of UP2You (tests only: the fake stages live in tests/);
- ``UP2YOU_SIMULATED_GPUS=FILE.json``: see the simulated GPUs of that file (`FileSimulatedProbe`)
  instead of NVML, the same ones in the fleet and in every job it starts.

Unset (the normal case), nothing is overridden.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from budgets.table import load_table
from orchestrator.probe import FileSimulatedProbe

TEST_PIPELINE_ENV = "UP2YOU_TEST_PIPELINE"
SIMULATED_GPUS_ENV = "UP2YOU_SIMULATED_GPUS"


def job_doubles() -> dict[str, Any]:
    """Keyword arguments for `plan_job`/`run_job` (pipeline, table, probe) that the environment asks for."""
    out: dict[str, Any] = {}
    module = os.environ.get(TEST_PIPELINE_ENV)
    if module:
        mod = importlib.import_module(module)
        out["pipeline"] = mod.FAKE
        out["table"] = load_table(mod.TABLE_PATH)
    gpus = os.environ.get(SIMULATED_GPUS_ENV)
    if gpus:
        out["probe"] = FileSimulatedProbe(gpus)
    return out
