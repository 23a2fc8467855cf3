"""`python -m tests.fakestages.drive_shared INPUT OUT [VRAM]`: run_job on the FAKE pipeline as its own
process, on the simulated GPUs of $UP2YOU_SIMULATED_GPUS (shared by every job process of a test) and
the GPU ledger of $UP2YOU_RUNTIME_DIR; writes OUT/run.json like the real command."""

import sys

from budgets.table import load_table
from orchestrator.job import RunOptions, run_job
from tests.fakestages import FAKE, TABLE_PATH

if __name__ == "__main__":
    vram = sys.argv[3] if len(sys.argv) > 3 else "auto"
    report = run_job(sys.argv[1], sys.argv[2], RunOptions(vram=vram, device="cpu"), pipeline=FAKE,
                     table=load_table(TABLE_PATH))  # fmt: skip
    print(f"exit {report.exit_code}: {report.message}", flush=True)
    sys.exit(report.exit_code)
