"""What each stage is, seen from outside: its module, what it reads, what it writes, which knobs
change its result. Torch-free, so the orchestrator can plan and key a run without CUDA.

The cache key of a stage is a hash of (name, version, its knob values, the keys of the stages it
reads): as in a build system, a changed knob invalidates that stage and what depends on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stages.plan import Plan

CPROFILE_ENV = "UP2YOU_CPROFILE"  # comma list of stages whose `run` is profiled (stages.harness)
CPROFILE_FILE = "cprofile.txt"  # written into the stage folder, not an output

# Exit codes: the contract between a stage process and the runner (sysexits.h where one fits).
EXIT_OK = 0
EXIT_BAD_INPUT = 65  # EX_DATAERR: an input photo or artifact is unusable
EXIT_MISSING_WEIGHTS = 66  # EX_NOINPUT: a checkpoint file is missing
EXIT_NO_DEVICE = 69  # EX_UNAVAILABLE: the plan wants CUDA and there is none
EXIT_DISK_FULL = 74  # EX_IOERR: writing an artifact failed (disk full, read-only)
EXIT_OOM = 75  # EX_TEMPFAIL: out of GPU memory; the runner re-plans and retries
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM forwarded by the runner
MAX_PHOTO_PIXELS = 40_000_000  # a photo above this is refused (by the scan, from its header; again by segment)
EXIT_MEANINGS = {
    EXIT_OK: "ok",
    EXIT_BAD_INPUT: "bad input",
    EXIT_MISSING_WEIGHTS: "missing or damaged weights",
    EXIT_NO_DEVICE: "no GPU",
    EXIT_DISK_FULL: "disk full or unwritable",
    EXIT_OOM: "out of GPU memory",
    EXIT_INTERRUPTED: "interrupted",
}


@dataclass(frozen=True)
class StageSpec:
    """A stage as the orchestrator sees it."""

    name: str
    module: str  # run as `python -m <module> JOB_DIR`
    reads: tuple[str, ...] = ()  # names of stages whose outputs it reads
    knobs: tuple[str, ...] = ()  # Plan fields its result depends on
    checkpoints: tuple[str, ...] = ()  # keys of up2you.checkpoints.CHECKPOINTS it loads (profile "real")
    version: int = 1  # bump when the stage's code changes its output
    gpu: bool = True  # whether it uses the GPU at all (CPU-only stages get no memory cap)
    exports: bool = False  # its deliverable files are written by stages.export beside the next stage
    doc: str = ""

    def key(self, plan: Plan, input_keys: Mapping[str, str]) -> str:
        payload = {
            "name": self.name,
            "version": self.version,
            "knobs": plan.knobs(self.knobs + ("profile", "dtype", "weights_dir")),
            "inputs": {k: input_keys[k] for k in self.reads},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of stages; the runner executes them in order."""

    stages: tuple[StageSpec, ...]
    name: str = "up2you"
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.stages:
            missing = [r for r in s.reads if r not in seen and r != "inputs"]
            if missing:
                raise ValueError(f"stage {s.name} reads {missing} before they are produced")
            seen.add(s.name)

    def __getitem__(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def keys(self, plan: Plan, inputs_key: str) -> dict[str, str]:
        """Cache key of every stage, in order; `inputs` is the key of the input photo set."""
        keys: dict[str, str] = {"inputs": inputs_key}
        for s in self.stages:
            keys[s.name] = s.key(plan, keys)
        return keys

    def downstream(self, names: Sequence[str]) -> list[str]:
        """The named stages and every stage that (transitively) reads them."""
        hit = set(names)
        for s in self.stages:
            if any(r in hit for r in s.reads):
                hit.add(s.name)
        return [s.name for s in self.stages if s.name in hit]


_DIFFUSION_KNOBS = (
    "views", "resolution", "steps", "guidance", "seed", "thg_schedule", "thg_interval",
)  # fmt: skip
# cfg_mode, vae_mode, offload, ref_chunk and mesh_view_chunk are exact rewrites: they change memory,
# not results beyond float rounding, so they are not part of the key (a retry with sequential CFG
# keeps the finished earlier stages and need not recompute anything but the failed stage).

UP2YOU = Pipeline(
    stages=(
        StageSpec("segment", "stages.segment", reads=("inputs",), checkpoints=("birefnet",),
                  doc="BiRefNet matte, crop to a 1024 canvas (0.925), composite on gray, 768 px"),
        StageSpec("features", "stages.features", reads=("segment",),
                  checkpoints=("dinov2", "shape_predictor"),
                  doc="DINOv2 ViT-L/14 patch tokens at 518 px + SMPL-X betas"),
        StageSpec("apose", "stages.apose", reads=("features",), knobs=("views", "resolution"),
                  checkpoints=("smplx",), doc="SMPL-X A-pose normal renders at N yaws"),
        StageSpec("weights", "stages.weights", reads=("segment", "features", "apose"), knobs=("views",),
                  checkpoints=("feature_aggregator",), doc="per-view reference weight maps (PCFA)"),
        StageSpec("rgb", "stages.rgb", reads=("segment", "apose", "weights"), knobs=_DIFFUSION_KNOBS,
                  checkpoints=("sd21", "rgb_adapter", "birefnet"), exports=True, doc="multi-view RGB diffusion"),
        StageSpec("normal", "stages.normal", reads=("apose", "rgb"), knobs=_DIFFUSION_KNOBS,
                  checkpoints=("sd21", "normal_adapter", "birefnet"), exports=True,
                  doc="multi-view normal diffusion"),
        StageSpec("mesh", "stages.mesh", reads=("apose", "rgb", "normal"),
                  knobs=("views", "mesh_iters", "mesh_resolution"), checkpoints=("smplx", "mano_ids", "smplx_lmkid"),
                  version=2, exports=True,  # v2: upstream's colour weights at the six training views
                  doc="continuous remeshing from SMPL-X, hands, Poisson, vertex colours"),
        StageSpec("video", "stages.video", reads=("mesh", "rgb", "normal"),
                  knobs=("video_frames", "video_resolution"), doc="turntable video and contact sheet"),
    )
)
