"""The Triton head kernels (``lego_kernels.head``, called through ``lego_kernels.ops``), on both
schedules: ``fused`` (the head kernels) and ``chunked`` (``lego_kernels.chunked``: torch's GEMM,
then ``head.logits_pass`` over each chunk's logits); every op test that goes through an exit-head
op takes the ``schedule`` fixture, which runs it once per schedule.

Reference: ``lego_kernels.reference`` evaluated in float64 on a float64 copy of the inputs
(after they were cast to the dtype under test), gradients by autograd through it.
Tolerance on ``||out - ref|| / ||ref||``: 1e-5 for float32 (the interpreter's float32 dot is
exact float32; on a GPU the tests keep torch's default "highest" float32 matmul precision, so the
kernels use IEEE float32 dots), 2e-2 for float16 and bfloat16.

The kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``), or on CUDA tensors natively with ``LEGO_TEST_CUDA=1`` on a GPU machine: the
same tests then run on the GPU, plus ``TestCuda`` (sizes the interpreter cannot afford), which is
skipped otherwise with its reason. The interpreter is
slow, so the shapes are small but cross every tile, K-step and vocabulary-split boundary of the
interpreter's tile sizes (16 tokens x 128 vocabulary entries x 32 (16 for float32) dims, 4-way
vocabulary splits).
"""

import dataclasses
import functools
import math
import os

import pytest
import torch

from lego_kernels import chunked, head, ops, reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Worst allowed logit gap between our prediction and the reference argmax (ties are legal).
ARGMAX_TOL = {torch.float32: 1e-5, torch.float16: 5e-2, torch.bfloat16: 5e-2}
HALF = [torch.float16, torch.bfloat16]

# The kernels run on CUDA tensors natively, and on CPU tensors through the interpreter.
DEVICE = "cpu" if INTERPRETER else "cuda"
GPU_REASON = "needs a CUDA GPU, and LEGO_TEST_CUDA=1 so that the interpreter stays off"
if not (INTERPRETER or CUDA):
    pytestmark = pytest.mark.skip(
        reason="the kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU; this run has neither"
    )


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=ops.SCHEDULES)
def schedule(request: pytest.FixtureRequest):
    """Runs the test inside ``ops.use_schedule`` of each schedule."""
    with ops.use_schedule(request.param):
        yield request.param


@pytest.fixture
def fused():
    """The fused schedule's kernels, whatever the cost model would pick (tests of those kernels)."""
    with ops.use_schedule("fused"):
        yield


@dataclasses.dataclass
class Head:
    """Inputs of one exit head in the dtype under test, and their float64 copies."""

    x: torch.Tensor
    weight: torch.Tensor
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    norm: str | None

    def args(self) -> tuple:
        """(x, weight, norm_weight, norm_bias), None where absent."""
        return self.x, self.weight, self.norm_weight, self.norm_bias

    def leaf_args(self) -> tuple:
        """Fresh copies of args() that require grad."""
        return tuple(None if t is None else t.clone().requires_grad_() for t in self.args())

    def ref_args(self, grad: bool = False) -> tuple:
        """float64 copies of args() for the reference."""
        return tuple(None if t is None else t.double().requires_grad_(grad) for t in self.args())


def make_head(
    lead: tuple[int, ...], D: int, V: int, norm: str | None, dtype: torch.dtype, device: str
) -> Head:
    """Logits of standard deviation ~2: a softmax that is neither flat nor one-hot."""
    x = torch.randn(*lead, D) + 0.5
    weight = torch.randn(V, D) * (2.0 / math.sqrt(D))
    norm_weight = 1.0 + 0.2 * torch.randn(D) if norm else None
    norm_bias = 0.2 * torch.randn(D) if norm == "layer" else None

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype=dtype, device=device)

    return Head(cast(x), cast(weight), cast(norm_weight), cast(norm_bias), norm)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def assert_argmax(pred: torch.Tensor, ref_logits: torch.Tensor, tol: float) -> None:
    """pred indexes a maximal reference logit, up to ``tol`` (any index of a tie is right)."""
    ref_logits = ref_logits.detach().double().cpu().reshape(-1, ref_logits.shape[-1])
    pred = pred.cpu().reshape(-1, 1)
    assert pred.dtype == torch.int64
    assert ((pred >= 0) & (pred < ref_logits.shape[-1])).all()
    gap = ref_logits.max(-1).values - ref_logits.gather(1, pred)[:, 0]
    assert (gap <= tol * ref_logits.abs().max().clamp_min(1.0)).all(), f"argmax gap {gap.max()}"


def check_confidence(out: ops.Confidence, ref_logits: torch.Tensor, measure: str, dtype) -> None:
    ref = reference.confidence_from_logits(ref_logits, measure=measure)
    assert out.confidence.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert_rel(out.confidence, ref.confidence, TOL[dtype], f"{measure} confidence")
    assert_rel(out.lse, ref.lse, TOL[dtype], "lse")
    assert_argmax(out.prediction, ref_logits, ARGMAX_TOL[dtype])


def ref_logits(h: Head) -> torch.Tensor:
    x, w, nw, nb = h.ref_args()
    return reference.norm_head_logits(x, w, nw, nb, norm=h.norm)


# ---------------------------------------------------------------------------------- confidence

CONF_CASES = [  # (lead dims, D, V, norm, dtype)
    ((17,), 48, 1000, "rms", torch.float32),
    ((2, 3), 100, 1000, "layer", torch.float32),
    ((1,), 8, 1, "rms", torch.float32),
    ((3,), 8, 2, None, torch.float32),
    ((3,), 48, 5003, "rms", torch.float32),
    ((2, 3), 100, 1000, "rms", torch.bfloat16),
    ((17,), 48, 1000, "layer", torch.float16),
]


@pytest.mark.parametrize("measure", reference.MEASURES)
@pytest.mark.parametrize(("lead", "D", "V", "norm", "dtype"), CONF_CASES)
def test_exit_confidence(device, schedule, lead, D, V, norm, dtype, measure):
    h = make_head(lead, D, V, norm, dtype, device)
    assert ops.backend(h.x).startswith("triton")
    out = ops.exit_confidence(*h.args(), norm=norm, measure=measure)
    assert out.confidence.shape == lead and out.prediction.shape == lead
    check_confidence(out, ref_logits(h), measure, dtype)


@pytest.mark.parametrize("measure", reference.MEASURES)
@pytest.mark.parametrize(
    ("lead", "V", "dtype"),
    [
        ((2, 3), 1000, torch.float32),
        ((1,), 1, torch.float32),
        ((3,), 2, torch.float32),
        ((3,), 5003, torch.float32),
        ((17,), 1000, torch.bfloat16),
        ((3,), 1000, torch.float16),
    ],
)
def test_confidence_from_logits(device, lead, V, dtype, measure):
    logits = (3 * torch.randn(*lead, V)).to(dtype=dtype, device=device)
    out = ops.confidence_from_logits(logits, measure=measure)
    check_confidence(out, logits.double(), measure, dtype)


def test_argmax_ties(device, schedule):
    """Equal top logits in different tiles and splits: a tied index, margin exactly 0."""
    V = 1000
    logits = torch.randn(3, V, device=device)
    logits[0, [5, 700]] = 10.0  # different splits
    logits[1, [130, 131, 999]] = 10.0  # one tile, and the last tile
    logits[2] = 1.0  # all equal
    out = ops.confidence_from_logits(logits, measure="margin")
    check_confidence(out, logits.double(), "margin", torch.float32)
    assert (out.confidence == 0).all()
    pred = out.prediction.tolist()
    assert pred[0] in (5, 700) and pred[1] in (130, 131, 999) and 0 <= pred[2] < V

    # Duplicate rows of the head (in different splits) tie for token 0 in the fused head.
    h = make_head((4,), 48, 300, None, torch.float32, device)
    h.weight[250] = h.weight[3]
    h.x[0] = 10 * h.weight[3]  # logit_j = 10 w_j . w_3, largest for j = 3 and its copy 250
    out = ops.exit_confidence(*h.args(), norm=None, measure="margin")
    assert out.prediction[0].item() in (3, 250) and abs(out.confidence[0].item()) < 1e-6
    check_confidence(out, ref_logits(h), "margin", torch.float32)


# ---------------------------------------------------------------------------------- logits


@pytest.mark.parametrize(
    ("lead", "D", "V", "norm", "dtype"),
    [
        ((2, 3), 48, 1000, "rms", torch.float32),
        ((17,), 100, 5, "layer", torch.float32),
        ((3,), 8, 1, None, torch.float32),
        ((2, 3), 48, 200, "layer", torch.bfloat16),
        ((17,), 100, 200, "rms", torch.float16),
    ],
)
def test_norm_head_logits(device, lead, D, V, norm, dtype):
    h = make_head(lead, D, V, norm, dtype, device)
    ours_args = h.leaf_args()
    out = ops.norm_head_logits(*ours_args, norm=norm)
    assert out.dtype == dtype and out.shape == (*lead, V)
    ref_args = h.ref_args(grad=True)
    ref = reference.norm_head_logits(*ref_args, norm=norm)
    assert_rel(out, ref, TOL[dtype], "logits")
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(dtype=dtype, device=device))
    ref.backward(grad)
    names = ["x", "weight", "norm_weight", "norm_bias"]
    for name, ours, theirs in zip(names, ours_args, ref_args, strict=True):
        if ours is not None:
            assert_rel(ours.grad, theirs.grad, TOL[dtype], f"d{name}")


# ---------------------------------------------------------------------------------- cross-entropy


def run_cross_entropy(h: Head, targets: torch.Tensor, **kwargs):
    """(loss, Confidence or None, grads) of ours and of the float64 reference, grads by autograd."""
    results = []
    for fn, args in (
        (ops.norm_head_cross_entropy, h.leaf_args()),
        (reference.norm_head_cross_entropy, h.ref_args(grad=True)),
    ):
        x, w, nw, nb = args
        out = fn(x, w, targets, nw, nb, norm=h.norm, **kwargs)
        loss, conf = out if kwargs.get("return_confidence") else (out, None)
        loss.sum().backward()
        results.append((loss, conf, [t.grad for t in args if t is not None]))
    return results


CE_CASES = [  # (lead dims, D, V, norm, dtype, reduction, weighted)
    ((17,), 48, 1000, "rms", torch.float32, "mean", False),
    ((2, 3), 100, 1000, "layer", torch.float32, "sum", True),
    ((3,), 8, 2, None, torch.float32, "none", True),
    ((3,), 8, 1, "rms", torch.float32, "mean", False),
    ((3,), 48, 5003, "rms", torch.float32, "mean", True),
    ((17,), 48, 1000, "layer", torch.bfloat16, "none", False),
    ((2, 3), 100, 1000, "rms", torch.float16, "mean", True),
]


@pytest.mark.parametrize(("lead", "D", "V", "norm", "dtype", "reduction", "weighted"), CE_CASES)
def test_norm_head_cross_entropy(device, schedule, lead, D, V, norm, dtype, reduction, weighted):
    h = make_head(lead, D, V, norm, dtype, device)
    targets = torch.randint(0, V, lead, device=device)
    targets.view(-1)[::4] = -7  # ignored tokens, with a non-default ignore_index
    weights = torch.rand(lead, device=device) + 0.5 if weighted else None
    (loss, _, grads), (ref_loss, _, ref_grads) = run_cross_entropy(
        h, targets, ignore_index=-7, reduction=reduction, token_weights=weights
    )
    assert loss.dtype == torch.float32
    assert loss.shape == (lead if reduction == "none" else ())
    assert_rel(loss, ref_loss, TOL[dtype], f"{reduction} loss")
    if reduction == "none":
        assert (loss.view(-1)[::4] == 0).all()
    for i, (ours, theirs) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_rel(ours, theirs, TOL[dtype], f"gradient of input {i}")
    assert (grads[0].reshape(-1, D)[::4] == 0).all()  # ignored tokens get no gradient


@pytest.mark.parametrize("measure", reference.MEASURES)
def test_cross_entropy_returns_confidence(device, schedule, measure):
    h = make_head((2, 3), 48, 1000, "rms", torch.float32, device)
    targets = torch.randint(0, 1000, (2, 3), device=device)
    targets[0, 0] = -100  # ignored tokens still get their confidence
    (loss, conf, _), (ref_loss, ref_conf, _) = run_cross_entropy(
        h, targets, return_confidence=True, measure=measure
    )
    assert_rel(loss, ref_loss, TOL[torch.float32], "loss")
    assert isinstance(conf, ops.Confidence) and conf.confidence.shape == (2, 3)
    assert_rel(conf.confidence, ref_conf.confidence, TOL[torch.float32], "confidence")
    assert_rel(conf.lse, ref_conf.lse, TOL[torch.float32], "lse")
    assert_argmax(conf.prediction, ref_logits(h), ARGMAX_TOL[torch.float32])


def test_all_ignored_mean_is_zero(device, schedule):
    h = make_head((5,), 48, 300, "layer", torch.float32, device)
    x, w = h.x.requires_grad_(), h.weight.requires_grad_()
    targets = torch.full((5,), -100, device=device)
    loss = ops.norm_head_cross_entropy(x, w, targets, h.norm_weight, h.norm_bias, norm="layer")
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all() and (w.grad == 0).all()


class _Spy:
    """Wraps a Triton kernel; records the keyword arguments of each launch."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("frozen", ["head", "input", "norm"])
def test_frozen_parameters_compute_no_gradient(device, frozen, monkeypatch):
    """A frozen head costs no dW (the dW path of the kernel does not run), and so on."""
    h = make_head((2, 3), 48, 300, "layer", torch.float32, device)
    ce_spy, norm_spy = _Spy(head._ce_bwd_kernel), _Spy(head._norm_bwd_kernel)
    monkeypatch.setattr(head, "_ce_bwd_kernel", ce_spy)
    monkeypatch.setattr(head, "_norm_bwd_kernel", norm_spy)
    x, w, nw, nb = (t.clone() for t in h.args())
    trainable = {"head": (x, nw, nb), "input": (w, nw, nb), "norm": (x, w)}[frozen]
    for t in trainable:
        t.requires_grad_()
    targets = torch.randint(0, 300, (2, 3), device=device)
    ops.norm_head_cross_entropy(x, w, targets, nw, nb, norm="layer").backward()

    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, nw, nb)]
    torch.autograd.backward(
        reference.norm_head_cross_entropy(ref[0], ref[1], targets, ref[2], ref[3], norm="layer")
    )
    for ours, theirs in zip((x, w, nw, nb), ref, strict=True):
        if ours.requires_grad:
            assert_rel(ours.grad, theirs.grad, TOL[torch.float32], "gradient")
        else:
            assert ours.grad is None
    (ce_launch,) = ce_spy.launches
    (norm_launch,) = norm_spy.launches
    assert ce_launch["COMPUTE_DW"] == (frozen != "head")
    assert ce_launch["COMPUTE_DH"] is True  # the trainable norm or x needs dh
    assert norm_launch["COMPUTE_DX"] == (frozen != "input")
    assert norm_launch["COMPUTE_DW"] == norm_launch["COMPUTE_DB"] == (frozen != "norm")


@pytest.mark.usefixtures("fused")
def test_no_dh_without_trainable_input(device, monkeypatch):
    """Only the head trains (norm=None, x frozen): the kernel computes dW alone."""
    spy = _Spy(head._ce_bwd_kernel)
    monkeypatch.setattr(head, "_ce_bwd_kernel", spy)
    h = make_head((3,), 48, 300, None, torch.float32, device)
    w = h.weight.clone().requires_grad_()
    targets = torch.randint(0, 300, (3,), device=device)
    ops.norm_head_cross_entropy(h.x, w, targets, norm=None).backward()
    ref_w = h.weight.double().requires_grad_()
    reference.norm_head_cross_entropy(h.x.double(), ref_w, targets, norm=None).backward()
    assert_rel(w.grad, ref_w.grad, TOL[torch.float32], "dW")
    assert spy.launches[0]["COMPUTE_DH"] is False and spy.launches[0]["COMPUTE_DW"] is True


@pytest.mark.parametrize("schedule_name", ops.SCHEDULES)
def test_out_of_range_targets_count_as_ignored(device, schedule_name):
    """What ops documents for CUDA (where it skips the range check): such tokens are ignored."""
    h = make_head((4,), 48, 300, "rms", torch.float32, device)
    targets = torch.tensor([3, 300, -5, 7], device=device)
    run = (
        head.norm_head_cross_entropy
        if schedule_name == "fused"
        else functools.partial(chunked.norm_head_cross_entropy, use_triton=True)
    )
    loss = run(
        h.x,
        h.weight,
        targets,
        h.norm_weight,
        None,
        "rms",
        1e-6,
        -100,
        "none",
        None,
        False,
        "max_prob",
    )
    kept = torch.tensor([3, -100, -100, 7], device=device)
    ref = reference.norm_head_cross_entropy(
        *(t.double() for t in (h.x, h.weight)), kept, h.norm_weight.double(), reduction="none"
    )
    assert_rel(loss, ref, TOL[torch.float32], "loss")


# ---------------------------------------------------------------------------------- edge cases


def test_empty_input(device, schedule):
    x = torch.randn(0, 3, 48, device=device, requires_grad=True)
    w = torch.randn(300, 48, device=device, requires_grad=True)
    nw = torch.ones(48, device=device, requires_grad=True)
    targets = torch.zeros(0, 3, dtype=torch.int64, device=device)
    assert ops.norm_head_logits(x, w, nw).shape == (0, 3, 300)
    for measure in reference.MEASURES:
        conf = ops.exit_confidence(x, w, nw, measure=measure)
        assert conf.confidence.shape == conf.prediction.shape == conf.lse.shape == (0, 3)
    assert ops.confidence_from_logits(torch.randn(0, 300, device=device)).lse.shape == (0,)
    for reduction in reference.REDUCTIONS:
        loss = ops.norm_head_cross_entropy(x, w, targets, nw, reduction=reduction)
        assert loss.shape == ((0, 3) if reduction == "none" else ())
        loss.sum().backward()
        assert x.grad.shape == x.shape and (w.grad == 0).all() and (nw.grad == 0).all()
        if reduction == "mean":
            assert loss.item() == 0.0


def test_poisoned_outputs(device, schedule, monkeypatch):
    """Every output element is written by a kernel: buffers start as NaN (floats) or -7 (ints)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    h = make_head((17,), 100, 1000, "layer", torch.float32, device)
    logits64 = ref_logits(h)
    x, w, nw, nb = h.leaf_args()
    targets = torch.randint(0, 1000, (17,), device=device)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", poisoned)
        conf = ops.exit_confidence(*h.args(), norm="layer", measure="entropy")
        from_logits = ops.confidence_from_logits(logits64.float(), measure="margin")
        logits = ops.norm_head_logits(x, w, nw, nb, norm="layer")
        loss, ce_conf = ops.norm_head_cross_entropy(
            x, w, targets, nw, nb, norm="layer", return_confidence=True
        )
        (loss + logits.sum()).backward()
    check_confidence(conf, logits64, "entropy", torch.float32)
    check_confidence(from_logits, logits64, "margin", torch.float32)
    check_confidence(ce_conf, logits64, "max_prob", torch.float32)
    rx, rw, rnw, rnb = h.ref_args(grad=True)
    ref_loss = reference.norm_head_cross_entropy(rx, rw, targets, rnw, rnb, norm="layer")
    (ref_loss + reference.norm_head_logits(rx, rw, rnw, rnb, norm="layer").sum()).backward()
    for ours, theirs in zip((x, w, nw, nb), (rx, rw, rnw, rnb), strict=True):
        assert_rel(ours.grad, theirs.grad, TOL[torch.float32], "gradient")


@pytest.mark.usefixtures("fused")
def test_no_vocabulary_sized_buffers(device, monkeypatch):
    """Confidence and cross-entropy (forward and backward) allocate nothing of N x V elements."""
    N, D, V = 17, 8, 1000  # N * V > V * D, the size of dW
    sizes = []

    def recording(alloc):
        def wrapped(*args, **kwargs):
            t = alloc(*args, **kwargs)
            sizes.append(t.numel())
            return t

        return wrapped

    h = make_head((N,), D, V, "rms", torch.float32, device)
    x, w, nw, _ = h.leaf_args()
    targets = torch.randint(0, V, (N,), device=device)
    with monkeypatch.context() as patch:
        for name in ("empty", "zeros", "full", "empty_like", "zeros_like"):
            patch.setattr(torch, name, recording(getattr(torch, name)))
        ops.exit_confidence(x.detach(), w.detach(), nw.detach(), measure="entropy")
        loss, _ = ops.norm_head_cross_entropy(x, w, targets, nw, return_confidence=True)
        loss.backward()
    assert sizes and max(sizes) < N * V


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize(
    ("blocks", "precision"),
    [
        ({"programs": 1}, "highest"),  # one vocabulary split: the whole V in one program's loop
        ({"programs": 64, "block_n": 32, "block_k": 64}, "highest"),  # a split per tile
        ({"block_m": 32, "block_n": 64, "block_k": 16}, "highest"),
        ({"resident_dim": 64}, "high"),  # TF32 dots: D = 48 in one K-step, h tile resident
    ],
)
def test_tile_configurations(device, blocks, precision, monkeypatch):
    """Tile and grid variants of the fused kernels; on a GPU "high" runs TF32 (error ~1e-3)."""
    monkeypatch.setattr(head, "BLOCKS", dataclasses.replace(head.BLOCKS, **blocks))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        _check_tiles(device, 1e-5 if INTERPRETER or precision == "highest" else 3e-3)
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_tiles(device, tol):
    h = make_head((2, 5), 48, 300, "rms", torch.float32, device)
    targets = torch.randint(0, 300, (2, 5), device=device)
    for measure in reference.MEASURES:
        out = ops.exit_confidence(*h.args(), measure=measure)
        ref = reference.confidence_from_logits(ref_logits(h), measure=measure)
        assert_rel(out.confidence, ref.confidence, tol, f"{measure} confidence")
        assert_rel(out.lse, ref.lse, tol, "lse")
    (loss, _, grads), (ref_loss, _, ref_grads) = run_cross_entropy(h, targets, reduction="sum")
    assert_rel(loss, ref_loss, tol, "loss")
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert_rel(ours, theirs, tol, "gradient")


# ---------------------------------------------------------------------------------- schedules


def test_deterministic_algorithms(device):
    """Under ``torch.use_deterministic_algorithms(True)`` a training call takes the chunked
    schedule (no float atomics) and two runs are bitwise equal (on a GPU this is the real test;
    on the CPU it checks the choice, and that the fused schedule refuses to run its backward)."""
    if device != "cpu" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        pytest.skip(
            "deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (gpu_check sets it)"
        )
    h = make_head((3, 5), 48, 300, "rms", torch.bfloat16, device)
    targets = torch.randint(0, 300, (3, 5), device=device)
    torch.use_deterministic_algorithms(True)
    try:
        x, w, nw, _ = h.leaf_args()
        assert ops.schedule(x, w, grad=True) == "chunked"
        runs = []
        for _ in range(2):
            x, w, nw, _ = h.leaf_args()
            loss = ops.norm_head_cross_entropy(x, w, targets, nw)
            loss.backward()
            runs.append((loss, x.grad, w.grad, nw.grad))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
        with ops.use_schedule("fused"), pytest.raises(RuntimeError, match="use_schedule"):
            ops.norm_head_cross_entropy(x, w, targets, nw)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_weights_get_their_gradient(device, schedule, reduction):
    """token_weights are differentiable on every backend: d loss / d w_i = the token's loss."""
    h = make_head((2, 5), 48, 300, "rms", torch.float32, device)
    targets = torch.randint(0, 300, (2, 5), device=device)
    targets[0, 0] = -100
    weights = (torch.rand(2, 5, device=device) + 0.5).requires_grad_()
    ref_weights = weights.detach().double().requires_grad_()
    x, w, nw, _ = h.leaf_args()
    rx, rw, rnw, _ = h.ref_args(grad=True)
    for fn, args, tw in (
        (ops.norm_head_cross_entropy, (x, w, targets, nw), weights),
        (reference.norm_head_cross_entropy, (rx, rw, targets, rnw), ref_weights),
    ):
        fn(*args, reduction=reduction, token_weights=tw).sum().backward()
    assert_rel(weights.grad, ref_weights.grad, TOL[torch.float32], "d token_weights")
    assert weights.grad[0, 0] == 0
    assert_rel(w.grad, rw.grad, TOL[torch.float32], "dW")


def test_autocast_keeps_float32_statistics(device, schedule):
    """Under autocast the GEMMs run in bfloat16 (float32 inputs, as F.linear would), the
    statistics in float32: the mean loss is as accurate as bf16 logits allow (the bug was
    bf16-rounded per-token losses: 5e-3 off)."""
    h = make_head((64,), 32, 500, "rms", torch.float32, device)
    targets = torch.randint(0, 500, (64,), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss, conf = ops.norm_head_cross_entropy(
            *h.args()[:2], targets, h.norm_weight, return_confidence=True
        )
        exit_conf = ops.exit_confidence(*h.args()[:3], measure="max_prob")
    ref_loss, ref_conf = reference.norm_head_cross_entropy(
        *h.ref_args()[:2], targets, h.ref_args()[2], return_confidence=True
    )
    assert loss.dtype == conf.lse.dtype == exit_conf.confidence.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 5e-4
    assert_rel(conf.lse, ref_conf.lse, 1e-3, "lse")
    assert_rel(exit_conf.confidence, ref_conf.confidence, 2e-2, "confidence")


@pytest.mark.cuda
@pytest.mark.skipif(
    not CUDA or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (and LEGO_TEST_CUDA=1): tensors on cuda:1, cuda:0 current",
)
@pytest.mark.parametrize("schedule_name", ops.SCHEDULES)
def test_launches_run_on_the_tensors_device(schedule_name):
    h = make_head((33,), 64, 1000, "rms", torch.float32, "cuda:1")
    targets = torch.randint(0, 1000, (33,), device="cuda:1")
    torch.cuda.set_device(0)
    with ops.use_schedule(schedule_name):
        (loss, _, grads), (ref_loss, ref_conf, ref_grads) = run_cross_entropy(
            h, targets, return_confidence=True
        )
        exit_conf = ops.exit_confidence(*h.args())
    assert_rel(loss, ref_loss, TOL[torch.float32], "loss")
    assert_rel(exit_conf.confidence, ref_conf.confidence, TOL[torch.float32], "confidence")
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert_rel(ours, theirs, TOL[torch.float32], "gradient")


# ---------------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=GPU_REASON)
class TestCuda:
    """Sizes the interpreter cannot afford, with the GPU's default tile sizes."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize(("N", "D", "V"), [(2048, 64, 69830), (256, 512, 128256)])
    def test_large_vocabulary(self, schedule, N, D, V, dtype):
        h = make_head((N,), D, V, "rms", dtype, "cuda")
        logits = ref_logits(h)
        for measure in reference.MEASURES:
            out = ops.exit_confidence(*h.args(), measure=measure)
            check_confidence(out, logits, measure, dtype)
        out = ops.confidence_from_logits(logits.to(dtype), measure="margin")
        check_confidence(out, logits.to(dtype).double(), "margin", dtype)
        targets = torch.randint(0, V, (N,), device="cuda")
        (loss, _, grads), (ref_loss, _, ref_grads) = run_cross_entropy(h, targets)
        assert_rel(loss, ref_loss, TOL[dtype], "loss")
        for ours, theirs in zip(grads, ref_grads, strict=True):
            assert_rel(ours, theirs, TOL[dtype], "gradient")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_wide_hidden(self, schedule, dtype):
        h = make_head((64,), 8192, 1000, "layer", dtype, "cuda")
        check_confidence(
            ops.exit_confidence(*h.args(), norm="layer"), ref_logits(h), "max_prob", dtype
        )
        targets = torch.randint(0, 1000, (64,), device="cuda")
        (loss, _, grads), (ref_loss, _, ref_grads) = run_cross_entropy(h, targets)
        assert_rel(loss, ref_loss, TOL[dtype], "loss")
        for ours, theirs in zip(grads, ref_grads, strict=True):
            assert_rel(ours, theirs, TOL[dtype], "gradient")

    def test_no_host_synchronization(self, schedule):
        h = make_head((512,), 64, 69830, "rms", torch.bfloat16, "cuda")
        x, w, nw, _ = h.leaf_args()
        targets = torch.randint(0, 69830, (512,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.exit_confidence(x.detach(), w.detach(), nw.detach(), measure="entropy")
            loss, _ = ops.norm_head_cross_entropy(x, w, targets, nw, return_confidence=True)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
