"""Sample a running stage's memory from outside: NVML per process (the truth on a GPU: it includes the
CUDA context and sees what torch's counters miss) and host RSS (psutil), in a background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from orchestrator.probe import Probe
from orchestrator.process import StageProcess, process_rss


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the job started
    gpu_bytes: int | None
    rss_bytes: int


class MemorySampler:
    """Samples a StageProcess every `interval` seconds until stopped; keeps peaks and the timeline."""

    def __init__(self, proc: StageProcess, probe: Probe | None, gpu_index: int | None, t0: float,
                 interval: float = 0.05) -> None:  # fmt: skip
        self.proc = proc
        self.probe = probe
        self.gpu_index = gpu_index
        self.t0 = t0
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"memory-{proc.spec.name}", daemon=True)

    def __enter__(self) -> MemorySampler:
        self.sample_once()  # at least one sample, however short the stage turns out to be
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def sample_once(self) -> None:
        pids = self.proc.pids()
        if not pids:
            return
        rss = process_rss(pids)
        gpu = None
        if self.probe is not None and self.gpu_index is not None:
            try:
                gpu = self.probe.process_bytes(self.gpu_index, set(pids))
            except Exception:  # NVML hiccup: a missing sample, not a failed job
                gpu = None
        self.samples.append(Sample(time.monotonic() - self.t0, gpu, rss))

    @property
    def peak_gpu(self) -> int | None:
        vals = [s.gpu_bytes for s in self.samples if s.gpu_bytes is not None]
        return max(vals) if vals else None

    @property
    def peak_rss(self) -> int:
        return max((s.rss_bytes for s in self.samples), default=0)
