"""Which yaws are generated and how much each counts: the six training views keep upstream's weights."""

from __future__ import annotations

import pytest

from up2you.views import TRAINING_YAWS_6, color_weight, color_weights, view_yaws


def test_six_views_are_the_training_views_with_upstreams_colour_weights() -> None:
    yaws = view_yaws(6)
    assert yaws == [0.0, 45.0, 90.0, 180.0, 270.0, 315.0]
    assert color_weights(yaws) == [1.0, 0.4, 0.8, 1.0, 0.8, 0.4]
    assert color_weight(45.0) == pytest.approx(0.5)  # the formula alone would not give upstream's 0.4


def test_six_view_weights_are_left_right_symmetric() -> None:
    w = dict(zip(view_yaws(6), color_weights(view_yaws(6)), strict=True))
    assert all(w[(360.0 - y) % 360.0] == wy for y, wy in w.items())


@pytest.mark.parametrize("n", [12, 20])
def test_other_view_counts_are_uniform_yaws_weighted_by_the_formula(n: int) -> None:
    yaws = view_yaws(n)
    assert yaws == [i * 360.0 / n for i in range(n)] and tuple(yaws) != TRAINING_YAWS_6
    assert color_weights(yaws) == [color_weight(y) for y in yaws]
