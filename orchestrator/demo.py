"""`up2you-budget demo`: the whole chain on a bare machine, no photos, weights or GPU needed.

It draws a few person-like photos (the calibration's synthetic figures), runs every stage with the
tiny random weights on the best device present, and says where each output is and how to get a
real run. Small settings (2 photos, 6 views at 256 px, 2 steps, the smoke geometry) keep it under
two minutes on two idle CPU cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from orchestrator.calibrate import write_photos
from orchestrator.job import RunOptions, RunReport, run_job
from orchestrator.probe import NvmlProbe, ProbeError

DEMO_PHOTOS = 2
DEMO_STEPS = 2  # denoising steps: the smoke profile's 4 halved (the output is noise either way)
NEXT_STEPS = ("this was a smoke test with tiny random weights (the output is noise). For a real run: "
              "`up2you-budget doctor`, then `up2you-budget weights fetch --accept-smplx-license`, then "
              "`up2you-budget YOUR_PHOTOS/`")  # fmt: skip


def best_device() -> str:
    """cuda when NVML sees a GPU and torch (asked in a child process) can use it, else cpu."""
    try:
        if not NvmlProbe().gpus():
            return "cpu"
    except ProbeError:
        return "cpu"
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)  # fmt: skip
    return "cuda" if proc.stdout.strip().endswith("True") else "cpu"


def run_demo(out: Path, device: str, console: Console) -> RunReport:
    """Photos into out/photos, the run's outputs into out/."""
    device = best_device() if device == "auto" else device
    out = Path(out).resolve()  # the paths it prints are where the outputs really are, from anywhere
    photos = write_photos(out / "photos", n=DEMO_PHOTOS)
    console.print(f"demo: {DEMO_PHOTOS} synthetic photos in {photos}, device {device}")
    return run_job(photos, out, RunOptions(tiny=True, device=device, steps=DEMO_STEPS), console=console)
