"""``generate`` for Hugging Face models: early exit and self-speculation on the model's cache.

``generate(model, input_ids, mode=..., exit_layer=E, max_new_tokens=N)`` decodes with the
semantics of ``lego.generation`` (DESIGN section 8) on a patched or unpatched
Llama/Mistral/Qwen2/GPT-2 model, with the model's own layers, masks and
``transformers.DynamicCache``; the family adapter (``lego.hf.adapter``) runs the decoder
piece by piece. Prompts are left-padded with ``attention_mask`` (positions count real
tokens, as ``model.generate`` computes them). Exits use the model's shared final norm
and head: confidences and greedy drafts come from ``ops.exit_confidence`` (no ``B x V``
tensor), the full model's tokens from the model's own ``lm_head(final_norm(h))``, so
``mode="full"`` and greedy ``"self-speculative"`` emit ``model.generate(do_sample=False)``'s
tokens. The cache keeps, beside the keys/values, a padding mask over its columns
(``Decoder.keys``): each row's left padding and the columns it must not attend.

- ``"full"``: the prompt through every layer, then one token per step.
- ``"early-exit"``: each step runs layers ``1..E`` on every row; a row whose
  ``measure`` confidence reaches ``threshold`` emits the exit's token, the others (the
  hard rows) run layers ``E+1..L`` on their own: a cache of the hard rows only is cut
  from the model's cache, the layers run on it, and their new keys/values are written
  back. The exited rows' deeper keys/values at the new column come from their exit
  state (``context="propagate"``, computed by ``Adapter.layer_kv`` without running the
  layer), or are left out of the deeper layers' mask (``"routed"``: ``Decoder.deep``).
  The prompt is routed the same way (there the deeper layers run on every prompt token
  and exited tokens keep their exit state: ``where(hard, new, exit)``), so greedy
  decoding emits the predictions of teacher-forced early exit on the generated sequence.
- ``"self-speculative"``: a round drafts ``draft_tokens`` tokens with layers ``1..E`` and
  the exit (their keys/values land in the cache), runs layers ``1..E`` once more on the
  last draft, then layers ``E+1..L`` once over the round's ``draft_tokens + 1`` exit
  states (LayerSkip), and keeps the drafts the full model agrees with
  (``lego.sampling.greedy_accept``, or ``speculative_accept`` when sampling). Rows advance
  independently: every layer gets the round's ``draft_tokens + 1`` columns, and a row's
  rejected drafts are masked out of ``Decoder.keys`` (holes, like padding), so no cache
  is cropped and no row waits for the others.

Sampling (``temperature > 0``) draws from ``lego.sampling.next_token_probs`` with
``generator``. Statistics: ``lego.generation.GenerationStats``, its FLOPs counted
analytically: 2 per weight-matrix entry of a layer per token, ``4 D`` per query per
attended key, ``2 V D`` per head call, the key/value projections of propagated tokens.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lego.generation import (
    MODES,
    Emitted,
    GenerationOutput,
    GenerationStats,
    Sampler,
    check_decoding,
    check_int,
    check_mask,
)
from lego.hf.adapter import Adapter
from lego.hf.patch import cast_head, find_adapter, head_confidence
from lego.sampling import greedy_accept, sample, speculative_accept
from lego_kernels import ops
from lego_kernels.reference import Confidence


class Decoder:
    """One ``generate`` call on a model: its ``DynamicCache`` and the masks of its columns.

    ``keys`` bool ``[B, S]``: the cache columns a query may attend (real tokens: not left
    padding, not a rejected draft); ``deep`` bool ``[B, S]``: the same for the layers past
    the exit (``context="routed"`` leaves exited tokens out); ``count`` int64 ``[B]``: the
    real tokens of each row so far (the next token's position). ``flops``: the tally.
    """

    def __init__(
        self, model: nn.Module, adapter: Adapter, real: Tensor, exit_layer: int | None
    ) -> None:
        config = model.config
        self.model, self.adapter, self.exit_layer = model, adapter, exit_layer
        self.layers = adapter.layers(model)
        self.num_layers = len(self.layers)
        self.cache = DynamicCache(config=config)
        self.keys = real.clone()
        self.deep = real.clone()
        self.count = real.sum(1)
        self.head = adapter.head(model)
        dim, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.kv_flops = 2 * 2 * dim * kv_heads * (getattr(config, "head_dim", None) or dim // heads)
        self.matrix_flops = 2 * sum(p.numel() for p in self.layers[0].parameters() if p.dim() == 2)
        self.attn_flops = 4 * dim
        self.head_flops = 2 * self.head.weight.numel()
        self.flops = 0

    # ------------------------------------------------------------------ columns

    def open(self, n: int) -> Tensor:
        """Add ``n`` columns for every row (attended until masked); returns their positions
        ``[B, n]`` (the rows' real-token counts onwards)."""
        new = self.keys.new_ones(self.keys.shape[0], n)
        self.keys = torch.cat([self.keys, new], 1)
        self.deep = torch.cat([self.deep, new], 1)
        return self.count[:, None] + torch.arange(n, device=self.count.device)

    def width(self, first: int, n: int) -> int:
        """Key columns of a pass of ``n`` tokens through ``layers[first:]``."""
        return self.cache.get_seq_length(first) + n

    # ------------------------------------------------------------------ layers

    def run_layers(self, hidden: Tensor, first: int, last: int, positions: Tensor) -> Tensor:
        """``layers[first:last]`` on every row's new states ``hidden [B, n, D]``."""
        width = self.width(first, hidden.shape[1])
        keys = self.keys if first == 0 else self.deep
        inputs = self.adapter.layer_inputs(
            self.model, hidden, keys[:, :width], positions, self.cache, first, last
        )
        for index in range(first, last):
            hidden = self.adapter.run_layer(self.model, index, hidden, inputs, self.cache)
        self.count_layers(last - first, hidden.shape[0] * hidden.shape[1], width)
        return hidden

    def run_deep_prompt(self, hidden: Tensor, hard: Tensor, positions: Tensor) -> Tensor:
        """Layers ``E+1..L`` on the prompt's exit states ``hidden [B, T, D]``: every token
        runs, exited ones (``~hard [B, T]``) keep their exit state (the reference of early
        exit); keys as ``deep`` says (``"routed"`` has marked exited tokens out)."""
        first, width = self.exit_layer, self.width(self.exit_layer, hidden.shape[1])
        inputs = self.adapter.layer_inputs(
            self.model, hidden, self.deep[:, :width], positions, self.cache, first, self.num_layers
        )
        state = hidden
        for index in range(first, self.num_layers):
            out = self.adapter.run_layer(self.model, index, state, inputs, self.cache)
            state = torch.where(hard[..., None], out, hidden)
        self.count_layers(self.num_layers - first, hidden.shape[0] * hidden.shape[1], width)
        return state

    def run_deep_rows(
        self, hidden: Tensor, hard: Tensor, positions: Tensor, context: str
    ) -> Tensor:
        """Layers ``E+1..L`` on the hard rows of one new token per row.

        ``hidden [B, 1, D]``: exit states; ``hard`` bool ``[B]``. The hard rows' cache is
        cut from the model's (a ``DynamicCache`` of those rows at those layers), the layers
        run on it, and each layer's new column is written back for every row: the hard
        rows' keys/values, the exited rows' from their exit state (``"propagate"``) or
        zeros left out of ``deep`` (``"routed"``). Returns the hard rows' states
        ``[K, 1, D]`` (K = hard rows, maybe 0).
        """
        first, last = self.exit_layer, self.num_layers
        width = self.width(first, 1)
        rows, exited = hard.nonzero().squeeze(1), (~hard).nonzero().squeeze(1)
        if context == "routed":
            self.deep[:, width - 1] = hard
        if exited.numel() == 0:  # every row is hard: the model's cache as it is
            return self.run_layers(hidden, first, last, positions)
        state, sub, inputs = hidden[rows], None, None
        if rows.numel() > 0:
            sub = DynamicCache(
                [
                    (layer.keys[rows], layer.values[rows]) if first <= i < last else (None, None)
                    for i, layer in enumerate(self.cache.layers)
                ],
                config=self.model.config,
            )
            inputs = self.adapter.layer_inputs(
                self.model, state, self.deep[rows, :width], positions[rows], sub, first, last
            )
        for index in range(first, last):
            keys, values = self.cache.layers[index].keys, self.cache.layers[index].values
            new_keys = keys.new_zeros(hard.shape[0], keys.shape[1], 1, keys.shape[3])
            new_values = values.new_zeros(hard.shape[0], values.shape[1], 1, values.shape[3])
            if context == "propagate":
                new_keys[exited], new_values[exited] = self.adapter.layer_kv(
                    self.model, index, hidden[exited], positions[exited]
                )
            if sub is not None:
                state = self.adapter.run_layer(self.model, index, state, inputs, sub)
                new_keys[rows] = sub.layers[index].keys[:, :, -1:]
                new_values[rows] = sub.layers[index].values[:, :, -1:]
            self.cache.update(new_keys, new_values, index)
        self.count_layers(last - first, rows.numel(), width)
        if context == "propagate":
            self.flops += (last - first) * exited.numel() * self.kv_flops
        return state

    def count_layers(self, layers: int, tokens: int, width: int) -> None:
        self.flops += layers * tokens * (self.matrix_flops + self.attn_flops * width)

    # ------------------------------------------------------------------ heads

    def confidence(self, hidden: Tensor, measure: str) -> Confidence:
        """The exit's ``ops.exit_confidence`` of ``hidden [..., D]`` (shared norm + head)."""
        self.flops += self.head_flops * hidden[..., 0].numel()
        return head_confidence(hidden, self.head, measure)

    def exit_logits(self, hidden: Tensor) -> Tensor:
        """The exit's logits ``[..., V]`` (``ops.norm_head_logits``; sampling only)."""
        self.flops += self.head_flops * hidden[..., 0].numel()
        head = cast_head(self.head, hidden.dtype)
        return ops.norm_head_logits(
            hidden, head.weight, head.norm_weight, head.norm_bias, norm=head.norm, eps=head.eps
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's own logits of last-layer states ``hidden [..., D]``: float32 ``[..., V]``."""
        self.flops += self.head_flops * hidden[..., 0].numel()
        norm = self.adapter.final_norm(self.model)
        return self.model.get_output_embeddings()(norm(hidden)).float()

    def full_token(self, hidden: Tensor, sampler: Sampler) -> Tensor:
        """The full model's next token after last-layer states ``hidden [R, D]``: ``[R]``."""
        logits = self.logits(hidden)
        if sampler.greedy:
            return logits.argmax(-1)
        return sample(sampler.probs(logits), sampler.generator)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.adapter.embed(self.model, ids, positions)


# ----------------------------------------------------------------------------- modes


def _prefill_positions(real: Tensor) -> Tensor:
    """Positions of the prompt columns: real tokens counted from 0, padding at 0 (as
    ``transformers``' ``generate``)."""
    return (real.long().cumsum(1) - 1).masked_fill(~real, 0)


def _decode_full(dec: Decoder, ids: Tensor, real: Tensor, out: Emitted, sampler: Sampler):
    positions = _prefill_positions(real)
    h = dec.run_layers(dec.embed(ids, positions), 0, dec.num_layers, positions)
    token = dec.full_token(h[:, -1], sampler)
    passes = 1
    while True:
        out.add(token[:, None], torch.ones_like(token))
        if out.done:
            return {"decode_steps": passes}
        positions = dec.open(1)
        h = dec.run_layers(dec.embed(token[:, None], positions), 0, dec.num_layers, positions)
        dec.count += 1
        token = dec.full_token(h[:, -1], sampler)
        passes += 1


def _early_exit_token(
    dec: Decoder, h_exit: Tensor, conf: Confidence, hard: Tensor, final: Tensor, sampler: Sampler
) -> Tensor:
    """The token of each row ``[B]``: the exit's for exited rows (``conf`` of the exit
    states ``h_exit [B, D]``), the full model's after ``final [K, D]`` for the hard ones."""
    rows = hard.nonzero().squeeze(1)
    if sampler.greedy:
        token = conf.prediction.clone()
    else:
        token = sample(sampler.probs(dec.exit_logits(h_exit)), sampler.generator)
    if rows.numel() > 0:
        token[rows] = dec.full_token(final, sampler)
    return token


def _decode_early_exit(
    dec: Decoder,
    ids: Tensor,
    real: Tensor,
    out: Emitted,
    sampler: Sampler,
    threshold: float,
    measure: str,
    context: str,
):
    exit_layer = dec.exit_layer
    positions = _prefill_positions(real)
    h = dec.run_layers(dec.embed(ids, positions), 0, exit_layer, positions)
    conf = dec.confidence(h, measure)
    hard = (conf.confidence < threshold) & real  # left padding always exits
    if context == "routed":
        dec.deep &= hard
    state = dec.run_deep_prompt(h, hard, positions)
    last = Confidence(*(t[:, -1] for t in conf))
    token = _early_exit_token(dec, h[:, -1], last, hard[:, -1], state[hard[:, -1], -1], sampler)
    exits, passes = int((~hard[:, -1]).sum()), 1
    while True:
        out.add(token[:, None], torch.ones_like(token))
        if out.done:
            return {"decode_steps": passes, "exited_tokens": exits}
        positions = dec.open(1)
        h = dec.run_layers(dec.embed(token[:, None], positions), 0, exit_layer, positions)
        conf = dec.confidence(h[:, 0], measure)
        hard = conf.confidence < threshold
        final = dec.run_deep_rows(h, hard, positions, context)[:, 0]
        dec.count += 1
        exits += int((~hard & ~out.finished).sum())
        token = _early_exit_token(dec, h[:, 0], conf, hard, final, sampler)
        passes += 1


def _decode_self_speculative(
    dec: Decoder, ids: Tensor, real: Tensor, out: Emitted, sampler: Sampler, draft_tokens: int
):
    exit_layer = dec.exit_layer
    positions = _prefill_positions(real)
    h = dec.run_layers(dec.embed(ids, positions), 0, dec.num_layers, positions)
    token = dec.full_token(h[:, -1], sampler)
    out.add(token[:, None], torch.ones_like(token))
    rounds = verifications = drafted = kept = 0
    while not out.done:
        positions = dec.open(draft_tokens + 1)
        states, drafts, draft_probs = [], [], []
        # Layers 1..E on the round's input token and each draft (the last one only for the
        # verification): their keys/values stay in the cache, their states are reused.
        for i in range(draft_tokens + 1):
            step = positions[:, i : i + 1]
            states.append(dec.run_layers(dec.embed(token[:, None], step), 0, exit_layer, step))
            if i == draft_tokens:
                break
            if sampler.greedy:
                token = dec.confidence(states[-1][:, 0], "max_prob").prediction
            else:
                draft_probs.append(sampler.probs(dec.exit_logits(states[-1][:, 0])))
                token = sample(draft_probs[-1], sampler.generator)
            drafts.append(token)
        h = dec.run_layers(torch.cat(states, 1), exit_layer, dec.num_layers, positions)
        draft, logits = torch.stack(drafts, 1), dec.logits(h)
        if sampler.greedy:
            accepted, token = greedy_accept(draft, logits.argmax(-1))
        else:
            accepted, token = speculative_accept(
                draft, torch.stack(draft_probs, 1), sampler.probs(logits), sampler.generator
            )
        emitted = torch.cat([draft, token[:, None]], 1)
        emitted = emitted.scatter(1, accepted[:, None], token[:, None])
        active = ~out.finished
        out.add(emitted, accepted + 1)
        # The round's input and its kept drafts are real tokens; the rejected drafts are holes.
        round_cols = torch.arange(draft_tokens + 1, device=accepted.device)
        rejected = round_cols > accepted[:, None]
        dec.keys[:, -(draft_tokens + 1) :] &= ~rejected
        dec.deep[:, -(draft_tokens + 1) :] &= ~rejected
        dec.count += accepted + 1
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


def full_decode_flops(dec: Decoder, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Analytic FLOPs of ``mode="full"`` generating ``new_tokens`` per row after prompts of
    ``prompt_len`` columns, counted as ``Decoder`` counts."""
    layer = dec.matrix_flops
    flops = dec.num_layers * batch * prompt_len * (layer + dec.attn_flops * prompt_len)
    for step in range(1, new_tokens):
        flops += dec.num_layers * batch * (layer + dec.attn_flops * (prompt_len + step))
    return flops + new_tokens * batch * dec.head_flops


# ----------------------------------------------------------------------------- entry point


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    mode: str = "self-speculative",
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
) -> GenerationOutput:
    """Continue the prompts ``input_ids`` int64 ``[B, T]`` of a Hugging Face causal LM by
    ``max_new_tokens`` tokens each (see the module docstring).

    ``mode``: ``"self-speculative"`` (``exit_layer`` in ``1..L-1``, ``draft_tokens >= 1``),
    ``"early-exit"`` (``exit_layer`` and ``threshold``; ``measure``, ``context``
    ``"propagate"``/``"routed"``) or ``"full"``. ``temperature = 0`` is greedy, else
    sampling with ``top_k``/``top_p`` from ``generator``. ``eos_id``: a row that emits
    it stops and is padded with it. ``attention_mask`` ``[B, T]``: 1 at real tokens,
    left padding. Returns ``lego.generation.GenerationOutput(tokens [B, T + N],
    new_tokens [B, N], stats)``. No gradient; dropout follows ``model.training``.
    """
    adapter = find_adapter(model)
    config = model.config
    if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.int64:
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int64 [batch, seq_len] tensor, got {got}")
    real = check_mask(input_ids, attention_mask)
    ids = input_ids.masked_fill(~real, 0)  # any id may sit under the padding
    if bool(((ids < 0) | (ids >= config.vocab_size)).any()):
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary)")
    batch, prompt_len = ids.shape
    num_layers = len(adapter.layers(model))
    ops.check_choice("mode", mode, MODES)
    check_int("max_new_tokens", max_new_tokens, 1, None, ">= 1")
    check_int("draft_tokens", draft_tokens, 1, None, ">= 1")  # before it counts below
    spare = draft_tokens if mode == "self-speculative" else 0  # a round's drafts past the end
    limit = config.max_position_embeddings
    if prompt_len + max_new_tokens + spare > limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} (+ {spare} drafts) "
            f"exceeds the model's {limit} positions; lower max_new_tokens"
        )
    check_decoding(
        mode,
        num_layers,
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
    if getattr(config, "add_cross_attention", False):
        raise ValueError("generate does not run models with cross-attention (add_cross_attention)")
    if mode == "self-speculative":
        _check_sliding_window(config, prompt_len + max_new_tokens * (draft_tokens + 1))

    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    dec = Decoder(model, adapter, real, exit_layer)
    out = Emitted(batch, max_new_tokens, eos_id, ids.device)
    sampler = Sampler(float(temperature), top_k, top_p, generator)
    if mode == "full":
        info = _decode_full(dec, ids, real, out, sampler)
    elif mode == "early-exit":
        info = _decode_early_exit(dec, ids, real, out, sampler, float(threshold), measure, context)
    else:
        info = _decode_self_speculative(dec, ids, real, out, sampler, draft_tokens)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    stats = GenerationStats(
        mode=mode,
        batch_size=batch,
        prompt_len=prompt_len,
        new_tokens=int(out.count.sum()),
        wall_time_s=time.perf_counter() - start,
        flops=dec.flops,
        full_flops=full_decode_flops(dec, batch, prompt_len, int(out.count.max())),
        **info,
    )
    return GenerationOutput(torch.cat([input_ids, out.tokens], 1), out.tokens, stats)


def _check_sliding_window(config: object, columns: int) -> None:
    """Self-speculation keeps rejected drafts as masked cache columns, which a sliding
    window would count: refuse a run that could outgrow the window."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    sliding = window is not None and (not types or "sliding_attention" in types)
    if sliding and columns >= window:
        raise ValueError(
            f"self-speculative decoding could fill {columns} cache columns, beyond the "
            f"sliding window of {window}; lower max_new_tokens or draft_tokens"
        )
