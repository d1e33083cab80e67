"""``lego.sampling``: filtering against a plain float64 reference, acceptance rules by hand and
speculative sampling's output distribution against the target's (total variation)."""

import math

import pytest
import torch

from lego.sampling import (
    check_sampling,
    greedy_accept,
    next_token_probs,
    sample,
    speculative_accept,
)


def reference_probs(logits: list[float], temperature: float, top_k, top_p) -> list[float]:
    """The filtering of ``next_token_probs`` for one row, written out in float64 Python."""
    scaled = [x / temperature for x in logits]
    if top_k is not None:
        kth = sorted(scaled, reverse=True)[min(top_k, len(scaled)) - 1]
        scaled = [x if x >= kth else -math.inf for x in scaled]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    if top_p is not None:
        kept, mass = set(), 0.0
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += probs[i]
        probs = [p if i in kept else 0.0 for i, p in enumerate(probs)]
        probs = [p / sum(probs) for p in probs]
    return probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6), (0.9, 8, 0.8), (2.0, 1, None)],
)
def test_next_token_probs_match_reference(temperature, top_k, top_p):
    logits = torch.randn(6, 13, dtype=torch.float64) * 2
    got = next_token_probs(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    want = torch.tensor(
        [reference_probs(row, temperature, top_k, top_p) for row in logits.tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_next_token_probs_greedy_limit_and_half_precision():
    logits = torch.randn(4, 9).to(torch.bfloat16)
    greedy = next_token_probs(logits, 0.0)
    assert greedy.dtype == torch.float32
    assert torch.equal(greedy.argmax(-1), logits.float().argmax(-1))
    assert torch.equal(greedy.sum(-1), torch.ones(4))
    assert int((greedy > 0).sum()) == 4
    want = torch.softmax(logits.float() / 0.5, -1)
    torch.testing.assert_close(next_token_probs(logits, 0.5), want)


def test_sample_is_reproducible_and_follows_the_probs():
    probs = torch.tensor([[0.1, 0.6, 0.3]]).expand(30_000, 3)
    first = sample(probs, torch.Generator().manual_seed(3))
    again = sample(probs, torch.Generator().manual_seed(3))
    assert first.dtype == torch.int64 and torch.equal(first, again)
    freq = torch.bincount(first, minlength=3).double() / first.numel()
    assert (freq - probs[0].double()).abs().max() < 0.01


def test_greedy_accept_prefix_and_next_token():
    draft = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]])
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [0, 6, 7, 8], [1, 2, 4, 4]])
    accepted, next_token = greedy_accept(draft, target)
    assert accepted.tolist() == [3, 1, 0, 2]  # a later agreement after a mismatch is not kept
    assert next_token.tolist() == [8, 9, 0, 4]
    with pytest.raises(ValueError, match="target"):
        greedy_accept(draft, target[:, :3])


def _total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / tokens.numel()
    return 0.5 * float((freq - probs.double()).abs().sum())


def test_speculative_accept_emits_the_target_distribution():
    rows, vocab = 40_000, 5
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.2], [0.3, 0.1, 0.1, 0.2, 0.3], [0.2] * 5])
    q = torch.tensor([[0.5, 0.1, 0.2, 0.1, 0.1], [0.05, 0.05, 0.6, 0.1, 0.2]])
    assert 0.5 * float((p[:2] - q).abs().sum(-1).min()) > 0.3  # the draft is far off
    draft = torch.stack([sample(q[i].expand(rows, vocab), gen) for i in range(2)], 1)
    accepted, next_token = speculative_accept(
        draft, q.expand(rows, 2, vocab), p.expand(rows, 3, vocab), gen
    )
    # The first emitted token follows p[0]; given that it was a kept draft, the second p[1].
    first = torch.where(accepted >= 1, draft[:, 0], next_token)
    assert _total_variation(first, p[0]) < 0.01
    kept = accepted >= 1
    second = torch.where(accepted >= 2, draft[:, 1], next_token)[kept]
    assert second.numel() > 5_000 and _total_variation(second, p[1]) < 0.015
    # A fixed generator repeats the draws.
    gen2 = torch.Generator().manual_seed(5)
    out = [
        speculative_accept(draft, q.expand(rows, 2, vocab), p.expand(rows, 3, vocab), g)
        for g in (gen2, torch.Generator().manual_seed(5))
    ]
    assert all(torch.equal(a, b) for a, b in zip(*out, strict=True))


def test_speculative_accept_extremes():
    vocab = 4
    draft = torch.tensor([[1, 2], [1, 2]])
    q = torch.full((2, 2, vocab), 0.25)
    # p == q: every draft is kept and the bonus token comes from p[K].
    bonus = torch.zeros(2, vocab)
    bonus[:, 3] = 1.0
    accepted, next_token = speculative_accept(draft, q, torch.cat([q, bonus[:, None]], 1))
    assert accepted.tolist() == [2, 2] and next_token.tolist() == [3, 3]
    # p puts no mass on the first draft: rejected, and the residual is p's own token 0.
    p = torch.zeros(2, 3, vocab)
    p[:, :, 0] = 1.0
    accepted, next_token = speculative_accept(draft, q, p)
    assert accepted.tolist() == [0, 0] and next_token.tolist() == [0, 0]
    with pytest.raises(ValueError, match="K >= 1"):
        speculative_accept(draft[:, :0], q[:, :0], p[:, :1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings_name_the_argument(kwargs, name):
    settings = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        check_sampling(**settings)
    with pytest.raises((ValueError, TypeError), match=name):
        next_token_probs(torch.zeros(1, 3), **settings)
