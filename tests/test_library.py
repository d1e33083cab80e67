"""The ``torch.library`` custom ops of ``lego_kernels.library``.

- ``torch.library.opcheck`` on every op, backward ops included: the schema (no mutation, no
  aliasing of inputs), the fake implementation against the real one (shapes, dtypes, strides),
  the autograd registration, and AOTAutograd with dynamic shapes against eager (outputs and
  gradients); on the torch backend and on the Triton kernels (through the interpreter on CPU
  tensors, natively with ``LEGO_TEST_CUDA=1``), both schedules, with and without the options
  that change the outputs (norm, measure, ignored targets, which gradients, GEMM dtype,
  capacity, threshold tensor, zero rows);
- ``FlopCounterMode`` counts the GEMMs of each op (2NDV each), also of the Triton kernels.

The numerics of the kernels against the reference are in ``test_head.py``,
``test_chunked.py`` and ``test_routing.py``; the public ops under ``torch.compile`` and
``torch.export`` (torch and Triton backends) in ``test_compile_safety.py``.
"""

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lego_kernels import library, ops

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
DEVICE = "cpu" if INTERPRETER or not CUDA else "cuda"
TRITON = pytest.param(
    True,
    id="triton",
    marks=pytest.mark.skipif(
        not (INTERPRETER or CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA GPU"
    ),
)
BACKENDS = [pytest.param(False, id="torch"), TRITON]
N, D, V = 5, 16, 40
EPS = 1e-6


def opcheck(op, args) -> None:
    """``torch.library.opcheck`` of ``op`` on ``args``; every check must succeed."""
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def head_tensors(norm: str | None, grad: bool, rows: int = N):
    """``(x [rows, D], weight [V, D], norm_weight, norm_bias)`` on DEVICE."""
    x = torch.randn(rows, D, device=DEVICE)
    weight = torch.randn(V, D, device=DEVICE) / D**0.5
    norm_weight = 1 + 0.1 * torch.randn(D, device=DEVICE) if norm else None
    norm_bias = 0.1 * torch.randn(D, device=DEVICE) if norm == "layer" else None
    return [
        None if t is None else t.requires_grad_(grad) for t in (x, weight, norm_weight, norm_bias)
    ]


def targets(rows: int = N) -> torch.Tensor:
    t = torch.randint(0, V, (rows,), device=DEVICE)
    t[1::3] = -100  # ignored tokens
    return t


def gemm_dtype(use_triton: bool) -> torch.dtype | None:
    """What ``ops`` passes: the inputs' dtype on the Triton backends, None on the torch one."""
    return torch.float32 if use_triton else None


# (schedule, norm, measure): every norm, with and without a confidence, on both schedules
HEAD_CASES = [
    ("fused", "rms", None),
    ("fused", "layer", "margin"),
    ("chunked", None, "entropy"),
    ("chunked", "rms", None),
]


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer", None])
def test_opcheck_norm_head_logits(use_triton, norm):
    x, w, nw, nb = head_tensors(norm, grad=True)
    opcheck(library.norm_head_logits, (x, w, nw, nb, norm, EPS, use_triton, gemm_dtype(use_triton)))
    grad = torch.randn(N, V, device=DEVICE)
    leaves = [None if t is None else t.detach() for t in (x, w, nw, nb)]
    for needs in ([True, True, norm is not None, norm == "layer"], [False, True, False, False]):
        args = (grad, *leaves, norm, EPS, use_triton, gemm_dtype(use_triton), needs)
        opcheck(library.norm_head_logits_backward, args)


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize(("schedule", "norm", "measure"), HEAD_CASES)
def test_opcheck_exit_confidence(use_triton, schedule, norm, measure):
    x, w, nw, nb = head_tensors(norm, grad=False)
    measure = measure or "max_prob"
    args = (x, w, nw, nb, norm, EPS, measure, schedule, use_triton, gemm_dtype(use_triton))
    opcheck(library.exit_confidence, args)
    opcheck(library.confidence_from_logits, (torch.randn(N, V, device=DEVICE), measure, use_triton))


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize(("schedule", "norm", "measure"), HEAD_CASES)
def test_opcheck_norm_head_cross_entropy(use_triton, schedule, norm, measure):
    x, w, nw, nb = head_tensors(norm, grad=True)
    t = targets()
    options = (norm, EPS, -100, measure, schedule, use_triton, gemm_dtype(use_triton))
    opcheck(library.norm_head_cross_entropy, (x, w, t, nw, nb, *options))
    leaves = [None if u is None else u.detach() for u in (x, w, nw, nb)]
    with torch.no_grad():
        lse = library.norm_head_cross_entropy(*leaves[:2], t, *leaves[2:], *options)[3]
    grad = torch.randn(N, device=DEVICE)
    for needs in ([True, True, norm is not None, norm == "layer"], [True, False, False, False]):
        args = (grad, *leaves[:2], t, *leaves[2:], lse, norm, EPS, -100, *options[4:], needs)
        opcheck(library.norm_head_cross_entropy_backward, args)


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("measure", [None, "max_prob"])
@pytest.mark.parametrize("trainable", ["all", "head", "input"])
def test_opcheck_chunked_cross_entropy(use_triton, measure, trainable):
    """The gradients computed in the forward for each set of trainable tensors; the
    coefficients of a mean with token weights (differentiable)."""
    x, w, nw, _ = head_tensors("rms", grad=False)
    for t, name in zip((x, w, nw), "xwn", strict=True):
        t.requires_grad_(name in {"all": "xwn", "head": "w", "input": "xn"}[trainable])
    t = targets()
    coef = ((t >= 0) * torch.rand(N, device=DEVICE) / N).requires_grad_()
    needs = [x.requires_grad, w.requires_grad, nw.requires_grad, False]
    args = (x, w, t, nw, None, coef, "rms", EPS, -100, measure, use_triton)
    opcheck(library.chunked_cross_entropy, (*args, gemm_dtype(use_triton), needs))


@pytest.mark.parametrize("use_triton", BACKENDS)
def test_opcheck_gemm_dtype_and_empty_input(use_triton):
    """A GEMM dtype other than the inputs' (autocast's, on the Triton backends) and N = 0."""
    dtype = torch.bfloat16 if use_triton else None
    x, w, nw, _ = head_tensors("rms", grad=True)
    opcheck(library.norm_head_logits, (x, w, nw, None, "rms", EPS, use_triton, dtype))
    options = ("rms", EPS, -100, "max_prob", "fused", use_triton, dtype)
    opcheck(library.norm_head_cross_entropy, (x, w, targets(), nw, None, *options))
    x0, w0, nw0, _ = head_tensors("rms", grad=True, rows=0)
    for schedule in ops.SCHEDULES:
        options = ("rms", EPS, -100, "max_prob", schedule, use_triton, gemm_dtype(use_triton))
        opcheck(library.norm_head_cross_entropy, (x0, w0, targets(0), nw0, None, *options))


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("capacity", [None, 0, 2, 9])
@pytest.mark.parametrize("threshold_tensor", [False, True], ids=["float", "tensor"])
def test_opcheck_route(use_triton, capacity, threshold_tensor):
    """``capacity=None`` gives a data-dependent size (the fake's dynamic size)."""
    confidence = torch.rand(7, device=DEVICE)
    tensor = torch.tensor(0.5, device=DEVICE) if threshold_tensor else None
    opcheck(
        library.route, (confidence, 0.0 if threshold_tensor else 0.5, tensor, capacity, use_triton)
    )


@pytest.mark.parametrize("use_triton", BACKENDS)
def test_opcheck_gather_scatter(use_triton):
    x = torch.randn(6, D, device=DEVICE, requires_grad=True)
    indices = torch.tensor([4, 0, -1], device=DEVICE)
    src = torch.randn(3, D, device=DEVICE, requires_grad=True)
    opcheck(library.gather_tokens, (x, indices, use_triton))
    opcheck(library.scatter_tokens, (x, src, indices, use_triton))
    opcheck(library.scatter_tokens, (x, None, indices, use_triton))  # zeros: base's gradient


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize(
    ("schedule", "reduction", "gemms"),
    [
        ("fused", "mean", 4),  # logits; backward: recomputed logits, dh, dW (8NDV)
        ("chunked", "mean", 3),  # logits, dh and dW in one walk (6NDV)
        ("chunked", "none", 4),  # a per-token upstream gradient: the walk again
    ],
)
def test_flop_counter_sees_the_gemms_of_each_op(use_triton, schedule, reduction, gemms):
    """``FlopCounterMode`` counts 2NDV per GEMM of a training call (the Triton kernels included,
    which it cannot see inside), and 2NDV for the logits and the confidence."""
    x, w, nw, _ = head_tensors("rms", grad=True)
    t = targets()
    with ops.use_schedule(schedule), ops.use_backend("auto" if use_triton else "torch"):
        assert ops.backend(x).startswith("triton") == use_triton
        with FlopCounterMode(display=False) as counter:
            ops.norm_head_cross_entropy(x, w, t, nw, reduction=reduction).sum().backward()
        assert counter.get_total_flops() == gemms * 2 * N * D * V
        with FlopCounterMode(display=False) as counter:
            ops.exit_confidence(x, w, nw)
            ops.norm_head_logits(x, w, nw).sum().backward()  # dW and dh: 3 GEMMs in all
        assert counter.get_total_flops() == 4 * 2 * N * D * V
