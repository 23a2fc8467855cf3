"""What the GPUs hold right now: NVML's view (device-wide and per process), behind a small interface.

NVML is the truth for budgeting: it sees other tenants and every process's CUDA context (~0.6 GiB
that torch's allocator never reports). Tests use `SimulatedProbe`, whose neighbours can appear or
leave while a job runs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class ProbeError(RuntimeError):
    """No GPU can be observed (NVML missing, no driver, no device); the message says what to do."""


class NoSuchGpu(ProbeError):
    """`--gpu` names a GPU that is not there: a usage error, not a missing device."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where NVML cannot tell (e.g. WDDM)
    name: str = ""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    total: int
    free: int
    used: int
    processes: tuple[GpuProcess, ...] = ()

    @property
    def cuda_visible_id(self) -> str:
        """What to put in CUDA_VISIBLE_DEVICES: the UUID, since NVML and CUDA may number GPUs differently."""
        return self.uuid or str(self.index)


class Probe(Protocol):
    def gpus(self) -> list[GpuInfo]:
        """Every GPU, with memory and compute processes, as of now."""
        ...

    def process_bytes(self, index: int, pids: Collection[int]) -> int | None:
        """GPU memory that the given processes hold on GPU `index` (context included); None if unknown."""
        ...


def select_gpu(gpus: list[GpuInfo], choice: str) -> GpuInfo:
    """`auto`: the GPU with the most free memory; otherwise the GPU with that NVML index."""
    if not gpus:
        raise ProbeError("no NVIDIA GPU found; use --device cpu --tiny for a CPU smoke test")
    if choice == "auto":
        return max(gpus, key=lambda g: g.free)
    try:
        index = int(choice)
    except ValueError:
        raise NoSuchGpu(f"--gpu {choice!r}: expected auto or a GPU index (see `up2you-budget gpus`)") from None
    for g in gpus:
        if g.index == index:
            return g
    raise NoSuchGpu(f"--gpu {index}: no such GPU; this machine has GPU {', '.join(str(g.index) for g in gpus)} "
                    "(see `up2you-budget gpus`), or use --gpu auto")


class NvmlProbe:
    """The real GPUs, through nvidia-ml-py (pynvml)."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ProbeError("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ProbeError(
                f"cannot talk to the NVIDIA driver ({exc}); no GPU here? Use --device cpu --tiny for a smoke test"
            ) from exc
        self._nvml = pynvml
        self._lock = threading.Lock()

    def gpus(self) -> list[GpuInfo]:
        nv = self._nvml
        out = []
        with self._lock:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                procs = tuple(
                    GpuProcess(p.pid, _nvml_bytes(p.usedGpuMemory), _process_name(p.pid))
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h)
                )
                out.append(GpuInfo(i, _text(nv.nvmlDeviceGetName(h)), _text(nv.nvmlDeviceGetUUID(h)),
                                   int(mem.total), int(mem.free), int(mem.used), procs))  # fmt: skip
        return out

    def process_bytes(self, index: int, pids: Collection[int]) -> int | None:
        nv = self._nvml
        with self._lock:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            sizes = [_nvml_bytes(p.usedGpuMemory) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)
                     if p.pid in pids]  # fmt: skip
        known = [s for s in sizes if s is not None]
        return sum(known) if known else None  # none listed: no CUDA context yet, or PIDs from another namespace


def _nvml_bytes(v: int | None) -> int | None:
    # NVML_VALUE_NOT_AVAILABLE is (unsigned long long)-1
    return None if v is None or v >= 2**63 else int(v)


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _process_name(pid: int) -> str:
    try:
        import psutil

        return " ".join(psutil.Process(pid).cmdline()[:3]) or psutil.Process(pid).name()
    except Exception:  # another user's process, or gone already
        return ""


@dataclass
class SimulatedGpu:
    total: int
    name: str = "Simulated GPU"
    neighbour_bytes: int = 0  # memory held by other tenants (shown as one process, pid 999999)
    reserved_bytes: int = 0  # driver reservation NVML never reports as free
    uuid: str = ""
    neighbours: list[GpuProcess] = field(default_factory=list)


class SimulatedProbe:
    """A probe over made-up GPUs; `set_neighbour` changes free memory while a job runs."""

    def __init__(self, *gpus: SimulatedGpu) -> None:
        self._gpus = list(gpus)
        self._lock = threading.Lock()

    def set_neighbour(self, index: int, used_bytes: int) -> None:
        with self._lock:
            self._gpus[index].neighbour_bytes = used_bytes

    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            out = []
            for i, g in enumerate(self._gpus):
                # listed processes hold their bytes; neighbour_bytes alone appears as one process
                used = g.neighbour_bytes + sum(p.used_bytes or 0 for p in g.neighbours)
                procs = tuple(g.neighbours) or ((GpuProcess(999_999, used, "neighbour"),) if used else ())
                out.append(GpuInfo(i, g.name, g.uuid or f"GPU-sim-{i}", g.total,
                                   g.total - g.reserved_bytes - used, used, procs))  # fmt: skip
            return out

    def process_bytes(self, index: int, pids: Collection[int]) -> int | None:
        return None  # the simulated GPU runs nothing of ours: the runner falls back to host RSS


SIMULATED_GPUS_ENV = "UP2YOU_SIMULATED_GPUS"


class FileSimulatedProbe:
    """Simulated GPUs described by a JSON file, re-read on every call, so several processes (jobs, a
    fleet, tests) see the same made-up card and a test changes it by rewriting the file.

    Format (sizes in bytes, or strings like "24GB"):
        {"gpus": [{"name": "Simulated 24G", "uuid": "GPU-sim-0", "total": "24GB", "reserved": 0,
                   "processes": [{"pid": 4242, "used": "6GB", "name": "neighbour"}]}]}
    free = total - reserved - the processes' used bytes. Selected by $UP2YOU_SIMULATED_GPUS=<file>.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def gpus(self) -> list[GpuInfo]:
        from orchestrator.sizes import parse_size

        def size(v: int | str | None) -> int:
            return v if isinstance(v, int) else parse_size(v) if v else 0

        try:
            spec = json.loads(self.path.read_text())
            out = []
            for i, g in enumerate(spec["gpus"]):
                procs = tuple(GpuProcess(int(p["pid"]), size(p.get("used")), str(p.get("name", "")))
                              for p in g.get("processes", []))  # fmt: skip
                used = sum(p.used_bytes or 0 for p in procs)
                total = size(g["total"])
                out.append(GpuInfo(i, str(g.get("name", "Simulated GPU")), str(g.get("uuid") or f"GPU-sim-{i}"),
                                   total, max(0, total - size(g.get("reserved")) - used), used, procs))  # fmt: skip
            return out
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProbeError(f"{SIMULATED_GPUS_ENV}={self.path}: cannot read simulated GPUs ({exc}); see "
                             f"orchestrator/probe.py FileSimulatedProbe for the format") from None  # fmt: skip

    def process_bytes(self, index: int, pids: Collection[int]) -> int | None:
        gpus = self.gpus()
        if index >= len(gpus):
            return None
        sizes = [p.used_bytes or 0 for p in gpus[index].processes if p.pid in pids]
        return sum(sizes) if sizes else None


def default_probe(device: str = "cuda") -> Probe | None:
    """The probe a job uses when none is passed: the simulated file if $UP2YOU_SIMULATED_GPUS is set,
    none on a CPU run, NVML otherwise."""
    path = os.environ.get(SIMULATED_GPUS_ENV)
    if path:
        return FileSimulatedProbe(path)
    if device == "cpu":
        return None
    return NvmlProbe()
