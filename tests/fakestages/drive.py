"""`python -m tests.fakestages.drive INPUT OUT`: run_job on the FAKE pipeline with a simulated 24 GiB GPU,
from a separate process, so tests can signal the orchestrator itself (Ctrl-C, SIGTERM)."""

import faulthandler
import signal
import sys

from budgets.table import load_table
from orchestrator.job import JobError, RunOptions, run_job
from orchestrator.probe import SimulatedGpu, SimulatedProbe
from tests.fakestages import FAKE, TABLE_PATH

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that times out asks where it hangs
    # an orchestrator at a terminal, whatever the test runner's own SIGINT is (a runner started with `&` or
    # nohup ignores it, and so would this process: then Ctrl-C would rightly be ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = run_job(sys.argv[1], sys.argv[2], RunOptions(vram="12GB", device="cpu"),
                         probe=SimulatedProbe(SimulatedGpu(24 * 2**30)), pipeline=FAKE, table=load_table(TABLE_PATH))
    except JobError as exc:
        print(f"error: {exc}", flush=True)
        sys.exit(exc.exit_code)
    print(f"exit {report.exit_code}: {report.message}", flush=True)
    sys.exit(report.exit_code)
