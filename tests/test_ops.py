"""The public API's contract: backend choice, input validation, shapes and dtypes.

Numerical agreement of the kernels with the reference is in ``test_head.py``;
these tests run the ops on the torch backend (``use_backend("torch")``), where
validation and dispatch are the same code.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego_kernels import ops

D, V = 8, 11


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
def test_shapes_and_dtypes(dtype):
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
def test_bad_input_names_the_argument(case, backend):
    name, error, call = bad_head_calls()[case]
    with ops.use_backend(backend), pytest.raises(error, match=name):
        call()


def test_ignore_index_targets_pass_the_range_check():
    x, w, t = head_inputs()
    t[1, 2] = 7_000_000  # custom ignore index outside [0, V)
    with ops.use_backend("torch"):
        loss = ops.norm_head_cross_entropy(x, w, t, ignore_index=7_000_000, reduction="none")
    assert loss[1, 2] == 0 and loss[0, 0] != 0


def test_empty_input():
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
