"""Planning and the CLI must work without torch: `gpus` and `--plan` are instant, even with no CUDA."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_orchestrator_budgets_and_cli_never_import_torch() -> None:
    code = ("import sys, cli, budgets.table, budgets.fit, budgets.timing, budgets.timing_fit, orchestrator.job, orchestrator.runner, orchestrator.report; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "torch was imported"
