"""Test stages: real processes on stages.harness that allocate real (CPU) tensors and write real outputs.

`FAKE` is a four-stage pipeline shaped like UP2You's (inputs -> per-photo prep -> per-view renders ->
a diffusion-like stage keyed on the diffusion knobs -> a mesh), with its own budget table, so the
runner is tested without the real models. For timing tests, FAKE_RUN_S="views=6" makes a stage's run
take that long.
"""

from __future__ import annotations

from pathlib import Path

from stages.spec import Pipeline, StageSpec

TABLE_PATH = Path(__file__).parent / "fake-v1.json"
_DIFFUSION_KNOBS = ("views", "resolution", "steps", "guidance", "seed", "thg_schedule", "thg_interval")

FAKE = Pipeline(
    name="fake",
    stages=(
        StageSpec("prep", "tests.fakestages.prep", reads=("inputs",)),
        StageSpec("views", "tests.fakestages.views", reads=("prep",), knobs=("views", "resolution")),
        StageSpec("rgb", "tests.fakestages.rgb", reads=("prep", "views"), knobs=_DIFFUSION_KNOBS, exports=True),
        StageSpec("mesh", "tests.fakestages.mesh", reads=("views", "rgb"), knobs=("views",)),
    ),
)
