"""The ASHEM experiment's tables and threshold sweep, from the runs' JSON files.

``python -m lego.train`` runs one configuration and writes its JSON; this module turns
a folder of them into the tables of the README and sweeps the early-exit threshold of
saved models (``--save-model``):

- ``python -m lego.experiment tables [--table1 DIR] [--table2 DIR] [--shape2 DIR]
  [--table4 DIR]``: markdown tables.
  Table 1: the ``--protocol seed`` ASHEM runs next to the paper draft's numbers.
  Table 2: the honest-protocol runs, one row per configuration (the rows that each
  run's strategy gives, ``Strategy.rows``), mean and standard
  deviation over the seeds found. The "standard 2-layer" row is ASHEM's phase 1 (the
  same model, data and schedule as ``--strategy standard --layers 2`` with that seed),
  read from the ASHEM runs' ``phase1_*`` numbers. Table 3: Table 2's rows for the
  second model shape (layers that cost more than the head), Table 4 for the draft's
  proposed shape (dim 128, 6 layers), each when its folder exists.
- ``python -m lego.experiment sweep MODEL.pt ... --json OUT``: for each saved early-exit
  model and each target exit ratio, the threshold is the matching quantile of the exit
  confidence on the validation split; the test split is evaluated with two-stage
  inference at that threshold. Writes the points as JSON.
- ``python -m lego.experiment plot SWEEP.json ... --out PNG``: test perplexity against
  the exit ratio and against the FLOPs cost, one line per model (a model's points may
  come from several sweep files).

Costs (``layer_cost``, ``flops_cost``) are relative to the full-depth forward of the
deep model (4 layers in the draft's shape, 8 in the second); the wall-clock column
divides two-stage inference by the full-depth forward of the same model on the same
batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import pickle
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lego.ashem import confidence_threshold
from lego.config import ModelConfig
from lego.data import Corpus
from lego.model import LegoModel
from lego.strategies import load_strategy
from lego.strategies.base import PERCENT
from lego.train import load_corpus
from lego.trainer import evaluate, exit_outputs

# The paper draft's WikiText-2 numbers (dim 64, 2 -> 4 layers, validation split), quoted
# for comparison; `None` where the draft reports nothing.
DRAFT = {
    "phase1_ppl": 986.4,
    "phase1_acc": 0.1603,
    "two_stage_ppl": 829.8,
    "two_stage_acc": 0.1577,
    "phase1_hard_ppl": 2763.7,
    "hard_ppl": 668.1,
    "exit_ratio": 0.704,
    "layer_cost": 0.648,
    "flops_cost": None,
    "two_stage_hard_ppl": None,
}
TABLE1_ROWS = {
    "phase1_ppl": "phase-1 perplexity",
    "phase1_acc": "phase-1 accuracy",
    "two_stage_ppl": "two-stage perplexity",
    "two_stage_acc": "two-stage accuracy",
    "phase1_hard_ppl": "hard-token perplexity, phase 1",
    "hard_ppl": "hard-token perplexity, two-stage",
    "two_stage_hard_ppl": "perplexity of the tokens that did not exit",
    "exit_ratio": "tokens exiting at the exit layer",
    "layer_cost": "compute cost, layers counted",
    "flops_cost": "compute cost, FLOPs with heads",
}
# Table 2's columns: (key, heading).
COLUMNS = (
    ("ppl", "test PPL"),
    ("acc", "accuracy"),
    ("hard_ppl", "hard-token PPL"),
    ("exit_ratio", "exit ratio"),
    ("layer_cost", "layer cost"),
    ("flops_cost", "FLOPs cost"),
    ("wall_ratio", "wall-clock vs full depth"),
)
# Table 2's row order: by the label's kind, then by its depth (``standard 2-layer`` first).
ROW_KINDS = (
    "standard",
    "deep supervision",
    "ASHEM, context=propagate",
    "ASHEM, context=routed",
    "LayerSkip",
)


def load_runs(folder: str) -> list[dict[str, Any]]:
    """Every ``*.json`` run result in ``folder`` (sorted by name), each with its ``path``."""
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            run = json.load(f)
        if not {"strategy", "protocol", "config", "eval"} <= run.keys():
            raise ValueError(f"{path} is not a python -m lego.train result (no strategy/eval)")
        runs.append({**run, "path": path})
    return runs


def _cell(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in PERCENT:
        return f"{100 * value:.2f}%"
    return f"{value:.3f}" if key == "wall_ratio" else f"{value:.1f}"


def table1(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: the draft's numbers next to each ``--protocol seed`` ASHEM run's."""
    runs = [r for r in runs if r["strategy"] == "ashem" and r["protocol"] == "seed"]
    if not runs:
        return "(no --protocol seed ASHEM run found)"
    heads = ["metric", "draft"] + [f"seed {r['config']['seed']} ({r['device']})" for r in runs]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key, label in TABLE1_ROWS.items():
        cells = [_cell(key, DRAFT[key])] + [_cell(key, r["eval"].get(key)) for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2_rows(run: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The Table 2 rows that one honest-protocol run gives: ``{row label: {column key:
    value}}``, from the strategy that made it (``Strategy.rows``; an ASHEM run gives its
    phase-1 model's row too)."""
    return load_strategy(run["config"].get("strategy", run["strategy"])).rows(run)


def _mean_std(key: str, values: list[float]) -> str:
    if not values:
        return "-"
    if len(set(values)) == 1:  # one seed, or a cost fixed by the configuration
        return _cell(key, values[0])
    mean, std = statistics.mean(values), statistics.stdev(values)
    if key in PERCENT:
        return f"{100 * mean:.2f} ± {100 * std:.2f}%"
    digits = 3 if key == "wall_ratio" else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _row_key(label: str) -> tuple[int, int, str]:
    kind = next((i for i, k in enumerate(ROW_KINDS) if label.startswith(k)), len(ROW_KINDS))
    depth = re.search(r"\d+", label)
    return kind, int(depth.group()) if depth else 0, label


def table2(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per configuration of the honest-protocol runs, mean ± standard
    deviation over their seeds (a run repeated with the same seed counts once)."""
    by_row: dict[str, dict[int, dict[str, float | None]]] = {}
    devices: dict[str, set[str]] = {}
    for run in runs:
        if run["protocol"] != "honest":
            continue
        for label, row in table2_rows(run).items():
            by_row.setdefault(label, {})[run["config"]["seed"]] = row
            devices.setdefault(label, set()).add(run["device"])
    if not by_row:
        return "(no --protocol honest run found)"
    heads = ["row", "seeds"] + [heading for _, heading in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label in sorted(by_row, key=_row_key):
        seeds = by_row[label]
        cells = [
            _mean_std(key, [r[key] for r in seeds.values() if r.get(key) is not None])
            for key, _ in COLUMNS
        ]
        seed_list = ", ".join(str(s) for s in sorted(seeds))
        lines.append(f"| {label} | {seed_list} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- threshold sweep


def load_model(path: str, device: str = "cpu") -> tuple[LegoModel, dict[str, Any]]:
    """A model saved by ``python -m lego.train --save-model`` and its saved settings."""
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} cannot be read as a saved model ({e})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"{path} is not a model saved by python -m lego.train --save-model")
    model = LegoModel(ModelConfig(**saved["model_config"])).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def load_run_corpus(config: dict[str, Any], data_dir: str | None = None) -> Corpus:
    """The corpus a run used, from its JSON ``config`` (``data_dir`` overrides its own)."""
    return load_corpus(argparse.Namespace(**{**config, "data_dir": data_dir or config["data_dir"]}))


def sweep(
    model: LegoModel,
    corpus: Corpus,
    saved: dict[str, Any],
    exit_ratios: Sequence[float],
    *,
    batch_size: int = 64,
    quiet: bool = True,
    time_full: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Two-stage test metrics of ``model`` at each target exit ratio (its threshold: that
    quantile of the validation split's exit confidence), plus the threshold itself;
    ``time_full``: also time the full-depth forward (``evaluate``'s ``full_wall_time_s``)."""
    exit_layer, measure = saved["exit_layer"], saved["measure"]
    _, conf = exit_outputs(
        model, corpus.valid, exit_layer=exit_layer, batch_size=batch_size, measure=measure
    )
    points = []
    for ratio in exit_ratios:
        threshold = confidence_threshold(conf.confidence, 1.0 - ratio)
        metrics = evaluate(
            model,
            corpus.test,
            batch_size=batch_size,
            exit_layer=exit_layer,
            threshold=threshold,
            context=saved["context"],
            measure=measure,
            quiet=quiet,
            time_full=time_full,
        )
        points.append({"target_exit_ratio": ratio, "threshold": threshold, **metrics})
        if progress is not None:
            progress(f"exit ratio {ratio:.2f}: test ppl {metrics['ppl']:.1f}")
    return points


def plot_sweep(
    curves: dict[str, list[dict[str, float]]],
    path: str,
    dataset: str,
    references: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Two panels written to ``path``, one line per model: test perplexity against the
    exit ratio (left) and against the FLOPs cost (right). ``references``: label ->
    (FLOPs cost, test perplexity) of models without early exit, drawn as horizontal
    dashed lines (left) and single markers (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_ratio, by_flops) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (label, points) in enumerate(curves.items()):
        ppl = [p["ppl"] for p in points]
        by_ratio.plot([100 * p["exit_ratio"] for p in points], ppl, marker="o", color=f"C{i}")
        by_flops.plot(
            [100 * p["flops_cost"] for p in points], ppl, marker="o", color=f"C{i}", label=label
        )
    for i, (label, (flops, ppl)) in enumerate((references or {}).items(), start=len(curves)):
        by_ratio.axhline(ppl, linestyle="--", color=f"C{i}")
        by_flops.plot([100 * flops], [ppl], marker="s", linestyle="none", color=f"C{i}")
        by_flops.axhline(ppl, linestyle="--", color=f"C{i}", label=f"{label}: {ppl:.1f}")
    by_ratio.set_xlabel("tokens exiting at the exit layer (%), test split")
    by_ratio.set_ylabel("two-stage test perplexity")
    by_flops.set_xlabel("FLOPs, % of the full-depth forward (heads counted)")
    for ax in (by_ratio, by_flops):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Early-exit threshold sweep, {dataset}")
    fig.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize="small",
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------- command line


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every exit ratio must lie in (0, 1), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lego.experiment", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tables = sub.add_parser("tables", help="Tables 1 to 3 as markdown, from run JSON files")
    tables.add_argument("--table1", default="results/table1", help="default: %(default)s")
    tables.add_argument("--table2", default="results/table2", help="default: %(default)s")
    tables.add_argument(
        "--shape2",
        default="results/shape2",
        help="Table 3, the second shape's runs (default: %(default)s; left out when absent)",
    )
    tables.add_argument(
        "--table4",
        default="results/table4",
        help="Table 4, the draft's proposed shape's runs (default: %(default)s; left out when "
        "absent)",
    )
    tables.add_argument("--out", help="also write the markdown to this file")
    sw = sub.add_parser("sweep", help="exit ratio against test PPL for saved models")
    sw.add_argument("models", nargs="+", help="files written by python -m lego.train --save-model")
    sw.add_argument(
        "--exit-ratios",
        type=_ratios,
        default=[0.1, 0.3, 0.5, 0.7, 0.9],
        help="comma-separated target exit ratios (default: 0.1,0.3,0.5,0.7,0.9)",
    )
    sw.add_argument("--data-dir", help="WikiText-2 folder (default: the run's, $LEGO_DATA_DIR)")
    sw.add_argument("--json", required=True, help="write the points here")
    sw.add_argument(
        "--time-full", action="store_true", help="also time the full-depth forward at each point"
    )
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    plot = sub.add_parser("plot", help="plot the points of sweep JSON files to one PNG")
    plot.add_argument(
        "sweeps",
        nargs="+",
        help="files written by the sweep command (a model's points may span several)",
    )
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument(
        "--table2", help="runs folder (Table 2's or 3's): draw its standard rows as references"
    )
    return parser


def training_budget(runs: Sequence[dict[str, Any]]) -> str:
    """The training the honest-protocol runs had, e.g. ``"full training split, at most 1
    epoch per run (ASHEM: per phase), on cpu"`` (each distinct budget named once, and
    the evaluation cap of ``--eval-samples`` when there is one)."""
    honest = [run for run in runs if run["protocol"] == "honest"]
    budgets = sorted({(run["config"]["samples"], run["config"]["epochs"]) for run in honest})
    parts = [
        ("full training split" if samples == 0 else f"{samples:,} training windows")
        + f", at most {epochs} epoch{'' if epochs == 1 else 's'} per run (ASHEM: per phase)"
        for samples, epochs in budgets
    ]
    devices = ", ".join(sorted({run["device"] for run in honest}))
    capped = sorted({run["config"].get("eval_samples", 0) for run in honest} - {0})
    if capped:
        parts.append(
            f"validation and test cut to their first {' / '.join(f'{n:,}' for n in capped)} windows"
        )
    return "; ".join(parts) + f", on {devices}" if honest else "no honest-protocol run"


def _tables(args: argparse.Namespace) -> None:
    table2_runs = load_runs(args.table2)
    sections = [
        "Table 1 (the original code's procedure)",
        table1(load_runs(args.table1)),
        f"Table 2 (honest protocol; {training_budget(table2_runs)})",
        table2(table2_runs),
    ]
    if os.path.isdir(args.shape2):
        shape2_runs = load_runs(args.shape2)
        sections += [
            f"Table 3 (honest protocol, second shape; {training_budget(shape2_runs)})",
            table2(shape2_runs),
        ]
    if os.path.isdir(args.table4):
        table4_runs = load_runs(args.table4)
        budget = training_budget(table4_runs)
        sections += [
            f"Table 4 (honest protocol, the draft's proposed shape; {budget})",
            table2(table4_runs),
        ]
    text = "\n\n".join(sections)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def _sweep(args: argparse.Namespace) -> None:
    report: dict[str, Any] = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "models": {},
    }
    for path in args.models:
        model, saved = load_model(path)
        corpus = load_run_corpus(saved["config"], args.data_dir)
        label = f"{saved['strategy']} ({saved['context']}), seed {saved['config']['seed']}"
        print(f"sweeping {label} ({path})", file=sys.stderr)
        points = sweep(
            model,
            corpus,
            saved,
            args.exit_ratios,
            quiet=args.quiet,
            time_full=args.time_full,
            progress=lambda line: print("  " + line, file=sys.stderr),
        )
        report["models"][label] = {
            "path": path,
            "config": saved["config"],
            "model_config": dataclasses.asdict(model.config),
            "points": points,
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"points written to {args.json}")


def load_sweeps(paths: Sequence[str]) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """The points of sweep files, ``{model label: points by target exit ratio}``, a
    model's points joined across files, and the datasets they were measured on."""
    curves: dict[str, dict[float, dict[str, Any]]] = {}
    datasets = set()
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if "models" not in report:
            raise ValueError(f"{path} is not a python -m lego.experiment sweep file")
        for label, model in report["models"].items():
            points = curves.setdefault(label, {})
            for point in model["points"]:
                ratio = point["target_exit_ratio"]
                if ratio in points:
                    raise ValueError(
                        f"{path}: {label} at exit ratio {ratio} is in another sweep file too; "
                        "keep one of them"
                    )
                points[ratio] = point
            datasets.add(model["config"]["dataset"])
    return {label: [p[r] for r in sorted(p)] for label, p in curves.items()}, datasets


def _plot(args: argparse.Namespace) -> None:
    curves, datasets = load_sweeps(args.sweeps)
    references: dict[str, tuple[float, float]] = {}
    if args.table2:
        rows: dict[str, list[dict[str, Any]]] = {}
        for run in load_runs(args.table2):
            for label, row in table2_rows(run).items():
                if label.startswith("standard") and run["protocol"] == "honest":
                    rows.setdefault(label, []).append(row)
        references = {
            f"{label}, mean": (
                statistics.mean(r["flops_cost"] for r in found),
                statistics.mean(r["ppl"] for r in found),
            )
            for label, found in sorted(rows.items(), key=lambda item: _row_key(item[0]))
        }
    plot_sweep(curves, args.out, ", ".join(sorted(datasets)), references)
    print(f"plot written to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lego.experiment``; returns the exit status."""
    args = build_parser().parse_args(argv)
    command = {"tables": _tables, "sweep": _sweep, "plot": _plot}[args.command]
    try:
        command(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m lego.experiment: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
