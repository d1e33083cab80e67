"""Stage-based training (LEGO deep supervision), early stopping and evaluation.

A batch's loss is the weighted sum of its exit losses (DESIGN section 2)::

    h = embed(inputs)
    for each (layer, weight) of config.layer_weights (ascending):
        h = layers up to that layer (h)
        loss += weight * exit_loss(h, targets, exit_layer=layer)

(one exit per stage end, or per layer of every stage with ``stage_loss="every"``,
weights scaled over depth with ``loss_scale``: ``TrainingConfig``).

Every exit loss is ``lego_kernels.ops.norm_head_cross_entropy`` (through
``LegoModel.exit_loss``), so no ``tokens x vocab`` tensor is stored. When the
only stage with a loss ends at the last layer (``TrainingConfig.plain_path``),
the trainer takes the plain path: one forward through every layer and one exit,
no intermediate exit computed (the seed's "automatic optimization"). The general
path computes every stage's exit, a zero-weight one included.

``Trainer.fit`` runs AdamW with gradient clipping, evaluates the validation
split after every epoch and stops once its perplexity has not improved for
``patience`` epochs in a row (the original code's rule), then restores the best
epoch's weights. The order of the training windows (``order``): ``"epoch"``
(default) draws epoch ``e``'s order from ``seed + e`` (as ``DistributedSampler``
does), so a run resumed from a checkpoint (``Trainer.state_dict`` after any epoch)
sees the same batches as an uninterrupted one; ``"once"`` draws one order from
``seed`` and keeps it every epoch, ``"none"`` keeps the data's order (the original
code's fixed batch lists: shuffled once in its phase 2, in order in its phase 1). A non-finite batch
loss stops training with ``NonFiniteLossError`` before the optimizer step.

Under ``torchrun`` (``lego.distributed``) the batch loss runs through
``DistributedDataParallel``: each rank computes the loss of its shard of the global
batch, scaled by its share of the batch's tokens, so the averaged gradient equals the
single-process gradient of the whole batch.
``routing_threshold`` only acts at evaluation: above 0, validation runs the
two-stage inference of ``LegoModel.early_exit`` at ``exit_layer``.

``evaluate(..., dense=True)`` is the original code's two-stage evaluation: every
layer runs on every token and each token takes the exit its confidence picks.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lego import distributed
from lego.config import TrainingConfig
from lego.data import batch_indices
from lego.model import CONTEXTS, LegoModel
from lego_kernels import ops
from lego_kernels.reference import MEASURES, Confidence

ORDERS = ("epoch", "once", "none")


@dataclass
class FitResult:
    """Outcome of ``Trainer.fit``: the restored (best) epoch, 1-based, its validation
    perplexity, and one record per epoch run (``epoch``, ``train_loss``, ``val_*`` metrics,
    ``time_s``)."""

    best_epoch: int
    best_val_ppl: float
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """A training batch gave a NaN or infinite loss; training stopped before the step."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s shuffled order: a function of ``(seed, epoch)``
    only (``seed + epoch``, as ``torch.utils.data.DistributedSampler``)."""
    return torch.Generator().manual_seed(seed + epoch)


def _device(model: LegoModel) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


@torch.no_grad()
def exit_outputs(
    model: LegoModel,
    windows: Tensor,
    *,
    exit_layer: int | None = None,
    batch_size: int = 64,
    measure: str = "max_prob",
    quiet: bool = True,
) -> tuple[Tensor, Confidence]:
    """Per-token results of one exit on every window, without early exit.

    ``windows``: int64 ``[n, seq_len + 1]``. Returns ``nll`` float32 ``[n, seq_len]``
    and a ``Confidence`` (``confidence`` float32, ``prediction`` int64, ``lse`` float32,
    each ``[n, seq_len]``) of the exit after ``exit_layer`` (default: last), all on the CPU.
    """
    exit_layer = model.config.num_layers if exit_layer is None else exit_layer
    device = _device(model)
    nll, parts = [], []
    bar = _progress(windows.shape[0], f"eval exit {exit_layer}", quiet)
    for idx in batch_indices(windows.shape[0], batch_size):
        batch = windows[idx].to(device)
        h = model.run_layers(model.embed(batch[:, :-1]), 1, exit_layer)
        loss, conf = model.exit_loss(
            h,
            batch[:, 1:],
            exit_layer=exit_layer,
            reduction="none",
            return_confidence=True,
            measure=measure,
        )
        nll.append(loss.cpu())
        parts.append([t.cpu() for t in conf])
        bar.update(len(idx))
    bar.close()
    return torch.cat(nll), Confidence(*(torch.cat(p) for p in zip(*parts, strict=True)))


@torch.no_grad()
def evaluate(
    model: LegoModel,
    windows: Tensor,
    *,
    batch_size: int = 64,
    exit_layer: int | None = None,
    threshold: float = 0.0,
    context: str = "propagate",
    measure: str = "max_prob",
    quiet: bool = True,
    time_full: bool = False,
    dense: bool = False,
) -> dict[str, float]:
    """Perplexity and next-token accuracy on ``windows`` (int64 ``[n, seq_len + 1]``).

    ``threshold == 0``: every token at the exit after ``exit_layer`` (default: last);
    returns ``ppl``, ``acc``. ``threshold > 0``: two-stage inference
    (``LegoModel.early_exit`` with ``exit_layer``, ``context``, ``measure``); also returns
    ``exit_ratio``, ``layer_cost`` (layers run / full depth), ``flops_cost`` (analytic
    FLOPs with every exit head, over the full-depth forward's), ``hard_ppl`` (the tokens
    that did not exit), and ``wall_time_s`` (summed over the calls). ``time_full``: also
    ``full_wall_time_s``, the full-depth forward of the same batches doing the same work
    (every token through every layer, last exit's loss and confidence), each batch timed
    right after its two-stage call so that both see the same machine load.

    ``dense`` (with ``threshold > 0``): the original code's two-stage evaluation instead
    (``dense_two_stage``): no ``wall_time_s``, no ``time_full``.
    """
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0 (0 turns early exit off), got {threshold}")
    if dense and (threshold == 0 or time_full):
        raise ValueError("dense=True needs threshold > 0 and no time_full (nothing is skipped)")
    if dense:
        if exit_layer is None:
            raise ValueError("exit_layer is required with threshold > 0 (the layer tokens exit at)")
        return dense_two_stage(
            model,
            windows,
            exit_layer=exit_layer,
            threshold=threshold,
            batch_size=batch_size,
            measure=measure,
            quiet=quiet,
        )
    if threshold == 0:
        nll, conf = exit_outputs(
            model, windows, exit_layer=exit_layer, batch_size=batch_size, quiet=quiet
        )
        return {
            "ppl": math.exp(nll.mean().item()),
            "acc": (conf.prediction == windows[:, 1:]).float().mean().item(),
        }
    if exit_layer is None:
        raise ValueError("exit_layer is required with threshold > 0 (the layer tokens exit at)")
    device = _device(model)
    totals = dict.fromkeys(("nll", "hard_nll", "correct", "hard", "layers", "flops", "full"), 0.0)
    wall = full_wall = 0.0
    bar = _progress(windows.shape[0], "eval two-stage", quiet)
    for idx in batch_indices(windows.shape[0], batch_size):
        batch = windows[idx].to(device)
        targets = batch[:, 1:]
        out = model.early_exit(
            batch[:, :-1],
            exit_layer=exit_layer,
            threshold=threshold,
            context=context,
            measure=measure,
            targets=targets,
        )
        hard = ~out.exited
        totals["nll"] += out.nll.sum().item()
        totals["hard_nll"] += out.nll[hard].sum().item()
        totals["correct"] += (out.prediction == targets).sum().item()
        totals["hard"] += hard.sum().item()
        totals["layers"] += out.stats.layer_cost * targets.numel()
        totals["flops"] += out.stats.flops
        totals["full"] += out.stats.full_flops
        wall += out.stats.wall_time_s
        if time_full:
            full_wall += _full_depth_time(model, batch[:, :-1], targets, measure)
        bar.update(len(idx))
    bar.close()
    num_tokens = windows.shape[0] * (windows.shape[1] - 1)
    num_hard = totals["hard"]
    metrics = {
        "ppl": math.exp(totals["nll"] / num_tokens),
        "acc": totals["correct"] / num_tokens,
        "exit_ratio": 1.0 - num_hard / num_tokens,
        "layer_cost": totals["layers"] / num_tokens,
        "flops_cost": totals["flops"] / totals["full"],
        "hard_ppl": math.exp(totals["hard_nll"] / num_hard) if num_hard else float("nan"),
        "wall_time_s": wall,
    }
    if time_full:
        metrics["full_wall_time_s"] = full_wall
    return metrics


@torch.no_grad()
def dense_two_stage(
    model: LegoModel,
    windows: Tensor,
    *,
    exit_layer: int,
    threshold: float,
    batch_size: int = 64,
    measure: str = "max_prob",
    quiet: bool = True,
) -> dict[str, float]:
    """Two-stage metrics as the original code computes them, on ``windows`` (int64
    ``[n, seq_len + 1]``): every layer runs on every token with full context; a token
    whose confidence at ``exit_layer`` is ``>= threshold`` takes that exit's prediction
    and loss, the others the last layer's.

    Returns ``ppl``, ``acc``, ``exit_ratio``, ``hard_ppl`` (the tokens that did not exit),
    ``layer_cost`` (the seed's count: layers a skipping implementation would run, over the
    full depth) and ``flops_cost`` (analytic FLOPs of such an implementation, heads
    included: the lower layers and the exit on every token, the deeper layers and the
    last head on the tokens that do not exit, counted per token; over the full-depth
    forward). Nothing here skips work: no wall time is reported.
    """
    num_layers = model.config.num_layers
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer must be in [1, {num_layers - 1}], got {exit_layer}")
    device = _device(model)
    nll_sum = hard_nll = correct = num_hard = 0.0
    bar = _progress(windows.shape[0], "eval two-stage (dense)", quiet)
    for idx in batch_indices(windows.shape[0], batch_size):
        batch = windows[idx].to(device)
        targets = batch[:, 1:]
        low = model.run_layers(model.embed(batch[:, :-1]), 1, exit_layer)
        high = model.run_layers(low, exit_layer + 1, num_layers)
        nll_low, conf = model.exit_loss(
            low,
            targets,
            exit_layer=exit_layer,
            reduction="none",
            return_confidence=True,
            measure=measure,
        )
        nll_high, deep = model.exit_loss(
            high, targets, reduction="none", return_confidence=True, measure=measure
        )
        hard = ~(conf.confidence >= threshold)
        nll = torch.where(hard, nll_high, nll_low)
        prediction = torch.where(hard, deep.prediction, conf.prediction)
        nll_sum += nll.sum().item()
        hard_nll += nll_high[hard].sum().item()
        correct += (prediction == targets).sum().item()
        num_hard += hard.sum().item()
        bar.update(len(idx))
    bar.close()
    num_tokens = windows.shape[0] * (windows.shape[1] - 1)
    share = num_hard / num_tokens
    seq_len = windows.shape[1] - 1
    low_flops = model.flops(1, seq_len, depth=exit_layer)
    deep_flops = model.flops(1, seq_len) - model.flops(1, seq_len, depth=exit_layer, head_tokens=0)
    return {
        "ppl": math.exp(nll_sum / num_tokens),
        "acc": correct / num_tokens,
        "exit_ratio": 1.0 - share,
        "layer_cost": (exit_layer + share * (num_layers - exit_layer)) / num_layers,
        "flops_cost": (low_flops + share * deep_flops) / model.flops(1, seq_len),
        "hard_ppl": math.exp(hard_nll / num_hard) if num_hard else float("nan"),
    }


def _full_depth_time(model: LegoModel, ids: Tensor, targets: Tensor, measure: str) -> float:
    """Seconds of the full-depth forward of ``ids`` ``[B, T]``: every layer on every token,
    then the last exit's per-token loss and confidence (what ``early_exit`` computes)."""
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    h = model.run_layers(model.embed(ids), 1, model.config.num_layers)
    model.exit_loss(h, targets, reduction="none", return_confidence=True, measure=measure)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


class _BatchLoss(nn.Module):
    """``trainer.batch_loss`` as a module's forward, so that ``DistributedDataParallel``
    (which synchronizes the gradients of what its forward computes) can wrap it."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.model = trainer.model
        self.trainer = trainer

    def forward(self, *batch: Tensor) -> Tensor:
        if batch[0].shape[0] == 0:
            # This rank's shard of a small last batch is empty: a zero loss that still
            # reaches every trained parameter, as DDP expects.
            return sum(p.sum() * 0 for p in self.trainer.params)
        return self.trainer.batch_loss(*batch)


class Trainer:
    """AdamW + gradient clipping + early stopping around the stage losses of ``config``.

    Trains the parameters of ``model`` that require grad. ``context`` and ``measure``
    are those of two-stage validation (``config.routing_threshold > 0``), done in batches
    of ``eval_batch_size`` windows (default: ``batch_size``). ``seed``
    drives the shuffling of the training windows, ``order`` its kind (``ORDERS``, module
    docstring); ``quiet`` hides the progress bars. During ``fit``, ``step`` is the
    0-based index of the current optimizer step over the whole run and ``total_steps``
    the number of steps that ``epochs`` would take (curricula read them).
    Subclasses change what a batch is by overriding ``batch_loss`` and ``batch_tokens``
    (see ``lego.ashem``). ``state_dict``/``load_state_dict`` save and restore the model,
    the optimizer and the progress of ``fit`` (for checkpoints).
    """

    def __init__(
        self,
        model: LegoModel,
        config: TrainingConfig,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        context: str = "propagate",
        measure: str = "max_prob",
        seed: int = 0,
        quiet: bool = False,
        order: str = "epoch",
    ) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        config.check_model(model.config.num_layers)
        if config.routing_threshold > 0 and config.exit_layer >= model.config.num_layers:
            raise ValueError(
                f"config.exit_layer ({config.exit_layer}) must lie below the model's "
                f"{model.config.num_layers} layers when routing_threshold > 0 (early exit)"
            )
        for name, value in (("lr", lr), ("grad_clip", grad_clip)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {eval_batch_size}")
        ops.check_choice("context", context, CONTEXTS)
        ops.check_choice("measure", measure, MEASURES)
        ops.check_choice("order", order, ORDERS)
        self.model = model
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter that requires grad: nothing to train")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.context = context
        self.measure = measure
        self.quiet = quiet
        self.seed = seed
        self.order = order
        self.step, self.total_steps = 0, 1
        self.device = _device(model)
        # The per-exit losses of the last stage_losses call, to name a non-finite one.
        self.last_terms: list[tuple[int, Tensor]] = []
        # Progress of fit: epochs done, whether it stopped, the best epoch so far.
        self.epoch = 0
        self.finished = False
        self.result = FitResult(best_epoch=0, best_val_ppl=math.inf)
        self.best_state: dict[str, Tensor] | None = None
        self.loss_fn: Callable[..., Tensor] = self.batch_loss
        if distributed.world()[1] > 1:
            # Per-exit heads that carry no loss get no gradient: let DDP look for them.
            self.loss_fn = DistributedDataParallel(
                _BatchLoss(self),
                device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=model.config.per_exit_heads,
            )

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and progress of ``fit`` (epochs done, whether it stopped, the
        best epoch, its validation perplexity and weights, the history). It refers to the
        live tensors and history, as ``nn.Module.state_dict`` does: save it at once, or
        deep-copy it to keep it."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "finished": self.finished,
            "best_epoch": self.result.best_epoch,
            "best_val_ppl": self.result.best_val_ppl,
            "history": self.result.history,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; ``fit`` then goes on after its epoch."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.finished = state["epoch"], state["finished"]
        self.result = FitResult(state["best_epoch"], state["best_val_ppl"], list(state["history"]))
        self.best_state = state["best_state"]

    def stage_losses(self, inputs: Tensor, targets: Tensor, *, plain: bool | None = None) -> Tensor:
        """Weighted sum of the exit losses (``config.layer_weights``) on ``inputs``/``targets``
        (int64 ``[B, T]``).

        ``plain``: ``None`` takes the plain path when ``config.plain_path`` allows it;
        ``True``/``False`` force the plain or the general path (they give the same loss
        when only the last layer has loss). Returns a float32 scalar.
        """
        model = self.model
        num_layers = model.config.num_layers
        weights = self.config.layer_weights(num_layers)
        if plain is None:
            plain = self.config.plain_path(num_layers)
        h = model.embed(inputs)
        if plain:
            with_loss = [(layer, w) for layer, w in weights if w > 0]
            if [layer for layer, _ in with_loss] != [num_layers]:
                raise ValueError("plain=True needs the only exit with loss to be the last layer")
            h = model.run_layers(h, 1, num_layers)
            term = model.exit_loss(h, targets)
            self.last_terms = [(num_layers, term.detach())]
            return with_loss[0][1] * term
        loss = h.new_zeros((), dtype=torch.float32)
        self.last_terms = []
        done = 0
        for layer, weight in weights:
            h = model.run_layers(h, done + 1, layer)
            done = layer
            term = model.exit_loss(h, targets, exit_layer=layer)
            self.last_terms.append((layer, term.detach()))
            loss = loss + weight * term
        return loss

    def batch_loss(self, windows: Tensor) -> Tensor:
        """Loss of one training batch: the stage losses of ``windows`` (int64 ``[B, T + 1]``)."""
        return self.stage_losses(windows[:, :-1], windows[:, 1:])

    def batch_tokens(self, windows: Tensor) -> int:
        """The number of tokens that ``batch_loss`` averages over."""
        return windows[:, 1:].numel()

    def validate(self, windows: Tensor) -> dict[str, float]:
        """Metrics on the validation windows; ``ppl`` drives early stopping."""
        threshold = self.config.routing_threshold
        return evaluate(
            self.model,
            windows,
            batch_size=self.eval_batch_size,
            exit_layer=self.config.exit_layer if threshold > 0 else None,
            threshold=threshold,
            context=self.context,
            measure=self.measure,
            quiet=self.quiet,
        )

    def _non_finite_stages(self) -> str:
        """The exits whose last loss was not finite, with their stages (all when unknown)."""
        bad = [layer for layer, term in self.last_terms if not torch.isfinite(term)]
        if not bad:
            return ", ".join(f"stage layers {s.layers}" for s in self.config.stages)
        stage_of = {
            layer: s.layers
            for s in self.config.stages
            for layer in range(s.layers[0], s.layers[1] + 1)
        }
        return ", ".join(f"stage layers {stage_of[layer]} (exit layer {layer})" for layer in bad)

    def train_epoch(
        self, data: tuple[Tensor, ...], epoch: int = 1, desc: str = "training"
    ) -> float:
        """Epoch ``epoch`` (1-based) over ``data`` (tensors sharing their first dim, batched
        together and handed to ``batch_loss``) in the order ``order`` gives;
        returns the mean batch loss. Raises ``NonFiniteLossError`` (naming ``desc``, the
        epoch, the step and the stage) before stepping on a NaN or infinite loss."""
        self.model.train()
        world_size = distributed.world()[1]
        total, count = 0.0, 0
        num = data[0].shape[0]
        steps = math.ceil(num / self.batch_size)
        bar = _progress(num, "train", self.quiet)
        order = batch_indices(
            num,
            self.batch_size,
            shuffle=self.order != "none",
            generator=epoch_generator(self.seed, epoch if self.order == "epoch" else 1),
        )
        for step, idx in enumerate(order, 1):
            self.step = (epoch - 1) * steps + step - 1
            part = distributed.shard(idx)
            loss = self.loss_fn(*(t[part].to(self.device) for t in data))
            if world_size > 1:
                # DDP averages the ranks' gradients: weigh each rank's mean loss by its
                # share of the global batch's tokens, times the number of ranks.
                share = self.batch_tokens(*(t[part] for t in data)) / self.batch_tokens(
                    *(t[idx] for t in data)
                )
                loss = loss * (share * world_size)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Read the loss after launching backward (the host waits for the device here).
            if world_size > 1:
                value = distributed.all_reduce_sum(loss.detach().clone()).item() / world_size
            else:
                value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite training loss ({value}) in {desc}, epoch {epoch}, step "
                    f"{step} of {steps}, at {self._non_finite_stages()}; stopped before the "
                    "optimizer step (a --checkpoint-dir keeps the last good epoch): lower --lr "
                    "or check the data"
                )
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            total += value * len(idx)
            count += len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        self.model.eval()
        return total / count

    def fit(
        self,
        train: Tensor | tuple[Tensor, ...],
        valid: Tensor,
        *,
        epochs: int,
        patience: int,
        desc: str = "training",
        on_epoch: Callable[[], None] | None = None,
    ) -> FitResult:
        """Train up to ``epochs`` epochs with early stopping on validation perplexity.

        ``train``: the training windows (int64 ``[n, T + 1]``) or a tuple of tensors that
        ``batch_loss`` takes; ``valid``: validation windows. Stops after ``patience``
        epochs in a row without improvement (``patience=0``: after the first epoch) and
        restores the best epoch's weights. Goes on from
        the progress in this trainer (after ``load_state_dict``); ``on_epoch`` is called
        after every epoch, its progress recorded (where a checkpoint is saved).
        """
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        data = train if isinstance(train, tuple) else (train,)
        if data[0].shape[0] == 0:
            raise ValueError("train is empty: no training example to fit on")
        result = self.result
        self.total_steps = epochs * math.ceil(data[0].shape[0] / self.batch_size)
        bar = tqdm(
            total=epochs, initial=self.epoch, desc=desc, disable=self.quiet, dynamic_ncols=True
        )
        while not self.finished:
            epoch = self.epoch + 1
            start = time.perf_counter()
            train_loss = self.train_epoch(data, epoch, desc)
            metrics = self.validate(valid)
            record = {"epoch": epoch, "train_loss": train_loss}
            record.update({f"val_{k}": v for k, v in metrics.items()})
            record["time_s"] = time.perf_counter() - start
            result.history.append(record)
            bar.update(1)
            bar.set_postfix(train_loss=f"{train_loss:.3f}", val_ppl=f"{metrics['ppl']:.2f}")
            if metrics["ppl"] < result.best_val_ppl:
                result.best_epoch, result.best_val_ppl = epoch, metrics["ppl"]
                self.best_state = copy.deepcopy(self.model.state_dict())
            self.epoch = epoch
            self.finished = epoch == epochs or epoch - result.best_epoch >= patience
            if on_epoch is not None:
                on_epoch()
        bar.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return result
