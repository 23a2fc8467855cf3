"""The fake pipeline for a job started as its own process (a fleet's jobs), chosen by an environment variable.

In-process tests hand `run_job` a pipeline and a table directly; a job that a fleet starts as
`python -m cli ...` cannot be handed anything, so ``UP2YOU_TEST_PIPELINE=tests.fakestages`` (tests only:
the fake stages live in tests/) is read here, and only here: that module's ``FAKE`` pipeline runs with its
``TABLE_PATH`` budget table instead of UP2You. (Simulated GPUs shared by such processes come from
``UP2YOU_SIMULATED_GPUS``, which orchestrator.probe.default_probe reads.) Unset, nothing is overridden.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from budgets.table import load_table

TEST_PIPELINE_ENV = "UP2YOU_TEST_PIPELINE"


def job_doubles() -> dict[str, Any]:
    """Keyword arguments for `plan_job`/`run_job` (pipeline, table) that the environment asks for."""
    out: dict[str, Any] = {}
    module = os.environ.get(TEST_PIPELINE_ENV)
    if module:
        mod = importlib.import_module(module)
        out["pipeline"] = mod.FAKE
        out["table"] = load_table(mod.TABLE_PATH)
    return out
