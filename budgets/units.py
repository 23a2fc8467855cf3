"""The units both models count in (memory, budgets.table; time, budgets.timing): image area relative to one
reference image, and the provenance a coefficient may have."""

from __future__ import annotations

from stages.plan import Plan

KINDS = ("measured", "derived")  # a coefficient was measured on a GPU, or derived from measured ones
REF_RES = 768  # diffusion features are in units of one 768 px image
RENDER_RES = 1024  # rasterisation features are in units of one 1024 px frame


def res2(plan: Plan) -> float:
    """The plan's diffusion image area in 768 px images."""
    return (plan.resolution / REF_RES) ** 2


def render_px(resolution: int) -> float:
    """A rasterised frame's area in 1024 px frames."""
    return (resolution / RENDER_RES) ** 2
