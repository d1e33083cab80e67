"""The ``layerskip`` strategy: LayerSkip-style training (Elhoushi et al., 2024) of one
``--layers``-layer model, evaluated with the same two-stage inference as the others.

A training step (``LayerSkipTrainer.batch_loss``) runs the layers in order with
*layer dropout rising with depth*: each sequence of the batch skips layer ``l`` with
probability ``p_l = p_max * (l - 1) / (L - 1)`` (``--layer-dropout`` is ``p_max``;
layer 1 never drops, the last layer drops with ``p_max``; a skipped layer leaves the
sequence's states as they are, and the kept sequences alone run it). Its loss is the
early-exit loss of ``lego.exit_loss``::

    loss = exit_L + sum over active exits l of scale_l * exit_l

through the shared head, with ``scale_l`` from ``--loss-scale`` over ``--exit-layers``
and the exits active at the step chosen by ``--curriculum`` (``rotational``: one exit
per step in turn; ``gradual``: exits switch on from the deepest down; ``none``: all).
No layer is dropped at evaluation.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from lego.config import StageConfig, TrainingConfig
from lego.exit_loss import (
    CURRICULA,
    LOSS_SCALES,
    active_exits,
    check_curriculum,
    check_exit_layers,
)
from lego.model import LegoModel
from lego.strategies.base import register, unit_float
from lego.strategies.stages import LayersStrategy
from lego.trainer import Trainer


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers, got {text!r}"
        ) from None


class LayerSkipTrainer(Trainer):
    """A ``Trainer`` whose batch loss is LayerSkip's (module docstring).

    ``config``'s stages end at the exit layers and at the last layer; their weights,
    scaled by ``config.loss_scale``, are the exits' ``scale_l``. ``layer_dropout``: the
    largest rate ``p_max`` in ``[0, 1]``; ``curriculum``: ``None`` or one of ``CURRICULA``.
    The dropped sequences of each step are drawn from ``(seed, step)``, so a resumed run
    drops the same ones.
    """

    def __init__(
        self,
        model: LegoModel,
        config: TrainingConfig,
        *,
        layer_dropout: float = 0.0,
        curriculum: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, config, **kwargs)
        if not 0.0 <= layer_dropout <= 1.0:
            raise ValueError(f"layer_dropout must lie in [0, 1], got {layer_dropout}")
        num_layers = model.config.num_layers
        weights = dict(config.layer_weights(num_layers))
        if max(weights) != num_layers:
            raise ValueError(f"config: the last stage must end at the last layer, {num_layers}")
        self.exit_layers = check_exit_layers(
            [layer for layer in weights if layer < num_layers], num_layers
        )
        check_curriculum(curriculum)
        self.weights = weights
        self.layer_dropout = layer_dropout
        self.curriculum = curriculum

    def dropout_rate(self, layer: int) -> float:
        """``p_l`` of layer ``layer`` (1-indexed)."""
        num_layers = self.model.config.num_layers
        return self.layer_dropout * (layer - 1) / max(1, num_layers - 1)

    def _run_layer(self, h: Tensor, layer: int, generator: torch.Generator) -> Tensor:
        block = self.model.layers[layer - 1]
        rate = self.dropout_rate(layer)
        if rate == 0 or not self.model.training:
            return block(h)
        kept = torch.nonzero(torch.rand(h.shape[0], generator=generator) >= rate)[:, 0]
        kept = kept.to(h.device)
        return h.index_copy(0, kept, block(h[kept]))

    def batch_loss(self, windows: Tensor) -> Tensor:
        model, num_layers = self.model, self.model.config.num_layers
        inputs, targets = windows[:, :-1], windows[:, 1:]
        active = active_exits(
            self.curriculum, self.exit_layers, num_layers, self.step, self.total_steps
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        h = model.embed(inputs)
        loss = h.new_zeros((), dtype=torch.float32)
        self.last_terms = []
        for layer in range(1, num_layers + 1):
            h = self._run_layer(h, layer, generator)
            if layer == num_layers or layer in active:
                term = model.exit_loss(h, targets, exit_layer=layer)
                self.last_terms.append((layer, term.detach()))
                loss = loss + self.weights[layer] * term
        return loss


@register
class LayerSkip(LayersStrategy):
    """LayerSkip-style training: layer dropout rising with depth + an early-exit loss with
    a curriculum (module docstring)."""

    name = "layerskip"
    description = "layer dropout rising with depth + early-exit loss with a curriculum"
    label = "LayerSkip"
    needs_exit = True
    trainer_class = LayerSkipTrainer

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        add = parser.add_argument
        add(
            "--layer-dropout",
            type=unit_float,
            default=0.2,
            help="largest layer-dropout rate (the last layer's), in [0, 1] (default: 0.2)",
        )
        add(
            "--curriculum",
            choices=("none", *CURRICULA),
            default="rotational",
            help="which exits carry loss at each step (default: %(default)s)",
        )
        add(
            "--exit-layers",
            type=_layers,
            help="layers with an exit loss, comma-separated (default: every layer below the last)",
        )
        add(
            "--loss-scale",
            choices=LOSS_SCALES,
            default="sum_l",
            help="the exits' scales over depth (torchtune's names) (default: %(default)s)",
        )

    def check(self, args: argparse.Namespace) -> None:
        super().check(args)
        exits = self._exit_layers(args)
        early_exit = args.threshold > 0 or args.exit_ratio > 0
        if early_exit and args.exit_layer not in exits:
            raise ValueError(
                f"--exit-layer ({args.exit_layer}) has no exit loss: add it to --exit-layers "
                f"({','.join(map(str, exits))})"
            )

    def _exit_layers(self, args: argparse.Namespace) -> tuple[int, ...]:
        exits = args.exit_layers or tuple(range(1, args.layers))
        try:
            return check_exit_layers(exits, args.layers)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--exit-layers: {e}") from None

    def training_config(self, args: argparse.Namespace) -> TrainingConfig:
        ends = [*self._exit_layers(args), args.layers]
        starts = [1, *(end + 1 for end in ends[:-1])]
        return TrainingConfig(
            stages=[StageConfig(layers=(s, e)) for s, e in zip(starts, ends, strict=True)],
            routing_threshold=args.threshold,
            exit_layer=args.exit_layer,
            loss_scale=args.loss_scale,
        )

    def trainer_options(self, args: argparse.Namespace) -> dict[str, Any]:
        curriculum = None if args.curriculum == "none" else args.curriculum
        return {"layer_dropout": args.layer_dropout, "curriculum": curriculum}
