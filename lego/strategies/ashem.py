"""The ``ashem`` strategy: ``lego.ashem.run_ashem`` on the command line (its flags,
results, printed lines and table rows)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from lego.ashem import run_ashem
from lego.config import ASHEMConfig, ModelConfig
from lego.model import LegoModel
from lego.strategies.base import (
    LABELS,
    RunContext,
    Strategy,
    cell,
    eval_lines,
    non_negative_int,
    open_unit_float,
    positive_float,
    positive_int,
    register,
)

DEFAULTS = ASHEMConfig()


def analytic_cost(model: dict[str, Any], depth: int, full_depth: int) -> float:
    """FLOPs of ``depth`` layers + one exit over the ``full_depth`` forward, for the model
    shape of a run's ``config["model"]`` (one window of ``max_seq_len`` tokens)."""
    model_config = ModelConfig(**{**model, "num_layers": full_depth})
    with torch.device("meta"):
        meta = LegoModel(model_config)
    seq_len = model_config.max_seq_len
    return meta.flops(1, seq_len, depth=depth) / meta.flops(1, seq_len)


@register
class ASHEM(Strategy):
    """Hard-example mining + selective layer expansion + two-stage inference (``lego.ashem``).

    ``--lr`` and ``--patience`` are phase 1's; phase 2 has its own flags.
    """

    name = "ashem"
    description = "train a shallow model, mine hard tokens, add layers trained on them"
    not_fingerprinted = ("phase1_from",)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add(
            "--phase1-layers",
            type=positive_int,
            default=DEFAULTS.phase1_layers,
            help="phase-1 depth (default: %(default)s)",
        )
        add(
            "--phase2-layers",
            type=positive_int,
            default=DEFAULTS.phase2_layers,
            help="phase-2 depth (default: %(default)s)",
        )
        add(
            "--hard-ratio",
            type=open_unit_float,
            default=DEFAULTS.hard_example_ratio,
            help="share of hard tokens, in (0, 1) (default: %(default)s)",
        )
        add(
            "--phase2-lr",
            type=positive_float,
            default=DEFAULTS.phase2_lr,
            help="phase-2 learning rate (default: %(default)s)",
        )
        add(
            "--phase2-patience",
            type=non_negative_int,
            default=DEFAULTS.phase2_patience,
            help="phase-2 early-stopping patience (default: %(default)s)",
        )
        add(
            "--phase1-from",
            metavar="FILE",
            help="skip phase 1 and start phase 2 from the phase-1 state that a run with "
            "--checkpoint-dir kept as DIR/phase1.pt; all settings must match except "
            "--context (default: run phase 1)",
        )

    def ashem_config(self, args: argparse.Namespace) -> ASHEMConfig:
        return ASHEMConfig(
            phase1_layers=args.phase1_layers,
            phase1_lr=args.lr,
            phase1_patience=args.patience,
            hard_example_ratio=args.hard_ratio,
            phase2_layers=args.phase2_layers,
            phase2_lr=args.phase2_lr,
            phase2_patience=args.phase2_patience,
        )

    def check(self, args: argparse.Namespace) -> None:
        if args.phase1_from is not None and args.checkpoint_dir is None:
            raise ValueError(
                "--phase1-from needs --checkpoint-dir DIR (where this run saves its own)"
            )
        self.ashem_config(args)

    def num_layers(self, args: argparse.Namespace) -> int:
        return args.phase1_layers

    def configs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"ashem": dataclasses.asdict(self.ashem_config(args))}

    def exit_layer(self, args: argparse.Namespace) -> int | None:
        return args.phase1_layers

    def start_from(self, args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
        return args.phase1_from, ("--context",)  # phase 1 does not read --context

    def train(self, run: RunContext) -> dict[str, Any]:
        args = run.args
        out = run_ashem(
            run.model,
            run.corpus,
            self.ashem_config(args),
            protocol=args.protocol,
            epochs=args.epochs,
            checkpoint=run.checkpoint,
            **run.trainer_kwargs(),
        )
        results: dict[str, Any] = {"threshold": out.threshold, "hard_ratio": out.hard_ratio}
        results["history"] = []
        for phase, fit in (("phase1", out.phase1), ("phase2", out.phase2)):
            results[phase] = {
                "best_epoch": fit.best_epoch,
                "val_ppl": fit.best_val_ppl,
                "history": fit.history,
            }
            results["history"] += [{"phase": phase, **record} for record in fit.history]
        results["eval"] = out.eval
        return results

    def table_lines(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        lines = [(LABELS[k], cell(k, results[k])) for k in ("threshold", "hard_ratio")]
        for phase in ("phase1", "phase2"):
            info = results[phase]
            lines.append(
                (f"{phase} best epoch / val ppl", f"{info['best_epoch']} / {info['val_ppl']:.2f}")
            )
        labels = LABELS
        if results["protocol"] == "seed":
            labels = {**LABELS, "hard_ppl": "hard-token perplexity (isolated tokens)"}
        return lines + eval_lines(results["eval"], labels)

    def rows(self, results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
        """The phase-1 model's row (a standard ``phase1_layers``-layer model: costs
        analytic) and the two-stage model's."""
        ev, config = results["eval"], results["config"]
        low, high = config["phase1_layers"], config["phase2_layers"]
        full = ev.get("full_wall_time_s")
        return {
            f"standard {low}-layer (ASHEM phase 1)": {
                "ppl": ev["phase1_ppl"],
                "acc": ev["phase1_acc"],
                "hard_ppl": ev["phase1_hard_ppl"],
                "exit_ratio": None,
                "layer_cost": low / high,
                "flops_cost": analytic_cost(config["model"], low, high),
                "wall_ratio": None,
            },
            f"ASHEM, context={config['context']}": {
                "ppl": ev["two_stage_ppl"],
                "acc": ev["two_stage_acc"],
                "hard_ppl": ev["hard_ppl"],
                "exit_ratio": ev["exit_ratio"],
                "layer_cost": ev["layer_cost"],
                "flops_cost": ev["flops_cost"],
                "wall_ratio": ev["wall_time_s"] / full if full else None,
            },
        }
