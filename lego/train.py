"""Command line: ``python -m lego.train --strategy NAME`` (any registered strategy).

``--strategy`` takes a name of the registry (``lego.strategies``: ``standard``,
``deep-supervision``, ``ashem``, ``layerskip``, and the entry points of installed
packages; ``--strategy list`` describes them) or ``package.module:Class`` for a
strategy defined anywhere else. This module owns what every strategy shares: the
data, the model's shape and variant, the optimizer and evaluation settings, devices,
checkpoints and the results JSON; the strategy adds its own flags (a flag of another
strategy is an error) and trains and evaluates.

Defaults reproduce the paper draft's configuration: WikiText-2, dim 64, 4 heads,
sequences of 32 tokens, batch 64, 10,000 training windows, ASHEM from 2 to 4
layers with hard ratio 0.5 and its learning rates and patience. Prints a results
table and writes a JSON file (``--out``; default
``runs/<strategy>-<dataset>-<protocol>-seed<seed>.json``, numbered ``-2``, ``-3``, ...
when taken; an existing ``--out`` is an error unless ``--overwrite``)::

    python -m lego.train --strategy ashem
    python -m lego.train --strategy deep-supervision --stages "1-2:0.3,3-4:1" --exit-ratio 0.5
    python -m lego.train --strategy layerskip --layers 4 --exit-layer 2 --exit-ratio 0.5
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
from typing import Any, NoReturn

import torch

import lego_kernels
from lego import distributed
from lego.ashem import PROTOCOLS
from lego.checkpoint import Checkpointer, save_atomic
from lego.config import ARCHS
from lego.data import (
    TEXT_KEY,
    TOKENIZERS,
    Corpus,
    TextCodec,
    load_hub_text,
    load_text_files,
    load_wikitext2,
    load_wikitext103,
    parse_split,
    synthetic_corpus,
)
from lego.model import CONTEXTS, LegoModel
from lego.strategies import RunContext, Strategy, load_strategy, registered, strategy_names
from lego.strategies.base import non_negative_int, positive_float, positive_int
from lego.trainer import NonFiniteLossError
from lego_kernels import ops
from lego_kernels.reference import MEASURES

DEFAULT_STRATEGY = "ashem"
DATASETS = ("wikitext-2", "wikitext-103", "text", "synthetic")
HF_PREFIX = "hf:"
# Settings that do not change the results, left out of a checkpoint's fingerprint
# (so a run may resume on another device, quietly, or write its JSON elsewhere).
NOT_FINGERPRINTED = (
    "device",
    "data_dir",
    "out",
    "overwrite",
    "quiet",
    "checkpoint_dir",
    "resume",
    "save_model",
    "eval_batch_size",
)
# The dataset flags, the datasets they apply to, and their defaults.
DATASET_FLAGS = {
    "data_dir": (("wikitext-2", "wikitext-103"), None),
    "data_files": (("text",), None),
    "tokenizer": (("text", HF_PREFIX), "word"),
    "hf_splits": ((HF_PREFIX,), ("train", "validation", "test")),
    "text_column": ((HF_PREFIX,), "text"),
}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _dataset(text: str) -> str:
    if text in DATASETS or (text.startswith(HF_PREFIX) and len(text) > len(HF_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DATASETS)} or hf:PATH[:CONFIG], got {text!r}"
    )


def _three(text: str, what: str) -> tuple[str, str, str]:
    parts = tuple(part.strip() for part in text.split(","))
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected three {what} (train,valid,test), got {text!r}")
    return parts  # type: ignore[return-value]


def _data_files(text: str) -> tuple[str, str, str]:
    return _three(text, "comma-separated files")


def _hf_splits(text: str) -> tuple[str, str, str]:
    splits = _three(text, "comma-separated hub splits")
    for spec in splits:
        try:
            parse_split(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return splits


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(strategy: Strategy | None = None) -> ArgumentParser:
    """The command line's parser: the shared flags, and ``strategy``'s own (defaults:
    the draft's configuration)."""
    p = ArgumentParser(
        prog="python -m lego.train",
        description="Train an early-exit Transformer with a registered strategy on "
        "WikiText-2/103, text files, a hub dataset or a synthetic corpus; print a results "
        "table and write JSON.",
        allow_abbrev=False,
    )
    add = p.add_argument
    add(
        "--strategy",
        default=DEFAULT_STRATEGY,
        help=f"one of {', '.join(strategy_names())}, or package.module:Class for a strategy "
        "defined elsewhere; 'list' describes them; --strategy NAME --help shows its flags "
        "(default: %(default)s)",
    )
    add(
        "--dataset",
        type=_dataset,
        default="wikitext-2",
        help="wikitext-2, wikitext-103, text (--data-files), synthetic, or hf:PATH[:CONFIG] "
        "(any text dataset of the Hugging Face hub, streamed) (default: %(default)s)",
    )
    add(
        "--data-dir",
        help="wikitext-2/103: folder with wiki.{train,valid,test}.tokens (default: "
        "$LEGO_DATA_DIR for wikitext-2, else the hub)",
    )
    add("--data-files", type=_data_files, help="text: three files, TRAIN,VALID,TEST")
    add("--tokenizer", choices=TOKENIZERS, help="text and hf datasets (default: word)")
    add(
        "--hf-splits",
        type=_hf_splits,
        help="hf: the hub splits that become train,valid,test, each NAME or NAME[START:STOP] "
        "(rows) (default: train,validation,test)",
    )
    add("--text-column", help="hf: the column holding the text (default: text)")
    add(
        "--samples",
        type=non_negative_int,
        default=10_000,
        help="training windows kept, 0 = all (default: %(default)s)",
    )
    add(
        "--eval-samples",
        type=non_negative_int,
        default=0,
        help="keep only the first N windows of the validation and test splits, 0 = all "
        "(default: %(default)s)",
    )
    add(
        "--epochs",
        type=positive_int,
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
    add("--dim", type=positive_int, default=64, help="model width (default: %(default)s)")
    add("--heads", type=positive_int, default=4, help="attention heads (default: %(default)s)")
    add("--seq-len", type=positive_int, default=32, help="tokens per window (default: 32)")
    add("--batch-size", type=positive_int, default=64, help="windows per step (default: 64)")
    add(
        "--eval-batch-size",
        type=positive_int,
        help="windows per evaluation batch (default: --batch-size)",
    )
    add(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="AdamW learning rate (ASHEM: phase 1) (default: %(default)s)",
    )
    add(
        "--patience",
        type=non_negative_int,
        default=1,
        help="stop after this many epochs in a row without a better validation perplexity "
        "(ASHEM: phase 1) (default: %(default)s)",
    )
    add("--context", choices=CONTEXTS, default="propagate", help="default: %(default)s")
    add("--measure", choices=MEASURES, default="max_prob", help="default: %(default)s")
    add(
        "--protocol",
        choices=PROTOCOLS,
        default="honest",
        help="honest: tune on validation, report test; seed: the original code's procedure "
        "and data slices, numbers on validation (default: %(default)s)",
    )
    add("--device", default=_default_device(), help="default: cuda when available, else cpu")
    add("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    add(
        "--out",
        help="JSON file to write (default: runs/<strategy>-<dataset>-<protocol>-seed<N>.json, "
        "numbered when taken)",
    )
    add("--overwrite", action="store_true", help="replace an existing --out file")
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
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (none there: start afresh)",
    )
    if strategy is not None:
        group = p.add_argument_group(f"--strategy {strategy.name}: {strategy.description}")
        strategy.add_arguments(group)
    return p


def _flag_owners(flag: str, chosen: Strategy) -> list[str]:
    """The registered strategies other than ``chosen`` that have the flag ``flag``."""
    owners = []
    for name, cls in registered().items():
        if name == chosen.name:
            continue
        probe = argparse.ArgumentParser(add_help=False)
        cls().add_arguments(probe)
        if flag in probe._option_string_actions:
            owners.append(name)
    return owners


def _strategy_spec(argv: list[str] | None) -> str:
    """The ``--strategy`` value of ``argv`` (its default when absent)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--strategy", default=DEFAULT_STRATEGY)
    return pre.parse_known_args(argv)[0].strategy


def describe_strategies() -> str:
    """One line per strategy of the registry: name and description."""
    lines = []
    for name in strategy_names():
        strategy = load_strategy(name)
        lines.append(f"{name:<20} {strategy.description}")
    return "\n".join(lines)


def resolve_args(argv: list[str] | None) -> tuple[argparse.Namespace, Strategy]:
    """Parse ``argv`` with the chosen strategy's flags; flags that do not apply (another
    strategy's, or a dataset's that is not chosen) and settings that do not fit together
    are errors (one line, exit status 2)."""
    spec = _strategy_spec(argv)
    if spec == "list":
        print(describe_strategies())
        sys.exit(0)
    try:
        strategy = load_strategy(spec)
    except ValueError as e:
        build_parser().error(str(e))
    parser = build_parser(strategy)
    args, extra = parser.parse_known_args(argv)
    if extra:
        flag = extra[0].split("=")[0]
        owners = _flag_owners(flag, strategy) if flag.startswith("--") else []
        if owners:
            parser.error(
                f"{flag} does not apply to --strategy {strategy.name} "
                f"(it is a flag of {', '.join(owners)})"
            )
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    kind = HF_PREFIX if args.dataset.startswith(HF_PREFIX) else args.dataset
    for name, (datasets, default) in DATASET_FLAGS.items():
        if getattr(args, name) is not None and kind not in datasets:
            parser.error(f"--{name.replace('_', '-')} does not apply to --dataset {args.dataset}")
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.dataset == "text" and args.data_files is None:
        parser.error("--dataset text needs --data-files TRAIN,VALID,TEST")
    if args.protocol == "seed" and args.dataset not in ("wikitext-2", "synthetic"):
        parser.error(f"--protocol seed is the draft's WikiText-2 procedure, not {args.dataset}")
    if args.epochs is None:
        args.epochs = 50 if args.protocol == "seed" else 10
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir DIR (the folder of the run to continue)")
    try:
        strategy.check(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    args.device = str(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if args.out is None:
        args.out = _fresh_name(
            os.path.join("runs", f"{strategy.name}-{args.dataset}-{args.protocol}-seed{args.seed}")
        )
    elif os.path.exists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it or pick another")
    return args, strategy


def _fresh_name(stem: str) -> str:
    """``stem.json``, or ``stem-2.json``, ``stem-3.json``, ... the first that is free."""
    path, number = f"{stem}.json", 1
    while os.path.exists(path):
        number += 1
        path = f"{stem}-{number}.json"
    return path


def load_corpus(args: argparse.Namespace) -> Corpus:
    """The dataset of ``args`` as windows of ``args.seq_len + 1`` tokens (a run's JSON
    ``config`` works too; older ones lack the flags added since, which take their
    defaults)."""
    samples = args.samples or None
    flags = {name: getattr(args, name, default) for name, (_, default) in DATASET_FLAGS.items()}
    if args.dataset == "synthetic":
        train = samples or 10_000
        held_out = max(1, train // 8)
        corpus = synthetic_corpus(
            args.seq_len,
            train_windows=train,
            valid_windows=held_out,
            test_windows=held_out,
            seed=args.seed,
        )
    elif args.dataset == "wikitext-2":
        seed = "seed" if args.protocol == "seed" else "standard"
        corpus = load_wikitext2(
            args.seq_len,
            data_dir=args.data_dir,
            samples=samples,
            variant=seed,
            slicing=seed,
            batch_size=args.batch_size,
        )
    elif args.dataset == "wikitext-103":
        corpus = load_wikitext103(args.seq_len, data_dir=args.data_dir, samples=samples)
    elif args.dataset == "text":
        corpus = load_text_files(
            args.seq_len, flags["data_files"], tokenizer=flags["tokenizer"], samples=samples
        )
    else:
        path, _, config = args.dataset.removeprefix(HF_PREFIX).partition(":")
        corpus = load_hub_text(
            args.seq_len,
            path,
            config or None,
            splits=flags["hf_splits"],
            text_column=flags["text_column"],
            tokenizer=flags["tokenizer"],
            samples=samples,
        )
    keep = getattr(args, "eval_samples", 0)
    if keep:
        corpus = dataclasses.replace(corpus, valid=corpus.valid[:keep], test=corpus.test[:keep])
    return corpus


def fingerprint(args: argparse.Namespace, corpus: Corpus, strategy: Strategy) -> dict[str, object]:
    """The settings of ``args`` (as flags) and the corpus's sizes: what a checkpoint must
    match to be resumed."""
    skip = (*NOT_FINGERPRINTED, *strategy.not_fingerprinted)
    settings: dict[str, object] = {
        f"--{name.replace('_', '-')}": value
        for name, value in vars(args).items()
        if name not in skip
    }
    settings["vocabulary size"] = corpus.vocab_size
    settings["training windows"] = corpus.train.shape[0]
    return settings


def git_stamp() -> dict[str, object] | None:
    """The commit of the checkout that ``lego`` is imported from (``git rev-parse --short
    HEAD``) and whether its tracked files differ from it; ``None`` outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=root, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, hung
        return None
    return {"commit": commit, "dirty": dirty}


def run(
    args: argparse.Namespace,
    corpus: Corpus,
    strategy: Strategy,
    checkpoint: Checkpointer | None = None,
) -> dict[str, Any]:
    """Train and evaluate per ``args`` with ``strategy``; returns the results (the JSON).

    ``checkpoint``: saves after every epoch; with a loaded state, the run resumes there.
    """
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model_config = strategy.model_config(args, corpus.vocab_size)
    model = LegoModel(model_config).to(args.device)
    if checkpoint is not None:
        checkpoint.restore_rng()
    rank, world_size = distributed.world()
    on_cuda = args.device.startswith("cuda")
    results: dict[str, Any] = {
        "strategy": strategy.name,
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
            "tokenizer": corpus.tokenizer,
            "model": dataclasses.asdict(model_config),
            **strategy.configs(args),
        },
        "exit_layer": strategy.exit_layer(args),
    }
    context = RunContext(args, corpus, model, checkpoint, quiet=args.quiet or rank != 0)
    results.update(strategy.train(context))
    # A resumed run counts the time of the processes before it (its checkpoint's).
    results["wall_time_s"] = (
        checkpoint.elapsed() if checkpoint is not None else time.perf_counter() - start
    )
    if args.save_model is not None and rank == 0:
        save_model(args.save_model, model, results, corpus.codec)
    return results


def save_model(path: str, model: LegoModel, results: dict, codec: TextCodec) -> None:
    """Write the trained ``model`` to ``path`` (atomically): ``model_config`` (dict),
    ``state_dict``, and from ``results`` the run's ``config``, its ``strategy``, the
    early-exit ``threshold`` (0 when none), ``exit_layer``, ``context`` and ``measure``, and
    ``codec``, the corpus's vocabulary and tokenization that ``python -m lego.generate``
    needs (under ``text``)."""
    config = results["config"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_atomic(
        {
            "model_config": dataclasses.asdict(model.config),
            "state_dict": model.state_dict(),
            "config": config,
            "strategy": results["strategy"],
            "threshold": results.get("threshold", config.get("threshold", 0.0)),
            "exit_layer": results["exit_layer"],
            "context": config["context"],
            "measure": config["measure"],
            TEXT_KEY: codec.state(),
        },
        path,
    )


def format_table(results: dict[str, Any], strategy: Strategy | None = None) -> str:
    """A readable two-column table of ``results`` (as ``run`` returns them; ``strategy``:
    the one that made them, by default loaded from ``results["config"]["strategy"]``)."""
    if strategy is None:
        strategy = load_strategy(results["config"]["strategy"])
    rows = strategy.table_lines(results)
    rows.append(("total wall time (s)", f"{results['wall_time_s']:.2f}"))
    title = (
        f"{results['strategy']} on {results['dataset']} ({results['protocol']} protocol, "
        f"{results['eval']['split']} split, {results['device']})"
    )
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{label:<{width}}  {value:>12}" for label, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lego.train``; returns the exit status."""
    args, strategy = resolve_args(argv)
    prog = build_parser().prog
    try:
        info = distributed.setup(args.device)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(prog, args, strategy, info)
    finally:
        distributed.teardown()


def _train(
    prog: str, args: argparse.Namespace, strategy: Strategy, info: distributed.DistInfo
) -> int:
    """``main`` once the process group (if any) is set up; returns the exit status."""
    args.device = info.device
    try:
        if args.batch_size % info.world_size != 0:
            raise ValueError(
                f"--batch-size ({args.batch_size}) is the global batch and must be divisible "
                f"by the {info.world_size} processes; pick a multiple of {info.world_size}"
            )
        corpus = load_corpus(args)
        strategy.model_config(args, corpus.vocab_size)  # a bad shape fails here, not later
        checkpoint = None
        if args.checkpoint_dir is not None:
            start_from, may_differ = strategy.start_from(args)
            checkpoint = Checkpointer(
                args.checkpoint_dir,
                fingerprint(args, corpus, strategy),
                resume=args.resume,
                write=info.is_main,
                start_from=start_from,
                may_differ=may_differ,
            )
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        results = run(args, corpus, strategy, checkpoint)
    except NonFiniteLossError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if info.is_main:
        print(format_table(results, strategy))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
