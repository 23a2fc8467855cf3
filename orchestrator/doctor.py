"""`up2you-budget doctor`: one row per thing a real run needs, each ok or with its fix.

Checks: NVML and the driver, each GPU's total/free memory, torch's CUDA build against the driver
(asked of a child process: this one never imports torch), nvdiffrast built or how it will be,
every checkpoint (where found, size and sha256), free disk for the output and the weight cache,
host RAM against the chain's host peak, ffmpeg for the videos, bytecode for what the stages import.
Ready = every row ok, but bytecode: without it a run starts, only each stage process starts slower.

A `--tiny` smoke test needs none of the checkpoint rows (and, with `--device cpu`, none of the
GPU rows either): each row says whether the smoke test skips it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from rich.markup import escape
from rich.table import Table

from orchestrator import bytecode
from orchestrator.job import DISK_BASE, DISK_PER_VIEW
from orchestrator.probe import GpuInfo, NvmlProbe, ProbeError
from orchestrator.sizes import gib
from orchestrator.weightfiles import folder_candidates, resolve, verify_checkpoint
from up2you.buildcache import extensions_dir
from up2you.checkpoints import CHECKPOINTS, DOWNLOADS, EXPECTED, LICENCES, files_of

# Peak host RSS per stage process, measured on the H100 calibration (full-size models, 20 views;
# benchmarks/results/calibration/h100_2026-11-22_measurements.json, max over the grid). The next stage
# is pre-started while one runs, so two neighbours are resident at once.
HOST_RSS_PEAK = {"segment": 0.70, "features": 2.09, "apose": 11.77, "weights": 1.38, "rgb": 6.58, "normal": 5.72,
                 "mesh": 1.71, "video": 1.71}  # GiB  # fmt: skip
FETCH_BYTES = 9_000_000_000  # what `weights fetch` downloads: 3.8 GB of known sizes + SD 2.1 fp32 (~5.2 GB, derived)
EXIT_NOT_READY = 1
CPU_SKIPS = "cpu: skip"  # a --tiny --device cpu run does not need this row

SKIPPED_BY_TINY = "the weights rows and the weights-folder disk"
SKIPPED_BY_TINY_CPU = "also NVML/GPUs, torch CUDA, nvdiffrast (with --device cpu)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    tiny: str = "needed"  # needed | skip | cpu: skip — whether a --tiny smoke test (on cpu) needs this row
    blocking: bool = True  # False: a run starts without it, only slower (shown "slow", not counted by `ready`)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def host_peak_bytes() -> int:
    """The largest sum of two neighbouring stages' RSS (one runs, the next is pre-started)."""
    peaks = list(HOST_RSS_PEAK.values())
    return int(max(a + b for a, b in zip(peaks, peaks[1:], strict=False)) * 2**30)


def check_gpus() -> tuple[list[Check], list[GpuInfo], str | None]:
    """NVML/driver and one row per GPU; returns the GPUs and the driver's CUDA version (e.g. '12.4')."""
    try:
        gpus = NvmlProbe().gpus()
    except ProbeError as exc:
        return [Check("NVML / NVIDIA driver", False, str(exc).split(";")[0],
                      "no GPU reachable: install the NVIDIA driver on a GPU machine; `up2you-budget demo --device cpu` "
                      "runs the smoke test without one", CPU_SKIPS)], [], None  # fmt: skip
    driver, cuda = _driver_versions()
    rows = [Check("NVML / NVIDIA driver", bool(gpus), f"driver {driver}, supports CUDA {cuda or '?'}, {len(gpus)} GPU(s)",
                  "" if gpus else "NVML sees no GPU: check CUDA_VISIBLE_DEVICES and `nvidia-smi`", CPU_SKIPS)]  # fmt: skip
    for g in gpus:
        rows.append(Check(f"GPU {g.index}", True, f"{g.name}: {gib(g.total)} total, {gib(g.free)} free, "
                          f"{len(g.processes)} other process(es)", "", CPU_SKIPS))  # fmt: skip
    return rows, gpus, cuda


def _driver_versions() -> tuple[str, str | None]:
    try:
        import pynvml

        v = pynvml.nvmlSystemGetDriverVersion()
        c = int(pynvml.nvmlSystemGetCudaDriverVersion())
        return (v.decode() if isinstance(v, bytes) else str(v)), f"{c // 1000}.{(c % 1000) // 10}"
    except Exception:  # noqa: BLE001 - an older driver without the call: reported as unknown
        return "unknown", None


_TORCH_PROBE = ("import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
                "'available': torch.cuda.is_available()}))")  # fmt: skip


def torch_info() -> dict[str, object]:
    """torch's version and CUDA build, asked of a child process (imports torch: ~2 s)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=180)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {"version": None, "cuda": None, "available": False}


def check_torch(info: dict[str, object], driver_cuda: str | None) -> Check:
    version, cuda = info.get("version"), info.get("cuda")
    name = "torch CUDA build"
    if version is None:
        return Check(name, False, "torch does not import", "reinstall it: pip install -e .", CPU_SKIPS)
    if not cuda:
        return Check(name, False, f"torch {version} is a CPU build",
                     "install a CUDA build of torch matching the driver (pytorch.org/get-started), e.g. "
                     "pip install torch --index-url https://download.pytorch.org/whl/cu128", CPU_SKIPS)  # fmt: skip
    if driver_cuda and _ver(str(cuda)) > _ver(driver_cuda):
        return Check(name, False, f"torch {version} is built for CUDA {cuda}, the driver supports up to {driver_cuda}",
                     f"update the NVIDIA driver, or install a torch built for CUDA <= {driver_cuda}", CPU_SKIPS)  # fmt: skip
    if not info.get("available"):
        return Check(name, False, f"torch {version} (CUDA {cuda}) sees no usable GPU",
                     "check the driver and CUDA_VISIBLE_DEVICES", CPU_SKIPS)  # fmt: skip
    return Check(name, True, f"torch {version}, CUDA {cuda} (driver supports {driver_cuda or '?'})", "", CPU_SKIPS)


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


def check_nvdiffrast() -> Check:
    name = "nvdiffrast"
    if importlib.util.find_spec("nvdiffrast") is None:
        return Check(name, False, "not installed", 'pip install -e ".[gpu]" (diffrp-nvdiffrast)', CPU_SKIPS)
    root = extensions_dir()
    built = sorted(root.glob("nvdiffrast_plugin*/*.so"))
    if built:
        return Check(name, True, f"built: {built[-1].parent}", "", CPU_SKIPS)
    nvcc = shutil.which("nvcc")
    plan = f"not built yet: the first GPU stage compiles it into {root} (about 30 s, once per machine)"
    if nvcc:
        return Check(name, True, f"{plan} with {nvcc}", "", CPU_SKIPS)
    return Check(name, False, plan + ", but nvcc is not on PATH",
                 "install the CUDA toolkit (nvcc) matching torch's CUDA, or put it on PATH", CPU_SKIPS)  # fmt: skip


def check_weights(weights: Path | None) -> list[Check]:
    """A row per found checkpoint (where, what was verified); the missing ones share one row and one fix."""
    res = resolve(weights)
    rows = []
    for key, found in res.found.items():
        gated = LICENCES[DOWNLOADS[key].licence].needs_acceptance
        fetch = f"up2you-budget weights fetch --only {key}" + (" --accept-smplx-license" if gated else "")
        checks = verify_checkpoint(key, res.root, fix=f"delete it and run {fetch}")
        bad = [v.problem for v in checks if not v.ok]
        how = "/".join(sorted({v.checked for v in checks}))
        known = any(rel in EXPECTED for rel in files_of(key))
        detail = f"{found.location.label}: {found.path} ({how}{'' if known else ', no known hash'})"
        rows.append(Check(f"weights: {key}", not bad, detail, bad[0] if bad else "", "skip"))
    if res.missing:
        gated = any(LICENCES[DOWNLOADS[k].licence].needs_acceptance for k in res.missing)
        looked = ", ".join(f"{loc.label}" for loc in res.looked_in)
        rows.append(Check(f"weights: {len(res.missing)} of {len(CHECKPOINTS)} missing", False,
                          f"{', '.join(res.missing)} (looked in {looked})",
                          "up2you-budget weights fetch" + (" --accept-smplx-license" if gated else ""), "skip"))  # fmt: skip
    return rows


def check_disk(out: Path, weights_folder: Path, weights_missing: bool) -> list[Check]:
    need = DISK_BASE + DISK_PER_VIEW * 20
    rows = []
    for name, folder, want, tiny in (("disk: --out", out, need, "needed"),
                                     ("disk: weights folder", weights_folder, FETCH_BYTES if weights_missing else 0,
                                      "skip")):  # fmt: skip
        probe = Path(folder).resolve()
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        ok = free >= want
        rows.append(Check(name, ok, f"{free / 1e9:.1f} GB free in {probe}" + (f", needs {want / 1e9:.1f} GB" if want else ""),
                          "" if ok else "free space there, or choose another folder (--out, or weights fetch --to)",
                          tiny))  # fmt: skip
    return rows


def check_ram() -> Check:
    vm = psutil.virtual_memory()
    peak = host_peak_bytes()
    ok = vm.available >= peak
    return Check("host RAM", ok, f"{gib(vm.available)} available of {gib(vm.total)}; a 20-view run peaks near {gib(peak)}",
                 "" if ok else "close other programs, or run with --views 6 (less host memory per stage)")  # fmt: skip


def check_ffmpeg() -> Check:
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        return Check("ffmpeg (videos)", True, exe)
    except Exception as exc:  # noqa: BLE001 - any failure means no ffmpeg for the videos
        system = shutil.which("ffmpeg")
        if system:
            return Check("ffmpeg (videos)", True, system)
        return Check("ffmpeg (videos)", False, f"none found ({type(exc).__name__})",
                     "pip install imageio-ffmpeg, or install ffmpeg")  # fmt: skip


def run_checks(out: Path, weights: Path | None) -> list[Check]:
    gpu_rows, _, driver_cuda = check_gpus()
    rows = gpu_rows + [check_torch(torch_info(), driver_cuda), check_nvdiffrast()]
    weight_rows = check_weights(weights)
    rows += weight_rows
    rows += check_disk(out, folder_candidates(weights)[0].path, any(not r.ok for r in weight_rows))
    rows += [check_ram(), check_ffmpeg(), check_bytecode()]
    return rows


def check_bytecode(packages: Sequence[str] = bytecode.STAGE_PACKAGES) -> Check:
    """Whether the stage processes import from bytecode (orchestrator.bytecode); a run starts either way."""
    ok, detail, fix = bytecode.summary(bytecode.survey(packages))
    return Check("bytecode (start-up)", ok, detail, fix, blocking=False)


def ready(rows: list[Check]) -> bool:
    return all(r.ok for r in rows if r.blocking)


def table(rows: list[Check]) -> Table:
    t = Table(title="up2you-budget doctor", show_lines=False, expand=True)
    for col, ratio in (("check", 2), ("", 0), ("detail / fix", 6), ("--tiny", 0)):
        t.add_column(col, overflow="fold", ratio=ratio or None, no_wrap=not ratio)
    for r in rows:
        mark = "[green]ok[/green]" if r.ok else "[red]FIX[/red]" if r.blocking else "[yellow]slow[/yellow]"
        text = escape(r.detail) if r.ok else f"{escape(r.detail)}\n[bold]fix:[/bold] {escape(r.fix)}"
        t.add_row(escape(r.name), mark, text, r.tiny)
    return t


def summary(rows: list[Check]) -> str:
    if ready(rows):
        return "ready: a real run can start (up2you-budget photos/)"
    bad = [r.name for r in rows if not r.ok and r.blocking]
    return (f"not ready: {len(bad)} check(s) to fix ({', '.join(bad)}). A --tiny smoke test skips "
            f"{SKIPPED_BY_TINY}; {SKIPPED_BY_TINY_CPU}: `up2you-budget demo` runs one now")  # fmt: skip
