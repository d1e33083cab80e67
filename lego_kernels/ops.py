"""Public functional API of ``lego_kernels``: validation and backend dispatch.

Every op takes plain tensors and returns plain tensors; autograd works.
Shapes: ``x [..., D]`` (any leading dims, flattened to N tokens), output head
``weight [V, D]`` (the ``nn.Linear`` layout), ``targets`` int64 ``[...]``.
Inputs may be float32, bfloat16 or float16; statistics and losses are
accumulated in float32 and come back as float32.

Backends (see :func:`backend`): CUDA tensors run the Triton kernels, CPU
tensors run plain PyTorch, or the Triton kernels through Triton's interpreter
when ``TRITON_INTERPRET=1`` was set before ``triton`` and ``lego_kernels`` were
imported. The variable is read once,
here, when this module is imported (``lego_kernels.head`` uses the same value);
:func:`backend` raises a ``RuntimeError`` that says what to do when it was set
too late. The kernel modules are imported lazily, so the package works on
machines without Triton.

Data-dependent validation (the range of ``targets``) never breaks a
``torch.compile`` graph and never waits for a device: see :func:`check_range`.

Schedules (see :func:`schedule`): the exit-head ops ``exit_confidence`` and
``norm_head_cross_entropy`` run either ``"fused"`` (one Triton kernel streams the
vocabulary and never writes logits; its backward recomputes them; on the torch
backend this is the reference's recompute order) or ``"chunked"``
(``lego_kernels.chunked``: the vendor GEMM per chunk of tokens, one pass over the
chunk's logits, gradients in the same forward). Both return the same results.

Every Triton launch runs with its tensors' device as the current CUDA device.
Under autocast, float32 inputs run the head GEMMs in autocast's dtype on the
Triton backends (as ``F.linear`` would), and in float32 on the torch backend;
the statistics (losses, lse, confidences) are accumulated in float32 either way.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from lego_kernels import chunked, reference
from lego_kernels.reference import MEASURES, NORMS, REDUCTIONS, Confidence, RoutePlan

__all__ = [
    "SCHEDULES",
    "Confidence",
    "RoutePlan",
    "backend",
    "confidence_from_logits",
    "exit_confidence",
    "gather_tokens",
    "norm_head_cross_entropy",
    "norm_head_logits",
    "route",
    "scatter_tokens",
    "schedule",
    "use_backend",
    "use_schedule",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FORCED_BACKEND: str | None = None
SCHEDULES = ("fused", "chunked")
_FORCED_SCHEDULE: str | None = None


def _triton_built_for_gpu() -> bool:
    """Whether ``triton`` was already imported, with its own ``@triton.jit`` helpers
    (``tl.zeros``, ``tl.cdiv``, ...) built for the GPU rather than for the interpreter:
    Triton decides that when it is imported, from ``TRITON_INTERPRET``."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:  # triton not imported yet: it will read the variable as ops did
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(standard, "zeros", None), JITFunction)


# Set before Triton was imported? Triton's helpers then run in the interpreter too.
_TRITON_BUILT_FOR_GPU = _INTERPRET and _triton_built_for_gpu()


def _check_interpreter_setting() -> None:
    """RuntimeError, saying what to do, when ``TRITON_INTERPRET`` no longer matches the
    value read at import, or was set after ``triton`` was imported."""
    if (os.environ.get("TRITON_INTERPRET") == "1") != _INTERPRET:
        raise RuntimeError(
            f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} now but was "
            f"{'' if _INTERPRET else 'not '}'1' when lego_kernels was imported, and it is read "
            "once, at import: set it before importing lego_kernels and triton (e.g. "
            "`TRITON_INTERPRET=1 python ...`, or at the top of the script or conftest.py)"
        )
    if _TRITON_BUILT_FOR_GPU:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after `import triton`, so Triton's own helpers were "
            "built for the GPU and the kernels cannot run in its interpreter: set "
            "TRITON_INTERPRET=1 before anything imports triton (e.g. `TRITON_INTERPRET=1 "
            "python ...`), or use ops.use_backend('torch') for the reference"
        )


def backend(x: Tensor) -> str:
    """Which implementation the ops run for tensors like ``x``.

    ``"triton"`` for CUDA tensors; ``"triton-interpreter"`` for CPU tensors
    when ``TRITON_INTERPRET=1`` was set before ``triton`` and ``lego_kernels``
    were imported; ``"torch"`` (the reference) otherwise: for float64 tensors
    (the kernels take float32, bfloat16 and float16), and inside
    ``use_backend("torch")``. Raises ``RuntimeError`` (saying what to do) when the
    Triton kernels would run but ``TRITON_INTERPRET`` was set too late (after
    ``import triton``) or changed after ``lego_kernels`` was imported.
    """
    if _FORCED_BACKEND == "torch" or x.dtype == torch.float64:
        return "torch"
    _check_interpreter_setting()
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu" and _INTERPRET:
        return "triton-interpreter"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: ``"torch"`` (the reference) or ``"auto"``.

    Useful to debug a model against the reference, or to keep a run on the
    fast PyTorch path while ``TRITON_INTERPRET=1`` is set for kernel tests.
    """
    global _FORCED_BACKEND
    if name not in ("torch", "auto"):
        raise ValueError(f"use_backend: name must be 'torch' or 'auto', got {name!r}")
    previous = _FORCED_BACKEND
    _FORCED_BACKEND = None if name == "auto" else name
    try:
        yield
    finally:
        _FORCED_BACKEND = previous


@contextlib.contextmanager
def use_schedule(name: str) -> Iterator[None]:
    """Force a schedule of the exit-head ops inside a ``with`` block: ``"fused"``, ``"chunked"``
    or ``"auto"`` (the cost model of :func:`schedule`).

    Both schedules return the same results (up to rounding); forcing one is for tests,
    benchmarks and debugging. ``"fused"`` with gradients under
    ``torch.use_deterministic_algorithms(True)`` raises, as its backward uses float atomics.
    """
    global _FORCED_SCHEDULE
    if name not in ("auto", *SCHEDULES):
        raise ValueError(f"use_schedule: name must be 'auto', 'fused' or 'chunked', got {name!r}")
    previous = _FORCED_SCHEDULE
    _FORCED_SCHEDULE = None if name == "auto" else name
    try:
        yield
    finally:
        _FORCED_SCHEDULE = previous


# Cost model of the schedules on a Hopper-class GPU (H100/H200; bench/NOTES.md has the measured
# rates these come from; re-fit them when a GPU run disagrees). Only their ratios matter.
_GEMM_FLOPS = {2: 7.0e14, 4: 3.5e14}  # cuBLAS's dense rate: bf16/fp16, and float32 as TF32
_FUSED_GEMM_SHARE = 0.6  # share of that rate the fused kernel's dots reach (softmax in the loop)
_LOGIT_SECONDS = 3.0e-13  # the fused epilogue per logit: ~10 instructions at 33.5e12 per second
_STREAM_BYTES = 3.5e12  # bytes per second of the chunk passes and of the GEMMs' logits traffic
_ATOMIC_BYTES = 1.5e12  # bytes per second of float32 atomic adds (into L2)
_FUSED_RESIDENT_DIM = 64  # up to this D the fused backward keeps dh in registers (no dh atomics)


def _predicted_seconds(
    tokens: int, dim: int, vocab: int, itemsize: int, grad: bool
) -> tuple[float, float]:
    """(fused, chunked) predicted seconds of one call; see :func:`schedule`."""
    gemm = 2 * tokens * dim * vocab / _GEMM_FLOPS[itemsize]  # one N x D x V GEMM on cuBLAS
    logits = tokens * vocab
    fused_s = max(gemm / _FUSED_GEMM_SHARE, logits * _LOGIT_SECONDS)
    chunked_s = gemm + 2 * logits * itemsize / _STREAM_BYTES  # GEMM writes, pass reads
    if grad:
        # fused: recompute + dh + dW GEMMs; dW tiles (and dh tiles past the resident width)
        # added with float32 atomics once per (128-token block, 128-wide vocabulary tile).
        atomic = math.ceil(tokens / 128) * vocab * dim * 4
        if dim > _FUSED_RESIDENT_DIM:
            atomic += tokens * dim * math.ceil(vocab / 128) * 4
        fused_s += 3 * gemm / _FUSED_GEMM_SHARE + logits * _LOGIT_SECONDS
        fused_s += atomic / _ATOMIC_BYTES
        # chunked: dh and dW GEMMs; the pass writes G and the GEMMs read it twice; dW is
        # read and written once per chunk.
        rows = chunked.chunk_rows(tokens, vocab, itemsize, torch.device("cuda"))
        chunks = math.ceil(tokens / rows)
        chunked_s += 2 * gemm + 4 * logits * itemsize / _STREAM_BYTES
        chunked_s += chunks * 2 * vocab * dim * itemsize / _STREAM_BYTES
    return fused_s, chunked_s


def _gemm_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the head GEMMs on the Triton backends: autocast's for float32 ``x`` under
    autocast on its device, ``x.dtype`` otherwise."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def schedule(x: Tensor, weight: Tensor, *, grad: bool | None = None) -> str:
    """Which schedule an exit-head op on ``x [..., D]`` and ``weight [V, D]`` runs.

    ``"fused"`` or ``"chunked"`` (see the module docstring); ``grad``: whether the call computes
    gradients (``None``: grad mode is on and ``x`` or ``weight`` requires grad; the ops count
    the norm's parameters too). Inside :func:`use_schedule` the forced name; otherwise the cost
    model, in this order:

    1. torch backend: ``"chunked"`` (the fused kernel needs Triton; on the CPU the vendor GEMM
       into one reused buffer beats the reference's recompute order, which is ``"fused"`` there);
    2. float32 GEMMs with ``torch.get_float32_matmul_precision() == "highest"``: ``"chunked"``
       (the fused kernel's float32 dots would be FMA loops without tensor cores; cuBLAS's
       SGEMM is at least as fast and as exact);
    3. gradients under ``torch.use_deterministic_algorithms(True)``: ``"chunked"`` (the fused
       backward adds dW tiles with float atomics, whose order varies from run to run);
    4. otherwise the faster of the two predicted times, with N = tokens, ``b`` bytes per
       element, ``P`` cuBLAS's rate and ``S`` the streaming rate::

           fused   = max(2NDV / (0.6 P), NV * 3e-13 s)  [+ 3x the GEMM part + NV * 3e-13 s
                     + float32 atomics: (N/128) V D (+ N D (V/128) when D > 64) * 4 B / 1.5e12]
           chunked = 2NDV / P + 2 NV b / S  [+ 4NDV / P + 4 NV b / S + chunks * 2 V D b / S]

       (brackets: with gradients). The fused kernel wins where the softmax epilogue, not the
       GEMM, sets the time (small D: ``seed``, D = 64); the chunked schedule wins where the
       GEMM dominates (``gpt2``, ``llama3``): its 6NDV FLOPs run on cuBLAS, with no atomics.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("schedule: x and weight must be tensors (the op's x [..., D] and [V, D])")
    if grad is not None and not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool or None, got {type(grad).__name__}")
    if _FORCED_SCHEDULE is not None:
        return _FORCED_SCHEDULE
    if grad is None:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if backend(x) == "torch":
        return "chunked"
    dtype = _gemm_dtype(x)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "chunked"
    if grad and torch.are_deterministic_algorithms_enabled():
        return "chunked"
    dim = x.shape[-1]
    fused_s, chunked_s = _predicted_seconds(
        x.numel() // max(dim, 1), dim, weight.shape[0], dtype.itemsize, grad
    )
    return "fused" if fused_s <= chunked_s else "chunked"


def _check_fused_allowed(grad: bool) -> None:
    """RuntimeError for the fused backward under deterministic algorithms (float atomics)."""
    if grad and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "norm_head_cross_entropy: the fused schedule's backward adds gradient tiles with "
            "float atomics, which torch.use_deterministic_algorithms(True) forbids; use "
            "ops.use_schedule('chunked') or 'auto' (which picks the deterministic schedule)"
        )


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """``t``'s CUDA device as the current device for the kernel launches (no-op otherwise)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _requires_grad(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors records gradients."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- validation


def check_choice(name: str, value: object, choices: tuple) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_floating(name: str, t: object) -> None:
    """TypeError unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {t.dtype}; cast it with .float()"
        )


def check_same_device(**tensors: Tensor | None) -> None:
    """ValueError unless every given tensor lives on the same device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                f"move them to one device (e.g. {name}.to({first_name}.device))"
            )


def _check_head_args(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
) -> None:
    check_floating("x", x)
    check_floating("weight", weight)
    check_choice("norm", norm, NORMS)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D [V, D] (the nn.Linear layout), got shape {tuple(weight.shape)}"
        )
    dim = x.shape[-1]
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight has D={weight.shape[1]} columns but x has D={dim} features; "
            "weight must be [V, D] (pass linear.weight, not its transpose)"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight is {weight.dtype} but x is {x.dtype}; cast one of them, "
            "e.g. weight.to(x.dtype)"
        )
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        check_floating(name, t)
        if norm is None:
            raise ValueError(f"{name} was given with norm=None; pass norm='rms' or 'layer'")
        if tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must have shape ({dim},) to match x, got {tuple(t.shape)}")
    if norm_bias is not None and norm == "rms":
        raise ValueError("norm_bias is only used by norm='layer'; drop it or use norm='layer'")
    check_same_device(x=x, weight=weight, norm_weight=norm_weight, norm_bias=norm_bias)


def check_range(name: str, values: Tensor, size: int, *, ignore_index: int | None = None) -> None:
    """Check that the integer ``values`` lie in ``[0, size)`` (or equal ``ignore_index``),
    without a host synchronization and without breaking a ``torch.compile`` graph.

    The check is ``torch._assert_async`` on the device: on CPU outside ``torch.compile``
    it fails at once and becomes a ``ValueError`` naming ``name`` and a bad value; under
    ``torch.compile`` / ``torch.export`` it is a node of the graph (a ``RuntimeError``
    with the same message when the compiled code runs on CPU); on CUDA it is a device-side
    assert (the error surfaces at the next synchronization, as for an out-of-range
    ``nn.Embedding`` index). Never a silently wrong answer, never a scalar read.
    """
    ok = (values >= 0) & (values < size)
    allowed = f"[0, {size})"
    if ignore_index is not None:
        ok = ok | (values == ignore_index)
        allowed += f" or equal ignore_index={ignore_index}"
    message = f"{name} must lie in {allowed}"
    if torch.compiler.is_compiling() or values.device.type != "cpu":
        torch._assert_async(ok.all(), message)
        return
    try:
        torch._assert_async(ok.all(), message)
    except RuntimeError:
        raise ValueError(f"{message}; found {int(values[~ok][0])}") from None


def _check_targets(
    targets: Tensor, x: Tensor, vocab: int, ignore_index: int, token_weights: Tensor | None
) -> None:
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 tensor of token ids, got {got}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(
            f"targets must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    check_same_device(x=x, targets=targets, token_weights=token_weights)
    if token_weights is not None:
        check_floating("token_weights", token_weights)
        if token_weights.shape != targets.shape:
            raise ValueError(
                f"token_weights must have the shape of targets {tuple(targets.shape)}, "
                f"got {tuple(token_weights.shape)}"
            )
    # Range check on CPU only (also under torch.compile: an assert in the graph). Not on
    # CUDA, where the Triton kernels treat an out-of-range target like ignore_index.
    if targets.device.type == "cpu":
        check_range("targets", targets, vocab, ignore_index=ignore_index)


def _flat(x: Tensor) -> Tensor:
    """``[..., D] -> [N, D]``, contiguous (what the kernels expect)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _contiguous(t: Tensor | None) -> Tensor | None:
    """``t.contiguous()``, passing ``None`` through (optional norm weight and bias)."""
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------- ops


def norm_head_logits(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    *,
    norm: str | None = "rms",
    eps: float = 1e-6,
) -> Tensor:
    """Exit-head logits ``norm(x) @ weight.T``: ``[..., V]`` in ``x.dtype``.

    Differentiable w.r.t. ``x``, ``weight``, ``norm_weight`` and ``norm_bias``.
    This op materializes ``N x V`` by definition; use :func:`exit_confidence`
    or :func:`norm_head_cross_entropy` when you only need their results.
    """
    _check_head_args(x, weight, norm_weight, norm_bias, norm, eps)
    if backend(x) == "torch":
        return reference.norm_head_logits(x, weight, norm_weight, norm_bias, norm=norm, eps=eps)
    from lego_kernels import head

    with _on_device(x):
        logits = head.norm_head_logits(
            _flat(x),
            weight.contiguous(),
            _contiguous(norm_weight),
            _contiguous(norm_bias),
            norm,
            eps,
        )
    return logits.reshape(*x.shape[:-1], weight.shape[0])


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
    """Per-token confidence, prediction and logsumexp of the exit head, in one pass.

    Returns ``Confidence(confidence f32, prediction i64, lse f32)``, each of
    shape ``x.shape[:-1]``; never stores the ``N x V`` logits (the chunked schedule
    holds one chunk's). No gradient. ``measure``: ``"max_prob"`` | ``"margin"`` |
    ``"entropy"`` (higher = more confident). Which schedule runs: :func:`schedule`.
    """
    _check_head_args(x, weight, norm_weight, norm_bias, norm, eps)
    check_choice("measure", measure, MEASURES)
    kind, lead = backend(x), x.shape[:-1]
    if schedule(x, weight, grad=False) == "fused":
        if kind == "torch":
            return reference.exit_confidence(
                x, weight, norm_weight, norm_bias, norm=norm, eps=eps, measure=measure
            )
        from lego_kernels import head

        run = head.exit_confidence
    else:
        run = functools.partial(chunked.exit_confidence, use_triton=kind != "torch")
    with torch.no_grad(), _on_device(x):
        out = run(
            _flat(x),
            weight.contiguous(),
            _contiguous(norm_weight),
            _contiguous(norm_bias),
            norm,
            eps,
            measure,
            dtype=_gemm_dtype(x) if kind != "torch" else None,
        )
    return Confidence(*(t.reshape(lead) for t in out))


def confidence_from_logits(logits: Tensor, *, measure: str = "max_prob") -> Confidence:
    """Confidence, prediction and logsumexp of logits ``[..., V]`` a caller already has."""
    check_floating("logits", logits)
    check_choice("measure", measure, MEASURES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if backend(logits) == "torch":
        with torch.no_grad():
            return reference.confidence_from_logits(logits, measure=measure)
    from lego_kernels import head

    lead = logits.shape[:-1]
    with torch.no_grad(), _on_device(logits):
        out = head.confidence_from_logits(_flat(logits), measure)
    return Confidence(*(t.reshape(lead) for t in out))


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
    """Cross-entropy of the exit head, ``cross_entropy(norm(x) @ weight.T, targets)``.

    Never materializes ``N x V`` (forward or backward; the chunked schedule holds
    one chunk's logits, within ``chunked.MEMORY_BUDGET``). Loss is float32:
    a scalar for ``reduction="mean"``/``"sum"``, ``x.shape[:-1]`` for ``"none"``.
    ``mean`` divides by the number of non-ignored tokens (0 if there is none);
    with ``token_weights`` each token's loss is multiplied by its weight first
    (``token_weights`` get their gradient too, on every backend).
    Backward computes only the gradients that are required (a frozen head
    costs no ``dW``). With ``return_confidence=True`` returns
    ``(loss, Confidence)`` from the same pass, using ``measure``. Which schedule
    runs: :func:`schedule`.
    """
    _check_head_args(x, weight, norm_weight, norm_bias, norm, eps)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("measure", measure, MEASURES)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_targets(targets, x, weight.shape[0], ignore_index, token_weights)
    targets = targets.long()
    kind, lead = backend(x), x.shape[:-1]
    grad = _requires_grad(x, weight, norm_weight, norm_bias)
    if schedule(x, weight, grad=grad) == "fused":
        if kind == "torch":
            return reference.norm_head_cross_entropy(
                x,
                weight,
                targets,
                norm_weight,
                norm_bias,
                norm=norm,
                eps=eps,
                ignore_index=ignore_index,
                reduction=reduction,
                token_weights=token_weights,
                return_confidence=return_confidence,
                measure=measure,
            )
        _check_fused_allowed(grad)
        from lego_kernels import head

        run = head.norm_head_cross_entropy
    else:
        run = functools.partial(chunked.norm_head_cross_entropy, use_triton=kind != "torch")
    with _on_device(x):
        out = run(
            _flat(x),
            weight.contiguous(),
            targets.reshape(-1).contiguous(),
            _contiguous(norm_weight),
            _contiguous(norm_bias),
            norm,
            eps,
            ignore_index,
            reduction,
            None if token_weights is None else token_weights.reshape(-1),
            return_confidence,
            measure,
            dtype=_gemm_dtype(x) if kind != "torch" else None,
        )
    if not return_confidence:
        return out.reshape(lead) if reduction == "none" else out
    loss, conf = out
    loss = loss.reshape(lead) if reduction == "none" else loss
    return loss, Confidence(*(t.reshape(lead) for t in conf))


# ----------------------------------------------------------------------------- routing


def _check_threshold(threshold: object, confidence: Tensor) -> float | Tensor:
    """A Python float, or a 0-d tensor on ``confidence``'s device (read there, no sync).

    A CPU tensor for a CUDA ``confidence`` becomes a float (no device sync). A NaN float
    is rejected; a tensor on ``confidence``'s device is never read on the host (that would
    sync, or break a ``torch.compile`` graph), so a NaN there makes every token hard.
    """
    if isinstance(threshold, Tensor):
        check_floating("threshold", threshold)
        if threshold.dim() != 0:
            raise ValueError(
                f"threshold must be a float or a 0-d tensor, got shape {tuple(threshold.shape)}; "
                "pass one value, e.g. threshold.reshape(())"
            )
        if threshold.device != confidence.device and threshold.device.type == "cpu":
            threshold = threshold.item()
        else:
            check_same_device(confidence=confidence, threshold=threshold)
            return threshold.detach()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"threshold must be a float or a 0-d floating tensor, got {type(threshold).__name__}"
        )
    if threshold != threshold:  # NaN (math.isnan would break torch.compile's graph)
        raise ValueError("threshold is NaN; pass a number (tokens below it are hard)")
    return float(threshold)


def _check_plan(plan: object, name: str, x: Tensor) -> None:
    """TypeError/ValueError unless ``plan`` is a RoutePlan for the tokens of ``x [..., D]``."""
    if not isinstance(plan, RoutePlan):
        raise TypeError(f"plan must be the RoutePlan from ops.route, got {type(plan).__name__}")
    indices = plan.indices
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise TypeError("plan.indices must be a 1-D int64 tensor; build the plan with ops.route")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., D], got a 0-d tensor")
    tokens = math.prod(x.shape[:-1])
    if tokens != plan.num_tokens:
        raise ValueError(
            f"{name} has {tokens} tokens (shape {tuple(x.shape)}) but plan was built for "
            f"{plan.num_tokens}; route the confidence of these same tokens"
        )
    check_same_device(**{name: x, "plan.indices": indices})


def route(
    confidence: Tensor, threshold: float | Tensor, *, capacity: int | None = None
) -> RoutePlan:
    """Plan of the hard tokens, those with ``confidence < threshold``, in ascending order.

    ``confidence [...]`` (any float dtype, compared in float32) is flattened to N tokens;
    a NaN confidence counts as hard (``hard = not (confidence >= threshold)``, so
    ``exited = confidence >= threshold`` is its exact complement). ``threshold`` is a
    float or a 0-d tensor (kept on the device: no synchronization).

    Returns ``RoutePlan(indices, count, num_tokens)``: ``indices`` int64 flat token
    indices, ``count`` a 0-d int64 tensor (the true number of hard tokens), ``num_tokens``
    N. Without ``capacity``, ``indices`` has ``count`` entries (one host synchronization);
    with ``capacity`` it has exactly ``capacity`` entries and nothing is synchronized
    (CUDA graphs and ``torch.compile`` work): the first ``min(count, capacity)`` are the
    first hard tokens, the rest -1; hard tokens past the capacity are left out (they exit),
    and ``count > capacity`` shows it. Not differentiable.
    """
    check_floating("confidence", confidence)
    threshold = _check_threshold(threshold, confidence)
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (slots in plan.indices), got {capacity}")
    if backend(confidence) == "torch":
        return reference.route(confidence, threshold, capacity=capacity)
    from lego_kernels import routing

    with _on_device(confidence):
        indices, count = routing.route(confidence.reshape(-1), threshold, capacity)
    return RoutePlan(indices, count, confidence.numel())


def gather_tokens(x: Tensor, plan: RoutePlan) -> Tensor:
    """The hard rows of ``x [..., D]`` (N tokens): ``[K, D]`` in x's dtype, K = len(plan.indices).

    Row ``k`` is token ``plan.indices[k]``, zeros where it is -1. Differentiable: the
    gradient flows back to those rows of ``x`` (zero elsewhere).
    """
    check_floating("x", x)
    _check_plan(plan, "x", x)
    if backend(x) == "torch":
        return reference.gather_tokens(x, plan)
    from lego_kernels import routing

    rows = x.reshape(plan.num_tokens, x.shape[-1])
    with _on_device(x):
        return routing.gather_tokens(rows, plan.indices.contiguous())


def scatter_tokens(base: Tensor, src: Tensor, plan: RoutePlan) -> Tensor:
    """Copy of ``base [..., D]`` with the rows ``plan.indices`` replaced by ``src [K, D]``.

    Out of place; entries -1 are skipped (their ``src`` rows are dropped). Differentiable
    w.r.t. both: ``src`` gets the gradient of its rows, ``base`` the gradient with the
    replaced rows zeroed.
    """
    check_floating("base", base)
    check_floating("src", src)
    _check_plan(plan, "base", base)
    dim, slots = base.shape[-1], plan.indices.shape[0]
    if src.dim() != 2 or src.shape[1] != dim:
        raise ValueError(
            f"src must be [K, D] with D={dim} like base, got shape {tuple(src.shape)}; "
            "pass the deep layers' output for ops.gather_tokens(x, plan)"
        )
    if src.shape[0] != slots:
        raise ValueError(
            f"src has {src.shape[0]} rows but plan.indices has {slots}; "
            "pass one row per plan entry (the shape of ops.gather_tokens(x, plan))"
        )
    if src.dtype != base.dtype:
        raise TypeError(f"src is {src.dtype} but base is {base.dtype}; cast it: src.to(base.dtype)")
    check_same_device(base=base, src=src)
    if backend(base) == "torch":
        return reference.scatter_tokens(base, src, plan)
    from lego_kernels import routing

    rows = base.reshape(plan.num_tokens, dim)
    with _on_device(base):
        return routing.scatter_tokens(rows, src, plan.indices.contiguous()).reshape(base.shape)
