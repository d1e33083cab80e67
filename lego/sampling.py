"""Next-token sampling and draft acceptance, shared by every decoder of the project.

``lego.generation`` (LegoModel decoding) and the Hugging Face adapters build on these
and write no sampling helper of their own. R = rows being decoded, V = vocabulary,
K = drafted tokens.

- ``next_token_probs``: logits -> probabilities after temperature, top-k, then top-p
  (nucleus) filtering, renormalized (float32). ``temperature = 0`` is the greedy
  limit: all the mass on the argmax (the first one on ties).
- ``sample``: one draw per row (``torch.multinomial``), reproducible with a generator.
- ``greedy_accept``: the longest prefix of the draft that the target model's argmax
  agrees with, and the target's token after it.
- ``speculative_accept``: speculative sampling (Leviathan et al. 2023, Chen et al.
  2023). Draft token ``i`` (drawn from ``q_i``) is accepted with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the next token is drawn
  from the residual ``norm(max(p_i - q_i, 0))``; if all K are accepted it is drawn
  from ``p_K``. Each emitted token then follows ``p`` exactly, whatever ``q`` is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """``TypeError``/``ValueError`` naming the argument unless ``temperature >= 0``,
    ``top_k`` is ``None`` or an int ``>= 1`` and ``top_p`` is ``None`` or in ``(0, 1]``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: no top-k filtering), got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a float or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (or None: no nucleus), got {top_p}")


def next_token_probs(
    logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Probabilities of the next token: ``logits [..., V]`` (any float dtype) -> float32
    ``[..., V]`` summing to 1 along the last dim.

    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (ties
    with the k-th are kept), then to the smallest set of most probable tokens whose mass
    reaches ``top_p`` (the most probable token is always kept), renormalized.
    ``temperature = 0``: one-hot on the argmax (the limit as the temperature goes to 0).
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row: ``probs [R, V]`` -> int64 ``[R]`` (``torch.multinomial``)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prefix_length(agree: Tensor) -> Tensor:
    """``agree`` bool ``[R, K]`` -> int64 ``[R]``: how many leading entries are True."""
    return agree.long().cumprod(-1).sum(-1)


def greedy_accept(draft: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification of a draft.

    ``draft`` int64 ``[R, K]``; ``target`` int64 ``[R, K + 1]``: the target model's argmax
    after each prefix (``target[:, i]`` follows the context and ``draft[:, :i]``).
    Returns ``(accepted, next_token)``, int64 ``[R]`` each: ``accepted`` in ``0..K`` is the
    length of the prefix where ``draft == target``, ``next_token = target[r, accepted[r]]``.
    """
    num_draft = draft.shape[-1]
    if draft.dim() != 2 or target.shape != (draft.shape[0], num_draft + 1):
        raise ValueError(
            f"draft must be [R, K] and target [R, K + 1], got {tuple(draft.shape)} and "
            f"{tuple(target.shape)}"
        )
    accepted = _prefix_length(draft == target[:, :num_draft])
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)


def speculative_accept(
    draft: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative-sampling verification of a draft (see the module docstring).

    ``draft`` int64 ``[R, K]``, drawn from ``draft_probs`` ``[R, K, V]`` (q); ``target_probs``
    ``[R, K + 1, V]`` (p): ``p[:, i]`` is the target model's distribution after the context
    and ``draft[:, :i]``. Returns ``(accepted, next_token)``, int64 ``[R]`` each:
    ``accepted`` in ``0..K`` draft tokens kept, then ``next_token`` (the residual draw at
    the first rejection, or a draw from ``p[:, K]`` when all are kept). Random numbers
    come from ``generator``: a fixed generator gives the same result.
    """
    rows, num_draft = draft.shape
    expected = ((rows, num_draft), (rows, num_draft + 1))
    if num_draft < 1 or (draft_probs.shape[:2], target_probs.shape[:2]) != expected:
        raise ValueError(
            f"draft [R, K] = {tuple(draft.shape)} (K >= 1) needs draft_probs [R, K, V] and "
            f"target_probs [R, K + 1, V], got {tuple(draft_probs.shape)} and "
            f"{tuple(target_probs.shape)}"
        )
    p = target_probs.float()
    q = draft_probs.float()
    p_draft = p[:, :num_draft].gather(-1, draft[..., None]).squeeze(-1)
    q_draft = q.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.rand(rows, num_draft, generator=generator, device=draft.device)
    accepted = _prefix_length(u * q_draft < p_draft)  # u < p / q: probability min(1, p / q)
    row = torch.arange(rows, device=draft.device)
    p_next = p[row, accepted]
    q_next = q[row, accepted.clamp(max=num_draft - 1)]
    residual = (p_next - q_next).clamp(min=0)
    all_kept = (accepted == num_draft)[:, None]
    # After a rejection p != q, so the residual has mass; fall back to p for rounding alone.
    residual = torch.where(all_kept | (residual.sum(-1, keepdim=True) <= 0), p_next, residual)
    residual = residual / residual.sum(-1, keepdim=True)
    return accepted, sample(residual, generator)
