"""The stage runtime: the one place that turns a stage's `prepare`/`run` into a well-behaved process.

Every stage module ends with ``if __name__ == "__main__": stage_main(NAME, run, prepare)`` and is
started by the runner as ``python -m stages.<name> JOB_DIR --weights DIR --profile P [--prestart]``.

What the harness guarantees, so that stages need not:
- **pre-start**: with ``--prestart`` it imports, runs ``prepare`` (weights into host memory, no
  CUDA context), starts the CUDA driver (a device count: no context, no GPU memory), prints ``ready`` and
  blocks on stdin until the runner writes ``go`` — start-up overlaps the previous stage while isolation
  is kept (a context, and so GPU memory, only after ``go``);
- **memory cap**: ``torch.cuda.set_per_process_memory_fraction`` to the budget in the request;
- **a CPU plan never touches CUDA** (the runner's CPU fallback hands a process spawned with a GPU
  visible a plan with ``device="cpu"``): no context, no cap, and the GPUs are hidden before anything
  could create a context;
- **fault injection**: ``UP2YOU_FAULTS=rgb:oom:1`` raises a real ``torch.cuda.OutOfMemoryError``
  in stage ``rgb`` on attempts <= 1 (kinds: ``oom``, ``oom_runtime``, ``crash``, ``sleep``,
  ``enospc`` (the first output write fails: disk full), ``linger`` (``rgb:linger:1:3``: exit 3 s after
  ``done``), ``pause`` (``rgb:pause:1:write``: stop at a named point — prepare, start, write, manifest,
  end — touch ``$UP2YOU_FAULT_MARKER`` and wait, so a test can kill the orchestrator at that moment));
- **same seed, same bytes**: the global RNGs (torch, numpy, random) start from the plan's seed;
- **exit codes** (stages.spec): OOM in any of its disguises -> 75, bad input -> 65, missing
  weights -> 66, no GPU -> 69, disk full -> 74, SIGINT/SIGTERM -> 130; an ``error.msgpack`` says why;
- **atomic outputs and the manifest** written last, with timings and torch's peak; then ``done`` on
  stdout, so the runner can start the next stage while this process's CUDA context is torn down.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import hashlib
import importlib
import io
import os
import pickle
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

T0 = time.time()

import numpy as np  # noqa: E402

from stages import export  # noqa: E402
from stages.jobfs import JobDir, atomic_path, remember_digest, shown  # noqa: E402
from stages.plan import Plan  # noqa: E402
from stages.spec import (  # noqa: E402
    CPROFILE_ENV,
    CPROFILE_FILE,
    EXIT_BAD_INPUT,
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_MISSING_WEIGHTS,
    EXIT_NO_DEVICE,
    EXIT_OK,
    EXIT_OOM,
)
from up2you import checkpoints  # noqa: E402

if TYPE_CHECKING:
    import torch


def _torch() -> Any:
    """torch, imported where the harness first needs it. Every stage but one imports it at its own top; segment
    does not when each photo brings its alpha, and its process then starts without torch's import (segment's
    import: 1.6-2.4 s with torch, 0.11-0.22 s without, lent H200, torch 2.11, 2026-12-03; the first stage, so
    nothing hides its start-up)."""
    import torch

    return torch


def _torch_if_imported() -> Any:
    """torch if this process has imported it, else None: what never made a context or tensor needs no clean-up."""
    return sys.modules.get("torch")


FAULTS_ENV = "UP2YOU_FAULTS"
FAULT_MARKER_ENV = "UP2YOU_FAULT_MARKER"
PAUSE_LIMIT_S = 120.0  # a paused stage nobody kills goes on after this


class BadInputError(ValueError):
    """An input (photo or upstream artifact) cannot be used; the message names it and the fix."""


_OOM_MARKERS = (
    "out of memory",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "cuda_error_out_of_memory",
    "failed to allocate",
)


def is_oom(exc: BaseException) -> bool:
    """True for every way an out-of-memory reaches Python: torch's own error, and the RuntimeErrors
    that CUDA, cuBLAS, cuDNN and nvdiffrast raise for failed allocations."""
    torch = _torch_if_imported()
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(m in msg for m in _OOM_MARKERS)
    return False


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def png_bytes(image: np.ndarray | torch.Tensor) -> bytes:
    """HxWxC (or CxHxW tensor) in [0,1] float or uint8, encoded as PNG."""
    if not isinstance(image, np.ndarray):  # a tensor: torch is imported
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    return export.png_bytes(image)


def import_ahead(*modules: str) -> None:
    """Import, in `prepare`, modules that `run` needs: a pre-started stage then pays them while the stage
    before it runs, not after `go`. Pure-Python imports only (no CUDA before `go`); a module that is not
    installed is left for `run` to report or fall back from."""
    for module in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


class StageContext:
    """What a stage sees: its plan, device, inputs and a safe way to write outputs."""

    def __init__(self, job_dir: Path, name: str, weights_dir: str, profile: str) -> None:
        self.job = JobDir(job_dir)
        self.name = name
        self.weights_dir = Path(weights_dir) if weights_dir else Path()
        self.profile = profile
        self.request: dict[str, Any] = {}
        self.plan = Plan(profile=profile, weights_dir=str(weights_dir), device="cpu")
        self.attempt = 0
        self.cap_bytes: int | None = None
        self._outputs: list[str] = []
        self._extras: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._device_ready = False

    # set once the request has arrived -----------------------------------------------------
    def _load_request(self) -> None:
        self.request = self.job.read_request(self.name)
        self.plan = Plan.from_dict(self.request["plan"])
        self.attempt = int(self.request.get("attempt", 1))
        self.cap_bytes = self.request.get("cap_bytes")

    @property
    def device(self) -> torch.device:
        return _torch().device(self.plan.device)

    @property
    def device_type(self) -> str:
        """"cuda" or "cpu", without importing torch."""
        return self.plan.device.split(":")[0]

    def use_device(self) -> torch.device:
        """The plan's device with its memory cap applied (once). The harness does this before `run`, except for a
        stage started with lazy_device, which calls it only when it does touch the GPU."""
        self._apply_cap_once()
        return self.device

    def _apply_cap_once(self) -> None:
        if not self._device_ready:
            _apply_cap(self)
            self._device_ready = True

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: the plan's on GPU, float32 on CPU (half precision on CPU is slow and partial)."""
        torch = _torch()
        if self.device_type != "cuda":
            return torch.float32
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.plan.dtype]

    @property
    def n_refs(self) -> int:
        return len(self.job.read_inputs()["photos"])

    def input_photos(self) -> list[Path]:
        return [Path(os.fsdecode(p["path"])) for p in self.job.read_inputs()["photos"]]

    # weights ------------------------------------------------------------------------------
    def ckpt(self, key: str) -> Path:
        """Path of a released checkpoint; raises MissingWeightsError naming the file and its source."""
        miss = checkpoints.missing(self.weights_dir, [key])
        if miss:
            raise checkpoints.MissingWeightsError(miss)
        return checkpoints.resolve(self.weights_dir, key)

    # artifacts ----------------------------------------------------------------------------
    def read_path(self, stage: str, name: str) -> Path:
        p = self.job.path(stage, name)
        if not p.exists():
            raise BadInputError(f"{p} is missing: stage '{stage}' has not produced it; rerun to recompute it")
        return p

    def load_tensors(self, stage: str, name: str = "outputs.safetensors") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.read_path(stage, name)))

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor] | dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> Path:
        """Write safetensors atomically; its sha256 (for the manifest) is taken from the bytes in memory while they
        are written, instead of reading the file back afterwards (0.1 s for rgb's 188 MB). numpy arrays are
        written without torch, in the same format (the same bytes as their tensors: tested)."""
        if all(isinstance(v, np.ndarray) for v in tensors.values()):
            from safetensors.numpy import save as save_arrays

            data = save_arrays({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
        else:
            from safetensors.torch import save

            data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
        with ThreadPoolExecutor(1) as pool:  # hashlib lets go of the GIL on large buffers
            digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
            with self.write_file(name) as tmp:
                tmp.write_bytes(data)
            path = self.job.path(self.name, name)
            remember_digest(path, digest.result())
        return path

    def save_image(self, name: str, image: np.ndarray | torch.Tensor) -> Path:
        """Save HxWxC (or CxHxW tensor) in [0,1] float or uint8 as PNG."""
        return self.save_images([(name, image)])[0]

    def save_images(self, items: Sequence[tuple[str, np.ndarray | torch.Tensor]]) -> list[Path]:
        """Save several PNGs: encoded side by side in threads (zlib lets go of the GIL; 20 views at 768 px
        are seconds one after another), then written one by one, in order, each atomically."""
        with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
            encoded = list(pool.map(png_bytes, [image for _, image in items]))
        paths = []
        for (name, _), data in zip(items, encoded, strict=True):
            with self.write_file(name) as tmp:
                tmp.write_bytes(data)
            paths.append(self.job.path(self.name, name))
        return paths

    @contextlib.contextmanager
    def write_file(self, name: str) -> Iterator[Path]:
        """Atomic write of an output file named `name` inside this stage's folder."""
        with atomic_path(self.job.path(self.name, name)) as tmp:
            yield tmp
            _fault_point(self.name, "write", self.attempt)  # written to the temporary name, not yet renamed
        if name not in self._outputs:
            self._outputs.append(name)

    def record(self, **kv: Any) -> None:
        """Add facts to the manifest (NFE used, iterations, vertex counts ...)."""
        self._extras.update(kv)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a phase of `run` into the manifest's timings as `<phase>_s` (the GPU's queue drained at both
        ends, so the time is the phase's own, not the phase before it still running)."""
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.timings[f"{phase}_s"] = round(time.perf_counter() - t, 4)

    def _sync(self) -> None:
        torch = _torch_if_imported()
        if self.device_type == "cuda" and torch is not None and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)

    def free_memory(self) -> None:
        gc.collect()
        torch = _torch_if_imported()
        if torch is not None and torch.cuda.is_initialized():  # never the first CUDA call: a CPU stage must create none
            torch.cuda.empty_cache()


def _faults(name: str, attempt: int) -> Iterator[list[str]]:
    """The UP2YOU_FAULTS items (split on ':') that apply to this stage and attempt."""
    spec = os.environ.get(FAULTS_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) >= 2 and parts[0] == name and attempt <= (int(parts[2]) if len(parts) > 2 else 1):
            yield parts


_paused: set[str] = set()


def _fault_point(name: str, point: str, attempt: int) -> None:
    """`pause` and `enospc` faults: act at a named point of the stage's life (each at most once a process)."""
    for parts in _faults(name, attempt):
        at = parts[3] if len(parts) > 3 else "write"
        if at != point or f"{parts[1]}:{at}" in _paused:
            continue
        _paused.add(f"{parts[1]}:{at}")
        if parts[1] == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULTS_ENV})")
        if parts[1] == "pause":
            marker = os.environ.get(FAULT_MARKER_ENV)
            if marker:
                Path(marker).write_text(f"{name}:{point} {os.getpid()}\n")
            time.sleep(PAUSE_LIMIT_S)


def _seed_everything(seed: int) -> None:
    """Code that draws from the global RNGs (e.g. remeshing's random edge picks) repeats with the plan. torch's
    too, when the stage has imported it by now (all but segment, which imports it later only to matte, and
    draws no random numbers)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = _torch_if_imported()
    if torch is not None:
        torch.manual_seed(seed)


def _inject_fault(name: str, attempt: int) -> None:
    spec = os.environ.get(FAULTS_ENV, "")
    for parts in _faults(name, attempt):
        kind = parts[1]
        if kind == "oom":
            raise _torch().cuda.OutOfMemoryError(
                f"CUDA out of memory (injected by {FAULTS_ENV}={spec!r}, attempt {attempt})")
        if kind == "oom_runtime":
            raise RuntimeError(f"CUDA error: out of memory (injected, attempt {attempt})")
        if kind == "crash":
            raise RuntimeError(f"injected crash (attempt {attempt})")
        if kind == "sleep":
            time.sleep(float(parts[3]) if len(parts) > 3 else 3600.0)


def _linger(name: str, attempt: int) -> None:
    """`linger` fault (``rgb:linger:1:2``): stay alive that many seconds after `done`, as a process whose
    CUDA teardown is slow does (the runner must keep its reservation until it is gone)."""
    for parts in _faults(name, attempt):
        if parts[1] == "linger":
            time.sleep(float(parts[3]) if len(parts) > 3 else 1.0)


def _give_back_cached_memory() -> None:
    """Before the manifest and `done`: torch's cached blocks and cuBLAS's workspaces go back to the driver, so that
    NVML lists only what this process cannot give back before its exit: the CUDA context and the kernels loaded into
    it, a library's own buffers (0.70-0.84 GiB at `done` on the lent H200, torch 2.11.0+cu130, 2026-12-03, with the
    cache emptied; a bare context is 0.68). The runner counts that, not the whole reservation, when it asks whether
    the next stage fits beside this one. Never fails the stage."""
    torch = _torch_if_imported()
    if torch is not None and torch.cuda.is_initialized():
        with contextlib.suppress(Exception):
            clear_blas = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # a CUDA build's; kept alive, not cached
            if clear_blas is not None:
                clear_blas()
            torch.cuda.empty_cache()


def _start_cuda_driver(lazy_device: bool) -> None:
    """Start the CUDA driver while the process waits for `go`: torch's device count (0.18-0.19 s on the lent H200,
    `benchmarks/cuda_init_cost.py`) makes no context and takes no GPU memory, so only the context (0.13-0.16 s) is
    left for the set-up after `go`. Skipped where the GPUs are hidden, and in a lazy-device stage that has not
    imported torch (it may need neither); never fails the stage."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or (lazy_device and _torch_if_imported() is None):
        return
    with contextlib.suppress(Exception):
        _torch().cuda.is_available()


def _make_cuda_context(device: str, lazy_device: bool) -> float:
    """On `warm`: make the CUDA context on `device` while the stage before still runs, so that the set-up after
    `go` no longer pays for it (0.12-0.20 s a stage on the lent H200, torch 2.11.0+cu130, 2026-12-03). No memory is
    allocated: the allocator cap comes with the request at `go`. Skipped in a lazy-device stage (it may need no
    GPU) and where the GPUs are hidden; never fails the stage. Returns the seconds it took."""
    t = time.time()
    if lazy_device or os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not device.startswith("cuda"):
        return 0.0
    with contextlib.suppress(Exception):
        torch = _torch()
        if torch.cuda.is_available():
            torch.cuda.set_device(device)
            torch.cuda.synchronize(device)  # a context for certain, whatever set_device does lazily
    return time.time() - t


def _apply_cap(ctx: StageContext) -> None:
    if ctx.device_type != "cuda":
        torch = _torch_if_imported()
        if torch is None or not torch.cuda.is_initialized():  # spawned seeing the GPU, no context yet: hide it
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    torch = _torch()
    if not torch.cuda.is_available():
        raise _NoDevice(f"the plan runs on {ctx.plan.device} but torch sees no CUDA GPU; use --device cpu --tiny")
    torch.cuda.set_device(ctx.device)
    if ctx.cap_bytes:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, ctx.cap_bytes / total)), ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)


class _NoDevice(RuntimeError):
    pass


def _peaks(ctx: StageContext) -> dict[str, int]:
    torch = _torch_if_imported()
    if ctx.device_type == "cuda" and torch is not None and torch.cuda.is_initialized():  # a lazy stage, no GPU used
        return {
            "torch_peak_allocated": int(torch.cuda.max_memory_allocated(ctx.device)),
            "torch_peak_reserved": int(torch.cuda.max_memory_reserved(ctx.device)),
        }
    return {"torch_peak_allocated": 0, "torch_peak_reserved": 0}


@contextlib.contextmanager
def _profiled(ctx: StageContext) -> Iterator[None]:
    """With the stage named in $UP2YOU_CPROFILE (comma list), run `run` under cProfile and write the
    40 costliest calls (cumulative) to `cprofile.txt` in the stage folder: host time a GPU trace misses."""
    if ctx.name not in os.environ.get(CPROFILE_ENV, "").split(","):
        yield
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        ctx.job.path(ctx.name, CPROFILE_FILE).write_text(text.getvalue())


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stage_main(
    name: str,
    run: Callable[[StageContext, Any], None],
    prepare: Callable[[StageContext], Any] | None = None,
    argv: list[str] | None = None,
    lazy_device: bool = False,
) -> None:
    """Entry point of every stage process. Never returns: exits with the contract's code.

    lazy_device: a GPU plan's CUDA context and memory cap wait for the stage's own `ctx.use_device()`, for a
    stage that may not need the GPU at all (segment, when every photo has its alpha: 0.2-0.35 s of set-up)."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    ap.add_argument("job_dir")
    ap.add_argument("--weights", default="")
    ap.add_argument("--profile", default="real")
    ap.add_argument("--prestart", action="store_true", help="prepare, print 'ready', wait for 'go' on stdin")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    ctx = StageContext(Path(args.job_dir), name, args.weights, args.profile)
    t_import = time.time() - _process_start()
    code = EXIT_OK
    phase = "prepare"
    try:
        t = time.time()
        prepared = prepare(ctx) if prepare else None
        ctx.timings["prepare_s"] = time.time() - t
        _fault_point(name, "prepare", 1)
        if args.prestart:
            t = time.time()
            _start_cuda_driver(lazy_device)
            ctx.timings["driver_s"] = time.time() - t
            print(f"ready {time.time() - T0:.3f}", flush=True)
            t = time.time()
            line = sys.stdin.readline().strip()
            if line.startswith("warm "):  # the runner claimed a context's memory for us while the stage before runs
                ctx.timings["warm_s"] = _make_cuda_context(line.removeprefix("warm "), lazy_device)
                line = sys.stdin.readline().strip()
            ctx.timings["wait_s"] = time.time() - t
            if line != "go":
                sys.exit(EXIT_OK)  # the runner no longer needs this process
        phase = "run"
        t_go = time.time()
        ctx._load_request()
        ctx.job.clear_error(name)
        ctx.job.sweep_temporaries(name)  # what a killed earlier attempt left half-written
        if not lazy_device or ctx.device_type != "cuda":  # a CPU plan still hides the GPUs here
            ctx._apply_cap_once()
        _seed_everything(ctx.plan.seed)
        _fault_point(name, "start", ctx.attempt)
        _inject_fault(name, ctx.attempt)
        t = time.time()
        ctx.timings["setup_s"] = t - t_go  # after `go`, before the work: request, CUDA context, memory cap
        with _profiled(ctx):
            run(ctx, prepared)
        ctx._sync()
        _fault_point(name, "manifest", ctx.attempt)
        ctx.timings["run_s"] = time.time() - t
        ctx.timings["import_s"] = t_import
        t = time.time()
        _give_back_cached_memory()
        ctx.timings["give_back_s"] = time.time() - t
        manifest = {
            "stage": name,
            "key": ctx.request.get("key", ""),
            "attempt": ctx.attempt,
            "plan": ctx.plan.to_dict(),
            "outputs": list(ctx._outputs),
            "timings": ctx.timings,
            "process_started_at": T0,  # wall clock when this process began importing (pre-start: long before go)
            "device": ctx.plan.device,
            "cap_bytes": ctx.cap_bytes,
            "extras": ctx._extras,
            **_peaks(ctx),
        }
        ctx.job.write_manifest(name, manifest)
        _fault_point(name, "end", ctx.attempt)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the contract maps every failure to a code
        code, kind = _classify(exc)
        msg = shown(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        if code == EXIT_DISK_FULL:
            msg += f"; free space where {ctx.job.root} is (or pass --out on another disk) and rerun: finished stages are kept"
        if code == 1:
            traceback.print_exc()
        print(f"[{name}] {kind}: {msg}", file=sys.stderr, flush=True)
        if phase == "prepare" and args.prestart and code != EXIT_INTERRUPTED:
            # a pre-started stage failed while the previous one runs: report it when it is this stage's turn,
            # since the runner clears error.msgpack before `go`; dismissed (no `go`): nobody needs the answer
            line = sys.stdin.readline().strip()
            if line.startswith("warm "):  # no context for a stage that cannot run: wait for its turn to say why
                line = sys.stdin.readline().strip()
            if line != "go":
                os._exit(EXIT_OK)
            with contextlib.suppress(Exception):
                ctx._load_request()
        with contextlib.suppress(Exception):
            if phase == "run" or code != EXIT_INTERRUPTED:
                ctx.job.write_error(name, {
                    "stage": name, "kind": kind, "exit_code": code, "message": msg,
                    "attempt": ctx.attempt, "cap_bytes": ctx.cap_bytes, "phase": phase,
                    "missing": [list(m) for m in getattr(exc, "items", [])], **_peaks(ctx),
                })
    if code == EXIT_OK:  # the work is all on disk: the runner may hand the GPU on while this process tears down
        with contextlib.suppress(OSError, KeyboardInterrupt):  # a parent gone or stopping: the exit is the same
            print(f"done {time.time() - T0:.3f}", flush=True)
            _linger(name, ctx.attempt)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: CUDA memory is returned by the driver at once


def _classify(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if is_oom(exc):
        return EXIT_OOM, "oom"
    if isinstance(exc, checkpoints.MissingWeightsError):
        return EXIT_MISSING_WEIGHTS, "missing_weights"
    if isinstance(exc, (checkpoints.DamagedWeightsError, pickle.UnpicklingError)):
        return EXIT_MISSING_WEIGHTS, "damaged_weights"
    if isinstance(exc, BadInputError):
        return EXIT_BAD_INPUT, "bad_input"
    if isinstance(exc, _NoDevice):
        return EXIT_NO_DEVICE, "no_device"
    if _is_disk_full(exc):
        return EXIT_DISK_FULL, "disk_full"
    return 1, "bug"


def _process_start() -> float:
    """When this process began, on time.time()'s clock: the lifeline launcher's note of it, else psutil's
    create_time (derived from the boot time in whole seconds: up to ~1 s off, as measured on the H200)."""
    from stages.lifeline import STARTED_ENV

    noted = os.environ.pop(STARTED_ENV, "")
    with contextlib.suppress(ValueError):
        if noted:
            return float(noted)
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # pragma: no cover
        return T0
