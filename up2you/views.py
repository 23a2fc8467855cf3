"""Which yaws the multi-view stages generate, and how much each view counts when colouring the mesh.

Torch-free: the planner, the diffusion stages and the geometry stages all import it.
"""

from __future__ import annotations

import math

TRAINING_YAWS_6 = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
"""The adapters were trained on exactly these six views (upstream `VIEWS_6`), in this order."""
TRAINING_WEIGHTS_6 = (1.0, 0.4, 0.8, 1.0, 0.8, 0.4)
"""Upstream's colour weights for those six views (the formula below would give 0.5 at 45 and 315)."""


def view_yaws(n: int) -> list[float]:
    """Yaws in degrees of the N generated views.

    N = 6 returns the training views (not uniform: there is no 135 or 225), any other N is uniform
    i*360/n as the 20/12-view derivative does.
    """
    if n < 1:
        raise ValueError(f"need at least one view, got {n}")
    if n == 6:
        return list(TRAINING_YAWS_6)
    return [i * 360.0 / n for i in range(n)]


def color_weight(yaw: float) -> float:
    """Weight of a view at `yaw` degrees in the vertex-colour projection.

    w(t) = 0.7 + 0.1 cos 2t + 0.2 cos 4t: front = back = 1.0, sides 0.8, diagonals 0.5. Built from
    even harmonics of 2t only, so it is mirror-symmetric (w(t) = w(-t)) and front/back symmetric
    (w(180 - t) = w(t)) for ANY set of yaws; an asymmetric back weight made the back of the head bulge
    in the 20-view derivative. It reproduces that derivative's hand-tuned symmetric 20-view vector
    (1.0, 0.8, 0.6, 0.5, 0.7, 0.8, ...) to within 0.05.
    """
    t = math.radians(yaw)
    return 0.7 + 0.1 * math.cos(2.0 * t) + 0.2 * math.cos(4.0 * t)


def color_weights(yaws: list[float] | tuple[float, ...]) -> list[float]:
    """Per-view colour weights for the given yaws (degrees).

    The six training views get upstream's own weights, the ones the released model was tuned with;
    any other set gets `color_weight` per yaw. Both are mirror-symmetric.
    """
    if tuple(float(y) for y in yaws) == TRAINING_YAWS_6:
        return list(TRAINING_WEIGHTS_6)
    return [color_weight(y) for y in yaws]
