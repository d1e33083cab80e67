"""The public API's contract: backend and schedule choice, input validation, shapes and dtypes.

Numerical agreement of the kernels with the reference is in ``test_head.py`` and
``test_chunked.py``; these tests run the ops on the torch backend (``use_backend("torch")``),
where validation and dispatch are the same code, once per schedule (``schedule`` fixture:
``"fused"`` is the reference there, ``"chunked"`` ``lego_kernels.chunked``'s CPU path).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego_kernels import ops, reference

D, V = 8, 11


@pytest.fixture(params=ops.SCHEDULES)
def schedule(request: pytest.FixtureRequest):
    with ops.use_schedule(request.param):
        yield request.param


def head_inputs(dtype=torch.float32):
    x = torch.randn(2, 3, D, dtype=dtype)
    w = torch.randn(V, D, dtype=dtype)
    targets = torch.randint(0, V, (2, 3))
    return x, w, targets


def test_backend_names():
    x = torch.randn(2, D)
    # tests/conftest.py sets TRITON_INTERPRET=1 before lego_kernels is imported
    assert ops.backend(x) == "triton-interpreter"
    assert ops.backend(x.double()) == "torch"  # the kernels take float32/bf16/fp16
    with ops.use_backend("torch"):
        assert ops.backend(x) == "torch"
    assert ops.backend(x) == "triton-interpreter"
    with pytest.raises(ValueError, match="use_backend"), ops.use_backend("cuda"):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_dtypes(schedule, dtype):
    x, w, targets = head_inputs(dtype)
    with ops.use_backend("torch"):
        assert ops.norm_head_logits(x, w).shape == (2, 3, V)
        assert ops.norm_head_logits(x, w).dtype == dtype
        conf = ops.exit_confidence(x, w)
        assert conf.confidence.dtype == torch.float32
        assert conf.prediction.dtype == torch.int64
        assert conf.lse.dtype == torch.float32
        assert conf.confidence.shape == (2, 3)
        loss = ops.norm_head_cross_entropy(x, w, targets)
        assert loss.dtype == torch.float32 and loss.shape == ()
        none = ops.norm_head_cross_entropy(x, w, targets, reduction="none")
        assert none.shape == (2, 3)
        assert ops.confidence_from_logits(torch.randn(4, V, dtype=dtype)).lse.shape == (4,)


def bad_head_calls():
    x, w, t = head_inputs()
    nw = torch.ones(D)
    return [
        ("x", TypeError, lambda: ops.exit_confidence(x.long(), w)),
        ("weight", TypeError, lambda: ops.exit_confidence(x, w.long())),
        ("weight", ValueError, lambda: ops.exit_confidence(x, w[0])),
        ("weight", ValueError, lambda: ops.exit_confidence(x, w[:, :5])),
        ("weight", TypeError, lambda: ops.exit_confidence(x, w.double())),
        ("norm_weight", ValueError, lambda: ops.exit_confidence(x, w, torch.ones(D + 1))),
        ("norm_bias", ValueError, lambda: ops.exit_confidence(x, w, nw, torch.ones(D))),
        ("norm_weight", ValueError, lambda: ops.exit_confidence(x, w, nw, norm=None)),
        ("norm", ValueError, lambda: ops.exit_confidence(x, w, norm="batch")),
        ("measure", ValueError, lambda: ops.exit_confidence(x, w, measure="top1")),
        ("eps", ValueError, lambda: ops.exit_confidence(x, w, eps=0.0)),
        ("measure", ValueError, lambda: ops.confidence_from_logits(x, measure="p")),
        ("logits", TypeError, lambda: ops.confidence_from_logits(t)),
        ("reduction", ValueError, lambda: ops.norm_head_cross_entropy(x, w, t, reduction="avg")),
        ("targets", TypeError, lambda: ops.norm_head_cross_entropy(x, w, t.float())),
        ("targets", ValueError, lambda: ops.norm_head_cross_entropy(x, w, t[0])),
        ("targets", ValueError, lambda: ops.norm_head_cross_entropy(x, w, t + V)),
        ("targets", ValueError, lambda: ops.norm_head_cross_entropy(x, w, t - V)),
        (
            "token_weights",
            ValueError,
            lambda: ops.norm_head_cross_entropy(x, w, t, token_weights=torch.ones(6)),
        ),
        (
            "token_weights",
            TypeError,
            lambda: ops.norm_head_cross_entropy(x, w, t, token_weights=t),
        ),
        (
            "ignore_index",
            TypeError,
            lambda: ops.norm_head_cross_entropy(x, w, t, ignore_index=0.5),
        ),
        ("weight", ValueError, lambda: ops.norm_head_logits(x, w.to("meta"))),
    ]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", range(len(bad_head_calls())))
def test_bad_input_names_the_argument(schedule, case, backend):
    name, error, call = bad_head_calls()[case]
    with ops.use_backend(backend), pytest.raises(error, match=name):
        call()


def test_ignore_index_targets_pass_the_range_check(schedule):
    x, w, t = head_inputs()
    t[1, 2] = 7_000_000  # custom ignore index outside [0, V)
    with ops.use_backend("torch"):
        loss = ops.norm_head_cross_entropy(x, w, t, ignore_index=7_000_000, reduction="none")
    assert loss[1, 2] == 0 and loss[0, 0] != 0


def test_empty_input(schedule):
    x, w, t = head_inputs()
    with ops.use_backend("torch"):
        assert ops.norm_head_cross_entropy(x[:0], w, t[:0]).item() == 0.0
        assert ops.exit_confidence(x[:, :0], w).confidence.shape == (2, 0)
        assert ops.norm_head_logits(x[:0], w).shape == (0, 3, V)


# A fresh interpreter per case: TRITON_INTERPRET is read when triton and lego_kernels load.
PITFALLS = {
    "set after import triton": (
        "import os, triton; os.environ['TRITON_INTERPRET'] = '1'; from lego_kernels import ops",
        "set after `import triton`",
    ),
    "set after import lego_kernels": (
        "import os; from lego_kernels import ops; os.environ['TRITON_INTERPRET'] = '1'",
        "read once, at import",
    ),
}


@pytest.mark.parametrize("case", list(PITFALLS))
def test_triton_interpret_set_too_late_says_what_to_do(case):
    setup, message = PITFALLS[case]
    code = (
        f"{setup}\nimport torch\nfrom lego_kernels import head\nx = torch.randn(2, 3)\n"
        "print(head.INTERPRET is ops._INTERPRET)\n"  # one reading for the kernels and ops
        "with ops.use_backend('torch'):\n    print(ops.backend(x))\n"  # the reference runs
        "ops.backend(x)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and result.stdout.split() == ["True", "torch"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError") and message in last and "before" in last


# ----------------------------------------------------------------------------- schedules


def shaped(n: int, d: int, v: int, dtype=torch.bfloat16):
    """x [n, d] and weight [v, d] of that size without the memory (expanded scalars): the
    schedule looks at shapes, dtype and requires_grad only."""
    return torch.zeros((), dtype=dtype).expand(n, d), torch.zeros((), dtype=dtype).expand(v, d)


def test_schedule_names_and_forcing():
    x, w = shaped(8, 4, 10)
    with ops.use_backend("torch"):
        assert ops.schedule(x, w) == "chunked"  # the CPU path
        with ops.use_schedule("fused"):
            assert ops.schedule(x, w) == "fused"
            with ops.use_schedule("auto"):
                assert ops.schedule(x, w) == "chunked"
            assert ops.schedule(x, w) == "fused"
    with pytest.raises(ValueError, match="use_schedule"), ops.use_schedule("fast"):
        pass
    with pytest.raises(TypeError, match="grad"):
        ops.schedule(x, w, grad="yes")


@pytest.mark.parametrize(
    ("shape", "dtype", "grad", "want"),
    [
        ((2048, 64, 69830), torch.bfloat16, True, "fused"),  # seed: the epilogue dominates
        ((2048, 64, 69830), torch.bfloat16, False, "fused"),
        ((8192, 768, 50257), torch.bfloat16, True, "chunked"),  # gpt2: atomics and 8NDV lose
        ((8192, 4096, 128256), torch.bfloat16, True, "chunked"),  # llama3: the GEMM dominates
        ((8192, 4096, 128256), torch.bfloat16, False, "chunked"),
        ((2048, 64, 69830), torch.float32, True, "chunked"),  # "highest": no FMA dots
    ],
)
def test_cost_model_on_the_triton_backends(shape, dtype, grad, want):
    """``backend`` is "triton-interpreter" here (conftest), which takes the GPU's cost model."""
    x, w = shaped(*shape, dtype=dtype)
    assert ops.backend(x) == "triton-interpreter"
    assert torch.get_float32_matmul_precision() == "highest"
    assert ops.schedule(x, w, grad=grad) == want


def test_cost_model_with_tf32_and_determinism():
    x, w = shaped(2048, 64, 69830, dtype=torch.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert ops.schedule(x, w, grad=True) == "fused"  # TF32 dots: the fused kernel again
    finally:
        torch.set_float32_matmul_precision(previous)
    x, w = shaped(2048, 64, 69830)
    torch.use_deterministic_algorithms(True)
    try:
        assert ops.schedule(x, w, grad=True) == "chunked"  # no float atomics
        assert ops.schedule(x, w, grad=False) == "fused"  # the fused forward is deterministic
    finally:
        torch.use_deterministic_algorithms(False)


def test_schedule_infers_grad(monkeypatch):
    """Without ``grad`` the cost model is asked about gradients when autograd would record."""
    x, w = torch.randn(4, D, dtype=torch.bfloat16), torch.randn(V, D, dtype=torch.bfloat16)
    calls = []
    original = ops._predicted_seconds

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(ops, "_predicted_seconds", spy)
    ops.schedule(x, w)
    ops.schedule(x, w.requires_grad_())
    with torch.no_grad():
        ops.schedule(x, w)
    assert calls == [False, True, False]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_get_their_gradient(schedule, reduction):
    """d loss / d w_i is the token's loss (times the upstream, over the count for mean)."""
    x, w, t = head_inputs()
    t[0, 1] = -100
    tw = (torch.rand(2, 3) + 0.5).requires_grad_()
    tw64 = tw.detach().double().requires_grad_()
    with ops.use_backend("torch"):
        loss = ops.norm_head_cross_entropy(x, w, t, reduction=reduction, token_weights=tw)
    ref = reference.norm_head_cross_entropy(
        x.double(), w.double(), t, reduction=reduction, token_weights=tw64
    )
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    loss.backward(upstream.float())
    ref.backward(upstream)
    assert tw.grad is not None and tw.grad[0, 1] == 0
    err = (tw.grad.double() - tw64.grad).norm() / tw64.grad.norm()
    assert err < 1e-5


def test_autocast_keeps_float32_statistics(schedule):
    """Under CPU autocast (bfloat16) the torch backend computes in float32: losses, lse and
    confidences as accurate as without autocast (the bug: bf16-rounded per-token losses)."""
    x, w = torch.randn(64, 32), torch.randn(500, 32) / math.sqrt(32) * 4
    t = torch.randint(0, 500, (64,))
    with ops.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.norm_head_cross_entropy(x, w, t, reduction="none")
        mean, conf = ops.norm_head_cross_entropy(x, w, t, return_confidence=True)
        exit_conf = ops.exit_confidence(x, w, measure="entropy")
    ref = reference.norm_head_cross_entropy(x.double(), w.double(), t, reduction="none")
    ref_conf = reference.exit_confidence(x.double(), w.double(), measure="entropy")
    assert loss.dtype == mean.dtype == conf.lse.dtype == torch.float32
    assert ((loss - ref).abs() / ref.abs()).max() < 1e-5
    assert abs(mean.item() - ref.mean().item()) < 1e-5 * ref.mean().item()
    assert (exit_conf.confidence - ref_conf.confidence).abs().max() < 1e-5
