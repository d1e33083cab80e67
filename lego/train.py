"""Command line: ``python -m lego.train`` (standard, deep supervision or ASHEM).

Defaults reproduce the paper draft's configuration: WikiText-2, dim 64, 4 heads,
sequences of 32 tokens, batch 64, 10,000 training windows, ASHEM from 2 to 4
layers with hard ratio 0.5 and its learning rates and patience. Prints a results
table and writes a JSON file (``--out``, default
``runs/<strategy>-<dataset>-<protocol>-seed<seed>.json``)::

    python -m lego.train --strategy ashem
    python -m lego.train --strategy deep-supervision --exit-layer 2 --threshold 0.3
    python -m lego.train --dataset synthetic --samples 512 --epochs 3 --dim 32

With ``--checkpoint-dir DIR`` the run saves a checkpoint after every epoch (and at
the ASHEM phase boundary); ``--resume`` continues a killed run from it and ends with
the same results. Under ``torchrun --nproc_per_node=N -m lego.train ...`` the ranks
train with ``DistributedDataParallel`` on shards of each global batch
(``--batch-size``), and rank 0 alone prints and writes (``lego.distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import NoReturn

import torch

import lego_kernels
from lego import distributed
from lego.ashem import PROTOCOLS, confidence_threshold, run_ashem
from lego.checkpoint import Checkpointer, save_atomic
from lego.config import ARCHS, ASHEMConfig, ModelConfig, StageConfig, TrainingConfig, arch_fields
from lego.data import Corpus, load_wikitext2, synthetic_corpus
from lego.model import CONTEXTS, LegoModel
from lego.trainer import NonFiniteLossError, Trainer, evaluate, exit_outputs
from lego_kernels import ops
from lego_kernels.reference import MEASURES

STRATEGIES = ("standard", "deep-supervision", "ashem")
DATASETS = ("wikitext-2", "synthetic")
# Flags that only one family of strategies reads, with their defaults; giving one to
# the other family is an error rather than a silently ignored setting.
STAGE_FLAGS = {"layers": 4, "threshold": 0.0, "exit_ratio": 0.0, "exit_layer": 2}
ASHEM = ASHEMConfig()
ASHEM_FLAGS = {
    "phase1_layers": ASHEM.phase1_layers,
    "phase2_layers": ASHEM.phase2_layers,
    "hard_ratio": ASHEM.hard_example_ratio,
    "phase2_lr": ASHEM.phase2_lr,
    "phase2_patience": ASHEM.phase2_patience,
    "phase1_from": None,
}
# Settings that do not change the results, left out of a checkpoint's fingerprint
# (so a run may resume on another device, quietly, or write its JSON elsewhere).
NOT_FINGERPRINTED = (
    "device",
    "data_dir",
    "out",
    "quiet",
    "checkpoint_dir",
    "resume",
    "save_model",
    "phase1_from",
)
# Settings that phase 1 of ASHEM does not read: a run may start its phase 2 from the
# phase-1 state of a run that differs from it only in these (--phase1-from).
PHASE2_ONLY = ("--context",)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _open_unit_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _unit_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> ArgumentParser:
    """The command line's parser (defaults: the draft's configuration)."""
    p = ArgumentParser(
        prog="python -m lego.train",
        description="Train an early-exit Transformer (standard, LEGO deep supervision or "
        "ASHEM) on WikiText-2 or a synthetic corpus; print a results table and write JSON.",
    )
    add = p.add_argument
    add("--strategy", choices=STRATEGIES, default="ashem", help="default: %(default)s")
    add("--dataset", choices=DATASETS, default="wikitext-2", help="default: %(default)s")
    add(
        "--data-dir",
        help="folder with wiki.{train,valid,test}.tokens (default: $LEGO_DATA_DIR, else the hub)",
    )
    add(
        "--samples",
        type=_non_negative_int,
        default=10_000,
        help="training windows kept, 0 = all (default: %(default)s)",
    )
    add(
        "--epochs",
        type=_positive_int,
        help="most epochs per phase (default: 50 with --protocol seed, the original code's; "
        "else 10)",
    )
    add(
        "--arch",
        choices=ARCHS,
        default="lego",
        help="model variant: lego (pre-norm, normed exits) or seed (the original code's: "
        "post-norm, no exit norm, FFN 4 x dim, truncated-normal init) (default: %(default)s)",
    )
    add("--layers", type=_positive_int, help="model depth, standard/deep-supervision (default: 4)")
    add("--phase1-layers", type=_positive_int, help="ASHEM phase-1 depth (default: 2)")
    add("--phase2-layers", type=_positive_int, help="ASHEM phase-2 depth (default: 4)")
    add("--dim", type=_positive_int, default=64, help="model width (default: %(default)s)")
    add("--heads", type=_positive_int, default=4, help="attention heads (default: %(default)s)")
    add("--seq-len", type=_positive_int, default=32, help="tokens per window (default: 32)")
    add("--batch-size", type=_positive_int, default=64, help="windows per step (default: 64)")
    add(
        "--lr",
        type=_positive_float,
        default=ASHEM.phase1_lr,
        help="AdamW learning rate (ASHEM: phase 1) (default: %(default)s)",
    )
    add("--phase2-lr", type=_positive_float, help="ASHEM phase-2 learning rate (default: 1e-4)")
    add(
        "--patience",
        type=_non_negative_int,
        default=ASHEM.phase1_patience,
        help="early-stopping patience in epochs (ASHEM: phase 1) (default: %(default)s)",
    )
    add("--phase2-patience", type=_non_negative_int, help="ASHEM phase-2 patience (default: 3)")
    add(
        "--hard-ratio",
        type=_open_unit_float,
        help="ASHEM share of hard tokens, in (0, 1) (default: 0.5)",
    )
    add(
        "--exit-layer",
        type=_positive_int,
        help="deep-supervision exit / early-exit layer, standard/deep-supervision (default: 2)",
    )
    add(
        "--threshold",
        type=_unit_float,
        help="early-exit confidence threshold in [0, 1], 0 = off, standard/deep-supervision "
        "(default: 0; ASHEM picks it from --hard-ratio)",
    )
    add(
        "--exit-ratio",
        type=_open_unit_float,
        help="standard/deep-supervision: instead of --threshold, pick the threshold on the "
        "validation split after training so that this share of its tokens exits at "
        "--exit-layer, in (0, 1) (default: off)",
    )
    add("--context", choices=CONTEXTS, default="propagate", help="default: %(default)s")
    add("--measure", choices=MEASURES, default="max_prob", help="default: %(default)s")
    add(
        "--protocol",
        choices=PROTOCOLS,
        default="honest",
        help="honest: tune on validation, report test; seed: the draft's (default: %(default)s)",
    )
    add("--device", default=_default_device(), help="default: cuda when available, else cpu")
    add("--seed", type=_non_negative_int, default=0, help="default: %(default)s")
    add("--out", help="JSON file to write (default: runs/<strategy>-<dataset>-<protocol>-seed<N>)")
    add("--quiet", action="store_true", help="no progress bars")
    add(
        "--save-model",
        metavar="PATH",
        help="also save the final model (weights, config, threshold) to PATH, for "
        "python -m lego.experiment sweep (default: not saved)",
    )
    add(
        "--checkpoint-dir",
        help="save a checkpoint in this folder after every epoch (default: none)",
    )
    add(
        "--phase1-from",
        metavar="FILE",
        help="ASHEM: skip phase 1 and start phase 2 from the phase-1 state that a run with "
        "--checkpoint-dir kept as DIR/phase1.pt; all settings must match except --context "
        "(default: run phase 1)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (none there: start afresh)",
    )
    return p


def resolve_args(parser: ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill the strategy-specific defaults; flags that the chosen
    strategy does not read are an error (through ``parser.error``)."""
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 50 if args.protocol == "seed" else 10
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir DIR (the folder of the run to continue)")
    if args.phase1_from is not None and args.checkpoint_dir is None:
        parser.error("--phase1-from needs --checkpoint-dir DIR (where this run saves its own)")
    ashem = args.strategy == "ashem"
    used, unused = (ASHEM_FLAGS, STAGE_FLAGS) if ashem else (STAGE_FLAGS, ASHEM_FLAGS)
    for name in unused:
        if getattr(args, name) is not None:
            parser.error(f"--{name.replace('_', '-')} does not apply to --strategy {args.strategy}")
        delattr(args, name)
    for name, default in used.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not ashem and args.threshold > 0 and args.exit_ratio > 0:
        parser.error("--threshold and --exit-ratio both pick the early-exit threshold; give one")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    args.device = str(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    return args


def load_corpus(args: argparse.Namespace) -> Corpus:
    """The dataset of ``args`` as windows of ``args.seq_len + 1`` tokens."""
    samples = args.samples or None
    if args.dataset == "synthetic":
        train = samples or 10_000
        held_out = max(1, train // 8)
        return synthetic_corpus(
            args.seq_len,
            train_windows=train,
            valid_windows=held_out,
            test_windows=held_out,
            seed=args.seed,
        )
    seed = "seed" if args.protocol == "seed" else "standard"
    return load_wikitext2(
        args.seq_len,
        data_dir=args.data_dir,
        samples=samples,
        variant=seed,
        slicing=seed,
        batch_size=args.batch_size,
    )


def build_configs(
    args: argparse.Namespace, vocab_size: int
) -> tuple[ModelConfig, TrainingConfig | ASHEMConfig]:
    """The model config and the training (standard, deep supervision) or ASHEM config of
    ``args``; ``ValueError`` for settings that do not fit together."""
    ashem = args.strategy == "ashem"
    model_config = ModelConfig(
        vocab_size=vocab_size,
        dim=args.dim,
        num_layers=args.phase1_layers if ashem else args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq_len,
        **arch_fields(args.arch, args.dim),
    )
    if ashem:
        return model_config, ASHEMConfig(
            phase1_layers=args.phase1_layers,
            phase1_lr=args.lr,
            phase1_patience=args.patience,
            hard_example_ratio=args.hard_ratio,
            phase2_layers=args.phase2_layers,
            phase2_lr=args.phase2_lr,
            phase2_patience=args.phase2_patience,
        )
    deep = args.strategy == "deep-supervision"
    if (deep or args.threshold > 0 or args.exit_ratio > 0) and not args.exit_layer < args.layers:
        raise ValueError(
            f"--exit-layer ({args.exit_layer}) must lie below --layers ({args.layers}) "
            "for deep supervision or early exit (--threshold > 0 or --exit-ratio)"
        )
    stages = [StageConfig(layers=(1, args.layers))]
    if deep:
        stages = [
            StageConfig(layers=(1, args.exit_layer)),
            StageConfig(layers=(args.exit_layer + 1, args.layers)),
        ]
    training = TrainingConfig(
        stages=stages, routing_threshold=args.threshold, exit_layer=args.exit_layer
    )
    training.check_model(args.layers)
    return model_config, training


def fingerprint(args: argparse.Namespace, corpus: Corpus) -> dict[str, object]:
    """The settings of ``args`` (as flags) and the corpus's sizes: what a checkpoint must
    match to be resumed."""
    settings: dict[str, object] = {
        f"--{name.replace('_', '-')}": value
        for name, value in vars(args).items()
        if name not in NOT_FINGERPRINTED
    }
    settings["vocabulary size"] = corpus.vocab_size
    settings["training windows"] = corpus.train.shape[0]
    return settings


def run(
    args: argparse.Namespace,
    corpus: Corpus,
    model_config: ModelConfig,
    config: TrainingConfig | ASHEMConfig,
    checkpoint: Checkpointer | None = None,
) -> dict:
    """Train and evaluate per ``args``; returns the results (the JSON of the issue).

    ``checkpoint``: saves after every epoch; with a loaded state, the run resumes there.
    """
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = LegoModel(model_config).to(args.device)
    if checkpoint is not None:
        checkpoint.restore_rng()
    rank, world_size = distributed.world()
    common = {
        "batch_size": args.batch_size,
        "context": args.context,
        "measure": args.measure,
        "quiet": args.quiet or rank != 0,
    }
    on_cuda = args.device.startswith("cuda")
    results: dict = {
        "strategy": args.strategy,
        "protocol": args.protocol,
        "dataset": args.dataset,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if on_cuda else platform.machine(),
        "backend": ops.backend(model.embedding.weight),
        "world_size": world_size,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lego_kernels": lego_kernels.__version__,
        },
        "git": git_stamp(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            **vars(args),
            "vocab_size": corpus.vocab_size,
            "model": dataclasses.asdict(model_config),
            "ashem" if isinstance(config, ASHEMConfig) else "training": dataclasses.asdict(config),
        },
    }
    if isinstance(config, ASHEMConfig):
        out = run_ashem(
            model,
            corpus,
            config,
            protocol=args.protocol,
            epochs=args.epochs,
            seed=args.seed,
            checkpoint=checkpoint,
            **common,
        )
        results["threshold"] = out.threshold
        results["hard_ratio"] = out.hard_ratio
        results["history"] = []
        for phase, fit in (("phase1", out.phase1), ("phase2", out.phase2)):
            results[phase] = {
                "best_epoch": fit.best_epoch,
                "val_ppl": fit.best_val_ppl,
                "history": fit.history,
            }
            results["history"] += [{"phase": phase, **record} for record in fit.history]
        results["eval"] = out.eval
    else:
        trainer = Trainer(model, config, lr=args.lr, seed=args.seed, **common)
        on_epoch = None
        if checkpoint is not None:
            if checkpoint.state is not None:
                trainer.load_state_dict(checkpoint.state["trainer"])

            def on_epoch() -> None:
                checkpoint.save({"trainer": trainer.state_dict()})

        fit = trainer.fit(
            corpus.train,
            corpus.valid,
            epochs=args.epochs,
            patience=args.patience,
            on_epoch=on_epoch,
        )
        threshold = config.routing_threshold
        if args.exit_ratio > 0:
            _, conf = exit_outputs(
                model,
                corpus.valid,
                exit_layer=config.exit_layer,
                batch_size=args.batch_size,
                measure=args.measure,
                quiet=common["quiet"],
            )
            threshold = confidence_threshold(conf.confidence, 1.0 - args.exit_ratio)
            results["threshold"] = threshold
        split = "test" if args.protocol == "honest" else "valid"
        metrics = evaluate(
            model,
            corpus.split(split),
            exit_layer=config.exit_layer if threshold > 0 else None,
            threshold=threshold,
            time_full=threshold > 0,
            **common,
        )
        results["best_epoch"] = fit.best_epoch
        results["val_ppl"] = fit.best_val_ppl
        results["history"] = fit.history
        results["eval"] = {"split": split, **metrics}
    # A resumed run counts the time of the processes before it (its checkpoint's).
    results["wall_time_s"] = (
        checkpoint.elapsed() if checkpoint is not None else time.perf_counter() - start
    )
    if args.save_model is not None and rank == 0:
        save_model(args.save_model, model, results)
    return results


def git_stamp() -> dict[str, object] | None:
    """The commit of the checkout that ``lego`` is imported from (``git rev-parse --short
    HEAD``) and whether its tracked files differ from it; ``None`` outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:  # no git, or not a checkout
        return None
    return {"commit": commit, "dirty": dirty}


def save_model(path: str, model: LegoModel, results: dict) -> None:
    """Write the trained ``model`` to ``path`` (atomically): ``model_config`` (dict),
    ``state_dict``, and from ``results`` the run's ``config``, its ``strategy``, the
    early-exit ``threshold`` (0 when none), ``exit_layer``, ``context`` and ``measure``."""
    config = results["config"]
    ashem = results["strategy"] == "ashem"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_atomic(
        {
            "model_config": dataclasses.asdict(model.config),
            "state_dict": model.state_dict(),
            "config": config,
            "strategy": results["strategy"],
            "threshold": results.get("threshold", config.get("threshold", 0.0)),
            "exit_layer": config["phase1_layers"] if ashem else config["exit_layer"],
            "context": config["context"],
            "measure": config["measure"],
        },
        path,
    )


PERCENT = {
    "acc",
    "exit_ratio",
    "layer_cost",
    "flops_cost",
    "phase1_acc",
    "two_stage_acc",
    "hard_ratio",
}
LABELS = {
    "ppl": "perplexity",
    "acc": "accuracy",
    "phase1_ppl": "phase-1 perplexity",
    "phase1_acc": "phase-1 accuracy",
    "phase1_hard_ppl": "phase-1 hard-token perplexity",
    "two_stage_ppl": "two-stage perplexity",
    "two_stage_acc": "two-stage accuracy",
    "hard_ppl": "hard-token perplexity (two-stage)",
    "exit_ratio": "tokens exiting early",
    "layer_cost": "layer cost (seed's count)",
    "flops_cost": "FLOPs cost (heads included)",
    "wall_time_s": "two-stage inference time (s)",
    "full_wall_time_s": "full-depth forward time (s)",
    "hard_ratio": "hard tokens (mining split)",
    "threshold": "confidence threshold",
}


def _cell(key: str, value: float) -> str:
    if key in PERCENT:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if key == "threshold" else f"{value:.2f}"


def format_table(results: dict) -> str:
    """A readable two-column table of ``results`` (as ``run`` returns them)."""
    ev = results["eval"]
    rows: list[tuple[str, str]] = []
    if results["strategy"] == "ashem":
        rows += [(LABELS[k], _cell(k, results[k])) for k in ("threshold", "hard_ratio")]
        for phase in ("phase1", "phase2"):
            info = results[phase]
            rows.append(
                (f"{phase} best epoch / val ppl", f"{info['best_epoch']} / {info['val_ppl']:.2f}")
            )
    else:
        rows.append(("best epoch / val ppl", f"{results['best_epoch']} / {results['val_ppl']:.2f}"))
        if "threshold" in results:
            rows.append((LABELS["threshold"], _cell("threshold", results["threshold"])))
    rows += [(LABELS.get(k, k), _cell(k, v)) for k, v in ev.items() if k != "split"]
    rows.append(("total wall time (s)", _cell("wall_time_s", results["wall_time_s"])))
    title = (
        f"{results['strategy']} on {results['dataset']} ({results['protocol']} protocol, "
        f"{ev['split']} split, {results['device']})"
    )
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{label:<{width}}  {value:>12}" for label, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lego.train``; returns the exit status."""
    parser = build_parser()
    args = resolve_args(parser, argv)
    if args.out is None:
        args.out = os.path.join(
            "runs", f"{args.strategy}-{args.dataset}-{args.protocol}-seed{args.seed}.json"
        )
    try:
        info = distributed.setup(args.device)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(parser, args, info)
    finally:
        distributed.teardown()


def _train(parser: ArgumentParser, args: argparse.Namespace, info: distributed.DistInfo) -> int:
    """``main`` once the process group (if any) is set up; returns the exit status."""
    args.device = info.device
    try:
        if args.batch_size % info.world_size != 0:
            raise ValueError(
                f"--batch-size ({args.batch_size}) is the global batch and must be divisible "
                f"by the {info.world_size} processes; pick a multiple of {info.world_size}"
            )
        corpus = load_corpus(args)
        model_config, config = build_configs(args, corpus.vocab_size)
        checkpoint = None
        if args.checkpoint_dir is not None:
            checkpoint = Checkpointer(
                args.checkpoint_dir,
                fingerprint(args, corpus),
                resume=args.resume,
                write=info.is_main,
                start_from=getattr(args, "phase1_from", None),
                may_differ=PHASE2_ONLY,
            )
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        results = run(args, corpus, model_config, config, checkpoint)
    except NonFiniteLossError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if info.is_main:
        print(format_table(results))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
