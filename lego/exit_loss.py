"""Depth loss scales and curricula of an early-exit loss (torchtune's names).

An early-exit loss adds, to the loss of the last layer, the losses of exits after
earlier layers (LayerSkip; torchtune's early-exit recipe)::

    loss = final + sum_l scale_l * exit_l        l in the exit layers (1-indexed)

:func:`loss_scales` gives the ``scale_l`` of a named shape over depth, normalized to
sum to 1 over the exits given, so that the exits together weigh as much as the last
layer whatever their number (one exit with ``"uniform"`` gets 1). For exits at layers
``l_1 < ... < l_k``:

=============== =======================================
name            unnormalized scale of exit ``l_i``
=============== =======================================
``uniform``     1
``linear_l``    ``l_i``
``sum_l``       ``l_1 + ... + l_i``
``sqrt_l``      ``sqrt(l_i)``
``inv_l``       ``1 / l_i``
``inv_sqrt_l``  ``1 / sqrt(l_i)``
=============== =======================================

A curriculum chooses which exits carry loss at each training step (the others are
not computed at all that step):

- ``"rotational"``: one exit per step, in turn: step ``s`` trains exit ``l_{(s mod k) + 1}``;
- ``"gradual"``: exits switch on from the deepest down as training progresses:
  exit ``l`` is on once ``step / total_steps >= fraction * (L - l + 1) / L`` (``L``
  the number of layers, ``fraction`` 0.5 by default, so every exit is on after
  half of the steps).

``curriculum=None`` trains every exit at every step. Active exits keep the scales
computed over all the exits (a curriculum switches terms off, it does not
re-weight the ones left).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LOSS_SCALES = ("uniform", "linear_l", "sum_l", "sqrt_l", "inv_l", "inv_sqrt_l")
CURRICULA = ("rotational", "gradual")


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """``exit_layers`` as a sorted tuple of distinct ints in ``[1, num_layers - 1]``.

    ``ValueError``/``TypeError`` naming ``exit_layers`` otherwise (the last layer is
    the final loss, never an exit).
    """
    layers = tuple(exit_layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"exit_layers must hold int layer numbers, got {layer!r}")
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"exit_layers must lie in [1, {num_layers - 1}] (1-indexed, below the last "
                f"layer, whose loss is the final one), got {layer}"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit_layers must be distinct, got {list(layers)}")
    return tuple(sorted(layers))


def loss_scales(name: str, exit_layers: Sequence[int], num_layers: int) -> tuple[float, ...]:
    """The scale of each exit (sorted ascending), by the shape ``name`` (see the module
    docstring), summing to 1; an empty tuple for no exits."""
    if name not in LOSS_SCALES:
        raise ValueError(f"exit_loss_scale must be one of {LOSS_SCALES}, got {name!r}")
    layers = check_exit_layers(exit_layers, num_layers)
    if not layers:
        return ()
    shapes = {
        "uniform": [1.0 for _ in layers],
        "linear_l": [float(layer) for layer in layers],
        "sum_l": [float(sum(layers[: i + 1])) for i in range(len(layers))],
        "sqrt_l": [math.sqrt(layer) for layer in layers],
        "inv_l": [1.0 / layer for layer in layers],
        "inv_sqrt_l": [1.0 / math.sqrt(layer) for layer in layers],
    }
    raw = shapes[name]
    total = sum(raw)
    return tuple(value / total for value in raw)


def check_curriculum(curriculum: str | None) -> None:
    """``ValueError`` naming ``curriculum`` unless it is ``None`` or one of ``CURRICULA``."""
    if curriculum is not None and curriculum not in CURRICULA:
        raise ValueError(f"curriculum must be None or one of {CURRICULA}, got {curriculum!r}")


def active_exits(
    curriculum: str | None,
    exit_layers: Sequence[int],
    num_layers: int,
    step: int,
    total_steps: int,
    *,
    fraction: float = 0.5,
) -> tuple[int, ...]:
    """The exits (ascending) that carry loss at training ``step`` (0-based) of
    ``total_steps``, by ``curriculum`` (see the module docstring)."""
    check_curriculum(curriculum)
    layers = check_exit_layers(exit_layers, num_layers)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if curriculum is None or not layers:
        return layers
    if curriculum == "rotational":
        return (layers[step % len(layers)],)
    progress = step / total_steps
    return tuple(
        layer for layer in layers if progress >= fraction * (num_layers - layer + 1) / num_layers
    )
