"""The chunked schedule (``lego_kernels.chunked``) against the reference, on both of its passes.

The loss runs through ``ops.norm_head_cross_entropy`` inside ``ops.use_schedule("chunked")``
(:func:`chunked_loss`: the custom ops of ``lego_kernels.library`` around the chunk walk).
``use_triton=False`` is the CPU path (torch's kernels), checked in float64 against the float64
reference (relative error < 1e-10); ``use_triton=True`` runs the Triton pass
(``head.logits_pass``) and norm kernels, through the interpreter on CPU tensors (or natively with
``LEGO_TEST_CUDA=1``), in float32 against the float64 reference (< 1e-5). Small memory budgets
make the chunks a few rows, so every test crosses chunk boundaries; vocabularies around the
64-column padding (63, 64, 65) and V = 1, 2 cover the padded buffer and the blocked argmax.
Also: the gradients are computed in the forward (the backward only scales them) except for
``reduction="none"``, which recomputes; the allocations stay within the budget plus O(N + V·D);
a second backward through the same graph raises instead of returning wrong gradients.
"""

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lego_kernels import chunked, ops, reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
TRITON = INTERPRETER or torch.cuda.is_available()
PASSES = [
    pytest.param(False, id="torch-pass"),
    pytest.param(
        True,
        id="triton-pass",
        marks=pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a CUDA GPU"),
    ),
]


def chunked_loss(use_triton: bool, x, w, targets, nw=None, nb=None, **kwargs):
    """``ops.norm_head_cross_entropy`` on the chunked schedule, with the Triton pass or torch's
    (float64 inputs run torch's anyway)."""
    with ops.use_schedule("chunked"), ops.use_backend("auto" if use_triton else "torch"):
        assert ops.backend(x).startswith("triton") == use_triton
        return ops.norm_head_cross_entropy(
            x, w, targets, nw, nb, norm=kwargs.pop("norm", "rms" if nw is not None else None),
            **kwargs,
        )  # fmt: skip


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def rows_per_chunk(monkeypatch: pytest.MonkeyPatch):
    """A setter of MEMORY_BUDGET to a number of rows of a vocabulary's padded buffer."""

    def set_rows(rows: int, vocab: int, itemsize: int) -> None:
        monkeypatch.setattr(chunked, "MEMORY_BUDGET", rows * chunked.padded(vocab) * itemsize)

    return set_rows


def head_inputs(n, d, v, norm, weighted, dtype, device):
    x = torch.randn(n, d, dtype=dtype, device=device) + 0.3
    w = torch.randn(v, d, dtype=dtype, device=device) * (2.0 / d**0.5)
    nw = 1.0 + 0.2 * torch.randn(d, dtype=dtype, device=device) if norm else None
    nb = 0.2 * torch.randn(d, dtype=dtype, device=device) if norm == "layer" else None
    tw = torch.rand(n, dtype=dtype, device=device) + 0.5 if weighted else None
    targets = torch.randint(0, v, (n,), device=device)
    targets[::4] = -100
    return [x, w, nw, nb, tw], targets


CASES = [  # (N, D, V, norm, reduction, weighted, rows per chunk, measure)
    (23, 9, 65, "rms", "mean", True, 5, "max_prob"),
    (23, 9, 64, "layer", "sum", False, 7, "margin"),
    (17, 5, 63, None, "none", True, 3, "entropy"),
    (9, 8, 130, "rms", "none", False, 2, "margin"),
    (6, 4, 2, "layer", "mean", False, 4, "entropy"),
    (5, 4, 1, "rms", "sum", True, 2, "margin"),
    (1, 7, 31, "rms", "mean", False, 1, "max_prob"),
]


@pytest.mark.parametrize("use_triton", PASSES)
@pytest.mark.parametrize(("n", "d", "v", "norm", "reduction", "weighted", "rows", "measure"), CASES)
def test_cross_entropy_matches_reference(
    use_triton, n, d, v, norm, reduction, weighted, rows, measure, rows_per_chunk
):
    dtype = torch.float32 if use_triton else torch.float64
    tol = 1e-5 if use_triton else 1e-10
    rows_per_chunk(rows, v, dtype.itemsize)
    inputs, targets = head_inputs(n, d, v, norm, weighted, dtype, DEVICE)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    x, w, nw, nb, tw = leaves
    loss, (conf, pred, lse) = chunked_loss(
        use_triton, x, w, targets, nw, nb, norm=norm, reduction=reduction, token_weights=tw,
        return_confidence=True, measure=measure,
    )  # fmt: skip
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    rx, rw, rnw, rnb, rtw = ref_leaves
    ref_loss, ref_conf = reference.norm_head_cross_entropy(
        rx, rw, targets, rnw, rnb, norm=norm, reduction=reduction, token_weights=rtw,
        return_confidence=True, measure=measure,
    )  # fmt: skip
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(conf, ref_conf.confidence) < tol and rel_err(lse, ref_conf.lse) < tol
    logits = reference.norm_head_logits(rx, rw, rnw, rnb, norm=norm).detach()
    gap = logits.max(1).values - logits.gather(1, pred.cpu()[:, None])[:, 0]
    assert (gap <= 1e-6 * logits.abs().max()).all()  # a maximal logit (any index of a tie)
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    ours = [t for t in leaves if t is not None]
    theirs = [t for t in ref_leaves if t is not None]
    grads = torch.autograd.grad(loss, ours, upstream.to(loss))
    ref_grads = torch.autograd.grad(ref_loss, theirs, upstream)
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        assert rel_err(a, b) < tol, f"gradient of input {i}"


@pytest.mark.parametrize("use_triton", PASSES)
@pytest.mark.parametrize(
    ("n", "v", "rows", "measure"),
    [(23, 65, 5, "max_prob"), (6, 1, 4, "margin"), (4, 2, 1, "margin"), (9, 200, 2, "entropy")],
)
def test_exit_confidence_matches_reference(use_triton, n, v, rows, measure, rows_per_chunk):
    dtype = torch.float32 if use_triton else torch.float64
    tol = 1e-5 if use_triton else 1e-10
    rows_per_chunk(rows, v, dtype.itemsize)
    (x, w, nw, _, _), _ = head_inputs(n, 12, v, "rms", False, dtype, DEVICE)
    conf, pred, lse = chunked.exit_confidence(x, w, nw, None, "rms", 1e-6, measure, use_triton)
    ref = reference.exit_confidence(x.double(), w.double(), nw.double(), measure=measure)
    assert rel_err(conf, ref.confidence) < tol and rel_err(lse, ref.lse) < tol
    assert pred.dtype == torch.int64 and torch.equal(pred.cpu(), ref.prediction.cpu())


@pytest.mark.parametrize("use_triton", PASSES)
def test_triton_pass_keeps_the_padding(use_triton):
    """After a pass with gradients the padding still holds -inf, and G = softmax - onehot."""
    z = 3 * torch.randn(5, 70, device=DEVICE)
    targets = torch.tensor([3, -1, 69, 0, 10], device=DEVICE)
    zp = torch.full((5, chunked.padded(70)), float("-inf"), device=DEVICE)
    zp[:, :70] = z
    lse, loss, conf, pred = chunked._pass(zp, 70, targets, "max_prob", True, use_triton)
    assert torch.isinf(zp[:, 70:]).all() and (zp[:, 70:] < 0).all()
    want = z.softmax(1)
    counted = targets >= 0
    want[counted.nonzero()[:, 0], targets[counted]] -= 1
    assert rel_err(zp[:, :70], want) < 1e-6
    assert rel_err(lse, z.logsumexp(1)) < 1e-6
    assert rel_err(loss, torch.where(counted, z.logsumexp(1) - z[range(5), targets], 0)) < 1e-6
    assert torch.equal(pred.cpu(), z.argmax(1).cpu()) and rel_err(conf, want.amax(1)) < 1e-6


def test_chunk_rows_follow_the_budget(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(chunked, "MEMORY_BUDGET", 10 * 128 * 4)
    assert chunked.padded(100) == 128 and chunked.padded(128) == 128 and chunked.padded(1) == 64
    assert chunked.chunk_rows(1000, 100, 4, gpu) == 10  # 10 rows of 128 float32 columns
    assert chunked.chunk_rows(7, 100, 4, gpu) == 7  # never more rows than tokens
    assert chunked.chunk_rows(1000, 100, 8, cpu) == 5
    assert chunked.chunk_rows(1000, 10**6, 4, gpu) == 1  # a row larger than the budget: one row
    monkeypatch.setattr(chunked, "MEMORY_BUDGET", 1100 * 128 * 4)
    assert chunked.chunk_rows(5000, 128, 4, gpu) == 1024  # a multiple of 128 once 1,024 fit
    monkeypatch.setattr(chunked, "MEMORY_BUDGET", 256 * 2**20)
    assert chunked.chunk_rows(8192, 128256, 2, gpu) == 1024  # llama3 bf16: 8 chunks of 1,024
    assert chunked.chunk_rows(2048, 69830, 4, gpu) == 960  # seed float32 on a GPU: 240 MiB
    assert chunked.chunk_rows(2048, 69830, 4, cpu) == 240  # and on the CPU: 64 MiB
    monkeypatch.undo()  # the defaults: llama3 bf16 in chunks of 850 rows, 208 MiB
    assert chunked.chunk_rows(8192, 128256, 2, gpu) == 850
    assert 850 * chunked.padded(128256) * 2 <= chunked.MEMORY_BUDGET == 208 * 2**20


def _peak_cpu_bytes(fn) -> tuple[int, int]:
    """(peak bytes allocated above the start, largest single allocation) during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live, peak, largest = 0, 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak, largest = max(peak, live), max(largest, e.nbytes())
    return peak, largest


@pytest.mark.skipif(DEVICE != "cpu", reason="measures CPU allocations (the profiler's)")
@pytest.mark.parametrize("use_triton", PASSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_memory_within_budget(use_triton, reduction, monkeypatch):
    """Forward + backward allocate at most the chunk budget plus O(N + V·D), far below N x V."""
    n, d, v = 60, 4, 1000
    budget = 10 * chunked.padded(v) * 4
    monkeypatch.setattr(chunked, "MEMORY_BUDGET", budget)
    (x, w, nw, _, tw), targets = head_inputs(n, d, v, "rms", True, torch.float32, "cpu")
    for t in (x, w, nw, tw):
        t.requires_grad_()

    def step():
        loss = chunked_loss(use_triton, x, w, targets, nw, reduction=reduction, token_weights=tw)
        loss.sum().backward()

    peak, largest = _peak_cpu_bytes(step)
    small = 4 * (3 * v * d + 4 * n * d) + 64 * n  # O(V·D + N·D + N): dW, dh, x grads, stats
    assert largest <= max(budget, 4 * v * d), largest
    assert peak <= budget + small < n * v * 4, (peak, budget, small)


def _spy_forward(monkeypatch):
    calls = []
    original = chunked.cross_entropy_forward

    def spy(*args):
        calls.append(args[9])  # needs: the gradients of x, weight, norm_weight, norm_bias
        return original(*args)

    monkeypatch.setattr(chunked, "cross_entropy_forward", spy)
    return calls


@pytest.mark.parametrize(
    ("reduction", "trainable", "want"),
    [
        ("mean", "all", [(True, True, True, False)]),  # 6NDV: one walk, gradients included
        ("sum", "head", [(False, True, False, False)]),  # a frozen input and norm: no dh
        ("mean", "input", [(True, False, True, False)]),  # a frozen head costs no dW
        ("none", "all", [(False,) * 4, (True, True, True, False)]),  # per-token: recompute
    ],
)
def test_gradients_in_the_forward_walk(reduction, trainable, want, monkeypatch):
    calls = _spy_forward(monkeypatch)
    (x, w, nw, _, _), targets = head_inputs(11, 6, 50, "rms", False, torch.float64, "cpu")
    leaves = {"all": (x, w, nw), "head": (w,), "input": (x, nw)}[trainable]
    for t in leaves:
        t.requires_grad_()
    loss = chunked_loss(False, x, w, targets, nw, reduction=reduction)
    assert len(calls) == 1  # the forward
    loss.sum().backward()
    assert calls == want
    ref = [t.detach().requires_grad_(t.requires_grad) for t in (x, w, nw)]
    reference.norm_head_cross_entropy(
        ref[0], ref[1], targets, ref[2], reduction=reduction
    ).sum().backward()
    for ours, theirs in zip((x, w, nw), ref, strict=True):
        assert (ours.grad is None) == (not ours.requires_grad)
        if ours.grad is not None:
            assert rel_err(ours.grad, theirs.grad) < 1e-10


def test_no_gradient_work_without_grad_mode(monkeypatch):
    calls = _spy_forward(monkeypatch)
    (x, w, _, _, _), targets = head_inputs(5, 4, 20, None, False, torch.float64, "cpu")
    w.requires_grad_()
    with torch.no_grad():
        chunked_loss(False, x, w, targets)
    assert calls == [(False,) * 4]


def test_second_backward_raises():
    """The backward scales the forward's gradients in place: a second one is an error."""
    (x, w, _, _, _), targets = head_inputs(5, 4, 20, None, False, torch.float64, "cpu")
    w.requires_grad_()
    loss = chunked_loss(False, x, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_bitwise_reproducible():
    """The same inputs give bitwise the same loss and gradients (no atomics, fixed order)."""
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        (x, w, nw, _, tw), targets = head_inputs(40, 16, 300, "rms", True, torch.float32, "cpu")
        for t in (x, w, nw, tw):
            t.requires_grad_()
        loss = chunked_loss(False, x, w, targets, nw, token_weights=tw)
        loss.backward()
        results.append([loss, x.grad, w.grad, nw.grad, tw.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
