"""The Plan: every knob a run depends on, chosen by the planner, read by the stages.

A stage never decides its own knobs; it reads them from the Plan the runner hands it.
Torch-free: the orchestrator builds Plans on machines without CUDA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VIEW_CHOICES = (20, 12, 6)
RESOLUTION_CHOICES = (768, 512)
CFG_MODES = ("batched", "sequential")
VAE_MODES = ("batched", "sliced", "tiled")
OFFLOAD_MODES = ("none", "model", "sequential")
THG_SCHEDULES = ("off", "fixed", "paper")
PROFILES = ("real", "tiny", "full-random")
DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Plan:
    """All knobs of one run. Frozen and flat so it hashes, diffs and serialises trivially."""

    # quality knobs (the planner degrades these last: views, then resolution)
    views: int = 20
    resolution: int = 768
    steps: int = 50
    guidance: float = 3.0
    seed: int = 42
    # guidance schedule (Tortoise-and-Hare Guidance, Lee et al., NeurIPS 2025, arXiv:2511.04117)
    thg_schedule: str = "fixed"
    thg_interval: int = 3
    # memory-only knobs (exact or near-exact: the planner uses these before losing quality)
    cfg_mode: str = "batched"
    vae_mode: str = "sliced"
    offload: str = "none"
    ref_chunk: int = 4  # reference photos per chunk in the reference-UNet pass
    dtype: str = "fp16"
    # geometry
    mesh_iters: int = 700
    mesh_resolution: int = 1024
    mesh_view_chunk: int = 0  # views rendered per batch in the mesh fit, 0 = all (memory only: exact)
    video_frames: int = 64
    video_resolution: int = 1024
    video_chunk: int = 8  # frames rasterised per batch
    # where and with what
    device: str = "cuda:0"
    profile: str = "real"
    weights_dir: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(self.cfg_mode in CFG_MODES, f"cfg_mode {self.cfg_mode!r} not in {CFG_MODES}")
        _check(self.vae_mode in VAE_MODES, f"vae_mode {self.vae_mode!r} not in {VAE_MODES}")
        _check(self.offload in OFFLOAD_MODES, f"offload {self.offload!r} not in {OFFLOAD_MODES}")
        _check(self.thg_schedule in THG_SCHEDULES, f"thg_schedule {self.thg_schedule!r} not in {THG_SCHEDULES}")
        _check(self.profile in PROFILES, f"profile {self.profile!r} not in {PROFILES}")
        _check(self.dtype in DTYPES, f"dtype {self.dtype!r} not in {DTYPES}")
        _check(self.views >= 1 and self.resolution % 64 == 0, "views >= 1 and resolution a multiple of 64")
        _check(self.thg_interval >= 1 and self.steps >= 1, "thg_interval and steps >= 1")
        _check(self.mesh_view_chunk >= 0, "mesh_view_chunk >= 0 (0 = all views at once)")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def latent(self) -> int:
        return self.resolution // 8

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = [list(kv) for kv in self.extra]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["extra"] = tuple(tuple(kv) for kv in kw.get("extra", ()))
        return cls(**kw)

    def knobs(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The values of the named knobs: what a stage's cache key depends on."""
        return {n: getattr(self, n) for n in names}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)
