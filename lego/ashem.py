"""ASHEM: hard-example mining, selective layer expansion and two-stage inference.

``run_ashem`` (DESIGN section 2):

1. Phase 1: train the ``phase1_layers`` model on all training windows, early stopping
   on validation perplexity, best epoch restored.
2. Threshold: the ``hard_example_ratio`` quantile of the exit confidence at layer
   ``phase1_layers`` on the mining split, so that share of its tokens is hard.
3. Hard tokens: those with confidence below the threshold.
4. Phase 2: ``model.extend(phase2_layers)``; the embedding and the lower layers stay
   frozen (bit-identical); the new layers train on the hard tokens only, with early
   stopping on the validation two-stage perplexity.
5. Two-stage evaluation: easy tokens exit at ``phase1_layers``, hard ones run the
   full depth.

Protocols:

- ``"honest"`` (default): threshold and hard tokens from the training split; every
  exit that already exists stays frozen in phase 2 too (so the exit behaves as it was
  mined); phase 2 runs the new layers through ``LegoModel.run_layers_routed`` on the
  training windows, with the attention ``context`` that inference uses; early stopping
  on validation; final numbers on test, with the real two-stage inference of
  ``LegoModel.early_exit``.
- ``"seed"``: the original code's procedure (``colab2.py``), to compare with the
  draft's numbers: batches in a fixed order (phase 1 in order, phase 2 shuffled once);
  hard tokens mined from the validation split; phase 2 trains the new layers *and the
  shared exit head* (only the embedding and the lower layers are frozen, so the exit's
  confidences move after the threshold was fixed), with each hard token fed alone to
  the new layers (its exit-layer state as a length-1 sequence, no context); early
  stopping and final numbers on validation, with the original's dense two-stage
  evaluation (``lego.trainer.dense_two_stage``: every layer on every token). Its
  ``hard_ppl`` is the original's too: the mined hard tokens, each alone through the
  new layers (``isolated_hard_ppl``); ``two_stage_hard_ppl`` is the two-stage
  evaluation's tokens that did not exit.

With a ``Checkpointer``, ``run_ashem`` saves its state after every epoch of both
phases and at the phase boundary (the extended model, the threshold, the hard-token
mask and the phase-1 numbers; kept as ``phase1.pt`` too, so that a run with another
``context`` can start its phase 2 from the same phase-1 model), and resumes from the
checkpoint's state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lego.checkpoint import PHASE1_NAME, Checkpointer
from lego.config import ASHEMConfig, StageConfig, TrainingConfig
from lego.data import Corpus, batch_indices
from lego.model import LegoModel
from lego.trainer import FitResult, Trainer, evaluate, exit_outputs
from lego_kernels import ops

PROTOCOLS = ("honest", "seed")
# Per protocol: the split that hard tokens are mined from, and the one evaluated.
PROTOCOL_SPLITS = {"honest": ("train", "test"), "seed": ("valid", "valid")}
# Per protocol: the batch order of phase 1 and of phase 2 (``Trainer``'s ``order``).
PROTOCOL_ORDERS = {"honest": ("epoch", "epoch"), "seed": ("none", "once")}
# The keys of ``ASHEMResult.eval`` (honest protocol).
EVAL_KEYS = (
    "split",
    "phase1_ppl",
    "phase1_acc",
    "phase1_hard_ppl",
    "two_stage_ppl",
    "two_stage_acc",
    "hard_ppl",
    "exit_ratio",
    "layer_cost",
    "flops_cost",
    "wall_time_s",
    "full_wall_time_s",
)
# The keys of ``ASHEMResult.eval`` under the seed protocol (nothing is skipped: no times).
SEED_EVAL_KEYS = (*EVAL_KEYS[:-2], "two_stage_hard_ppl")


@dataclass
class ASHEMResult:
    """Outcome of ``run_ashem``.

    ``threshold``: the exit-confidence threshold; ``hard_ratio``: the share of hard
    tokens in the mining split; ``phase1``/``phase2``: their ``FitResult``; ``eval``:
    the split evaluated (``"split"``) and its metrics ``phase1_ppl``, ``phase1_acc``,
    ``phase1_hard_ppl``, ``two_stage_ppl``, ``two_stage_acc``, ``hard_ppl``,
    ``exit_ratio``, ``layer_cost``, ``flops_cost``, ``wall_time_s`` (two-stage inference)
    and ``full_wall_time_s`` (the full-depth forward of the extended model, same batches);
    under the seed protocol ``SEED_EVAL_KEYS`` (module docstring).
    """

    threshold: float
    hard_ratio: float
    phase1: FitResult
    phase2: FitResult
    eval: dict[str, float | str]


class RoutedHardTokenTrainer(Trainer):
    """Phase 2, honest protocol: a batch is ``(windows [B, T + 1], hard bool [B, T])``.

    The frozen lower layers run without grad; the new layers run on the hard tokens only
    through ``run_layers_routed`` (queries, attention output and FFN on the gathered hard
    rows; keys/values per ``context``); the loss is the deep exit's on the hard tokens.
    """

    def batch_loss(self, windows: Tensor, hard: Tensor) -> Tensor:
        model, targets, exit_layer = self.model, windows[:, 1:], self.config.exit_layer
        with torch.no_grad():
            h = model.run_layers(model.embed(windows[:, :-1]), 1, exit_layer)
        h = model.run_layers_routed(
            h, hard, exit_layer + 1, model.config.num_layers, context=self.context
        )
        return model.exit_loss(h[hard], targets[hard])

    def batch_tokens(self, windows: Tensor, hard: Tensor) -> int:
        """The hard tokens, which the loss averages over."""
        return int(hard.sum())


class IsolatedHardTokenTrainer(Trainer):
    """Phase 2, seed protocol: a batch is ``(states [K, D], targets [K])``, the exit-layer
    states of hard tokens, each run through the new layers alone (a length-1 sequence).
    Validation is the original's dense two-stage evaluation."""

    def batch_loss(self, states: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        model = self.model
        h = model.run_layers(
            states[:, None, :], self.config.exit_layer + 1, model.config.num_layers
        )
        return model.exit_loss(h[:, 0], targets, reduction=reduction)

    def batch_tokens(self, states: Tensor, targets: Tensor) -> int:
        """The hard tokens of the batch, which the loss averages over."""
        return targets.numel()

    def validate(self, windows: Tensor) -> dict[str, float]:
        return evaluate(
            self.model,
            windows,
            batch_size=self.eval_batch_size,
            exit_layer=self.config.exit_layer,
            threshold=self.config.routing_threshold,
            measure=self.measure,
            quiet=self.quiet,
            dense=True,
        )

    @torch.no_grad()
    def isolated_hard_ppl(self, states: Tensor, targets: Tensor) -> float:
        """Perplexity of the hard tokens ``(states [K, D], targets [K])``, each alone
        through the new layers (the original's ``evaluate_on_hard_examples``)."""
        total = 0.0
        for idx in batch_indices(targets.numel(), self.eval_batch_size):
            batch = (states[idx].to(self.device), targets[idx].to(self.device))
            total += self.batch_loss(*batch, reduction="sum").item()
        return math.exp(total / targets.numel())


def confidence_threshold(confidence: Tensor, ratio: float) -> float:
    """The ``ratio`` quantile of ``confidence`` (any shape, float32) as an order statistic:
    the ``floor(ratio * n)``-th smallest value (0-based), so that ``confidence < threshold``
    holds for ``floor(ratio * n)`` tokens when values are distinct."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    values = confidence.flatten().sort().values
    if values.numel() == 0:
        raise ValueError("confidence is empty: no token to take a quantile of")
    return values[int(ratio * values.numel())].item()


@torch.no_grad()
def hard_token_states(
    model: LegoModel, windows: Tensor, hard: Tensor, *, exit_layer: int, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """The exit-layer states and targets of the hard tokens (seed protocol's phase-2 data).

    ``windows`` int64 ``[n, T + 1]``, ``hard`` bool ``[n, T]``. Returns ``states``
    ``[K, D]`` (model dtype) and ``targets`` int64 ``[K]``, in token order, on the CPU.
    """
    device = next(model.parameters()).device
    states, targets = [], []
    for idx in batch_indices(windows.shape[0], batch_size):
        batch, mask = windows[idx].to(device), hard[idx].to(device)
        h = model.run_layers(model.embed(batch[:, :-1]), 1, exit_layer)
        states.append(h[mask].cpu())
        targets.append(batch[:, 1:][mask].cpu())
    return torch.cat(states), torch.cat(targets)


def mine_hard_tokens(
    model: LegoModel,
    corpus: Corpus,
    ratio: float,
    *,
    protocol: str,
    measure: str,
    batch_size: int,
    quiet: bool,
) -> dict[str, Any]:
    """Threshold and hard tokens of the trained phase-1 ``model`` (steps 2 and 3).

    Returns ``threshold`` (float), ``hard`` (bool ``[n, T]`` over the mining split's
    windows) and ``phase1_eval`` (``phase1_ppl``, ``phase1_acc``, ``phase1_hard_ppl``
    on the evaluation split, the phase-1 exit being frozen from here on).
    """
    low = model.config.num_layers
    mine_split, eval_split = PROTOCOL_SPLITS[protocol]
    outputs = {
        split: exit_outputs(
            model,
            corpus.split(split),
            exit_layer=low,
            batch_size=batch_size,
            measure=measure,
            quiet=quiet,
        )
        for split in {mine_split, eval_split}
    }
    threshold = confidence_threshold(outputs[mine_split][1].confidence, ratio)
    hard = outputs[mine_split][1].confidence < threshold
    if not hard.any():
        raise ValueError(
            f"no token has exit confidence below the threshold {threshold} "
            f"(hard_example_ratio={ratio}): phase 2 has nothing to learn"
        )
    windows = corpus.split(eval_split)
    nll1, conf1 = outputs[eval_split]
    hard1 = conf1.confidence < threshold
    phase1_eval = {
        "phase1_ppl": math.exp(nll1.mean().item()),
        "phase1_acc": (conf1.prediction == windows[:, 1:]).float().mean().item(),
        "phase1_hard_ppl": math.exp(nll1[hard1].mean().item()) if hard1.any() else math.nan,
    }
    return {"threshold": threshold, "hard": hard, "phase1_eval": phase1_eval}


def run_ashem(
    model: LegoModel,
    corpus: Corpus,
    config: ASHEMConfig,
    *,
    protocol: str = "honest",
    context: str = "propagate",
    measure: str = "max_prob",
    epochs: int = 10,
    batch_size: int = 64,
    eval_batch_size: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    checkpoint: Checkpointer | None = None,
) -> ASHEMResult:
    """Run ASHEM on ``corpus`` with ``model`` (a fresh ``config.phase1_layers``-layer
    ``LegoModel``; it is trained, extended to ``config.phase2_layers`` and left so).

    ``protocol``: ``"honest"`` or ``"seed"`` (module docstring); ``context``: the deep
    layers' attention context in phase 2 and at inference; ``measure``: the confidence
    measure; ``epochs``: the most epochs of each phase; ``batch_size`` /
    ``eval_batch_size``: windows per training step / per evaluation batch (default: the
    same); ``seed``: shuffling;
    ``checkpoint``: saves every epoch and the phase boundary, and holds the state to
    resume from (``checkpoint.state``), if any.
    """
    ops.check_choice("protocol", protocol, PROTOCOLS)
    if not isinstance(config, ASHEMConfig):
        raise TypeError(f"config must be an ASHEMConfig, got {type(config).__name__}")
    low, high = config.phase1_layers, config.phase2_layers
    if model.config.num_layers != low:
        raise ValueError(
            f"model has {model.config.num_layers} layers but config.phase1_layers is {low}; "
            f"build it with ModelConfig(num_layers={low})"
        )
    eval_batch_size = eval_batch_size or batch_size
    common = {"context": context, "measure": measure, "quiet": quiet}
    train_kwargs = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, **common}
    saved = checkpoint.state if checkpoint is not None else None
    order1, order2 = PROTOCOL_ORDERS[protocol]

    def save(state: dict[str, Any], also_as: str | None = None) -> None:
        if checkpoint is not None:
            checkpoint.save(state, also_as=also_as)

    if saved is not None and saved["phase"] == 2:
        mined = saved["mined"]
    else:
        # Phase 1: the shallow model on all training windows.
        phase1_config = TrainingConfig(stages=[StageConfig(layers=(1, low))])
        trainer1 = Trainer(
            model, phase1_config, lr=config.phase1_lr, seed=seed, order=order1, **train_kwargs
        )
        if saved is not None:
            trainer1.load_state_dict(saved["trainer"])
        fit1 = trainer1.fit(
            corpus.train,
            corpus.valid,
            epochs=epochs,
            patience=config.phase1_patience,
            desc="phase 1",
            on_epoch=lambda: save({"phase": 1, "trainer": trainer1.state_dict()}),
        )
        mined = mine_hard_tokens(
            model,
            corpus,
            config.hard_example_ratio,
            protocol=protocol,
            measure=measure,
            batch_size=eval_batch_size,
            quiet=quiet,
        )
        mined["phase1"] = dataclasses.asdict(fit1)
    threshold, hard = mined["threshold"], mined["hard"]

    # Phase 2: new layers on the hard tokens; the lower model frozen (honest: its exit
    # head too; seed: the shared head trains, as in the original).
    model.extend(high)
    model.freeze_lower(low, head=protocol == "honest" and not model.config.per_exit_heads)
    phase2_config = TrainingConfig(
        stages=[StageConfig(layers=(low + 1, high))], routing_threshold=threshold, exit_layer=low
    )
    phase2_class = IsolatedHardTokenTrainer if protocol == "seed" else RoutedHardTokenTrainer
    trainer2 = phase2_class(
        model, phase2_config, lr=config.phase2_lr, seed=seed, order=order2, **train_kwargs
    )
    if saved is not None and saved["phase"] == 2:
        trainer2.load_state_dict(saved["trainer"])
    else:
        save({"phase": 2, "mined": mined, "trainer": trainer2.state_dict()}, PHASE1_NAME)
    mine_split, eval_split = PROTOCOL_SPLITS[protocol]
    mine = corpus.split(mine_split)
    if protocol == "seed":
        data = hard_token_states(model, mine, hard, exit_layer=low, batch_size=eval_batch_size)
    else:
        keep = hard.any(dim=1)
        data = (mine[keep], hard[keep])
    phase2 = trainer2.fit(
        data,
        corpus.valid,
        epochs=epochs,
        patience=config.phase2_patience,
        desc="phase 2",
        on_epoch=lambda: save({"phase": 2, "mined": mined, "trainer": trainer2.state_dict()}),
    )

    # Two-stage evaluation.
    windows = corpus.split(eval_split)
    if protocol == "seed":
        two_stage = trainer2.validate(windows)
        extra = {
            "hard_ppl": trainer2.isolated_hard_ppl(*data),
            "two_stage_hard_ppl": two_stage["hard_ppl"],
        }
    else:
        two_stage = evaluate(
            model,
            windows,
            exit_layer=low,
            threshold=threshold,
            time_full=True,
            batch_size=eval_batch_size,
            **common,
        )
        extra = {
            "hard_ppl": two_stage["hard_ppl"],
            "wall_time_s": two_stage["wall_time_s"],
            "full_wall_time_s": two_stage["full_wall_time_s"],
        }
    metrics = {
        "two_stage_ppl": two_stage["ppl"],
        "two_stage_acc": two_stage["acc"],
        **{k: two_stage[k] for k in ("exit_ratio", "layer_cost", "flops_cost")},
        **extra,
    }
    keys = SEED_EVAL_KEYS if protocol == "seed" else EVAL_KEYS
    ev = {"split": eval_split, **mined["phase1_eval"], **metrics}
    return ASHEMResult(
        threshold=threshold,
        hard_ratio=hard.float().mean().item(),
        phase1=FitResult(**mined["phase1"]),
        phase2=phase2,
        eval={k: ev[k] for k in keys},
    )
