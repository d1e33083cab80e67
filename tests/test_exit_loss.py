"""Depth loss scales and curricula (lego.exit_loss) against their definitions."""

import math

import pytest

from lego.exit_loss import LOSS_SCALES, active_exits, check_exit_layers, loss_scales


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("uniform", [1, 1, 1]),
        ("linear_l", [1, 3, 6]),
        ("sum_l", [1, 4, 10]),
        ("sqrt_l", [1, math.sqrt(3), math.sqrt(6)]),
        ("inv_l", [1, 1 / 3, 1 / 6]),
        ("inv_sqrt_l", [1, 1 / math.sqrt(3), 1 / math.sqrt(6)]),
    ],
)
def test_loss_scales_are_the_named_shape_normalized(name, raw):
    scales = loss_scales(name, [6, 1, 3], num_layers=8)  # sorted: 1, 3, 6
    assert scales == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert sum(scales) == pytest.approx(1.0, rel=1e-12)


def test_one_exit_gets_scale_one_and_no_exit_none():
    for name in LOSS_SCALES:
        assert loss_scales(name, [2], num_layers=4) == (1.0,)
        assert loss_scales(name, [], num_layers=4) == ()


@pytest.mark.parametrize(
    ("layers", "match"),
    [([4], r"\[1, 3\]"), ([0], r"\[1, 3\]"), ([2, 2], "distinct"), ([1.5], "int")],
)
def test_bad_exit_layers_name_the_argument(layers, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        check_exit_layers(layers, num_layers=4)
    assert "exit_layers" in str(info.value)


def test_unknown_scale_and_curriculum_are_errors():
    with pytest.raises(ValueError, match="exit_loss_scale must be one of"):
        loss_scales("linear", [1], num_layers=4)
    with pytest.raises(ValueError, match="curriculum must be None or one of"):
        active_exits("rot", [1], 4, step=0, total_steps=10)


def test_no_curriculum_keeps_every_exit():
    assert active_exits(None, [3, 1], 4, step=7, total_steps=10) == (1, 3)


def test_rotational_trains_one_exit_per_step_in_turn():
    got = [active_exits("rotational", [1, 2, 3], 4, step=s, total_steps=100) for s in range(7)]
    assert got == [(1,), (2,), (3,), (1,), (2,), (3,), (1,)]


def test_gradual_switches_exits_on_from_the_deepest():
    # L = 4, fraction 0.5: exit l is on from progress 0.5 * (5 - l) / 4.
    def at(step):
        return active_exits("gradual", [1, 2, 3], 4, step=step, total_steps=80)

    assert at(0) == ()
    assert at(19) == ()  # progress 0.2375 < 0.25
    assert at(20) == (3,)  # 0.25
    assert at(30) == (2, 3)  # 0.375
    assert at(39) == (2, 3)
    assert at(40) == (1, 2, 3)  # 0.5
    assert at(79) == (1, 2, 3)
    assert active_exits("gradual", [1], 4, step=10, total_steps=10, fraction=1.0) == (1,)
