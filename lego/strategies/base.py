"""The ``Strategy`` interface and the registry that ``python -m lego.train`` looks names up in.

A strategy is a class that says which flags it reads, how it builds its model, how it
trains and evaluates, and how its results read as lines of the printed table and rows
of the experiment's tables. The command line owns everything else (data, the model's
shape and variant, optimizer settings, devices, checkpoints, the results JSON).

A strategy is found by:

- its ``name``, for the classes decorated with ``@register`` (the built-in ones in
  ``lego.strategies``) and for those that a package declares under the entry-point
  group ``lego.strategies`` (``[project.entry-points."lego.strategies"] name =
  "package.module:Class"``);
- ``"package.module:Class"``: any importable subclass of ``Strategy``, no registration
  needed.

Flags: ``add_arguments`` adds the strategy's own flags to the parser; a flag of
another registered strategy given to this one is an error. ``check`` then validates
them together (``ValueError``, printed as one line by the command line).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from lego.checkpoint import Checkpointer
from lego.config import ModelConfig, arch_fields
from lego.data import Corpus
from lego.model import LegoModel

ENTRY_POINT_GROUP = "lego.strategies"
_REGISTRY: dict[str, type[Strategy]] = {}

# How the printed table and the experiment's tables show a metric.
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
    "two_stage_hard_ppl": "hard-token perplexity (two-stage)",
    "exit_ratio": "tokens exiting early",
    "layer_cost": "layer cost (seed's count)",
    "flops_cost": "FLOPs cost (heads included)",
    "wall_time_s": "two-stage inference time (s)",
    "full_wall_time_s": "full-depth forward time (s)",
    "hard_ratio": "hard tokens (mining split)",
    "threshold": "confidence threshold",
}


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def open_unit_float(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def cell(key: str, value: float) -> str:
    """``value`` of metric ``key`` as the printed table shows it."""
    if key in PERCENT:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if key == "threshold" else f"{value:.2f}"


def eval_lines(ev: dict[str, Any], labels: dict[str, str] = LABELS) -> list[tuple[str, str]]:
    """``(label, value)`` of every metric of an ``eval`` dict but its ``split``."""
    return [(labels.get(k, k), cell(k, v)) for k, v in ev.items() if k != "split"]


@dataclass
class RunContext:
    """What a strategy's ``train`` gets: the parsed ``args``, the ``corpus``, a fresh
    ``model`` (built from ``model_config``, on ``args.device``), the run's
    ``checkpoint`` (``None`` without ``--checkpoint-dir``; ``checkpoint.state`` holds
    what the strategy saved, when resuming) and ``quiet`` (no progress bars here)."""

    args: argparse.Namespace
    corpus: Corpus
    model: LegoModel
    checkpoint: Checkpointer | None
    quiet: bool

    @property
    def split(self) -> str:
        """The split the final numbers come from: test (honest protocol) or valid (seed)."""
        return "test" if self.args.protocol == "honest" else "valid"

    def trainer_kwargs(self) -> dict[str, Any]:
        """The ``Trainer`` keywords that every strategy takes from the shared flags."""
        args = self.args
        return {
            "seed": args.seed,
            "batch_size": args.batch_size,
            "eval_batch_size": args.eval_batch_size,
            "context": args.context,
            "measure": args.measure,
            "quiet": self.quiet,
        }

    def save_every_epoch(self, state: Callable[[], dict[str, Any]]) -> Callable[[], None] | None:
        """An ``on_epoch`` callback for ``Trainer.fit`` that saves ``state()`` to the
        checkpoint (``None`` without one)."""
        if self.checkpoint is None:
            return None
        checkpoint = self.checkpoint
        return lambda: checkpoint.save(state())


class Strategy:
    """A training strategy of ``python -m lego.train`` (module docstring).

    Subclasses set ``name`` (what ``--strategy`` takes and the results JSON records) and
    ``description`` (one line for ``--strategy list``), and implement ``train``; the
    other methods have defaults.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Flags (dest names) left out of a checkpoint's fingerprint: they do not change results.
    not_fingerprinted: ClassVar[tuple[str, ...]] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this strategy's own flags to ``parser`` (an ``ArgumentParser`` or one of its
        argument groups: call ``parser.add_argument`` only) (default: none)."""

    def check(self, args: argparse.Namespace) -> None:
        """Check the parsed flags together; ``ValueError`` naming the flags otherwise."""

    def num_layers(self, args: argparse.Namespace) -> int:
        """The depth of the model ``train`` starts from (default: ``--layers``)."""
        return args.layers

    def model_config(self, args: argparse.Namespace, vocab_size: int) -> ModelConfig:
        """The model ``train`` starts from: the shared shape flags at ``num_layers``."""
        return ModelConfig(
            vocab_size=vocab_size,
            dim=args.dim,
            num_layers=self.num_layers(args),
            num_heads=args.heads,
            max_seq_len=args.seq_len,
            **arch_fields(args.arch, args.dim),
        )

    def configs(self, args: argparse.Namespace) -> dict[str, Any]:
        """Configs to record in the results JSON's ``config`` (name -> dict)."""
        return {}

    def exit_layer(self, args: argparse.Namespace) -> int | None:
        """The layer a saved model lets tokens exit at (``None``: no early exit)."""
        return None

    def start_from(self, args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
        """A checkpoint file of another run to start from, and the fingerprint entries
        (flags) that may differ from it (default: none)."""
        return None, ()

    def train(self, run: RunContext) -> dict[str, Any]:
        """Train ``run.model`` and evaluate it; returns the strategy's part of the results
        JSON: at least ``eval`` (``{"split": ..., metric: value}``) and ``history`` (one
        record per epoch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement train()")

    def table_lines(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        """``(label, value)`` lines of the printed table for ``results`` (default: the
        ``eval`` metrics)."""
        return eval_lines(results["eval"])

    def rows(self, results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
        """The experiment table rows (``{label: {column: value}}``, columns as in
        ``lego.experiment.COLUMNS``) that one results JSON gives (default: none)."""
        return {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` findable by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError(f"register takes a Strategy subclass with a name, got {cls!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is taken by {_REGISTRY[cls.name]!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def strategy_names() -> tuple[str, ...]:
    """The registered names and those of installed entry points, in that order."""
    return tuple(dict.fromkeys([*_REGISTRY, *_entry_points()]))


def registered() -> dict[str, type[Strategy]]:
    """The registered strategy classes by name (the built-in ones and those imported)."""
    return dict(_REGISTRY)


def _import_class(spec: str) -> type[Strategy]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--strategy {spec}: cannot import {module_name} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"--strategy {spec}: {attr} in {module_name} is not a Strategy subclass")
    return cls


def load_strategy(spec: str) -> Strategy:
    """A new instance of the strategy ``spec``: a registered or entry-point name, or
    ``"package.module:Class"``. ``ValueError`` naming the known names otherwise."""
    if ":" in spec:
        cls = _import_class(spec)
    elif spec in _REGISTRY:
        cls = _REGISTRY[spec]
    elif spec in _entry_points():
        cls = _import_class(_entry_points()[spec].value)
    else:
        raise ValueError(
            f"--strategy: unknown strategy {spec!r}; known: {', '.join(strategy_names())}, "
            "or package.module:Class"
        )
    if not cls.name:
        raise ValueError(f"--strategy {spec}: {cls.__name__}.name is empty; give it a name")
    return cls()
