"""`up2you-budget ray-worker`: join a Ray cluster with one raylet per GPU of this host.

Ray's custom resources are per node and nothing enforces them (shared/research/multitenancy.md,
lesson 5): a node with two 80 GB GPUs advertising `vram_gib: 160` would accept a 60 GiB task when
neither GPU has 60 GiB. So each GPU gets its own raylet, started with CUDA_VISIBLE_DEVICES set to that
GPU alone, `--num-gpus=1` and `vram_gib` = that GPU's memory: a task asking for `vram_gib: X` beside a
fraction of one GPU then lands where one GPU has X. Inside the task the host ledger still decides.

Pure command building here (testable without Ray); `start_raylets` runs the commands.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.probe import GpuInfo

VRAM_RESOURCE = "vram_gib"
HEADROOM_BYTES = 2**29  # 0.5 GiB of each card that no task is promised (driver reserve, allocator rounding)
# each raylet on the host needs ports of its own; these bases are Ray's defaults, shifted per GPU
DASHBOARD_AGENT_PORT = 52365
WORKER_PORT_BASE = 10002
WORKER_PORTS_PER_RAYLET = 1000


@dataclass(frozen=True)
class Raylet:
    gpu: GpuInfo
    env: dict[str, str]  # set for the raylet only
    cmd: list[str]

    def shell(self) -> str:
        """The same command as a person would type it."""
        return " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()) + " " + shlex.join(self.cmd)


def vram_gib(gpu: GpuInfo) -> float:
    """What a raylet advertises for this GPU: its memory less HEADROOM_BYTES, in GiB rounded down to 0.1."""
    return max(0, int((gpu.total - HEADROOM_BYTES) * 10 / 2**30)) / 10


def raylets(gpus: Sequence[GpuInfo], address: str, cpus: int | None = None) -> list[Raylet]:
    """One `ray start` per GPU: that GPU only, one GPU, its vram_gib, its own ports, a share of the cores."""
    share = max(1, (cpus or os.cpu_count() or 1) // max(1, len(gpus)))
    out = []
    for i, g in enumerate(gpus):
        low = WORKER_PORT_BASE + i * WORKER_PORTS_PER_RAYLET
        cmd = ["ray", "start", f"--address={address}", "--num-gpus=1", f"--num-cpus={share}",
               f"--resources={json.dumps({VRAM_RESOURCE: vram_gib(g)})}",
               f"--dashboard-agent-listen-port={DASHBOARD_AGENT_PORT + i}",
               f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS_PER_RAYLET - 1}"]  # fmt: skip
        out.append(Raylet(g, {"CUDA_VISIBLE_DEVICES": g.cuda_visible_id, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, cmd))
    return out


def nvml_index(ray_gpu_ids: Sequence[object], gpus: Sequence[GpuInfo]) -> int | None:
    """The NVML index of the GPU Ray gave a task: its id is a UUID (one raylet per GPU, as started here)
    or a CUDA ordinal, which is the NVML index under CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if not ray_gpu_ids:
        return None
    rid = str(ray_gpu_ids[0])
    for g in gpus:
        if g.uuid and g.uuid == rid:
            return g.index
    if rid.isdigit():
        return int(rid)
    return None


def start_raylets(plan: Sequence[Raylet]) -> int:
    """Run each `ray start` (they daemonise); the first failure's exit code, or 0."""
    for r in plan:
        proc = subprocess.run(r.cmd, env={**os.environ, **r.env})
        if proc.returncode != 0:
            return proc.returncode
    return 0
