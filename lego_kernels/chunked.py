r"""The chunked schedule of the exit-head ops: vendor GEMMs over token chunks, one pass per chunk.

``h = norm(x)`` (``x: [N, D]``), head ``W: [V, D]``, logits ``z = h @ W.T``. The tokens are walked
in chunks of ``C`` rows; a chunk's logits ``z_c: [C, V]`` are the only vocabulary-sized tensor, held
once, in one buffer that every chunk reuses: ``C`` is the largest row count whose buffer fits
:data:`MEMORY_BUDGET` bytes (:data:`CPU_MEMORY_BUDGET` on the CPU; see :func:`chunk_rows`). The
buffer's rows are padded to a multiple of ``PAD`` columns that hold ``-inf``, so that every row
starts aligned and a pass can read whole vectors also when V is not a multiple of 8. The logits
come from the vendor GEMM (``torch.mm``: cuBLAS on CUDA, MKL on the CPU), written straight into
the buffer.

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

(``coef_c *`` scales rows: cheaper than scaling ``G_c``), and the norm's backward turns ``dh_c``
into ``dx_c`` and the chunk's share of the norm weight's and bias's gradients: the norm, too, runs
per chunk, so no ``[N, D]`` intermediate exists and between forward and backward only the inputs'
gradients are held. Forward and backward together cost 6NDV FLOPs (the fused schedule recomputes
the logits in its backward: 8NDV) and use no atomics: every sum has one fixed order, so results and
gradients are bitwise reproducible run to run.

The upstream gradient of a ``mean`` or ``sum`` loss is one scalar ``g``, known only in backward, so
the forward computes the gradients for ``g = 1`` and the backward multiplies them by ``g``
(:func:`cross_entropy_backward`). Where the upstream gradient is per token (``reduction="none"``)
that factorization is wrong for ``dW`` (``sum_i g_i G_i^T h_i`` is not ``g`` times anything known in
the forward), so that path stays exact by recomputing: its forward computes the statistics only
(2NDV) and its backward walks the chunks again with ``coef_i = g_i`` (6NDV). Token weights are a
differentiable input of the loss either way: ``d loss / d w_i`` is the token's loss (times the
upstream gradient, over the count for ``mean``).

Who runs the pass: on the CPU ("torch" backend) torch's own kernels (a blocked max/argmax, softmax
in place, a gather of the target logit; :func:`_torch_pass`); on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1``, the Triton kernels of :mod:`lego_kernels.head` (:func:`head.logits_pass`),
which are imported lazily so that this module works without Triton; the norm likewise (the
reference's with its row statistics and the backward formula of :func:`norm_rows_backward`, or the
Triton norm kernels). The GEMMs run in the head's dtype with autocast off: the compute dtype on the
CPU (float32 for 16-bit inputs), and on CUDA the inputs' dtype or, for float32 inputs under
autocast, autocast's (``lego_kernels.ops`` passes it). The functions take validated, flattened,
contiguous tensors (``lego_kernels.ops`` checks) and never synchronize with the host; no autograd
runs in them: ``lego_kernels.library`` wraps them as ``torch.library`` custom ops
(``lego_kernels::chunked_cross_entropy`` for ``mean``/``sum``, whose backward is
:func:`cross_entropy_backward`; ``lego_kernels::norm_head_cross_entropy`` and its backward op for
``none``) with their gradient formulas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lego_kernels import reference

# Bytes of one chunk's logits buffer; read at call time. 208 MiB, not 256: at `llama3`
# (V = 128,256, D = 4096, bfloat16: C = 850) the buffer plus the per-chunk [C, D]
# temporaries are predicted at about 228 MiB = 239 MB, under the 256 MB target
# (bench/NOTES.md; not yet measured on a GPU).
MEMORY_BUDGET = 208 * 2**20
# On the CPU the chunks are smaller still: a fresh buffer costs a page fault per 4 KiB, and
# smaller chunks run as fast (bench.cpu) while holding a quarter of the memory.
CPU_MEMORY_BUDGET = 64 * 2**20
PAD = 64  # the buffer's rows are padded to a multiple of PAD columns (-inf)
_ENTROPY_BYTES = 2**22  # the entropy's temporary covers at most this many bytes of a chunk


def padded(vocab: int) -> int:
    """Row length of the chunk buffer: ``vocab`` rounded up to a multiple of :data:`PAD`."""
    return -(-vocab // PAD) * PAD


def chunk_rows(num_tokens: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Rows per chunk: the most whose ``[C, padded(V)]`` buffer fits :data:`MEMORY_BUDGET` (and
    :data:`CPU_MEMORY_BUDGET` on the CPU), rounded down to a multiple of 128 (the GPU GEMMs' tile
    height) when at least 1,024 fit, >= 1.

    The buffer never exceeds the budget unless a single row does (a row is then the chunk).
    """
    budget = MEMORY_BUDGET if device.type != "cpu" else min(MEMORY_BUDGET, CPU_MEMORY_BUDGET)
    fit = budget // (padded(vocab) * itemsize)
    if fit >= 1024:
        fit -= fit % 128
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
    safe_targets = targets.clamp(min=0)
    target_logit = zp[rows, safe_targets]
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
        zp[rows, safe_targets] -= counted.to(zp.dtype)  # no mask indexing: no host sync
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


def norm_rows(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    use_triton: bool,
) -> tuple[Tensor, object]:
    """``h = norm(x)`` of rows ``x [c, D]``, and the row statistics its backward needs.

    Triton: the norm kernels (h in x's dtype, statistics ``[2, c]`` float32). torch: the
    reference's norm in the compute dtype, with its ``(mean, rstd)`` (no autograd: custom ops
    run below it, so :func:`norm_rows_backward` has the formula). ``norm=None``: ``h`` is ``x``
    (in the compute dtype on the torch path), no statistics.
    """
    if norm is None:
        return x if use_triton else x.to(reference.compute_dtype(x.dtype)), None
    if use_triton:
        from lego_kernels import head

        return head._norm_forward(x, norm_weight, norm_bias, norm == "rms", eps)
    h, mean, rstd = reference.apply_norm_with_stats(x, norm_weight, norm_bias, norm, eps)
    return h, (mean, rstd)


def norm_rows_backward(
    dh: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    stats: object,
    needs: tuple[bool, bool, bool],
    use_triton: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, d norm_weight, d norm_bias)`` of :func:`norm_rows` from ``dh [c, D]``, where
    ``needs`` says; dx in x's dtype, the other two as float32 sums (the compute dtype's).

    The torch path, with ``xhat = (x - mean) * rstd`` and ``g = dh * norm_weight``::

        dx = rstd * (g - xhat * mean(g * xhat) - mean(g))    (the mean(g) term for layer only)
        d norm_weight = sum_rows(dh * xhat),    d norm_bias = sum_rows(dh)
    """
    if norm is None:
        return dh.to(x.dtype), None, None
    if use_triton:
        from lego_kernels import head

        return head._norm_backward(dh, x, norm_weight, norm_bias, stats, norm == "rms", needs)
    need_dx, need_dw, need_db = needs
    mean, rstd = stats
    xf = x.to(rstd.dtype)
    xhat = (xf if mean is None else xf - mean) * rstd
    dx = dw = db = None
    if need_dx:
        g = dh if norm_weight is None else dh * norm_weight.to(dh.dtype)
        dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
        if mean is not None:
            dx = dx - g.mean(-1, keepdim=True)
        dx = (dx * rstd).to(x.dtype)
    if need_dw:
        dw = (dh * xhat).sum(0)
    if need_db:
        db = dh.sum(0)
    return dx, dw, db


def cross_entropy_forward(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    targets: Tensor,
    coef: Tensor | None,
    norm: str | None,
    eps: float,
    measure: str | None,
    needs: tuple[bool, bool, bool, bool],
    use_triton: bool,
) -> tuple[Tensor, ...]:
    """Per-token cross-entropy of ``norm(x) @ weight.T`` and, as required, its gradients.

    One walk over the token chunks: per chunk the norm, the logits GEMM, the pass, and with
    gradients the dh and dW GEMMs and the norm's backward. ``x [N, D]``; ``weight [V, D]`` in the
    GEMMs' dtype (``norm(x)`` is cast to it); ``targets`` int64 ``[N]`` in ``[0, V)`` or -1
    (ignored); ``coef [N]`` the weight of each token's loss in the gradients (needed with any
    gradient); ``needs``: the gradients of x, weight, norm_weight and norm_bias.

    Returns ``(loss, lse, confidence, prediction, dx, dw, dnw, dnb)``: ``loss`` and ``lse``
    ``[N]`` in the compute dtype of ``weight`` (float32, float64 for float64),
    ``confidence``/``prediction`` ``[N]`` (empty for ``measure=None``), and the gradients of
    ``sum_i coef_i loss_i`` w.r.t. x, weight, norm_weight and norm_bias in their dtypes (``None``
    where not needed). Besides them it holds one chunk's logits and O(C·D) per chunk.
    """
    N = x.shape[0]
    V = weight.shape[0]
    need_dx, need_dw, need_dnw, need_dnb = needs
    norm_needs = (need_dx, need_dnw, need_dnb)
    need_dh = any(norm_needs)
    grad = need_dh or need_dw
    device, stat_dtype = x.device, reference.compute_dtype(weight.dtype)
    loss = torch.empty(N, dtype=stat_dtype, device=device)
    lse = torch.empty(N, dtype=stat_dtype, device=device)
    confidence = torch.empty(N if measure else 0, dtype=stat_dtype, device=device)
    prediction = torch.empty(N if measure else 0, dtype=torch.int64, device=device)
    dx = torch.empty_like(x) if need_dx else None
    dw = None
    sums = [torch.zeros_like(t, dtype=stat_dtype) if t is not None else None
            for t in (norm_weight, norm_bias)]  # fmt: skip
    with reference.no_autocast(device):
        step = chunk_rows(N, V, weight.element_size(), device)
        buffer = torch.empty((min(step, N), padded(V)), dtype=weight.dtype, device=device)
        buffer[:, V:] = float("-inf")  # the padding; the GEMM writes the rest
        for start in range(0, N, step):
            rows = slice(start, min(start + step, N))
            x_c = x[rows]
            h, stats = norm_rows(x_c, norm_weight, norm_bias, norm, eps, use_triton)
            h = h.to(weight.dtype)
            zp = buffer[: rows.stop - start]
            z = zp[:, :V]
            torch.mm(h, weight.T, out=z)
            lse[rows], loss[rows], conf, pred = _pass(
                zp, V, targets[rows], measure, grad, use_triton
            )
            if measure:
                confidence[rows], prediction[rows] = conf, pred
            if not grad:
                continue
            scale = coef[rows, None]
            if need_dw:
                scaled_h = (h * scale).to(h.dtype)
                dw = torch.mm(z.T, scaled_h) if dw is None else dw.addmm_(z.T, scaled_h)
            if need_dh:
                dh = torch.mm(z, weight).mul_(scale)
                dx_c, dnw_c, dnb_c = norm_rows_backward(
                    dh, x_c, norm_weight, norm_bias, norm, stats, norm_needs, use_triton
                )
                if need_dx:
                    dx[rows] = dx_c
                for total, part in zip(sums, (dnw_c, dnb_c), strict=True):
                    if part is not None:
                        total += part
        if need_dw and dw is None:  # N = 0
            dw = torch.zeros_like(weight)
    dnw, dnb = (
        total.to(t.dtype) if need else None
        for total, t, need in zip(sums, (norm_weight, norm_bias), (need_dnw, need_dnb), strict=True)
    )
    return loss, lse, confidence, prediction, dx, dw, dnw, dnb


def cross_entropy_backward(
    grad: Tensor, *forward_grads: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Apply the upstream scalar ``grad`` of ``sum_i coef_i loss_i`` to what the forward made.

    ``forward_grads``: the gradients :func:`cross_entropy_forward` returned (and the per-token
    losses, the gradient of the loss w.r.t. ``coef``); ``None`` stays ``None``. Eager tensors
    are scaled in place (their memory becomes the gradient; a second backward through the same
    graph is an error, not a wrong result). While a compiler traces the backward (its tensors
    are then not plain ``torch.Tensor`` s: AOTAutograd's functional tensors), out of place: a
    traced graph must not mutate the tensors saved by its forward.
    """
    return tuple(
        None if g is None else g.mul_(grad) if type(g) is Tensor else g * grad
        for g in forward_grads
    )


# ----------------------------------------------------------------------------- the loss


def counted_tokens(targets: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Tokens whose loss counts: not ``ignore_index`` and in ``[0, vocab)`` (bool, like targets).

    Targets outside ``[0, V)`` are only possible on CUDA, where ``ops`` skips the range check
    (a host synchronization); they count as ignored.
    """
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab)


def walk_targets(targets: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """``targets`` as :func:`cross_entropy_forward` takes them: -1 for the tokens that do not
    count (:func:`counted_tokens`)."""
    return torch.where(counted_tokens(targets, ignore_index, vocab), targets, -1)


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


def gemm_weight(weight: Tensor, x: Tensor, dtype: torch.dtype | None, use_triton: bool) -> Tensor:
    """The head in the GEMMs' dtype (a differentiable cast): ``dtype`` if given, else x's on the
    Triton path and the compute dtype (float32 for 16-bit inputs) on the torch path."""
    if dtype is None:
        dtype = x.dtype if use_triton else reference.compute_dtype(x.dtype)
    return weight.to(dtype)


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

    ``dtype``: the GEMMs' dtype (see :func:`gemm_weight`). No gradient.
    """
    with torch.no_grad():
        w = gemm_weight(weight, x, dtype, use_triton)
        no_targets = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        _, lse, conf, pred, *_ = cross_entropy_forward(
            x, w, norm_weight, norm_bias, no_targets, None, norm, eps, measure,
            (False, False, False, False), use_triton,
        )  # fmt: skip
    return conf, pred, lse
