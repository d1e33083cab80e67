"""The implementations that the benchmarks time: ``lego_kernels`` and its peers.

Every function takes the inputs of :mod:`bench.common` (``x [N, D]``,
``weight [V, D]``, ``norm_weight [D]`` in one dtype, ``targets`` int64 ``[N]``)
and applies RMSNorm (``eps = bench.common.EPS``) before the head.

- ``lego_*``: the ``lego_kernels.ops`` calls (fused norm + head).
- ``eager_*``: what a user writes in plain PyTorch: ``F.rms_norm`` and the head
  GEMM in the input dtype, softmax statistics and cross-entropy in float32.
  ``torch.compile`` compiles these same functions.
- Liger-Kernel and Cut Cross-Entropy (CCE) have no fused norm: they get the
  output of ``F.rms_norm`` and run their fused linear + cross-entropy on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import EPS
from lego_kernels import ops, reference

HeadLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- lego_kernels


def lego_logits(x: Tensor, weight: Tensor, norm_weight: Tensor) -> Tensor:
    """``ops.norm_head_logits``: ``[N, V]`` in ``x.dtype``."""
    return ops.norm_head_logits(x, weight, norm_weight, eps=EPS)


def lego_confidence(x: Tensor, weight: Tensor, norm_weight: Tensor) -> Tensor:
    """``ops.exit_confidence(...).confidence``: max-prob confidence, float32 ``[N]``."""
    return ops.exit_confidence(x, weight, norm_weight, eps=EPS).confidence


def lego_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, norm_weight: Tensor) -> Tensor:
    """``ops.norm_head_cross_entropy``: mean loss, float32 scalar."""
    return ops.norm_head_cross_entropy(x, weight, targets, norm_weight, eps=EPS)


def lego_route_gather_scatter(
    x: Tensor, base: Tensor, confidence: Tensor, threshold: float, capacity: int | None = None
) -> Tensor:
    """``ops.route`` + ``ops.gather_tokens`` + ``ops.scatter_tokens``: ``base`` with the
    hard rows (``confidence < threshold``) taken from ``x``, ``[N, D]``."""
    plan = ops.route(confidence, threshold, capacity=capacity)
    return ops.scatter_tokens(base, ops.gather_tokens(x, plan), plan)


# ----------------------------------------------------------------------------- eager PyTorch


def torch_rms_norm(x: Tensor, norm_weight: Tensor) -> Tensor:
    """``F.rms_norm`` over the last dimension, in ``x.dtype``."""
    return F.rms_norm(x, (x.shape[-1],), norm_weight, EPS)


def eager_logits(x: Tensor, weight: Tensor, norm_weight: Tensor) -> Tensor:
    """``rms_norm(x) @ weight.T`` in ``x.dtype``: ``[N, V]``."""
    return torch_rms_norm(x, norm_weight) @ weight.T


def eager_confidence(x: Tensor, weight: Tensor, norm_weight: Tensor) -> Tensor:
    """Max-prob confidence of the eager logits (statistics in float32): ``[N]``."""
    return reference.confidence_from_logits(eager_logits(x, weight, norm_weight)).confidence


def eager_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, norm_weight: Tensor) -> Tensor:
    """``F.cross_entropy`` of the eager logits upcast to float32: mean loss, scalar."""
    return F.cross_entropy(eager_logits(x, weight, norm_weight).float(), targets)


def head_gemm(x: Tensor, weight: Tensor) -> Tensor:
    """The bare head GEMM ``x @ weight.T``: the floor that target 1 is measured against."""
    return x @ weight.T


def eager_route_gather_scatter(
    x: Tensor, base: Tensor, confidence: Tensor, threshold: float
) -> Tensor:
    """``nonzero`` + ``index_select`` + ``index_copy``: same result as the lego version."""
    index = torch.nonzero(confidence < threshold).squeeze(1)
    return base.index_copy(0, index, x.index_select(0, index))


# ----------------------------------------------------------------------------- peer libraries


def liger_cross_entropy() -> HeadLoss:
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` after ``F.rms_norm``.

    Raises ``ImportError`` when ``liger-kernel`` is not installed.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(x: Tensor, weight: Tensor, targets: Tensor, norm_weight: Tensor) -> Tensor:
        return loss_fn(weight, torch_rms_norm(x, norm_weight), targets)

    return run


def cce_cross_entropy() -> HeadLoss:
    """CCE's ``linear_cross_entropy`` (its defaults: ``impl="cce"``, gradient filtering
    ``filter_eps="high"``) after ``F.rms_norm``.

    Raises ``ImportError`` when ``cut-cross-entropy`` is not installed.
    """
    from cut_cross_entropy import linear_cross_entropy

    def run(x: Tensor, weight: Tensor, targets: Tensor, norm_weight: Tensor) -> Tensor:
        return linear_cross_entropy(torch_rms_norm(x, norm_weight), weight, targets)

    return run
