"""Classifier-free guidance schedules: plain CFG and Tortoise-and-Hare Guidance (THG).

THG: Lee, Pak, Hong, Kim, "Tortoise and Hare Guidance: Accelerating Diffusion Model Inference with
Multirate Integration", NeurIPS 2025, arXiv:2511.04117. CFG is split as eps = eps_c + (s-1)*Delta with
Delta = eps_c - eps_u: the conditional term is integrated every step (tortoise), the guidance term on a
coarse grid (hare). For a first-order solver such as DDPM the step is affine in eps, so THG reduces to
holding Delta between refresh steps (anchors §4.5). Refresh steps use exactly the CFG formula
`eps_u + s*Delta`, so a grid that refreshes every step IS plain CFG. (A public derivative applies
`eps_c + s*Delta`, silently raising guidance 3 -> 4; we do not.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from up2you.diffusion.refresh import PAPER_BOOST, paper_cutoff_step, refresh_steps, thg_grid

__all__ = ["GuidanceSchedule", "GuidedPrediction", "thg_grid"]


@dataclass(frozen=True)
class GuidanceSchedule:
    """When the unconditional prediction is evaluated, and how a held Delta is applied.

    refresh: steps that evaluate eps_u (and refresh Delta); boost: factor on a reused Delta;
    cutoff: from this step on Delta = 0 (guidance off: conditional prediction only).
    """

    scale: float
    steps: int
    refresh: frozenset[int]
    boost: float = 1.0
    cutoff: int | None = None

    @classmethod
    def from_plan(cls, schedule: str, steps: int, scale: float, interval: int = 1) -> GuidanceSchedule:
        """`off`: CFG every step; `fixed`: refresh when i % interval == 0; `paper`: thg_grid + boost + cutoff."""
        refresh = frozenset(refresh_steps(schedule, steps, interval))
        if schedule == "paper":
            return cls(scale, steps, refresh, PAPER_BOOST, paper_cutoff_step(steps))
        return cls(scale, steps, refresh)

    @property
    def guided(self) -> bool:
        return self.scale != 1.0

    def needs_uncond(self, i: int) -> bool:
        return self.guided and i in self.refresh and (self.cutoff is None or i < self.cutoff)

    def nfe(self) -> int:
        """Network evaluations per sample over the whole run (one per conditional, one per unconditional)."""
        return self.steps + sum(self.needs_uncond(i) for i in range(self.steps))


class GuidedPrediction:
    """Combines predictions step by step, holding Delta between refreshes."""

    def __init__(self, schedule: GuidanceSchedule) -> None:
        self.schedule = schedule
        self.delta: torch.Tensor | None = None

    def __call__(self, i: int, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        s = self.schedule
        if not s.guided:
            return cond
        if uncond is not None:
            self.delta = cond - uncond
            return uncond + s.scale * self.delta
        if self.delta is None or (s.cutoff is not None and i >= s.cutoff):
            return cond
        return cond + (s.scale - 1.0) * s.boost * self.delta
