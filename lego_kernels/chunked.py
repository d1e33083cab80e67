r"""The chunked schedule of the exit-head ops: vendor GEMMs over token chunks, one pass per chunk.

``h = norm(x)`` (``x: [N, D]``), head ``W: [V, D]``, logits ``z = h @ W.T``. The tokens are walked
in chunks of ``C`` rows; a chunk's logits ``z_c: [C, V]`` are the only vocabulary-sized tensor, held
once, in one buffer that every chunk reuses: ``C`` is the largest row count whose buffer fits
:data:`MEMORY_BUDGET` bytes (see :func:`chunk_rows`). The buffer's rows are padded to a multiple of
``PAD`` columns that hold ``-inf``, so that every row starts aligned and a pass can read whole
vectors also when V is not a multiple of 8. The logits come from the vendor GEMM (``torch.mm``:
cuBLAS on CUDA, MKL on the CPU), written straight into the buffer.

One pass over ``z_c`` gives every statistic, in float32 (float64 for float64 inputs)::

    m_i = max_j z_ij,   a_i = argmax_j z_ij,   s_i = sum_j exp(z_ij - m_i),   lse_i = m_i + log s_i
    loss_i = lse_i - z_{i, t_i}   (0 for an ignored token, whose target is passed as -1)
    max_prob = 1 / s_i,   margin = (1 - exp(m2_i - m_i)) / s_i,   entropy: 1 - H_i / ln V

(``m2`` the second largest logit, ``H = -sum_j p_ij log p_ij``). When gradients are needed, the
same pass turns the buffer in place into ``G_c = softmax(z_c) - onehot(t_c)``, and with the
per-token coefficient ``coef_i = d loss / d loss_i`` (the token weight, over the number of counted
tokens for ``mean``; 0 for ignored tokens) the chunk's share of the gradients is computed before the
next chunk overwrites the buffer::

    dh_c = coef_c * (G_c @ W),    dW += G_c^T @ (coef_c * h_c)

(``coef_c *`` scales rows: cheaper than scaling ``G_c``). Forward and backward together cost 6NDV
FLOPs (the fused schedule recomputes the logits in its backward: 8NDV) and use no atomics: every
sum has one fixed order, so results and gradients are bitwise reproducible run to run.

The upstream gradient of a ``mean`` or ``sum`` loss is one scalar ``g``, known only in backward, so
the forward computes ``dh`` and ``dW`` for ``g = 1`` and the backward multiplies them by ``g``
(:func:`cross_entropy_backward`). Where the upstream gradient is per token (``reduction="none"``)
that factorization is wrong for ``dW`` (``sum_i g_i G_i^T h_i`` is not ``g`` times anything known in
the forward), so that path stays exact by recomputing: its forward computes the statistics only
(2NDV) and its backward walks the chunks again with ``coef_i = g_i`` (6NDV). Token weights are a
differentiable input of the loss either way: ``d loss / d w_i`` is the token's loss (times the
upstream gradient, over the count for ``mean``).

Who runs the pass: on the CPU ("torch" backend) torch's own kernels (a blocked max/argmax, softmax
in place, a gather of the target logit; :func:`_torch_pass`); on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1``, the Triton kernels of :mod:`lego_kernels.head` (:func:`head.logits_pass`),
which are imported lazily so that this module works without Triton. Everything here computes in the
inputs' dtype with autocast off; ``lego_kernels.ops`` chooses that dtype (float32 on the CPU,
autocast's dtype for float32 inputs on CUDA under autocast). The functions take validated,
flattened, contiguous tensors (``lego_kernels.ops`` checks) and never synchronize with the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lego_kernels import reference

MEMORY_BUDGET = 256 * 2**20  # bytes of one chunk's logits buffer; read at call time
PAD = 64  # the buffer's rows are padded to a multiple of PAD columns (-inf)
_ENTROPY_BYTES = 2**22  # the entropy's temporary covers at most this many bytes of a chunk


def padded(vocab: int) -> int:
    """Row length of the chunk buffer: ``vocab`` rounded up to a multiple of :data:`PAD`."""
    return -(-vocab // PAD) * PAD


def chunk_rows(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: the most whose ``[C, padded(V)]`` buffer fits :data:`MEMORY_BUDGET` (>= 1).

    The buffer never exceeds the budget unless a single row does (a row is then the chunk).
    """
    fit = MEMORY_BUDGET // (padded(vocab) * itemsize)
    return max(1, min(num_tokens, fit))


# ----------------------------------------------------------------------------- the CPU pass


def _block_max(zp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row max of ``zp [c, Vp]`` by blocks of PAD columns: ``(block maxima [c, Vp / PAD], index of
    the first maximal block [c], that block's PAD logits [c, PAD])``.

    Two cheap reductions instead of ``argmax`` over the whole row (about 4x faster on the CPU).
    """
    rows = zp.shape[0]
    blocks = zp.view(rows, -1, PAD)
    block_max = blocks.amax(2)
    best = block_max.argmax(1)
    return block_max, best, blocks[torch.arange(rows, device=zp.device), best]


def _torch_pass(
    zp: Tensor, vocab: int, targets: Tensor, measure: str | None, grad: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Statistics of one chunk with torch's kernels; with ``grad``, ``zp[:, :vocab]`` becomes G.

    ``zp [c, Vp]``: the chunk's logits in ``zp[:, :vocab]`` and ``-inf`` in the padding (which
    this pass overwrites with zeros). ``targets`` int64 ``[c]``, -1 for ignored tokens.
    Returns ``(lse, loss, confidence, prediction)`` (``[c]`` each; the last two ``None`` when
    ``measure`` is None).
    """
    rows = torch.arange(zp.shape[0], device=zp.device)
    counted = targets >= 0
    target_logit = zp[rows, targets.clamp(min=0)]
    if measure is None:
        top, prediction = zp.amax(1), None
    else:
        block_max, best, block = _block_max(zp)
        top, within = block.max(1)
        prediction = best * PAD + within
        if measure == "margin":  # the second largest: in the best block, or another block's max
            second = block.topk(2, dim=1).values[:, 1]
            if block_max.shape[1] > 1:
                second = torch.maximum(second, block_max.topk(2, dim=1).values[:, 1])
    torch.softmax(zp, 1, out=zp)  # p, in place; the padding becomes 0
    # max p = exp(m - lse) = 1 / s (no underflow, unlike p at the target), so lse = m + log s
    top_p = zp.amax(1) if prediction is None else zp[rows, prediction]
    lse = top - top_p.log()
    loss = torch.where(counted, lse - target_logit, 0.0)
    confidence = None
    if measure == "max_prob":
        confidence = top_p
    elif measure == "margin":
        confidence = top_p * (1.0 - torch.exp(second - top))
    elif measure == "entropy":
        confidence = _normalized_entropy(zp, vocab)
    if grad:
        zp[rows[counted], targets[counted]] -= 1.0
    return lse, loss, confidence, prediction


def _normalized_entropy(p: Tensor, vocab: int) -> Tensor:
    """``1 - H / ln V`` of the probabilities ``p [c, Vp]`` (zero padding), 1 when V = 1."""
    if vocab == 1:
        return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
    step = max(1, _ENTROPY_BYTES // (p.shape[1] * p.element_size()))
    entropy = torch.cat(
        [torch.special.entr(p[i : i + step]).sum(1) for i in range(0, len(p), step)]
    )
    return 1.0 - entropy / math.log(vocab)


def _pass(
    zp: Tensor, vocab: int, targets: Tensor, measure: str | None, grad: bool, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The chunk pass of this backend; leaves ``-inf`` in the buffer's padding for the next one."""
    if use_triton:
        from lego_kernels import head

        return head.logits_pass(zp, vocab, targets, measure, grad)
    out = _torch_pass(zp, vocab, targets, measure, grad)
    zp[:, vocab:] = float("-inf")
    return out


# ----------------------------------------------------------------------------- the chunk walk


def cross_entropy_forward(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    coef: Tensor | None,
    measure: str | None,
    need_dh: bool,
    need_dw: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-token cross-entropy of ``h @ weight.T`` and, as required, its gradients, in one walk.

    ``h [N, D]`` and ``weight [V, D]`` in one dtype; ``targets`` int64 ``[N]`` in ``[0, V)`` or -1
    (ignored); ``coef [N]`` (float32, or the compute dtype) the weight of each token's loss in the
    gradients, needed when ``need_dh`` or ``need_dw``. Returns ``(loss, lse, confidence,
    prediction, dh, dw)``: ``loss`` and ``lse`` ``[N]`` in the compute dtype (float32, float64 for
    float64), ``confidence``/``prediction`` ``[N]`` (empty for ``measure=None``), and
    ``dh = d(sum_i coef_i loss_i)/dh [N, D]`` in h's dtype and ``dw`` the same for ``weight``
    (``None`` unless required).
    """
    N = h.shape[0]
    V = weight.shape[0]
    device, stat_dtype = h.device, reference.compute_dtype(h.dtype)
    grad = need_dh or need_dw
    loss = torch.empty(N, dtype=stat_dtype, device=device)
    lse = torch.empty(N, dtype=stat_dtype, device=device)
    confidence = torch.empty(N if measure else 0, dtype=stat_dtype, device=device)
    prediction = torch.empty(N if measure else 0, dtype=torch.int64, device=device)
    dh = torch.empty_like(h) if need_dh else None
    dw = None
    with reference.no_autocast(device):
        step = chunk_rows(N, V, h.element_size())
        buffer = torch.full((min(step, N), padded(V)), float("-inf"), dtype=h.dtype, device=device)
        for start in range(0, N, step):
            rows = slice(start, min(start + step, N))
            zp = buffer[: rows.stop - start]
            z = zp[:, :V]
            torch.mm(h[rows], weight.T, out=z)
            lse[rows], loss[rows], conf, pred = _pass(
                zp, V, targets[rows], measure, grad, use_triton
            )
            if measure:
                confidence[rows], prediction[rows] = conf, pred
            if not grad:
                continue
            scale = coef[rows, None]
            if need_dw:
                scaled_h = (h[rows] * scale).to(h.dtype)
                dw = torch.mm(z.T, scaled_h) if dw is None else dw.addmm_(z.T, scaled_h)
            if need_dh:
                torch.mm(z, weight, out=dh[rows])
                dh[rows].mul_(scale)
        if need_dw and dw is None:  # N = 0
            dw = torch.zeros_like(weight)
    return loss, lse, confidence, prediction, dh, dw


def cross_entropy_backward(
    grad: Tensor, dh: Tensor | None, dw: Tensor | None, token_loss: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Apply the upstream scalar ``grad`` of ``sum_i coef_i loss_i`` to what the forward computed.

    Returns ``(grad_h, grad_weight, grad_coef)``: ``dh`` and ``dw`` scaled in place (their
    memory becomes the gradients), and ``grad * token_loss`` (``None`` where the input is None).
    """
    if dh is not None:
        dh = dh.mul_(grad)
    if dw is not None:
        dw = dw.mul_(grad)
    grad_coef = None if token_loss is None else token_loss * grad
    return dh, dw, grad_coef


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_i coef_i loss_i`` with the gradients computed in the forward (scalar upstream)."""

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        coef: Tensor,
        measure: str | None,
        needs: tuple[bool, bool, bool],
        use_triton: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        need_dh, need_dw, need_dcoef = needs
        loss, lse, conf, pred, dh, dw = cross_entropy_forward(
            h, weight, targets, coef, measure, need_dh, need_dw, use_triton
        )
        ctx.save_for_backward(dh, dw, loss if need_dcoef else None)
        ctx.mark_non_differentiable(lse, conf, pred)
        return (loss * coef).sum(), lse, conf, pred

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_coef = cross_entropy_backward(grad, *ctx.saved_tensors)
        return grad_h, grad_w, None, grad_coef, None, None, None


class _ChunkedTokenCrossEntropy(torch.autograd.Function):
    """Per-token losses (``reduction="none"``); backward recomputes the chunks (exact)."""

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        measure: str | None,
        use_triton: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loss, lse, conf, pred, _, _ = cross_entropy_forward(
            h, weight, targets, None, measure, False, False, use_triton
        )
        ctx.save_for_backward(h, weight, targets)
        ctx.use_triton = use_triton
        ctx.mark_non_differentiable(lse, conf, pred)
        return loss, lse, conf, pred

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, targets = ctx.saved_tensors
        coef = torch.where(targets >= 0, grad, 0.0)  # an ignored token's loss is a constant 0
        _, _, _, _, dh, dw = cross_entropy_forward(
            h, weight, targets, coef, None, *ctx.needs_input_grad[:2], ctx.use_triton
        )
        return dh, dw, None, None, None


# ----------------------------------------------------------------------------- entry points


def counted_tokens(targets: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Tokens whose loss counts: not ``ignore_index`` and in ``[0, vocab)`` (bool, like targets).

    Targets outside ``[0, V)`` are only possible on CUDA, where ``ops`` skips the range check
    (a host synchronization); they count as ignored.
    """
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab)


def loss_coefficients(
    counted: Tensor, token_weights: Tensor | None, reduction: str, dtype: torch.dtype
) -> Tensor:
    """``coef_i = d loss / d loss_i`` of a ``"mean"`` or ``"sum"`` loss: the token weight (1
    without), over the number of counted tokens for ``mean``, 0 for ignored tokens.
    Differentiable in ``token_weights``."""
    coef = counted.to(dtype)
    if token_weights is not None:
        coef = coef * token_weights.to(dtype)
    if reduction == "mean":
        coef = coef / counted.sum().clamp(min=1)
    return coef


def reduce_losses(
    token_loss: Tensor,
    targets: Tensor,
    ignore_index: int,
    vocab: int,
    reduction: str,
    token_weights: Tensor | None,
) -> Tensor:
    """The loss from per-token losses ``[N]`` (0 for ignored tokens), differentiable in both.

    ``"none"``: ``w_i * loss_i``; ``"sum"``/``"mean"``: ``sum_i coef_i * loss_i``
    (:func:`loss_coefficients`).
    """
    if reduction == "none":
        return (
            token_loss if token_weights is None else token_loss * token_weights.to(token_loss.dtype)
        )
    counted = counted_tokens(targets, ignore_index, vocab)
    return (
        token_loss * loss_coefficients(counted, token_weights, reduction, token_loss.dtype)
    ).sum()


def _normalize(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    use_triton: bool,
) -> Tensor:
    """``norm(x)``, differentiable: the Triton norm kernels, or the reference (compute dtype)."""
    if not use_triton:
        return reference.apply_norm(x, norm_weight, norm_bias, norm, eps)
    from lego_kernels import head

    return head._apply_norm(x, norm_weight, norm_bias, norm, eps)


def _gemm_operands(h: Tensor, weight: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """``h`` and ``weight`` in one dtype for the GEMMs (differentiable casts)."""
    dtype = dtype or h.dtype
    return h.to(dtype), weight.to(dtype)


def exit_confidence(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    measure: str,
    use_triton: bool,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(confidence, prediction, lse)`` ``[N]`` each of ``norm(x) @ weight.T``; x ``[N, D]``.

    ``dtype``: the GEMMs' dtype (default: that of ``norm(x)``). No gradient.
    """
    with torch.no_grad():
        h = _normalize(x, norm_weight, norm_bias, norm, eps, use_triton)
        h, w = _gemm_operands(h, weight, dtype)
        no_targets = torch.full((h.shape[0],), -1, dtype=torch.int64, device=h.device)
        _, lse, conf, pred, _, _ = cross_entropy_forward(
            h, w, no_targets, None, measure, False, False, use_triton
        )
    return conf, pred, lse


def norm_head_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    ignore_index: int,
    reduction: str,
    token_weights: Tensor | None,
    return_confidence: bool,
    measure: str,
    use_triton: bool,
    dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Cross-entropy of ``norm(x) @ weight.T`` over token chunks; the arguments of ``head``'s.

    x ``[N, D]``, weight ``[V, D]``, targets int64 ``[N]``, token_weights ``[N]`` or None
    (differentiable). ``dtype``: the GEMMs' dtype (default: that of ``norm(x)``). Returns the loss
    (float32, float64 for float64 inputs; a scalar, or ``[N]`` for ``reduction="none"``), with
    ``(confidence, prediction, lse)`` when ``return_confidence``.
    """
    h = _normalize(x, norm_weight, norm_bias, norm, eps, use_triton)
    h, w = _gemm_operands(h, weight, dtype)
    counted = counted_tokens(targets, ignore_index, weight.shape[0])
    safe_targets = torch.where(counted, targets, -1)
    code = measure if return_confidence else None
    if reduction == "none":
        loss, lse, conf, pred = _ChunkedTokenCrossEntropy.apply(
            h, w, safe_targets, code, use_triton
        )
        loss = reduce_losses(loss, targets, ignore_index, w.shape[0], "none", token_weights)
    else:
        coef = loss_coefficients(
            counted, token_weights, reduction, reference.compute_dtype(h.dtype)
        )
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and h.requires_grad, grad_on and w.requires_grad, coef.requires_grad)
        loss, lse, conf, pred = _ChunkedCrossEntropy.apply(
            h, w, safe_targets, coef, code, needs, use_triton
        )
    if return_confidence:
        return loss, (conf, pred, lse)
    return loss
