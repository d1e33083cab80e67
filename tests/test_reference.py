"""The reference against textbook PyTorch (``F.rms_norm``/``F.layer_norm``, ``F.cross_entropy``,
``softmax``), in float64: relative error below 1e-10.

The reference is chunked over tokens (``CHUNK_TOKENS`` rows at a time); these tests cross
chunk boundaries by lowering ``CHUNK_TOKENS``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lego_kernels import reference

TOL = 1e-10  # float64 against float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 7)


def textbook_norm(x, w, b, norm, eps):
    if norm == "rms":
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    if norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return x


@pytest.mark.parametrize("norm", ["rms", "layer", None])
def test_apply_norm(norm):
    x = torch.randn(5, 13, dtype=torch.float64) * 3 + 1
    w = torch.randn(13, dtype=torch.float64) if norm else None
    b = torch.randn(13, dtype=torch.float64) if norm == "layer" else None
    out = reference.apply_norm(x, w, b, norm, 1e-6)
    assert rel_err(out, textbook_norm(x, w, b, norm, 1e-6)) < TOL


@pytest.mark.parametrize("vocab", [1, 2, 11])
def test_confidence_measures(vocab):
    logits = torch.randn(3, 4, vocab, dtype=torch.float64) * 4
    p = logits.softmax(-1)
    top2 = torch.cat([p, torch.zeros_like(p[..., :1])], -1).topk(2, -1).values
    entropy = -(p * p.log()).sum(-1)
    expected = {
        "max_prob": p.max(-1).values,
        "margin": top2[..., 0] - top2[..., 1],
        "entropy": 1 - entropy / math.log(vocab) if vocab > 1 else torch.ones(3, 4).double(),
    }
    for measure, want in expected.items():
        conf = reference.confidence_from_logits(logits, measure=measure)
        assert rel_err(conf.confidence, want) < TOL, measure
        assert torch.equal(conf.prediction, logits.argmax(-1))
        assert rel_err(conf.lse, logits.logsumexp(-1)) < TOL


@pytest.mark.usefixtures("small_chunks")
def test_exit_confidence_matches_unchunked():
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    w = torch.randn(17, 8, dtype=torch.float64)
    nw = torch.randn(8, dtype=torch.float64)
    got = reference.exit_confidence(x, w, nw, measure="margin")
    want = reference.confidence_from_logits(reference.norm_head_logits(x, w, nw), measure="margin")
    for a, b in zip(got, want, strict=True):
        assert a.shape == (2, 10)
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("norm", ["rms", "layer", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_and_grads_match_textbook(reduction, norm, weighted):
    n, d, v = 23, 9, 31
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    nw = torch.randn(d, dtype=torch.float64, requires_grad=True) if norm else None
    nb = torch.randn(d, dtype=torch.float64, requires_grad=True) if norm == "layer" else None
    targets = torch.randint(0, v, (n,))
    targets[::5] = -100
    tw = torch.rand(n, dtype=torch.float64) if weighted else None
    loss = reference.norm_head_cross_entropy(
        x, w, targets, nw, nb, norm=norm, reduction=reduction, token_weights=tw
    )
    per_token = F.cross_entropy(
        textbook_norm(x, nw, nb, norm, 1e-6) @ w.T, targets, reduction="none"
    )
    if tw is not None:
        per_token = per_token * tw
    want = {
        "none": per_token,
        "sum": per_token.sum(),
        "mean": per_token.sum() / (targets != -100).sum(),
    }[reduction]
    assert rel_err(loss, want) < TOL
    params = [t for t in (x, w, nw, nb) if t is not None]
    upstream = torch.randn_like(want)
    got = torch.autograd.grad(loss, params, upstream)
    ref = torch.autograd.grad(want, params, upstream)
    for a, b in zip(got, ref, strict=True):
        assert rel_err(a, b) < TOL


def test_cross_entropy_frozen_head_and_all_ignored():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)  # frozen
    targets = torch.full((4,), -100)
    loss = reference.norm_head_cross_entropy(x, w, targets)
    assert loss.item() == 0.0  # mean over zero tokens is 0, not NaN
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    assert w.grad is None


@pytest.mark.usefixtures("small_chunks")
def test_cross_entropy_return_confidence_and_empty():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    w = torch.randn(12, 8, dtype=torch.float64)
    targets = torch.randint(0, 12, (3, 5))
    loss, conf = reference.norm_head_cross_entropy(
        x, w, targets, return_confidence=True, measure="entropy", reduction="none"
    )
    want = reference.exit_confidence(x, w, measure="entropy")
    assert loss.shape == conf.confidence.shape == (3, 5)
    for a, b in zip(conf, want, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    empty = reference.norm_head_cross_entropy(x[:0], w, targets[:0], reduction="none")
    assert empty.shape == (0, 5)
