"""``torch.library`` custom ops behind every op of :mod:`lego_kernels.ops`.

Each call of a public op is one node of a ``torch.compile`` or ``torch.export`` graph: the compiler
never traces into the kernels (Triton, the chunked schedule's buffer walk, the Python loops of the
reference); it sees the op's *fake* implementation (output shapes and dtypes from the inputs') and
its registered gradient formula. The ops, in the namespace ``lego_kernels``
(``torch.ops.lego_kernels.<name>``), with the public op they back:

- ``norm_head_logits`` (``ops.norm_head_logits``); its gradient is the op
  ``norm_head_logits_backward``;
- ``exit_confidence``, ``confidence_from_logits``: no gradient;
- ``norm_head_cross_entropy`` (``ops.norm_head_cross_entropy``): the per-token losses of the
  ``fused`` schedule, and of ``reduction="none"`` on the chunked one; its gradient is the op
  ``norm_head_cross_entropy_backward`` (the logits recomputed: exact for any upstream gradient);
- ``chunked_cross_entropy``: ``mean``/``sum`` on the chunked schedule, the gradients computed in
  its forward walk; its gradient formula only scales them by the upstream scalar;
- ``route``: no gradient; ``gather_tokens`` and ``scatter_tokens``: the gradient of each is the
  other one.

Conventions (``lego_kernels.ops`` validates, flattens and calls these):

- Tensors are flat and contiguous: ``x [N, D]``, ``weight [V, D]``, ``targets [N]``.
- Every choice that depends on Python-level state is an argument, resolved by ``ops`` before
  the call: ``use_triton`` (the backend: the Triton kernels, on CUDA or through the
  interpreter, or torch's), ``schedule`` (``"fused"`` or ``"chunked"``), ``dtype`` (the head
  GEMMs' dtype, autocast's or the inputs'; ``None``: the torch backend's compute dtype) and
  ``needs`` (which gradients a forward computes, for the chunked schedule, which computes them
  there; and which ones a backward op returns). Inside an op autocast is off and the launches
  run on the tensors' CUDA device. A result depends only on the arguments, so a graph is right
  for the state it was traced under (``torch.compile`` guards on that state).
- Custom ops return no ``None``: a gradient that is not computed is an empty tensor, which the
  gradient formula turns back into ``None``.
- Custom ops run below autograd (nothing inside records a graph), so every gradient has an
  explicit formula (in ``chunked``, ``head``, ``reference``); the heavy ones are ops themselves.
- ``torch.utils.flop_counter.FlopCounterMode`` sees an op as one call, so each head op registers
  its GEMMs' FLOPs (``2NDV`` each: the logits, and recomputed logits, dh and dW in a backward),
  whatever runs inside (Triton kernels, which the counter cannot see, or torch's GEMMs).
  ``lego_kernels.compile_safety.SyncCounter`` looks inside the ops instead.
"""

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from lego_kernels import chunked, reference

_NO_GRADIENTS = (False, False, False, False)  # needs of x, weight, norm_weight, norm_bias


@contextlib.contextmanager
def _on_device(t: Tensor) -> Iterator[None]:
    """Launches on ``t``'s device (its CUDA device as the current one), autocast off."""
    device = torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
    with device, reference.no_autocast(t.device):
        yield


def _gradients(grads: tuple, inputs: tuple, like: Tensor) -> tuple[Tensor, ...]:
    """Gradients as op outputs: each in its input's dtype, an empty tensor (``like``'s) where
    it was not computed."""
    return tuple(
        like.new_empty(0) if g is None else g.to(t.dtype)
        for g, t in zip(grads, inputs, strict=True)
    )


def _fake_gradients(needs: list[bool], inputs: tuple, like: Tensor) -> tuple[Tensor, ...]:
    """The fake of :func:`_gradients`."""
    return tuple(
        t.new_empty(t.shape) if need else like.new_empty(0)
        for need, t in zip(needs, inputs, strict=True)
    )


def _wanted(ctx: object, grads: tuple, positions: tuple[int, ...]) -> tuple:
    """``grads`` with ``None`` where the op's input at that position needs no gradient."""
    return tuple(
        g if ctx.needs_input_grad[i] else None for g, i in zip(grads, positions, strict=True)
    )


def _needs(ctx: object, positions: tuple[int, ...]) -> list[bool]:
    """Which of the op's inputs at ``positions`` need a gradient."""
    return [ctx.needs_input_grad[i] for i in positions]


def _in_gemm_dtype(h: Tensor, weight: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """``h`` and ``weight`` in the GEMMs' dtype: ``dtype``, or h's (the torch backend's)."""
    dtype = dtype or h.dtype
    return h.to(dtype), weight.to(dtype)


def _fused(use_triton: bool) -> ModuleType:
    """The fused schedule's module: ``head`` (Triton) or ``reference`` (its recompute order);
    both have ``linear_cross_entropy`` and ``linear_cross_entropy_backward``."""
    if use_triton:
        from lego_kernels import head

        return head
    return reference


def _gemm_flops(x_shape: torch.Size, weight_shape: torch.Size, gemms: int = 1) -> int:
    """FLOPs of ``gemms`` GEMMs of the size ``[N, D] @ [D, V]``."""
    return gemms * 2 * x_shape[0] * x_shape[1] * weight_shape[0]


def _backward_gemms(needs: list[bool]) -> int:
    """GEMMs of a head backward for ``needs`` (x, weight, norm_weight, norm_bias): dW for the
    head, dh for x or the norm."""
    need_dx, need_dw, need_dnw, need_dnb = needs
    return int(need_dw) + int(need_dx or need_dnw or need_dnb)


def _fake_stats(x: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fake ``(confidence, prediction, lse)`` of ``rows`` tokens (the statistics' dtype)."""
    dtype = reference.compute_dtype(x.dtype)
    return (
        x.new_empty(rows, dtype=dtype),
        x.new_empty(rows, dtype=torch.int64),
        x.new_empty(rows, dtype=dtype),
    )


# ----------------------------------------------------------------------------- logits


@torch.library.custom_op("lego_kernels::norm_head_logits", mutates_args=())
def norm_head_logits(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    use_triton: bool,
    dtype: torch.dtype | None,
) -> Tensor:
    """Logits ``norm(x) @ weight.T``: ``[N, V]``, the GEMM in ``dtype`` and the logits too
    (``None``: the GEMM in the norm's compute dtype, the logits in x's)."""
    with _on_device(x):
        h, _ = chunked.norm_rows(x, norm_weight, norm_bias, norm, eps, use_triton)
        h, w = _in_gemm_dtype(h, weight, dtype)
        return torch.mm(h, w.T).to(dtype or x.dtype)


@norm_head_logits.register_fake
def _(x, weight, norm_weight, norm_bias, norm, eps, use_triton, dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype or x.dtype)


@register_flop_formula(torch.ops.lego_kernels.norm_head_logits)
def _(x, weight, *args, **kwargs):
    return _gemm_flops(x, weight)


@torch.library.custom_op("lego_kernels::norm_head_logits_backward", mutates_args=())
def norm_head_logits_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    use_triton: bool,
    dtype: torch.dtype | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW, d norm_weight, d norm_bias)`` of :func:`norm_head_logits` for ``grad [N, V]``,
    where ``needs`` says: ``dW = grad^T @ h``, ``dh = grad @ W`` and the norm's backward, with
    ``h = norm(x)`` recomputed (O(ND); the forward saves no ``h``)."""
    need_dx, need_dw, need_dnw, need_dnb = needs
    norm_needs = (need_dx, need_dnw, need_dnb)
    with _on_device(x):
        h, stats = chunked.norm_rows(x, norm_weight, norm_bias, norm, eps, use_triton)
        hd, w = _in_gemm_dtype(h, weight, dtype)
        g = grad.to(hd.dtype)
        dw = torch.mm(g.T, hd) if need_dw else None
        dx = dnw = dnb = None
        if any(norm_needs):
            dh = torch.mm(g, w).to(h.dtype)
            dx, dnw, dnb = chunked.norm_rows_backward(
                dh, x, norm_weight, norm_bias, norm, stats, norm_needs, use_triton
            )
    return _gradients((dx, dw, dnw, dnb), (x, weight, norm_weight, norm_bias), x)


@norm_head_logits_backward.register_fake
def _(grad, x, weight, norm_weight, norm_bias, norm, eps, use_triton, dtype, needs):
    return _fake_gradients(needs, (x, weight, norm_weight, norm_bias), x)


@register_flop_formula(torch.ops.lego_kernels.norm_head_logits_backward)
def _(grad, x, weight, *args, **kwargs):
    return _gemm_flops(x, weight, _backward_gemms(args[-1]))


def _logits_setup(ctx, inputs, output):
    x, weight, norm_weight, norm_bias, *ctx.config = inputs
    ctx.save_for_backward(x, weight, norm_weight, norm_bias)


def _logits_backward(ctx, grad):
    needs = _needs(ctx, (0, 1, 2, 3))
    if not any(needs):
        return (None,) * 8
    grads = norm_head_logits_backward(grad, *ctx.saved_tensors, *ctx.config, needs)
    return (*_wanted(ctx, grads, (0, 1, 2, 3)), None, None, None, None)


norm_head_logits.register_autograd(_logits_backward, setup_context=_logits_setup)


# ----------------------------------------------------------------------------- confidence


@torch.library.custom_op("lego_kernels::exit_confidence", mutates_args=())
def exit_confidence(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    measure: str,
    schedule: str,
    use_triton: bool,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(confidence, prediction, lse)`` ``[N]`` each of ``norm(x) @ weight.T``; no gradient."""
    with _on_device(x):
        if schedule == "chunked":
            return chunked.exit_confidence(
                x, weight, norm_weight, norm_bias, norm, eps, measure, use_triton, dtype
            )
        if use_triton:
            from lego_kernels import head

            return head.exit_confidence(
                x, weight, norm_weight, norm_bias, norm, eps, measure, dtype
            )
        return tuple(
            reference.exit_confidence(
                x, weight, norm_weight, norm_bias, norm=norm, eps=eps, measure=measure
            )
        )


@exit_confidence.register_fake
def _(x, weight, norm_weight, norm_bias, norm, eps, measure, schedule, use_triton, dtype):
    return _fake_stats(x, x.shape[0])


@register_flop_formula(torch.ops.lego_kernels.exit_confidence)
def _(x, weight, *args, **kwargs):
    return _gemm_flops(x, weight)


@torch.library.custom_op("lego_kernels::confidence_from_logits", mutates_args=())
def confidence_from_logits(
    logits: Tensor, measure: str, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(confidence, prediction, lse)`` ``[N]`` each of ``logits [N, V]``; no gradient."""
    with _on_device(logits):
        if use_triton:
            from lego_kernels import head

            return head.confidence_from_logits(logits, measure)
        return tuple(reference.confidence_from_logits(logits, measure=measure))


@confidence_from_logits.register_fake
def _(logits, measure, use_triton):
    return _fake_stats(logits, logits.shape[0])


# ----------------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("lego_kernels::norm_head_cross_entropy", mutates_args=())
def norm_head_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    ignore_index: int,
    measure: str | None,
    schedule: str,
    use_triton: bool,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token cross-entropy of ``norm(x) @ weight.T``: ``(loss, confidence, prediction, lse)``
    ``[N]`` each, the loss 0 for ignored tokens (and targets outside ``[0, V)``), confidence and
    prediction empty for ``measure=None``. Its backward (:func:`norm_head_cross_entropy_backward`)
    recomputes the logits: exact for any per-token upstream gradient."""
    with _on_device(x):
        if schedule == "chunked":
            w = chunked.gemm_weight(weight, x, dtype, use_triton)
            walk_targets = chunked.walk_targets(targets, ignore_index, weight.shape[0])
            loss, lse, conf, pred, *_ = chunked.cross_entropy_forward(
                x, w, norm_weight, norm_bias, walk_targets, None, norm, eps, measure,
                _NO_GRADIENTS, use_triton,
            )  # fmt: skip
            return loss, conf, pred, lse
        h, _ = chunked.norm_rows(x, norm_weight, norm_bias, norm, eps, use_triton)
        h, w = _in_gemm_dtype(h, weight, dtype)
        return _fused(use_triton).linear_cross_entropy(h, w, targets, ignore_index, measure)


@norm_head_cross_entropy.register_fake
def _(x, weight, targets, norm_weight, norm_bias, norm, eps, ignore_index, measure, *_):
    rows = x.shape[0]
    conf, pred, lse = _fake_stats(x, rows if measure else 0)
    return lse.new_empty(rows), conf, pred, lse.new_empty(rows)


@register_flop_formula(torch.ops.lego_kernels.norm_head_cross_entropy)
def _(x, weight, *args, **kwargs):
    return _gemm_flops(x, weight)


@torch.library.custom_op("lego_kernels::norm_head_cross_entropy_backward", mutates_args=())
def norm_head_cross_entropy_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    lse: Tensor,
    norm: str | None,
    eps: float,
    ignore_index: int,
    schedule: str,
    use_triton: bool,
    dtype: torch.dtype | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW, d norm_weight, d norm_bias)`` of the per-token losses for ``grad [N]``, where
    ``needs`` says. Chunked: the walk again with ``coef_i = grad_i``; fused: the norm
    recomputed, the logit tiles recomputed (``linear_cross_entropy_backward``), the norm's
    backward."""
    need_dx, need_dw, need_dnw, need_dnb = needs
    norm_needs = (need_dx, need_dnw, need_dnb)
    with _on_device(x):
        if schedule == "chunked":
            w = chunked.gemm_weight(weight, x, dtype, use_triton)
            walk_targets = chunked.walk_targets(targets, ignore_index, weight.shape[0])
            coef = torch.where(walk_targets >= 0, grad, 0.0)  # an ignored loss is a constant 0
            *_, dx, dw, dnw, dnb = chunked.cross_entropy_forward(
                x, w, norm_weight, norm_bias, walk_targets, coef, norm, eps, None, tuple(needs),
                use_triton,
            )  # fmt: skip
        else:
            h, stats = chunked.norm_rows(x, norm_weight, norm_bias, norm, eps, use_triton)
            hd, w = _in_gemm_dtype(h, weight, dtype)
            dh, dw = _fused(use_triton).linear_cross_entropy_backward(
                hd, w, targets, ignore_index, lse, grad, any(norm_needs), need_dw
            )
            dx = dnw = dnb = None
            if any(norm_needs):
                dx, dnw, dnb = chunked.norm_rows_backward(
                    dh.to(h.dtype), x, norm_weight, norm_bias, norm, stats, norm_needs, use_triton
                )
    return _gradients((dx, dw, dnw, dnb), (x, weight, norm_weight, norm_bias), x)


@norm_head_cross_entropy_backward.register_fake
def _(grad, x, weight, targets, norm_weight, norm_bias, *args):
    return _fake_gradients(args[-1], (x, weight, norm_weight, norm_bias), x)


@register_flop_formula(torch.ops.lego_kernels.norm_head_cross_entropy_backward)
def _(grad, x, weight, *args, **kwargs):
    return _gemm_flops(x, weight, 1 + _backward_gemms(args[-1]))  # the logits recomputed


def _token_loss_setup(ctx, inputs, output):
    x, weight, targets, norm_weight, norm_bias, *ctx.config = inputs
    ctx.save_for_backward(x, weight, targets, norm_weight, norm_bias, output[3])
    ctx.mark_non_differentiable(*output[1:])


def _token_loss_backward(ctx, grad, *_unused):
    needs = _needs(ctx, (0, 1, 3, 4))
    if not any(needs):
        return (None,) * 12
    norm, eps, ignore_index, _measure, schedule, use_triton, dtype = ctx.config
    grads = norm_head_cross_entropy_backward(
        grad, *ctx.saved_tensors, norm, eps, ignore_index, schedule, use_triton, dtype, needs
    )
    dx, dw, dnw, dnb = _wanted(ctx, grads, (0, 1, 3, 4))
    return dx, dw, None, dnw, dnb, *(None,) * 7


norm_head_cross_entropy.register_autograd(_token_loss_backward, setup_context=_token_loss_setup)


@torch.library.custom_op("lego_kernels::chunked_cross_entropy", mutates_args=())
def chunked_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    coef: Tensor,
    norm: str | None,
    eps: float,
    ignore_index: int,
    measure: str | None,
    use_triton: bool,
    dtype: torch.dtype | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sum_i coef_i loss_i`` on the chunked schedule, its gradients computed in the same walk
    (``needs``: those of x, weight, norm_weight, norm_bias): ``(loss, token_loss, lse,
    confidence, prediction, dx, dW, d norm_weight, d norm_bias)``. The backward only scales
    them by the upstream scalar (:func:`chunked.cross_entropy_backward`); ``d coef`` is
    ``token_loss`` times it."""
    with _on_device(x):
        w = chunked.gemm_weight(weight, x, dtype, use_triton)
        walk_targets = chunked.walk_targets(targets, ignore_index, weight.shape[0])
        token_loss, lse, conf, pred, *grads = chunked.cross_entropy_forward(
            x, w, norm_weight, norm_bias, walk_targets, coef, norm, eps, measure, tuple(needs),
            use_triton,
        )  # fmt: skip
        loss = (token_loss * coef).sum()
        grads = _gradients(grads, (x, weight, norm_weight, norm_bias), x)
    return loss, token_loss, lse, conf, pred, *grads


@chunked_cross_entropy.register_fake
def _(x, weight, targets, norm_weight, norm_bias, coef, norm, eps, ignore_index, measure, *args):
    rows = x.shape[0]
    conf, pred, lse = _fake_stats(x, rows if measure else 0)
    token_loss = lse.new_empty(rows)
    grads = _fake_gradients(args[-1], (x, weight, norm_weight, norm_bias), x)
    return token_loss.new_empty(()), token_loss, lse.new_empty(rows), conf, pred, *grads


@register_flop_formula(torch.ops.lego_kernels.chunked_cross_entropy)
def _(x, weight, *args, **kwargs):
    return _gemm_flops(x, weight, 1 + _backward_gemms(args[-1]))


def _chunked_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[5:], output[1])  # the gradients, the per-token losses
    ctx.mark_non_differentiable(*output[1:])


def _chunked_backward(ctx, grad, *_unused):
    dx, dw, dnw, dnb, token_loss = ctx.saved_tensors
    wanted = _wanted(ctx, (dx, dw, dnw, dnb, token_loss), (0, 1, 3, 4, 5))
    dx, dw, dnw, dnb, dcoef = chunked.cross_entropy_backward(grad, *wanted)
    return dx, dw, None, dnw, dnb, dcoef, *(None,) * 7


chunked_cross_entropy.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# ----------------------------------------------------------------------------- routing


@torch.library.custom_op("lego_kernels::route", mutates_args=())
def route(
    confidence: Tensor,
    threshold: float,
    threshold_tensor: Tensor | None,
    capacity: int | None,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """``(indices, count)`` of the hard tokens of ``confidence [N]`` (``threshold_tensor``, a 0-d
    tensor on the device, when given, else ``threshold``): ``indices`` int64 ``[capacity]``, or
    ``[count]`` without a capacity (a size that depends on the data)."""
    threshold = threshold if threshold_tensor is None else threshold_tensor
    with _on_device(confidence):
        if use_triton:
            from lego_kernels import routing

            return routing.route(confidence, threshold, capacity)
        plan = reference.route(confidence, threshold, capacity=capacity)
    return plan.indices, plan.count


@route.register_fake
def _(confidence, threshold, threshold_tensor, capacity, use_triton):
    slots = torch.library.get_ctx().new_dynamic_size() if capacity is None else capacity
    count = confidence.new_empty((), dtype=torch.int64)
    return confidence.new_empty(slots, dtype=torch.int64), count


@torch.library.custom_op("lego_kernels::gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, indices: Tensor, use_triton: bool) -> Tensor:
    """Rows ``indices`` (int64 ``[K]``, -1 gives zeros) of ``x [N, D]``: ``[K, D]``."""
    with _on_device(x):
        if use_triton:
            from lego_kernels import routing

            return routing.gather_tokens(x, indices)
        return reference.gather_rows(x, indices)


@gather_tokens.register_fake
def _(x, indices, use_triton):
    return x.new_empty((indices.shape[0], x.shape[1]))


def _gather_setup(ctx, inputs, output):
    x, indices, ctx.use_triton = inputs
    ctx.num_tokens = x.shape[0]
    ctx.save_for_backward(indices)


def _gather_backward(ctx, grad):
    """The gradient of a gather is a scatter into zeros."""
    if not ctx.needs_input_grad[0]:
        return None, None, None
    (indices,) = ctx.saved_tensors
    zeros = grad.new_zeros((ctx.num_tokens, grad.shape[1]))
    return scatter_tokens(zeros, grad, indices, ctx.use_triton), None, None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("lego_kernels::scatter_tokens", mutates_args=())
def scatter_tokens(base: Tensor, src: Tensor | None, indices: Tensor, use_triton: bool) -> Tensor:
    """Copy of ``base [N, D]`` with the rows ``indices`` (``[K]``, -1 skipped) replaced by
    ``src [K, D]``, or by zeros when ``src`` is None (the gradient of ``base``)."""
    with _on_device(base):
        if use_triton:
            from lego_kernels import routing

            return routing.scatter_tokens(base, src, indices)
        return reference.scatter_rows(base, src, indices)


@scatter_tokens.register_fake
def _(base, src, indices, use_triton):
    return base.new_empty(base.shape)


def _scatter_setup(ctx, inputs, output):
    _, _, indices, ctx.use_triton = inputs
    ctx.save_for_backward(indices)


def _scatter_backward(ctx, grad):
    """``base`` gets the gradient with the replaced rows zeroed, ``src`` a gather of it."""
    (indices,) = ctx.saved_tensors
    need_base, need_src = ctx.needs_input_grad[:2]
    grad_base = scatter_tokens(grad, None, indices, ctx.use_triton) if need_base else None
    grad_src = gather_tokens(grad, indices, ctx.use_triton) if need_src else None
    return grad_base, grad_src, None, None


scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup)
