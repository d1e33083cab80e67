"""Strategies that train one model of ``--layers`` layers with stage losses: ``standard``
(one loss, at the last layer) and ``deep-supervision`` (any stage layout, ``--stages``).

Both evaluate on the protocol's split (test, or validation with ``--protocol seed``):
the last exit, or with ``--threshold`` / ``--exit-ratio`` the two-stage inference of
``LegoModel.early_exit`` at ``--exit-layer`` (``--exit-ratio r``: the threshold is the
quantile of the exit confidence on the validation split that lets a share ``r`` of its
tokens exit).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar

from lego.ashem import confidence_threshold
from lego.config import STAGE_LOSSES, StageConfig, TrainingConfig, parse_stages
from lego.exit_loss import LOSS_SCALES
from lego.strategies.base import (
    RunContext,
    Strategy,
    cell,
    eval_lines,
    open_unit_float,
    positive_int,
    register,
    unit_float,
)
from lego.trainer import Trainer, evaluate, exit_outputs


def _stages(text: str) -> str:
    """argparse type: a stage layout that ``parse_stages`` reads (kept as text)."""
    try:
        parse_stages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--stages: ")) from None
    return text


class LayersStrategy(Strategy):
    """Base of the strategies that train one ``--layers``-layer model with a ``Trainer``
    and evaluate it at the last exit or with early exit at ``--exit-layer``.

    Subclasses give ``training_config`` (and may set ``trainer_class`` and override
    ``trainer_options`` for a ``Trainer`` subclass with its own ``batch_loss``);
    ``label`` names their rows in the experiment's tables; ``needs_exit`` says whether
    ``--exit-layer`` must lie below ``--layers`` even without early exit.
    """

    label: ClassVar[str] = ""
    needs_exit: ClassVar[bool] = False
    trainer_class: ClassVar[type[Trainer]] = Trainer

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--layers", type=positive_int, default=4, help="model depth (default: %(default)s)")
        add(
            "--exit-layer",
            type=positive_int,
            default=2,
            help="the early-exit layer (default: %(default)s)",
        )
        add(
            "--threshold",
            type=unit_float,
            default=0.0,
            help="early-exit confidence threshold in [0, 1], 0 = off (default: 0)",
        )
        add(
            "--exit-ratio",
            type=open_unit_float,
            default=0.0,
            help="instead of --threshold, pick the threshold on the validation split after "
            "training so that this share of its tokens exits at --exit-layer, in (0, 1) "
            "(default: off)",
        )

    def check(self, args: argparse.Namespace) -> None:
        if args.threshold > 0 and args.exit_ratio > 0:
            raise ValueError(
                "--threshold and --exit-ratio both pick the early-exit threshold; give one"
            )
        early_exit = args.threshold > 0 or args.exit_ratio > 0
        if (self.needs_exit or early_exit) and not args.exit_layer < args.layers:
            raise ValueError(
                f"--exit-layer ({args.exit_layer}) must lie below --layers ({args.layers}) "
                f"for {self.name} or early exit (--threshold > 0 or --exit-ratio)"
            )
        self.training_config(args).check_model(args.layers)

    def training_config(self, args: argparse.Namespace) -> TrainingConfig:
        """The stages and routing setting of the run (``ValueError`` if they do not fit)."""
        raise NotImplementedError

    def configs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"training": dataclasses.asdict(self.training_config(args))}

    def exit_layer(self, args: argparse.Namespace) -> int | None:
        return args.exit_layer

    def trainer_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Extra keywords of ``trainer_class`` (default: none)."""
        return {}

    def train(self, run: RunContext) -> dict[str, Any]:
        args, corpus, model = run.args, run.corpus, run.model
        config = self.training_config(args)
        trainer = self.trainer_class(
            model, config, lr=args.lr, **run.trainer_kwargs(), **self.trainer_options(args)
        )
        if run.checkpoint is not None and run.checkpoint.state is not None:
            trainer.load_state_dict(run.checkpoint.state["trainer"])
        fit = trainer.fit(
            corpus.train,
            corpus.valid,
            epochs=args.epochs,
            patience=args.patience,
            on_epoch=run.save_every_epoch(lambda: {"trainer": trainer.state_dict()}),
        )
        results: dict[str, Any] = {
            "best_epoch": fit.best_epoch,
            "val_ppl": fit.best_val_ppl,
            "history": fit.history,
        }
        common = {"batch_size": args.eval_batch_size, "measure": args.measure, "quiet": run.quiet}
        threshold = config.routing_threshold
        if args.exit_ratio > 0:
            _, conf = exit_outputs(model, corpus.valid, exit_layer=config.exit_layer, **common)
            threshold = confidence_threshold(conf.confidence, 1.0 - args.exit_ratio)
            results["threshold"] = threshold
        metrics = evaluate(
            model,
            corpus.split(run.split),
            exit_layer=config.exit_layer if threshold > 0 else None,
            threshold=threshold,
            time_full=threshold > 0,
            context=args.context,
            **common,
        )
        results["eval"] = {"split": run.split, **metrics}
        return results

    def table_lines(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        lines = [("best epoch / val ppl", f"{results['best_epoch']} / {results['val_ppl']:.2f}")]
        if "threshold" in results:
            lines.append(("confidence threshold", cell("threshold", results["threshold"])))
        return lines + eval_lines(results["eval"])

    def rows(self, results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
        ev, layers = results["eval"], results["config"]["layers"]
        if "exit_ratio" in ev:
            full = ev.get("full_wall_time_s")
            row = {k: ev.get(k) for k in ("ppl", "acc", "hard_ppl", "exit_ratio")}
            row |= {k: ev.get(k) for k in ("layer_cost", "flops_cost")}
            row["wall_ratio"] = ev["wall_time_s"] / full if full else None
            return {f"{self.label} {layers}-layer, early exit": row}
        row = {"ppl": ev["ppl"], "acc": ev["acc"], "hard_ppl": None, "exit_ratio": None}
        row |= {"layer_cost": 1.0, "flops_cost": 1.0, "wall_ratio": None}
        return {f"{self.label} {layers}-layer": row}


@register
class Standard(LayersStrategy):
    """One loss, at the last layer: the plain forward path (no intermediate exit)."""

    name = "standard"
    description = "one loss at the last layer (early exit optional, untrained exit)"
    label = "standard"

    def training_config(self, args: argparse.Namespace) -> TrainingConfig:
        return TrainingConfig(
            stages=[StageConfig(layers=(1, args.layers))],
            routing_threshold=args.threshold,
            exit_layer=args.exit_layer,
        )


@register
class DeepSupervision(LayersStrategy):
    """LEGO deep supervision: the weighted exit losses of any stage layout."""

    name = "deep-supervision"
    description = "LEGO stages: weighted exit losses at the stage ends (--stages)"
    label = "deep supervision"
    needs_exit = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        add = parser.add_argument
        add(
            "--stages",
            type=_stages,
            help='stage layout, layer ranges with loss weights, e.g. "1-2:0.3,3-4:1.0" '
            "(default: 1-E:1,E+1-L:1 with E = --exit-layer, L = --layers)",
        )
        add(
            "--stage-loss",
            choices=STAGE_LOSSES,
            default="end",
            help="end: one loss at each stage's end layer; every: at every layer of its "
            "range, as the original code's StageConfig (default: %(default)s)",
        )
        add(
            "--loss-scale",
            choices=LOSS_SCALES,
            help="scale the exit losses below the last layer by this depth shape "
            "(torchtune's names; they sum to 1) (default: the --stages weights alone)",
        )

    def training_config(self, args: argparse.Namespace) -> TrainingConfig:
        stages = (
            parse_stages(args.stages)
            if args.stages
            else (
                StageConfig(layers=(1, args.exit_layer)),
                StageConfig(layers=(args.exit_layer + 1, args.layers)),
            )
        )
        return TrainingConfig(
            stages=stages,
            routing_threshold=args.threshold,
            exit_layer=args.exit_layer,
            stage_loss=args.stage_loss,
            loss_scale=args.loss_scale,
        )
