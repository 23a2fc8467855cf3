"""The Ray backend: each subject is one Ray task; on the worker the same job command runs as on a host.

Placement is Ray's, by GPU memory: a task asks for its plan's peak in the custom resource `vram_gib`
beside a fraction of one GPU (1 / --jobs-per-gpu, or 1/AUTO_JOBS_PER_GPU with auto), and lands on a
raylet that has that much (`up2you-budget ray-worker` starts one raylet per GPU; see ray_worker.py).
On the worker the task starts `up2you-budget FOLDER --gpu INDEX --out OUT ...`: the same runner, the
same stage processes and disk hand-off, the same host ledger, and our own out-of-memory recovery
(re-plan on the worker). Ray retries a task only when its worker died (`max_retries`, never
`retry_exceptions`); the rerun resumes from the job folder, so --out must be on storage every node
sees. Subjects are planned on the driver against the largest `vram_gib` a node offers.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import ray

from orchestrator.fleet import resume
from orchestrator.fleet.command import job_command, job_env
from orchestrator.fleet.joblog import JobLog
from orchestrator.fleet.local import LocalJob
from orchestrator.fleet.placement import Slot
from orchestrator.fleet.ray_worker import VRAM_RESOURCE, nvml_index
from orchestrator.fleet.summary import SubjectRecord
from orchestrator.inputs import EXIT_USAGE
from orchestrator.job import JobError, RunOptions
from orchestrator.probe import GpuInfo, ProbeError, default_probe
from orchestrator.runner import AUTO_RESERVE
from stages.spec import EXIT_INTERRUPTED, EXIT_NO_DEVICE

if TYPE_CHECKING:
    from orchestrator.fleet.progress import FleetView
    from orchestrator.fleet.subjects import Subject


class RayKnobs(Protocol):
    """The fleet options this backend reads (orchestrator.fleet.queue.FleetOptions has them)."""

    address: str | None
    jobs_per_gpu: int | None
    worker_retries: int
    poll_s: float


class FleetRun(Protocol):
    """What this backend needs of the queue's run (orchestrator.fleet.queue.Fleet), declared here so that
    the backend does not import the queue that starts it."""

    fleet: RayKnobs
    options: RunOptions
    subjects: Mapping[str, Subject]
    records: list[SubjectRecord]
    fingerprints: dict[str, dict[str, Any]]
    view: FleetView

    def now(self) -> float: ...

    def plan_need(self, rec: SubjectRecord, slot: Slot) -> tuple[int, str] | JobError: ...

AUTO_JOBS_PER_GPU = 8
TASK_FILE = "ray_task.json"  # written by the task when it starts on a worker: where it runs
LOG_NAME = "fleet.log"
GiB = 2**30


def subject_task(folder: str, out: str, options: RunOptions) -> dict[str, Any]:
    """On a worker: run one subject's job on the GPU Ray gave this task; return its exit code and where."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        probe = default_probe(options.device)
        gpus = probe.gpus() if probe is not None else []
    except ProbeError as exc:
        return {"exit_code": EXIT_NO_DEVICE, "host": socket.gethostname(), "gpu": None, "message": str(exc)}
    index = nvml_index(ray.get_gpu_ids(), gpus)
    where = {"host": socket.gethostname(), "gpu": index, "started": time.time()}
    (out_dir / TASK_FILE).write_text(json.dumps(where))
    job = LocalJob(job_command(Path(folder), out_dir, index, options), job_env(), out_dir / LOG_NAME)
    try:
        code = job.popen.wait()
    except KeyboardInterrupt:  # ray.cancel: stop the job's stage cleanly, let it write run.json
        job.interrupt()
        code = job.wait()
    return {**where, "exit_code": code}


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", log_to_driver=False)
    except ConnectionError as exc:
        raise JobError(f"--backend ray: no Ray cluster at {address or 'auto'} ({exc}); start one "
                       "(ray start --head, then up2you-budget ray-worker on each GPU host) or pass --address", EXIT_NO_DEVICE) from None  # fmt: skip


def _largest_vram_gib() -> float:
    sizes = [n["Resources"].get(VRAM_RESOURCE, 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(sizes, default=0.0)


def run_on_ray(fleet: FleetRun, todo: list[SubjectRecord]) -> None:
    """Submit every subject in `todo`, follow them, record how each ended (see the module docstring)."""
    _connect(fleet.fleet.address)
    largest = _largest_vram_gib()
    if largest <= 0:
        raise JobError(f"--backend ray: no live node of the cluster offers the {VRAM_RESOURCE!r} resource; start "
                       "workers with up2you-budget ray-worker (one raylet per GPU)", EXIT_USAGE)  # fmt: skip
    size = int(largest * GiB)
    # a made-up GPU to plan against (its own name in the driver's ledger folder, where nothing reserves)
    gpu = GpuInfo(0, f"a Ray worker's GPU ({largest:g} {VRAM_RESOURCE})", "ray-planning", size, size, 0)
    slot = Slot(0, gpu.name, size, size, size, 0, gpu)
    fraction = 1.0 / (fleet.fleet.jobs_per_gpu or AUTO_JOBS_PER_GPU)
    remote = ray.remote(subject_task)
    refs: dict[Any, tuple[SubjectRecord, JobLog]] = {}
    for rec in todo:
        planned = fleet.plan_need(rec, slot)
        if isinstance(planned, JobError):
            rec.outcome, rec.exit_code, rec.message, rec.ended_s = "failed", planned.exit_code, str(planned), fleet.now()
            continue
        need, rec.plan_label = planned
        rec.need_bytes = need
        ask = math.ceil((need + AUTO_RESERVE) * 10 / GiB) / 10
        resume.mark_started(rec.out_dir)
        (rec.out_dir / TASK_FILE).unlink(missing_ok=True)
        task = remote.options(num_gpus=fraction, resources={VRAM_RESOURCE: ask}, max_retries=fleet.fleet.worker_retries,
                              retry_exceptions=False, name=f"up2you:{rec.subject}")  # fmt: skip
        refs[task.remote(str(fleet.subjects[rec.subject].folder), str(rec.out_dir), fleet.options)] = (
            rec, JobLog(rec.out_dir / LOG_NAME))
        rec.gpu = "queued in Ray"
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=fleet.fleet.poll_s)
            for ref in done:
                rec, log = refs.pop(ref)
                _finish(fleet, rec, log, ref)
            for rec, log in refs.values():
                _follow(fleet, rec, log)
            fleet.view.update(fleet.records, fleet.now())
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)
        for ref, (rec, log) in refs.items():
            _finish(fleet, rec, log, ref)
        raise


def _follow(fleet: FleetRun, rec: SubjectRecord, log: JobLog) -> None:
    """A task that has started on a worker says so in OUT/NAME/ray_task.json; its log gives the stage."""
    if rec.outcome != "running":
        try:
            where = json.loads((rec.out_dir / TASK_FILE).read_text())
        except (OSError, ValueError):
            return
        rec.outcome, rec.started_s = "running", fleet.now()
        rec.gpu = f"{where['host']} GPU {where['gpu']}"
    rec.activity = log.update()


def _finish(fleet: FleetRun, rec: SubjectRecord, log: JobLog, ref: Any) -> None:
    _follow(fleet, rec, log)
    log.update()
    try:
        result = ray.get(ref)
        code = int(result["exit_code"])
        tail = result.get("message") or log.last_line
    except ray.exceptions.TaskCancelledError:
        code, tail = EXIT_INTERRUPTED, "interrupted: cancelled before it ran on a worker"
    except (ray.exceptions.RayError, KeyboardInterrupt) as exc:
        code, tail = 1, f"the Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if rec.started_s is None:
        rec.started_s = fleet.now()
    resume.finish(rec, code, fleet.fingerprints[rec.subject], fleet.now(), tail)
