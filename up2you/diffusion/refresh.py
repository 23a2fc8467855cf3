"""Which denoising steps evaluate the unconditional branch: plain CFG, fixed-interval THG, the paper's grid.

Torch-free, so the planner can count network evaluations (its time model) with the very function the
sampler's `GuidanceSchedule` uses. THG: Lee, Pak, Hong, Kim, "Tortoise and Hare Guidance: Accelerating
Diffusion Model Inference with Multirate Integration", NeurIPS 2025, arXiv:2511.04117.
"""

from __future__ import annotations

import math

PAPER_RHO = 1.1
PAPER_BOOST = 1.1
PAPER_CUTOFF = 0.76  # i_hi / N of the paper's SD1.5 setting (38 / 50)

# c_T(u) / c_H(u): ratio of the tortoise's to the hare's local error constant over normalised time u,
# piecewise constant, read off the paper's SD1.5 grid at rho 1.1 (Richardson estimates, Alg. 3). The
# real ratio for UP2You needs the model; this profile is the paper's, not re-measured.
_ERROR_RATIO = ((0.12, 1.0), (0.28, 2.0), (0.52, 3.0), (1.0, 2.0))


def thg_grid(steps: int, rho: float = PAPER_RHO, cutoff: float = PAPER_CUTOFF) -> tuple[int, ...]:
    """Refresh steps of THG's coarse grid ("look before you leap", paper §3.3, Alg. 2).

    A hare leap of m fine steps has local error ~ |c_H| (m dt)^(p+1); the tortoise over the same m steps
    accumulates ~ m |c_T| dt^(p+1). Keeping their ratio <= rho gives, for order p = 1,
    m_max(u) = floor(rho * c_T(u) / c_H(u)) (dt cancels, so the grid depends on u = i/steps only).
    Walk from step 0, leaping m_max each time, until the guidance cutoff at round(cutoff * steps).
    At 50 steps and rho 1.1 this gives {0..6, 8, 10, 12, 14, 17, 20, 23, 26, 28, ..., 36}: 20 refreshes,
    70 NFE instead of 100.
    """
    end = round(cutoff * steps)
    grid: list[int] = []
    i = 0
    while i < end:
        grid.append(i)
        u = i / steps + 1e-9
        ratio = next(r for u_end, r in _ERROR_RATIO if u < u_end)
        i += max(1, math.floor(rho * ratio))
    return tuple(grid)


def refresh_steps(schedule: str, steps: int, interval: int = 1) -> tuple[int, ...]:
    """`off`: every step (plain CFG); `fixed`: i % interval == 0; `paper`: thg_grid (before its cutoff)."""
    if schedule == "off":
        return tuple(range(steps))
    if schedule == "fixed":
        return tuple(range(0, steps, interval))
    if schedule == "paper":
        return thg_grid(steps)
    raise ValueError(f"unknown guidance schedule {schedule!r}")


def paper_cutoff_step(steps: int) -> int:
    """From this step on the paper's schedule drops guidance (conditional prediction only)."""
    return round(PAPER_CUTOFF * steps)


def uncond_evaluations(schedule: str, steps: int, interval: int, guidance: float) -> int:
    """Steps that run the unconditional branch: refresh steps (all before the paper's cutoff), none unguided."""
    if guidance == 1.0:
        return 0
    return len(refresh_steps(schedule, steps, interval))
