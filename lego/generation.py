"""Token-by-token generation for ``LegoModel``: a KV cache and three decoding modes.

``generate(model, ids, max_new_tokens=N, mode=...)`` (also ``LegoModel.generate``)
continues a batch of prompts ``ids [B, T]``; prompts of different lengths are left-padded
and marked by ``attention_mask [B, T]`` (True = real token), as in Hugging Face, and
rotary positions count the real tokens only. DESIGN section 8 gives the semantics.

The cache (``KVCache``) holds every layer's keys and values ``[B, S, H, hd]`` for
``S = T + max_new_tokens (+ draft_tokens)`` columns, preallocated: column ``j`` of row
``b`` is the ``j``-th token of that row's padded sequence, and each row has its own
length, so rows may advance by different numbers of tokens. A decoding pass takes the
``n`` new tokens of every row, writes their keys/values at their columns and attends
over the columns written so far (an explicit ``[B, 1, n, width]`` mask: real keys up to
the query's own column). The layers are the model's own (``Block.attn_input``,
``Block.project``, ``Block.finish``), the exits ``LegoModel.exit_confidence`` /
``exit_logits``; nothing here re-implements a norm, residual or FFN.

Modes:

- ``"full"``: the prompt through every layer (prefill), then one token per step.
- ``"early-exit"``: each pass runs layers ``1..exit_layer`` on all rows, takes the exit's
  one-pass confidence (``ops.exit_confidence``) and routes the tokens below
  ``threshold`` (``ops.route``); only those *hard* tokens run the deeper layers
  (``ops.gather_tokens``, per-row padded queries as ``HardLayout``), the others emit the
  exit's token. ``context="propagate"``: an exited token's deeper keys/values are
  projected from its exit-layer state (CALM's state propagation, no second pass over the
  lower layers); ``"routed"``: exited tokens get no deeper keys/values, deeper layers
  attend to earlier hard tokens only (Mixture-of-Depths). The prompt is routed the same
  way, so the emitted tokens are the predictions of teacher-forced
  ``LegoModel.early_exit`` on the generated sequence (greedy). A pass where no token is
  hard still writes the deeper keys/values (``"propagate"``), which later ones attend to.
  With ``capacity=K`` at most ``K`` hard rows of a decode step run the deeper layers and
  the hard rows past them exit, as in ``LegoModel.early_exit(..., capacity=K)``: the
  decode step (``early_exit_step``) then has static shapes and makes no host
  synchronization (the plan has ``min(K, B)`` slots, free ones -1; the attention spans
  every cache column, masked), so it can be captured in a CUDA graph. The prompt is
  routed without a capacity (``early_exit_prefill``); the decode loop reads the device
  once per step only with ``eos_id`` (to stop when every row is done), and its counts
  at the end.
- ``"self-speculative"``: a round drafts ``draft_tokens`` tokens with layers
  ``1..exit_layer`` and the shared exit, then runs the deeper layers once over the
  round's ``draft_tokens + 1`` tokens from the exit-layer states kept while drafting
  (their lower keys/values are already cached, as in LayerSkip), and keeps the drafts
  the full model agrees with (``lego.sampling.greedy_accept``, or
  ``speculative_accept`` when sampling): greedy output equals ``"full"``, sampled output
  follows the full model's distribution. A rejected draft's cache columns are simply
  written over by the next round; each row keeps its own length.

``temperature = 0`` is greedy (the argmax from ``ops.exit_confidence``, no ``B x V``
softmax); otherwise tokens are drawn from ``lego.sampling.next_token_probs`` (top-k,
top-p) with ``generator``. A row that emits ``eos_id`` is finished: it is padded with
``eos_id`` and its later tokens are neither counted nor kept (the batch keeps running
until every row is done or has ``max_new_tokens`` tokens).

Statistics (``GenerationStats``): tokens, passes, wall time, tokens/s, exit ratio,
overflowing tokens (with a capacity), acceptance rate, and analytic FLOPs of the call
and of full-depth decoding of the same tokens, both counted with
``LegoModel._layer_flops`` / ``_head_flops`` on what each pass computes (SDPA's
``queries x width`` score entries, as the model's counts).

``check_int``, ``check_mask``, ``check_decoding``, ``Sampler``, ``Emitted`` and the
outputs are shared with ``lego.hf.generation``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import torch
from torch import Tensor

from lego.model import CONTEXTS, HardLayout, LegoModel, attention, put_rows, take_rows
from lego.sampling import (
    check_sampling,
    greedy_accept,
    next_token_probs,
    sample,
    speculative_accept,
)
from lego_kernels import ops
from lego_kernels.reference import MEASURES

MODES = ("full", "early-exit", "self-speculative")


# ----------------------------------------------------------------------------- outputs


@dataclasses.dataclass
class GenerationStats:
    """What one ``generate`` call did and cost.

    ``new_tokens``: tokens generated, all rows together (a row stops counting after
    ``eos_id``); ``decode_steps``: model passes that produced tokens (the prefill
    included; self-speculative: one per round); ``wall_time_s``: the call's wall clock
    (device synchronized); ``flops``: analytic FLOPs of this call; ``full_flops``: those
    of ``mode="full"`` generating as many tokens per row. Early-exit: ``exited_tokens``,
    generated tokens emitted at the exit; with a ``capacity``, ``overflow_tokens``: those
    of them that were hard but exited because the step's capacity was full.
    Self-speculative: ``verifications`` (rounds of the rows still generating),
    ``drafted_tokens`` and ``accepted_tokens`` (kept drafts). Counts that do not apply to
    the mode are ``None``; the ratios derive from them.
    """

    mode: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    decode_steps: int
    wall_time_s: float
    flops: int
    full_flops: int
    exited_tokens: int | None = None
    overflow_tokens: int | None = None
    verifications: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float:
        """``new_tokens / wall_time_s``."""
        return self.new_tokens / self.wall_time_s

    @property
    def flops_cost(self) -> float:
        """``flops / full_flops``: below 1 means fewer FLOPs than full-depth decoding."""
        return self.flops / self.full_flops

    @property
    def exit_ratio(self) -> float | None:
        """Share of the generated tokens emitted at the exit (early-exit; the overflowing
        ones included)."""
        return None if self.exited_tokens is None else self.exited_tokens / self.new_tokens

    @property
    def acceptance_rate(self) -> float | None:
        """Kept drafts over drafted tokens (self-speculative; ``None`` before any round)."""
        if not self.drafted_tokens:
            return None
        return self.accepted_tokens / self.drafted_tokens

    @property
    def tokens_per_verification(self) -> float | None:
        """Tokens a row gains per round, ``1 + kept drafts`` on average (self-speculative)."""
        if not self.verifications:
            return None
        return (self.accepted_tokens + self.verifications) / self.verifications

    def as_dict(self) -> dict[str, object]:
        """The fields and the ratios, for JSON."""
        ratios = ("tokens_per_s", "flops_cost", "exit_ratio", "acceptance_rate")
        ratios += ("tokens_per_verification",)
        return {**dataclasses.asdict(self), **{name: getattr(self, name) for name in ratios}}


class GenerationOutput(NamedTuple):
    """Result of ``generate``: ``tokens`` int64 ``[B, T + max_new_tokens]`` (the prompts as
    given, then ``new_tokens``), ``new_tokens`` int64 ``[B, max_new_tokens]`` (``eos_id``
    after a row finished), ``stats``."""

    tokens: Tensor
    new_tokens: Tensor
    stats: GenerationStats


# ----------------------------------------------------------------------------- cache


class Pass(NamedTuple):
    """Where the ``n`` new tokens of each row go: ``cols`` and ``positions`` int64
    ``[B, n]`` (cache column; rotary position = real tokens before it), ``width`` the
    key columns attended (the largest column + 1) and ``mask`` bool ``[B, 1, n, width]``
    (the dense attention of the new tokens)."""

    cols: Tensor
    positions: Tensor
    width: int
    mask: Tensor

    def column(self, i: int) -> Pass:
        """The ``i``-th new token of each row alone (same ``width``)."""
        return Pass(
            self.cols[:, i : i + 1],
            self.positions[:, i : i + 1],
            self.width,
            self.mask[:, :, i : i + 1],
        )


class KVCache:
    """Keys and values of every layer for the tokens of a batch, preallocated.

    ``keys[l]``, ``values[l]``: ``[B, columns, H, hd]`` in the model's dtype (layer
    ``l + 1``); ``pad`` int64 ``[B]``: each row's left-padding columns (never attended);
    ``length`` int64 ``[B]``: columns whose keys/values are final at every layer (a row's
    next token goes to column ``length``); ``deep`` bool ``[B, columns]``: columns that
    have keys/values at the layers past the exit (early-exit with ``context="routed"``).
    """

    def __init__(self, model: LegoModel, pad: Tensor, columns: int) -> None:
        config = model.config
        like = model.embedding.weight
        shape = (pad.shape[0], columns, config.num_heads, config.head_dim)
        # Zeros, not empty: a masked key's value still meets a 0 weight (0 * NaN = NaN).
        self.keys = [like.new_zeros(shape) for _ in range(config.num_layers)]
        self.values = [like.new_zeros(shape) for _ in range(config.num_layers)]
        self.columns = columns
        self.pad = pad
        self.length = torch.zeros_like(pad)
        self.deep = torch.zeros(shape[:2], dtype=torch.bool, device=pad.device)
        self.rows = torch.arange(shape[0], device=pad.device)[:, None]

    def plan(self, n: int, width: int | None = None) -> Pass:
        """The pass of ``n`` new tokens per row, at columns ``length .. length + n - 1``.

        ``width``: the key columns attended; ``None``: up to the largest new column (read
        on the host, one synchronization); an int (``columns`` for a static pass) keeps
        every shape fixed, the columns past a row's own masked."""
        cols = self.length[:, None] + torch.arange(n, device=self.pad.device)
        if width is None:
            width = int(cols.max()) + 1
        return Pass(
            cols, (cols - self.pad[:, None]).clamp(min=0), width, self.mask(cols, self.real(width))
        )

    def real(self, width: int) -> Tensor:
        """bool ``[B, width]``: the columns that hold real tokens (not left padding)."""
        return torch.arange(width, device=self.pad.device) >= self.pad[:, None]

    @staticmethod
    def mask(query_cols: Tensor, key_ok: Tensor) -> Tensor:
        """Attention mask ``[B, 1, M, width]`` of queries at ``query_cols [B, M]`` over the
        keys ``key_ok [B, width]`` up to their own column. A query always sees its own
        column, so a padding query attends to something (finite output, never read)."""
        key_cols = torch.arange(key_ok.shape[1], device=key_ok.device)
        own = key_cols == query_cols[..., None]
        return ((key_cols <= query_cols[..., None]) & (key_ok[:, None, :] | own)).unsqueeze(1)

    def write(self, layer: int, rows: Tensor, cols: Tensor, k: Tensor, v: Tensor) -> None:
        """Store ``k, v [..., H, hd]`` of layer ``layer`` (0-based) at ``(rows, cols) [...]``."""
        self.keys[layer][rows, cols] = k
        self.values[layer][rows, cols] = v

    def attend(self, layer: int, q: Tensor, mask: Tensor) -> Tensor:
        """SDPA of ``q [B, M, H, hd]`` over the first ``mask.shape[-1]`` columns of layer
        ``layer`` (0-based) under ``mask [B, 1, M, width]``: ``[B, M, H, hd]``."""
        width = mask.shape[-1]
        k, v = self.keys[layer][:, :width], self.values[layer][:, :width]
        return attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- decoder


class Decoder:
    """The cached layers of ``model`` for one ``generate`` call, with its FLOPs tally.

    ``Decoder(model, pad, columns)``: a ``KVCache`` of ``columns`` columns for rows with
    ``pad`` int64 ``[B]`` left-padding columns. ``run_layers`` runs a block of layers on
    every new token, ``run_hard`` the deeper layers on the hard tokens of a routing plan
    (the only place hard rows are handled; a plan with a capacity and a static width
    make it free of host synchronization). ``flops`` counts what the passes computed.
    """

    def __init__(self, model: LegoModel, pad: Tensor, columns: int) -> None:
        self.model = model
        self.cache = KVCache(model, pad, columns)
        self.flops = 0

    def head(self, tokens: int) -> None:
        """Count an exit head run on ``tokens`` tokens."""
        self.flops += self.model._head_flops(tokens)

    def run_layers(self, h: Tensor, start: int, end: int, step: Pass) -> Tensor:
        """Layers ``start..end`` (1-indexed) on the new tokens ``h [B, n, D] -> [B, n, D]``,
        writing their keys/values at ``step.cols``."""
        batch, n, _ = h.shape
        for index in range(start - 1, end):
            block = self.model.layers[index]
            x = block.attn_input(h)
            self.write_kv(index, x, step)
            q = block.project(block.wq, x, step.positions)
            h = block.finish(h, self.cache.attend(index, q, step.mask))
        tokens = batch * n
        self.flops += (end - start + 1) * self.model._layer_flops(
            tokens, tokens, tokens * step.width
        )
        return h

    def write_kv(self, layer: int, x: Tensor, step: Pass) -> None:
        """Keys/values of layer ``layer`` (0-based) from the attention inputs ``x [B, n, D]``
        of every new token, written at ``step.cols`` (the caller counts the FLOPs)."""
        block = self.model.layers[layer]
        k = block.project(block.wk, x, step.positions)
        self.cache.write(layer, self.cache.rows, step.cols, k, block.project(block.wv, x))

    def propagate(self, h: Tensor, step: Pass, exit_layer: int) -> None:
        """The keys/values of the layers after ``exit_layer`` for new tokens that all exited:
        from their exit-layer states ``h [B, n, D]`` (``context="propagate"``)."""
        model = self.model
        for layer in range(exit_layer, model.config.num_layers):
            self.write_kv(layer, model.layers[layer].attn_input(h), step)
        tokens = h.shape[0] * h.shape[1]
        self.flops += (model.config.num_layers - exit_layer) * model._layer_flops(0, tokens, 0)

    def run_hard(
        self,
        h: Tensor,
        plan: ops.RoutePlan,
        step: Pass,
        exit_layer: int,
        context: str,
        width: int | None = None,
    ) -> Tensor:
        """The layers after ``exit_layer`` on the ``K >= 1`` slots of ``plan``.

        ``h [B, n, D]``: every new token's exit-layer state; ``width``: that of
        ``HardLayout.build`` (``None`` reads it on the host; an int keeps the call free of
        host synchronization). Returns the slots' states after the last layer ``[K, D]``
        (slot ``k`` holds token ``plan.indices[k] = b * n + i``, the ``i``-th new token of
        row ``b``; the free slots -1 of a plan with a capacity run as zero rows and are
        written nowhere). Queries, attention output and FFN run on the slots; keys/values
        of the new tokens come from every one of them (``"propagate"``: exited tokens from
        ``h``) or from the hard ones only (``"routed"``: the others' columns hold zeros,
        left out of ``cache.deep``).
        """
        model, cache = self.model, self.cache
        batch, n, _ = h.shape
        index = plan.indices
        # HardLayout's own key mask covers one sequence of n tokens; the cache's is built here.
        layout = HardLayout.build(plan, batch, n, "routed", width)
        cols = take_rows(step.cols.reshape(-1), index)
        positions = take_rows(step.positions.reshape(-1), index)
        key_ok = cache.real(step.width)
        if context == "routed":
            in_plan = put_rows(index.new_zeros(batch * n, dtype=torch.bool), index, index >= 0)
            cache.deep[cache.rows, step.cols] = in_plan.view(batch, n)
            key_ok = key_ok & cache.deep[:, : step.width]
        mask = cache.mask(layout.pad(cols), key_ok)
        hard = ops.gather_tokens(h, plan)
        for layer in range(exit_layer, model.config.num_layers):
            block = model.layers[layer]
            if context == "propagate":
                x_all = block.attn_input(ops.scatter_tokens(h, hard, plan))
                self.write_kv(layer, x_all, step)
                x = ops.gather_tokens(x_all, plan)
            else:
                x = block.attn_input(hard)
                kv = (block.project(block.wk, x, positions), block.project(block.wv, x))
                # Every new column is written, so no free slot lands anywhere.
                zeros = kv[0].new_zeros(batch * n, *kv[0].shape[1:])
                kv = [put_rows(zeros, index, t).unflatten(0, (batch, n)) for t in kv]
                cache.write(layer, cache.rows, step.cols, *kv)
            q = layout.pad(block.project(block.wq, x, positions))
            hard = block.finish(hard, layout.unpad(cache.attend(layer, q, mask)))
        num_hard = plan.indices.numel()
        kv_tokens = batch * n if context == "propagate" else num_hard
        deep_layer = model._layer_flops(num_hard, kv_tokens, batch * layout.width * step.width)
        self.flops += (model.config.num_layers - exit_layer) * deep_layer
        return hard

    def next_token(self, h: Tensor, exit_layer: int, sampler: Sampler) -> Tensor:
        """The token each row of ``h [R, D]`` emits at the exit after ``exit_layer``:
        int64 ``[R]`` (the argmax when greedy, else a draw)."""
        self.head(h.shape[0])
        if sampler.greedy:
            return self.model.exit_confidence(h, exit_layer=exit_layer).prediction
        return sample(self.probs(h, exit_layer, sampler), sampler.generator)

    def probs(self, h: Tensor, exit_layer: int, sampler: Sampler) -> Tensor:
        """Sampling probabilities float32 ``[..., V]`` of the exit after ``exit_layer`` on
        ``h [..., D]`` (the caller counts the head)."""
        return sampler.probs(self.model.exit_logits(h, exit_layer))


class Sampler(NamedTuple):
    """How a token is picked from a distribution (see ``lego.sampling``); shared with
    ``lego.hf.generation``. ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` filter the
    distribution (``None``: no filter); ``generator`` draws the samples."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        """``temperature == 0``: the argmax, no sampling."""
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """Sampling probabilities float32 ``[..., V]`` of ``logits [..., V]``
        (``lego.sampling.next_token_probs``)."""
        return next_token_probs(logits, self.temperature, self.top_k, self.top_p)


class Emitted:
    """The generated tokens of each row; shared with ``lego.hf.generation``.

    ``Emitted(batch, max_new, eos_id, device)``: ``tokens`` int64 ``[B, max_new]`` (filled
    with ``eos_id``, or 0 without one), ``count`` int64 ``[B]`` and ``finished`` bool ``[B]``
    (``max_new`` reached or ``eos_id`` emitted). ``add`` makes no host synchronization;
    ``done`` reads ``finished`` on the host.
    """

    def __init__(self, batch: int, max_new: int, eos_id: int | None, device: torch.device):
        self.max_new, self.eos_id = max_new, eos_id
        fill = 0 if eos_id is None else eos_id
        self.tokens = torch.full((batch, max_new), fill, dtype=torch.int64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def add(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Append the first ``lengths [B]`` of ``tokens [B, n]`` to the unfinished rows, up to
        ``max_new_tokens`` and the first ``eos_id``; returns how many each row took ``[B]``."""
        n = tokens.shape[1]
        index = torch.arange(n, device=tokens.device)
        take = torch.minimum(lengths, self.max_new - self.count).masked_fill(self.finished, 0)
        ended = torch.zeros_like(self.finished)
        if self.eos_id is not None:
            eos = (tokens == self.eos_id) & (index < take[:, None])
            ended = eos.any(1)
            take = torch.where(ended, eos.long().argmax(1) + 1, take)
        # Column j of a row takes tokens[:, j - count] where count <= j < count + take.
        offset = torch.arange(self.max_new, device=tokens.device) - self.count[:, None]
        new = tokens.gather(1, offset.clamp(0, n - 1))
        self.tokens = torch.where((offset >= 0) & (offset < take[:, None]), new, self.tokens)
        self.count += take
        self.finished |= ended | (self.count >= self.max_new)
        return take

    @property
    def done(self) -> bool:
        """Whether every row is finished (one host synchronization)."""
        return bool(self.finished.all())


def full_decode_flops(model: LegoModel, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Analytic FLOPs of ``mode="full"`` generating ``new_tokens`` per row after prompts of
    ``prompt_len`` columns: the prefill (every layer on ``B x T`` tokens, the head on the
    last column), then ``new_tokens - 1`` one-token passes over the growing cache."""
    config = model.config
    tokens = batch * prompt_len
    flops = config.num_layers * model._layer_flops(tokens, tokens, tokens * prompt_len)
    for step in range(1, new_tokens):
        width = prompt_len + step
        flops += config.num_layers * model._layer_flops(batch, batch, batch * width)
    return flops + new_tokens * model._head_flops(batch)


# ----------------------------------------------------------------------------- modes


def _prefill(dec: Decoder, ids: Tensor, sampler: Sampler) -> Tensor:
    """The prompts ``ids [B, T]`` through every layer; returns the first new token ``[B]``."""
    num_layers = dec.model.config.num_layers
    step = dec.cache.plan(ids.shape[1])
    h = dec.run_layers(dec.model.embedding(ids), 1, num_layers, step)
    dec.cache.length += ids.shape[1]
    return dec.next_token(h[:, -1], num_layers, sampler)


def _decode_full(dec: Decoder, ids: Tensor, out: Emitted, sampler: Sampler) -> dict:
    num_layers = dec.model.config.num_layers
    token = _prefill(dec, ids, sampler)
    out.add(token[:, None], torch.ones_like(token))
    passes = 1
    while not out.done:
        step = dec.cache.plan(1)
        h = dec.run_layers(dec.model.embedding(token[:, None]), 1, num_layers, step)
        dec.cache.length += 1
        token = dec.next_token(h[:, -1], num_layers, sampler)
        out.add(token[:, None], torch.ones_like(token))
        passes += 1
    return {"decode_steps": passes}


class Routing(NamedTuple):
    """How early-exit decoding routes (see ``generate``): a token whose ``measure``
    confidence at ``exit_layer`` is ``>= threshold`` exits there; ``context`` as in
    ``LegoModel.early_exit``; ``capacity``: at most that many hard rows of a decode step
    run the deeper layers (``None``: all of them)."""

    exit_layer: int
    threshold: float
    measure: str = "max_prob"
    context: str = "propagate"
    capacity: int | None = None


class Emission(NamedTuple):
    """What an early-exit pass emits for each row: ``token`` int64 ``[B]``; ``exited`` bool
    ``[B]``: the token came from the exit (the row was confident, or past the capacity);
    ``overflow`` bool ``[B]``: the row was hard but past the capacity, so it exited."""

    token: Tensor
    exited: Tensor
    overflow: Tensor


def _early_exit_pass(
    dec: Decoder,
    ids: Tensor,
    real: Tensor | None,
    sampler: Sampler,
    routing: Routing,
    slots: int | None,
) -> Emission:
    """One early-exit pass of the new tokens ``ids [B, n]`` (``real [B, n]``: False at left
    padding, which always exits), at most ``slots`` hard tokens running the deeper layers
    (``None``: every one, their number read on the host). With ``slots`` and ``n == 1``
    nothing is read on the host: the pass attends all cache columns and the deeper layers
    run ``slots`` rows (free slots as zero rows), whatever the data."""
    model, exit_layer, threshold = dec.model, routing.exit_layer, routing.threshold
    batch, n = ids.shape
    static = slots is not None
    step = dec.cache.plan(n, dec.cache.columns if static else None)
    h = dec.run_layers(model.embedding(ids), 1, exit_layer, step)
    conf = model.exit_confidence(h, exit_layer=exit_layer, measure=routing.measure)
    dec.head(batch * n)
    confidence = conf.confidence if real is None else conf.confidence.masked_fill(~real, math.inf)
    plan = ops.route(confidence, threshold, capacity=slots)
    # rows: the rows whose last token ran deeper (-1: a free slot), final: its states.
    rows, final = plan.indices, h.new_zeros(0, h.shape[-1])
    if rows.numel() > 0:
        width = min(slots, n) if static else None
        hard = dec.run_hard(h, plan, step, exit_layer, routing.context, width)
        if n == 1:  # each slot holds its row's last token
            final = hard
        else:
            last = rows % n == n - 1
            rows, final = rows[last] // n, hard[last]
    elif routing.context == "propagate":  # no hard token, yet later ones attend to these
        dec.propagate(h, step, exit_layer)
    dec.cache.length += n
    deep = put_rows(torch.zeros_like(ids[:, 0], dtype=torch.bool), rows, rows >= 0)
    overflow = ~deep & ~(confidence[:, -1] >= threshold)  # hard as ops.route says, yet exited
    if sampler.greedy:
        token = conf.prediction[:, -1]
        if rows.numel() > 0:
            token = put_rows(token, rows, dec.next_token(final, None, sampler))
        return Emission(token, ~deep, overflow)
    # The exit's distribution of the exited rows (static: of every row, the deep ones
    # overwritten next), then the last layer's of the deep rows.
    exit_rows = torch.arange(batch, device=ids.device) if static else (~deep).nonzero()[:, 0]
    probs = h.new_zeros(batch, model.config.vocab_size, dtype=torch.float32)
    for index, states, layer in ((exit_rows, h[exit_rows, -1], exit_layer), (rows, final, None)):
        if index.numel() > 0:
            dec.head(index.numel())
            probs = put_rows(probs, index, dec.probs(states, layer, sampler))
    return Emission(sample(probs, sampler.generator), ~deep, overflow)


def early_exit_prefill(
    dec: Decoder, ids: Tensor, real: Tensor, sampler: Sampler, routing: Routing
) -> Emission:
    """The prompts ``ids`` int64 ``[B, T]`` (``real`` bool ``[B, T]``: False at left
    padding) through an early-exit pass into ``dec.cache``: every prompt token is routed,
    without a capacity (the host reads the number of hard tokens), as teacher-forced
    ``LegoModel.early_exit`` routes them. Returns each row's first new token."""
    return _early_exit_pass(dec, ids, real, sampler, routing, None)


def early_exit_step(dec: Decoder, token: Tensor, sampler: Sampler, routing: Routing) -> Emission:
    """The decode step: each row's current token ``token`` int64 ``[B]`` through the
    cached layers (its keys/values written at column ``cache.length``, which then grows
    by one); returns the next tokens.

    With ``routing.capacity``: at most ``min(capacity, B)`` hard rows (the first ones, in
    row order) run the deeper layers; the hard rows past them exit (``overflow``). The
    step then makes no host synchronization and every shape is static (the attention
    spans all ``cache.columns`` columns, masked; the deeper layers run ``min(capacity,
    B)`` rows), so it can be captured in a CUDA graph: a replay reads ``token`` and
    rewrites the cache and the returned tensors in place (``dec.flops`` counts calls, not
    replays). Without a capacity the step reads the hard rows' number and the attended
    width on the host.
    """
    slots = None if routing.capacity is None else min(routing.capacity, token.shape[0])
    return _early_exit_pass(dec, token[:, None], None, sampler, routing, slots)


def _decode_early_exit(
    dec: Decoder, ids: Tensor, real: Tensor, out: Emitted, sampler: Sampler, routing: Routing
) -> dict:
    first = early_exit_prefill(dec, ids, real, sampler, routing)
    token, exits, overflows = first.token, first.exited.sum(), first.overflow.sum()
    out.add(token[:, None], torch.ones_like(token))
    passes = 1
    # The loop's own host reads: out.done once per step when eos_id can end rows early
    # (none without it: every row takes max_new_tokens tokens), the counts at the end.
    while (not out.done) if out.eos_id is not None else passes < out.max_new:
        active = ~out.finished
        step = early_exit_step(dec, token, sampler, routing)
        exits += (step.exited & active).sum()
        overflows += (step.overflow & active).sum()
        token = step.token
        out.add(token[:, None], torch.ones_like(token))
        passes += 1
    info = {"decode_steps": passes, "exited_tokens": int(exits)}
    if routing.capacity is not None:
        info["overflow_tokens"] = int(overflows)
    return info


def _decode_self_speculative(
    dec: Decoder, ids: Tensor, out: Emitted, sampler: Sampler, exit_layer: int, draft_tokens: int
) -> dict:
    model, cache = dec.model, dec.cache
    num_layers = model.config.num_layers
    token = _prefill(dec, ids, sampler)
    out.add(token[:, None], torch.ones_like(token))
    rounds = verifications = drafted = kept = 0
    while not out.done:
        step = cache.plan(draft_tokens + 1)
        states, drafts, draft_probs = [], [], []
        # Layers 1..E on the round's input token and each draft (the last one is only
        # needed for the verification pass): their keys/values and states are reused.
        for i in range(draft_tokens + 1):
            h = dec.run_layers(model.embedding(token[:, None]), 1, exit_layer, step.column(i))
            states.append(h)
            if i == draft_tokens:
                break
            if sampler.greedy:
                token = dec.next_token(h[:, 0], exit_layer, sampler)
            else:
                dec.head(h.shape[0])
                draft_probs.append(dec.probs(h[:, 0], exit_layer, sampler))
                token = sample(draft_probs[-1], sampler.generator)
            drafts.append(token)
        h = dec.run_layers(torch.cat(states, 1), exit_layer + 1, num_layers, step)
        draft = torch.stack(drafts, 1)
        dec.head(h.shape[0] * h.shape[1])
        if sampler.greedy:
            target = model.exit_confidence(h).prediction
            accepted, token = greedy_accept(draft, target)
        else:
            target_probs = dec.probs(h, None, sampler)
            accepted, token = speculative_accept(
                draft, torch.stack(draft_probs, 1), target_probs, sampler.generator
            )
        emitted = torch.cat([draft, token[:, None]], 1).scatter(
            1, accepted[:, None], token[:, None]
        )
        active = ~out.finished
        out.add(emitted, accepted + 1)
        # The round's input and its kept drafts now have keys/values at every layer. A row
        # that finished keeps its length (its later rounds, never read, stay in the columns).
        cache.length += torch.where(out.finished, 0, accepted + 1)
        num_active = int(active.sum())
        rounds += 1
        verifications += num_active
        drafted += draft_tokens * num_active
        kept += int(accepted[active].sum())
    return {
        "decode_steps": 1 + rounds,
        "verifications": verifications,
        "drafted_tokens": drafted,
        "accepted_tokens": kept,
    }


# ----------------------------------------------------------------------------- entry point


def check_int(name: str, value: object, low: int, high: int | None, hint: str) -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` unless
    ``low <= value`` (and ``value <= high`` when ``high`` is given); the messages name
    ``name`` and say ``hint`` (the valid values, e.g. ``">= 1"``). Shared with
    ``lego.hf.generation``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {hint}, got {value}")


def check_mask(ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The bool ``[B, T]`` mask of real tokens of ``ids [B, T]`` (all True when
    ``attention_mask`` is None); ``TypeError``/``ValueError`` naming ``ids`` or
    ``attention_mask`` unless the mask is bool or 0/1 ``[B, T]`` on ids' device, with left
    padding only and a real token in every row. Shared with ``lego.hf.generation``."""
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"ids must be an int64 [batch, seq_len] tensor, got {got}")
    if attention_mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a [batch, seq_len] tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != ids.shape or attention_mask.device != ids.device:
        raise ValueError(
            f"attention_mask must be shaped like ids {tuple(ids.shape)} on {ids.device}, got "
            f"{tuple(attention_mask.shape)} on {attention_mask.device}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or 0/1 integers, got {attention_mask.dtype}")
    if (
        attention_mask.dtype != torch.bool
        and not ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must hold 0/1 (or True/False) values")
    real = attention_mask.bool()
    if not real.any(1).all():
        rows = (~real.any(1)).nonzero().squeeze(1).tolist()
        raise ValueError(f"attention_mask has rows with no real token: rows {rows}; drop them")
    if (real[:, :-1] & ~real[:, 1:]).any():
        raise ValueError(
            "attention_mask must be left padding (each row False... then True...), as Hugging "
            "Face tokenizers give with padding_side='left'"
        )
    return real


def check_decoding(
    mode: str,
    num_layers: int,
    vocab_size: int,
    *,
    exit_layer: int | None,
    threshold: float | None,
    measure: str,
    context: str,
    draft_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    generator: torch.Generator | None,
) -> None:
    """The checks of ``generate``'s decoding arguments (a ``TypeError``/``ValueError``
    naming the argument) for a ``mode`` already checked and a model of ``num_layers``
    layers and ``vocab_size`` tokens; ``lego.hf.generate`` makes the same ones."""
    if mode == "full":
        for name, value in (("exit_layer", exit_layer), ("threshold", threshold)):
            if value is not None:
                raise ValueError(f"{name} does not apply to mode='full'; leave it None")
    else:
        if exit_layer is None:
            raise ValueError(f"mode={mode!r} needs exit_layer (in 1..{num_layers - 1})")
        check_int(
            "exit_layer",
            exit_layer,
            1,
            num_layers - 1,
            f"in 1..{num_layers - 1} (below the last layer)",
        )
    if mode == "early-exit":
        if threshold is None:
            raise ValueError("mode='early-exit' needs threshold (0: all exit, > 1: none does)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
        if math.isnan(threshold):
            raise ValueError("threshold is NaN; pass a number (0: all exit, > 1: none does)")
    elif threshold is not None:
        raise ValueError(f"threshold applies to mode='early-exit' only, not {mode!r}")
    ops.check_choice("measure", measure, MEASURES)
    ops.check_choice("context", context, CONTEXTS)
    check_int("draft_tokens", draft_tokens, 1, None, ">= 1")
    check_sampling(temperature, top_k, top_p)
    if eos_id is not None:
        check_int("eos_id", eos_id, 0, vocab_size - 1, f"in [0, {vocab_size})")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


@torch.no_grad()
def generate(
    model: LegoModel,
    ids: Tensor,
    *,
    max_new_tokens: int,
    mode: str = "full",
    exit_layer: int | None = None,
    threshold: float | None = None,
    measure: str = "max_prob",
    context: str = "propagate",
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    capacity: int | None = None,
) -> GenerationOutput:
    """Continue the prompts ``ids`` int64 ``[B, T]`` by ``max_new_tokens`` tokens each.

    ``mode``: ``"full"``, ``"early-exit"`` (needs ``exit_layer`` in ``1..L-1`` and
    ``threshold``; ``measure`` and ``context`` as in ``LegoModel.early_exit``; optional
    ``capacity >= 1``: at most that many hard rows per decode step run the deeper layers,
    the others exit, and the step makes no host synchronization, see
    ``early_exit_step``) or ``"self-speculative"`` (needs ``exit_layer``;
    ``draft_tokens >= 1`` per round); see the module docstring. ``temperature = 0``:
    greedy; else sampling with ``top_k`` / ``top_p`` from ``generator``. ``eos_id``: a row
    that emits it stops (then padded with it). ``attention_mask`` bool/0-1 ``[B, T]``:
    True at real tokens, left padding only. ``T + max_new_tokens`` must not exceed
    ``max_seq_len``. No gradient.
    """
    real = check_mask(ids, attention_mask)
    prompts, ids = ids, ids.masked_fill(~real, 0)  # any id may sit under the padding
    model._check_ids("ids", ids)
    batch, prompt_len = ids.shape
    config = model.config
    ops.check_choice("mode", mode, MODES)
    check_int("max_new_tokens", max_new_tokens, 1, None, ">= 1")
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len {config.max_seq_len}; lower max_new_tokens to at most "
            f"{max(config.max_seq_len - prompt_len, 0)} or shorten the prompts"
        )
    check_decoding(
        mode,
        config.num_layers,
        config.vocab_size,
        exit_layer=exit_layer,
        threshold=threshold,
        measure=measure,
        context=context,
        draft_tokens=draft_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        generator=generator,
    )
    if capacity is not None:
        if mode != "early-exit":
            raise ValueError(f"capacity applies to mode='early-exit' only, not {mode!r}")
        check_int("capacity", capacity, 1, None, ">= 1 (hard rows per decode step; None: all)")

    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    spare = draft_tokens if mode == "self-speculative" else 0
    dec = Decoder(model, (~real).sum(1), prompt_len + max_new_tokens + spare)
    out = Emitted(batch, max_new_tokens, eos_id, ids.device)
    sampler = Sampler(float(temperature), top_k, top_p, generator)
    if mode == "full":
        info = _decode_full(dec, ids, out, sampler)
    elif mode == "early-exit":
        routing = Routing(exit_layer, float(threshold), measure, context, capacity)
        info = _decode_early_exit(dec, ids, real, out, sampler, routing)
    else:
        info = _decode_self_speculative(dec, ids, out, sampler, exit_layer, draft_tokens)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    wall = time.perf_counter() - start
    stats = GenerationStats(
        mode=mode,
        batch_size=batch,
        prompt_len=prompt_len,
        new_tokens=int(out.count.sum()),
        wall_time_s=wall,
        flops=dec.flops,
        full_flops=full_decode_flops(model, batch, prompt_len, int(out.count.max())),
        **info,
    )
    return GenerationOutput(torch.cat([prompts, out.tokens], 1), out.tokens, stats)
