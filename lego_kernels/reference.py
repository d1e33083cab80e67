"""Plain-PyTorch reference of every ``lego_kernels`` op.

This module is the spec: the tests compare the Triton kernels with it, and
``lego_kernels.ops`` runs it for CPU tensors (the ``"torch"`` backend). It is
written for clarity, with one concession to memory: the exit-head ops walk
over the tokens in chunks of ``CHUNK_TOKENS`` rows, so that neither the forward
nor the backward of the loss ever holds an ``N x V`` tensor (only
``CHUNK_TOKENS x V`` at a time).

Arguments are assumed valid (``ops`` validates them). Shapes:
``x [..., D]``, ``weight [V, D]`` (the ``nn.Linear`` layout), ``norm_weight`` and
``norm_bias`` ``[D]`` or ``None``, ``targets`` int64 ``[...]``.

Precision: every op computes in ``promote_types(x.dtype, float32)``: float32
for float32/bfloat16/float16 inputs and float64 for float64 inputs (the tests
use float64 as the high-precision reference), also under autocast, which the
head ops switch off for their own computation.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

NORMS = ("rms", "layer", None)
MEASURES = ("max_prob", "margin", "entropy")
REDUCTIONS = ("mean", "sum", "none")
CHUNK_TOKENS = 1024


class Confidence(NamedTuple):
    """Per-token exit statistics, each of shape ``x.shape[:-1]``.

    - ``confidence``: float32, higher = more confident (see ``MEASURES``);
    - ``prediction``: int64, argmax of the logits;
    - ``lse``: float32, logsumexp of the logits (log-probability of token t is
      ``logit_t - lse``).
    """

    confidence: Tensor
    prediction: Tensor
    lse: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (the head ops choose their own precision)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def apply_norm(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
) -> Tensor:
    """Normalize the last dimension of ``x [..., D]``; returns the compute dtype.

    - ``"rms"``: ``x * rsqrt(mean(x^2) + eps) * norm_weight``
    - ``"layer"``: ``(x - mean) * rsqrt(var + eps) * norm_weight + norm_bias``
      (biased variance, as ``torch.nn.functional.layer_norm``)
    - ``None``: identity

    A ``None`` weight means 1 and a ``None`` bias means 0.
    """
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype)
    if norm is None:
        return x
    if norm == "rms":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    if norm_weight is not None:
        y = y * norm_weight.to(dtype)
    if norm_bias is not None:
        y = y + norm_bias.to(dtype)
    return y


def norm_head_logits(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    norm: str | None = "rms",
    eps: float = 1e-6,
) -> Tensor:
    """``norm(x) @ weight.T``: logits ``[..., V]`` in ``x.dtype``, computed in the compute dtype."""
    h = apply_norm(x, norm_weight, norm_bias, norm, eps)
    return (h @ weight.to(h.dtype).T).to(x.dtype)


def confidence_from_logits(logits: Tensor, *, measure: str = "max_prob") -> Confidence:
    """Confidence, argmax and logsumexp of ``logits [..., V]``.

    - ``max_prob``: ``p1 = exp(max - lse)``;
    - ``margin``: ``p1 - p2``, the top-2 probability gap (``p2 = 0`` when V = 1);
    - ``entropy``: ``1 - H / ln(V)`` with ``H = lse - sum(p * logits)`` in nats
      (1 when V = 1).
    """
    logits = logits.to(compute_dtype(logits.dtype))
    vocab = logits.shape[-1]
    lse = torch.logsumexp(logits, dim=-1)
    top, prediction = logits.max(dim=-1)
    if measure == "max_prob":
        confidence = torch.exp(top - lse)
    elif measure == "margin":
        if vocab == 1:
            confidence = torch.exp(top - lse)
        else:
            top2 = logits.topk(2, dim=-1).values
            confidence = torch.exp(top2[..., 0] - lse) - torch.exp(top2[..., 1] - lse)
    else:
        if vocab == 1:
            confidence = torch.ones_like(lse)
        else:
            p = torch.exp(logits - lse.unsqueeze(-1))
            entropy = lse - (p * logits).sum(-1)
            confidence = 1.0 - entropy / math.log(vocab)
    return Confidence(confidence, prediction, lse)


def _chunks(num_tokens: int) -> range:
    """Start rows of the token chunks (``CHUNK_TOKENS`` is read at call time)."""
    return range(0, num_tokens, CHUNK_TOKENS)


def exit_confidence(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    norm: str | None = "rms",
    eps: float = 1e-6,
    measure: str = "max_prob",
) -> Confidence:
    """``confidence_from_logits(norm(x) @ weight.T)``, chunked over tokens (no grad)."""
    lead, dim = x.shape[:-1], x.shape[-1]
    with torch.no_grad(), no_autocast(x.device):
        h = apply_norm(x.reshape(-1, dim), norm_weight, norm_bias, norm, eps)
        w = weight.to(h.dtype)
        parts = [
            confidence_from_logits(h[i : i + CHUNK_TOKENS] @ w.T, measure=measure)
            for i in _chunks(h.shape[0])
        ]
        if not parts:  # N = 0
            parts = [confidence_from_logits(h @ w.T, measure=measure)]
    return Confidence(*(torch.cat(p).reshape(lead) for p in zip(*parts, strict=True)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token ``lse_i - (h_i . w_{t_i})`` over token chunks, never holding ``N x V``.

    ``measure=None`` computes the loss only (the confidence outputs are then
    empty). Forward keeps only ``h``, ``weight``, ``targets`` and ``lse``; backward
    recomputes each chunk's logits, forms ``G = softmax - onehot(target)``
    scaled by the incoming per-token gradient, and accumulates
    ``dh = G @ W`` and ``dW = G^T @ h``, each only when required.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        measure: str | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        losses, lses, confs, preds = [], [], [], []
        for i in _chunks(h.shape[0]):
            logits = h[i : i + CHUNK_TOKENS] @ weight.T
            if measure is None:  # loss only: skip the confidence statistics
                lse = torch.logsumexp(logits, dim=1)
            else:
                conf = confidence_from_logits(logits, measure=measure)
                lse = conf.lse
                confs.append(conf.confidence)
                preds.append(conf.prediction)
            target_logit = logits.gather(1, safe_targets[i : i + CHUNK_TOKENS, None])[:, 0]
            losses.append(lse - target_logit)
            lses.append(lse)
        empty = h.new_zeros(0)
        loss = torch.where(valid, torch.cat([empty, *losses]), 0.0)
        lse = torch.cat([empty, *lses])
        confidence = torch.cat([empty, *confs])
        prediction = torch.cat([targets.new_zeros(0), *preds])
        ctx.save_for_backward(h, weight, safe_targets, valid, lse)
        ctx.mark_non_differentiable(confidence, prediction, lse)
        return loss, confidence, prediction, lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        h, weight, targets, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        scale = torch.where(valid, grad_loss, 0.0)
        with no_autocast(h.device):
            for i in _chunks(h.shape[0]):
                rows = slice(i, i + CHUNK_TOKENS)
                g = (h[rows] @ weight.T).sub_(lse[rows, None]).exp_()  # softmax, in place
                g[torch.arange(g.shape[0]), targets[rows]] -= 1.0
                g *= scale[rows, None]
                if need_h:
                    grad_h[rows] = g @ weight
                if need_w:
                    grad_w += g.T @ h[rows]
        return grad_h, grad_w, None, None, None


def norm_head_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    norm: str | None = "rms",
    eps: float = 1e-6,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weights: Tensor | None = None,
    return_confidence: bool = False,
    measure: str = "max_prob",
) -> Tensor | tuple[Tensor, Confidence]:
    """``cross_entropy(norm(x) @ weight.T, targets)`` without an ``N x V`` tensor.

    Per token: ``loss_i = w_i * (lse_i - logit_{i, t_i})``, 0 where
    ``t_i == ignore_index``; ``w_i = 1`` without ``token_weights``.
    Reductions: ``"none"`` gives ``[...]``, ``"sum"`` gives ``sum(loss_i)``,
    ``"mean"`` gives ``sum(loss_i) / (number of non-ignored tokens)`` (0 when
    there is none, where ``torch.nn.functional.cross_entropy`` gives NaN).
    The loss (and confidence) come back in the compute dtype (float32 for
    float32/half inputs). Differentiable w.r.t. ``x``, ``weight``,
    ``norm_weight`` and ``norm_bias``.
    """
    lead, dim = x.shape[:-1], x.shape[-1]
    with no_autocast(x.device):
        h = apply_norm(x.reshape(-1, dim), norm_weight, norm_bias, norm, eps)
        flat_targets = targets.reshape(-1)
        loss, confidence, prediction, lse = _ChunkedLinearCrossEntropy.apply(
            h,
            weight.to(h.dtype),
            flat_targets,
            ignore_index,
            measure if return_confidence else None,
        )
    if token_weights is not None:
        loss = loss * token_weights.reshape(-1).to(loss.dtype)
    if reduction == "none":
        loss = loss.reshape(lead)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        num_valid = (flat_targets != ignore_index).sum().clamp(min=1)
        loss = loss.sum() / num_valid
    if not return_confidence:
        return loss
    return loss, Confidence(confidence.reshape(lead), prediction.reshape(lead), lse.reshape(lead))


# ----------------------------------------------------------------------------- routing


class RoutePlan(NamedTuple):
    """The hard tokens (those that continue past an exit), as built by ``route``.

    - ``indices``: int64 ``[K]``, flat token indices in ascending order; with a
      capacity ``K = capacity`` and the slots past the count hold -1;
    - ``count``: 0-d int64 tensor on the device, the true number of hard tokens
      (``count > capacity`` means some hard tokens did not fit and exit instead);
    - ``num_tokens``: ``N``, the number of tokens the plan was built for.
    """

    indices: Tensor
    count: Tensor
    num_tokens: int


def hard_mask(confidence: Tensor, threshold: float | Tensor) -> Tensor:
    """``not (confidence >= threshold)``, compared in float32: a NaN confidence is hard."""
    return ~(confidence.float() >= threshold)


def route(
    confidence: Tensor, threshold: float | Tensor, *, capacity: int | None = None
) -> RoutePlan:
    """Plan of the hard tokens of ``confidence [...]`` (flattened to N tokens).

    Without ``capacity``: ``indices = nonzero(hard)`` (one host synchronization).
    With ``capacity``: static shapes and no synchronization; the hard token ``i``
    takes slot ``cumsum(hard)_i - 1`` when that is below ``capacity``, other tokens
    go to a dump slot that is dropped, and free slots keep -1.
    """
    hard = hard_mask(confidence.reshape(-1), threshold)
    count = hard.sum()
    if capacity is None:
        return RoutePlan(torch.nonzero(hard).squeeze(1), count, hard.numel())
    slots = torch.cumsum(hard, 0) - 1
    slots = torch.where(hard & (slots < capacity), slots, capacity)
    tokens = torch.arange(hard.numel(), device=hard.device)
    indices = torch.full((capacity + 1,), -1, dtype=torch.int64, device=hard.device)
    return RoutePlan(indices.scatter(0, slots, tokens)[:capacity], count, hard.numel())


def _rows_with_dump(x: Tensor, num_tokens: int) -> Tensor:
    """``x [..., D]`` as ``[N + 1, D]``: the extra zero row stands in for the -1 entries."""
    rows = x.reshape(num_tokens, x.shape[-1])
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


def _dump_targets(plan: RoutePlan) -> Tensor:
    """``plan.indices`` with each -1 replaced by ``N``, the dump row."""
    return torch.where(plan.indices >= 0, plan.indices, plan.num_tokens)


def gather_tokens(x: Tensor, plan: RoutePlan) -> Tensor:
    """Rows ``plan.indices`` of ``x [..., D]`` (as ``[N, D]``): ``[K, D]``, zeros for -1."""
    return _rows_with_dump(x, plan.num_tokens).index_select(0, _dump_targets(plan))


def scatter_tokens(base: Tensor, src: Tensor, plan: RoutePlan) -> Tensor:
    """Copy of ``base [..., D]`` with rows ``plan.indices`` replaced by ``src [K, D]``.

    -1 entries are skipped: they are copied into the dump row, which is dropped.
    """
    padded = _rows_with_dump(base, plan.num_tokens)
    return padded.index_copy(0, _dump_targets(plan), src)[:-1].reshape(base.shape)
