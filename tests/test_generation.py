"""``lego.generation``: KV-cached decoding against re-running the model on the whole prefix.

References: ``naive_greedy`` re-runs ``LegoModel.forward`` on each row's prefix (no
padding, no cache) every step; teacher-forced ``LegoModel.early_exit`` on the generated
sequence; the full model's exact next-token distributions (from ``forward``) for
sampling. Greedy comparisons run in float64, so no near-tie decides a test; everything
runs on the torch backend except ``test_decoding_under_triton_interpreter`` and the CUDA
test (skipped without a GPU).

Early-exit decoding with a ``capacity`` (hard rows per decode step): the decode step
makes no host synchronization (``SyncCounter``); with a capacity of at least the batch it
equals decoding without one and teacher-forced ``early_exit(..., capacity=...)`` (which
then has room for every hard token: that is where the two are comparable, as
``early_exit`` caps the hard tokens of the whole sequence, decoding those of each step);
with a smaller one it equals teacher-forced two-stage inference
(``LegoModel.run_layers_routed``) on the hard set that the per-step capacity leaves, and
an overflowing row emits the exit's token; on CUDA a captured and replayed step equals
the eager one.
"""

import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lego.model
from lego import LegoModel, ModelConfig
from lego.generation import (
    Decoder,
    Routing,
    Sampler,
    check_mask,
    early_exit_prefill,
    early_exit_step,
    full_decode_flops,
    generate,
)
from lego_kernels import ops
from lego_kernels.compile_safety import SyncCounter

V, D, HEADS, LAYERS = 41, 32, 4, 4
NEW = 9


@pytest.fixture(autouse=True)
def torch_backend():
    with ops.use_backend("torch"):
        yield


def peaked_model(vocab: int = V, dim: int = D, seed: int = 0) -> LegoModel:
    """A random model with unit-scale logits (the default init gives nearly uniform ones),
    so that exits and layers disagree and greedy has no near-ties; float64."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab, dim=dim, num_layers=LAYERS, num_heads=HEADS, max_seq_len=24
    )
    model = LegoModel(config)
    for name, p in model.named_parameters():
        if name.startswith("embedding"):
            torch.nn.init.normal_(p)
        elif p.dim() == 2:
            torch.nn.init.normal_(p, std=2 * dim**-0.5)
    return model.double().eval()


def ragged_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7, 4 and 6 tokens, left-padded with junk ids: ``ids``, ``mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :1] = False
    return ids.masked_fill(~mask, V - 1), mask


def rows(tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens (prompt without padding, then what follows)."""
    full = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - mask.shape[1])], 1)
    return [tokens[b][full[b]] for b in range(tokens.shape[0])]


def naive_greedy(model: LegoModel, prompt: torch.Tensor, n: int, exit_layer=None) -> list[int]:
    seq = prompt.clone()
    for _ in range(n):
        nxt = model(seq[None], exit_layer=exit_layer)[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
    return seq[prompt.numel() :].tolist()


@pytest.fixture(scope="module")
def model() -> LegoModel:
    return peaked_model()


# ----------------------------------------------------------------------------- greedy


def test_full_equals_naive_greedy_on_ragged_prompts(model):
    ids, mask = ragged_batch()
    out = model.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    assert out.new_tokens.shape == (3, NEW) and out.tokens.shape == (3, 7 + NEW)
    assert torch.equal(out.tokens[:, :7], ids)  # the prompts as given, padding included
    want = [naive_greedy(model, prompt, NEW) for prompt in rows(ids, mask)]
    assert out.new_tokens.tolist() == want
    stats = out.stats
    assert (stats.new_tokens, stats.decode_steps, stats.batch_size) == (3 * NEW, NEW, 3)
    assert stats.flops == stats.full_flops == full_decode_flops(model, 3, 7, NEW)
    assert stats.wall_time_s > 0 and stats.tokens_per_s > 0
    assert stats.exit_ratio is None and stats.acceptance_rate is None


def eos_that_ends_rows_apart(model: LegoModel, ids, mask, **kwargs) -> int:
    """A token that ends the rows of greedy decoding (``mode="full"`` unless ``kwargs``
    say otherwise) at different steps."""
    out = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, **kwargs).new_tokens
    for token in out[0, 2:].tolist():
        ends = [row.index(token) if token in row else NEW for row in out.tolist()]
        if len(set(ends)) > 1:
            return token
    raise AssertionError("no token ends the rows at different steps; change the seed")


@pytest.mark.parametrize(("exit_layer", "draft_tokens"), [(1, 1), (2, 3), (3, 2), (2, 6)])
def test_self_speculative_greedy_equals_full(model, exit_layer, draft_tokens):
    ids, mask = ragged_batch()
    eos = eos_that_ends_rows_apart(model, ids, mask)
    full = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_id=eos)
    spec = model.generate(
        ids,
        max_new_tokens=NEW,
        attention_mask=mask,
        eos_id=eos,
        mode="self-speculative",
        exit_layer=exit_layer,
        draft_tokens=draft_tokens,
    )
    assert torch.equal(spec.new_tokens, full.new_tokens)
    ends = [row.index(eos) if eos in row else NEW for row in full.new_tokens.tolist()]
    for row, end in zip(full.new_tokens.tolist(), ends, strict=True):
        assert row[end:] == [eos] * (NEW - end)  # finished rows are padded with eos
    stats = spec.stats
    assert stats.new_tokens == full.stats.new_tokens == sum(min(e + 1, NEW) for e in ends)
    assert 0 <= stats.acceptance_rate <= 1
    assert stats.tokens_per_verification == pytest.approx(1 + draft_tokens * stats.acceptance_rate)
    assert stats.decode_steps <= full.stats.decode_steps  # one per round, rounds gain >= 1
    assert stats.full_flops == full.stats.flops


def test_early_exit_threshold_extremes(model):
    ids, mask = ragged_batch()
    kwargs = {"max_new_tokens": NEW, "attention_mask": mask, "mode": "early-exit"}
    everyone = model.generate(ids, exit_layer=2, threshold=0.0, **kwargs)
    want = [naive_greedy(model, prompt, NEW, exit_layer=2) for prompt in rows(ids, mask)]
    assert everyone.new_tokens.tolist() == want and everyone.stats.exit_ratio == 1.0
    for context in ("propagate", "routed"):
        nobody = model.generate(ids, exit_layer=2, threshold=1.5, context=context, **kwargs)
        full = model.generate(ids, max_new_tokens=NEW, attention_mask=mask)
        assert torch.equal(nobody.new_tokens, full.new_tokens)
        assert nobody.stats.exit_ratio == 0.0
    assert everyone.stats.flops < everyone.stats.full_flops


def median_threshold(model: LegoModel, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Midway between the two middle exit-layer confidences (layer 2) of teacher-forced
    ``early_exit`` on ``tokens`` (prompts ``mask``, then continuations): about half of
    them exit."""
    seqs = rows(tokens, mask)
    scored = [model.early_exit(s[None], exit_layer=2, threshold=2.0).confidence for s in seqs]
    conf = torch.cat([c.flatten() for c in scored]).sort().values
    return (conf[conf.numel() // 2 - 1] + conf[conf.numel() // 2]).item() / 2


@pytest.mark.parametrize("batch", ["ragged", "rows alone"])
@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_early_exit_decoding_equals_teacher_forced_early_exit(model, context, batch):
    """The consistency rule: the emitted tokens are teacher-forced ``early_exit``'s
    predictions on the generated sequence, row by row (prompt tokens routed too). A row
    decoded alone has steps with no hard token at all, whose deeper keys/values
    (``"propagate"``) later hard tokens still attend to."""
    ids, mask = ragged_batch()
    full = model.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    threshold = median_threshold(model, full.tokens, mask)
    kwargs = {"mode": "early-exit", "exit_layer": 2, "threshold": threshold, "context": context}
    if batch == "ragged":
        out = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, **kwargs)
        assert 0.2 < out.stats.exit_ratio < 0.8
        assert not torch.equal(out.new_tokens, full.new_tokens)  # the exit changed some tokens
        tokens = out.tokens
    else:
        alone = [
            model.generate(
                ids[b : b + 1], max_new_tokens=NEW, attention_mask=mask[b : b + 1], **kwargs
            )
            for b in range(3)
        ]
        tokens = torch.cat([out.tokens for out in alone])
    for b, seq in enumerate(rows(tokens, mask)):
        prompt_len = int(mask[b].sum())
        teacher = model.early_exit(seq[None], exit_layer=2, threshold=threshold, context=context)
        generated = tokens[b, mask.shape[1] :]
        assert teacher.prediction[0, prompt_len - 1 : -1].tolist() == generated.tolist()


def test_generation_flops_match_flop_counter(model, monkeypatch):
    """Each mode's analytic count equals FlopCounterMode's matmuls (norms aside, as in
    ``test_model``), SDPA on its math path."""
    monkeypatch.setattr(lego.model, "NORM_FLOPS_PER_ELEMENT", 0)
    ids, mask = ragged_batch()
    early = {"mode": "early-exit", "threshold": 0.3}
    settings = [
        {"mode": "full"},
        {**early, "exit_layer": 2, "context": "propagate"},
        {**early, "exit_layer": 1, "context": "routed"},
        {**early, "exit_layer": 2, "capacity": 1},
        {**early, "exit_layer": 1, "context": "routed", "capacity": 2},
        {"mode": "self-speculative", "exit_layer": 2, "draft_tokens": 3},
        {"mode": "self-speculative", "exit_layer": 2, "temperature": 1.0},
    ]
    cases = [(ids, mask, kwargs) for kwargs in settings]
    cases.append((ids[:1], mask[:1], {**early, "exit_layer": 2}))  # passes with no hard token
    for prompts, prompt_mask, kwargs in cases:
        gen = torch.Generator().manual_seed(0)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model.generate(
                prompts, max_new_tokens=NEW, attention_mask=prompt_mask, generator=gen, **kwargs
            )
        assert counter.get_total_flops() == out.stats.flops, kwargs


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "full"},
        {"mode": "early-exit", "exit_layer": 2, "threshold": 0.4},
        {"mode": "self-speculative", "exit_layer": 2},
    ],
)
def test_sampling_is_reproducible_with_a_generator(model, kwargs):
    ids, mask = ragged_batch()

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(
            ids,
            max_new_tokens=NEW,
            attention_mask=mask,
            temperature=1.5,
            top_k=20,
            top_p=0.95,
            generator=gen,
            **kwargs,
        ).new_tokens

    first = draw(0)
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


@torch.no_grad()
def exact_marginals(model: LegoModel, prompt: torch.Tensor, steps: int, exit_layer=None):
    """Exact distribution of each of the first ``steps`` sampled tokens (temperature 1),
    by enumerating every prefix: a list of float64 ``[V]``."""
    vocab = model.config.vocab_size
    prefixes, weights = prompt[None], torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        probs = model(prefixes, exit_layer=exit_layer)[:, -1].double().softmax(-1)
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        prefixes = torch.cat(
            [
                prefixes.repeat_interleave(vocab, 0),
                torch.arange(vocab).repeat(len(prefixes))[:, None],
            ],
            1,
        )
        weights = joint.flatten()
    return marginals


def test_self_speculative_sampling_follows_the_full_model():
    """Tiny vocabulary: 6,000 rows sample 3 tokens; tokens 2 and 3 come from the first
    speculative round (token 1 from the prefill). Their frequencies match the full
    model's exact marginals, which differ clearly from the draft exit's."""
    vocab, num_rows = 5, 6000
    model = peaked_model(vocab=vocab, dim=16, seed=0).float()
    prompt = torch.tensor([1, 3, 0])
    full = exact_marginals(model, prompt, 3)
    draft = exact_marginals(model, prompt, 3, exit_layer=1)
    out = model.generate(
        prompt.expand(num_rows, 3),
        max_new_tokens=3,
        mode="self-speculative",
        exit_layer=1,
        draft_tokens=2,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert 0.1 < out.stats.acceptance_rate < 0.9
    for step in (1, 2):
        freq = torch.bincount(out.new_tokens[:, step], minlength=vocab).double() / num_rows
        assert 0.5 * (draft[step] - full[step]).abs().sum() > 0.3  # the test can fail
        assert 0.5 * (freq - full[step]).abs().sum() < 0.03


# ----------------------------------------------------------------------------- bad input


EARLY = {"mode": "early-exit", "exit_layer": 2, "threshold": 0.5}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": 18}, "max_new_tokens"),  # 7 + 18 > max_seq_len 24
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"mode": "fast"}, "mode"),
        ({"mode": "early-exit", "exit_layer": 0, "threshold": 0.5}, "exit_layer"),
        ({"mode": "early-exit", "exit_layer": LAYERS, "threshold": 0.5}, "exit_layer"),
        ({"mode": "self-speculative"}, "exit_layer"),
        ({"mode": "full", "exit_layer": 2}, "exit_layer"),
        ({"mode": "early-exit", "exit_layer": 2}, "threshold"),
        ({"mode": "early-exit", "exit_layer": 2, "threshold": float("nan")}, "threshold"),
        ({"mode": "self-speculative", "exit_layer": 2, "threshold": 0.5}, "threshold"),
        ({"mode": "self-speculative", "exit_layer": 2, "draft_tokens": 0}, "draft_tokens"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.2}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"eos_id": V}, "eos_id"),
        ({"context": "dense"}, "context"),
        ({"measure": "max"}, "measure"),
        ({"generator": 0}, "generator"),
        ({"attention_mask": torch.ones(3, 6, dtype=torch.bool)}, "attention_mask"),
        ({"attention_mask": torch.tensor([[1] * 7, [0] * 7, [1] * 7])}, "attention_mask"),
        ({"attention_mask": torch.tensor([[1] * 7, [1, 0] + [1] * 5, [1] * 7])}, "left padding"),
        ({"attention_mask": torch.full((3, 7), 0.5)}, "attention_mask"),
        ({**EARLY, "capacity": 0}, "capacity"),
        ({**EARLY, "capacity": -2}, "capacity"),
        ({**EARLY, "capacity": 1.5}, "capacity"),
        ({**EARLY, "capacity": True}, "capacity"),
        ({**EARLY, "capacity": "2"}, "capacity"),
        ({"capacity": 2}, "capacity"),
        ({"mode": "self-speculative", "exit_layer": 2, "capacity": 2}, "capacity"),
    ],
)
def test_bad_input_names_the_argument(model, kwargs, name):
    ids, _ = ragged_batch()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        model.generate(ids, **kwargs)


def test_bad_ids(model):
    with pytest.raises(TypeError, match="ids"):
        generate(model, torch.zeros(2, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="ids"):
        model.generate(torch.full((1, 3), V), max_new_tokens=2)
    with pytest.raises(TypeError, match="ids"):
        model.generate([[1, 2]], max_new_tokens=2)


# ----------------------------------------------------------------------------- interpreter


def test_decoding_under_triton_interpreter():
    """Early-exit and self-speculative decoding on the Triton kernels (interpreter:
    confidence, routing) give the torch backend's tokens."""
    model = peaked_model(vocab=13, dim=16, seed=2).float()
    ids = torch.randint(0, 13, (2, 3))
    settings = [
        {"mode": "early-exit", "exit_layer": 2, "threshold": 0.6},
        {"mode": "self-speculative", "exit_layer": 2, "draft_tokens": 2},
    ]
    for kwargs in settings:
        want = model.generate(ids, max_new_tokens=4, **kwargs)
        with ops.use_backend("auto"):
            assert ops.backend(model.embedding.weight) == "triton-interpreter"
            got = model.generate(ids, max_new_tokens=4, **kwargs)
        assert torch.equal(got.new_tokens, want.new_tokens), kwargs
    assert want.stats.acceptance_rate > 0


def test_one_new_token_is_the_prefill_alone(model):
    ids, mask = ragged_batch()
    full = model.generate(ids, max_new_tokens=1, attention_mask=mask)
    spec = model.generate(
        ids, max_new_tokens=1, attention_mask=mask, mode="self-speculative", exit_layer=2
    )
    assert torch.equal(spec.new_tokens, full.new_tokens) and spec.stats.decode_steps == 1
    assert spec.stats.acceptance_rate is None and spec.stats.flops == full.stats.flops


# ----------------------------------------------------------------------------- capacity

GREEDY = Sampler(0.0, None, None, None)
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(scope="module")
def threshold(model) -> float:
    """About half of the ragged batch's tokens exit at layer 2 (full-depth continuations)."""
    ids, mask = ragged_batch()
    return median_threshold(
        model, model.generate(ids, max_new_tokens=NEW, attention_mask=mask).tokens, mask
    )


def prefilled(model, ids, mask, routing, sampler=GREEDY) -> tuple[Decoder, torch.Tensor]:
    """A decoder whose cache holds the prompts (``early_exit_prefill``, as ``generate``
    starts), and each row's first new token."""
    real = check_mask(ids, mask)
    dec = Decoder(model, (~real).sum(1), ids.shape[1] + NEW)
    return dec, early_exit_prefill(dec, ids.masked_fill(~real, 0), real, sampler, routing).token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_decode_step_with_a_capacity_makes_no_host_synchronization(
    model, threshold, context, temperature
):
    ids, mask = ragged_batch()
    sampler = Sampler(temperature, 20, 0.9, torch.Generator().manual_seed(0))
    routing = Routing(2, threshold, "max_prob", context, capacity=2)
    dec, token = prefilled(model, ids, mask, routing, sampler)
    for _ in range(3):
        with SyncCounter() as syncs:
            token = early_exit_step(dec, token, sampler, routing).token
        assert syncs.scalar_reads == 0 and syncs.dynamic_shapes == 0, syncs.ops
    with SyncCounter() as syncs:  # without: the attended width, the layout's, route's nonzero
        early_exit_step(dec, token, sampler, routing._replace(capacity=None))
    assert syncs.scalar_reads == 2 and syncs.ops["aten.nonzero.default"] >= 1


def test_early_exit_loop_reads_the_device_only_to_stop_at_eos(model, threshold):
    """With a capacity, the host reads of a ``generate`` call do not grow with the number
    of steps (the prompt's routing and the statistics only), and with ``eos_id`` by one
    per step (``out.done``)."""
    ids, mask = ragged_batch()
    kwargs = {"attention_mask": mask, "mode": "early-exit", "exit_layer": 2, "capacity": 1}

    def reads(max_new_tokens: int, **more: object) -> int:
        with SyncCounter() as syncs:
            model.generate(
                ids, max_new_tokens=max_new_tokens, threshold=threshold, **kwargs, **more
            )
        return syncs.total

    assert reads(3) == reads(NEW)
    emitted = model.generate(ids, max_new_tokens=NEW, threshold=threshold, **kwargs).new_tokens
    eos = next(t for t in range(V) if t not in emitted)  # never emitted: every row runs NEW steps
    assert reads(NEW, eos_id=eos) - reads(3, eos_id=eos) == NEW - 3


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_a_capacity_of_the_batch_changes_nothing(model, threshold, context):
    """Capacity >= batch: the tokens of decoding without one (greedy, rows ending at
    different steps; sampled with one generator), and teacher-forced
    ``early_exit(..., capacity=...)``'s predictions with room for every token."""
    ids, mask = ragged_batch()
    kwargs = {"mode": "early-exit", "exit_layer": 2, "context": context, "threshold": threshold}
    eos = eos_that_ends_rows_apart(model, ids, mask, **kwargs)
    kwargs |= {"attention_mask": mask, "max_new_tokens": NEW}
    free = model.generate(ids, eos_id=eos, **kwargs)
    assert 0.2 < free.stats.exit_ratio < 0.8 and free.stats.overflow_tokens is None
    for capacity in (3, 8):
        capped = model.generate(ids, eos_id=eos, capacity=capacity, **kwargs)
        assert torch.equal(capped.new_tokens, free.new_tokens)
        assert capped.stats.overflow_tokens == 0
        assert capped.stats.exited_tokens == free.stats.exited_tokens
    for b, seq in enumerate(rows(capped.tokens, mask)):
        new = capped.new_tokens[b].tolist()
        prompt_len, count = int(mask[b].sum()), new.index(eos) + 1 if eos in new else NEW
        teacher = model.early_exit(
            seq[None], exit_layer=2, threshold=threshold, context=context, capacity=seq.numel()
        )
        assert torch.equal(teacher.stats.overflow, torch.tensor(0))
        got = teacher.prediction[0, prompt_len - 1 : prompt_len - 1 + count]
        assert torch.equal(got, capped.new_tokens[b, :count])
    draws = [
        model.generate(
            ids, temperature=1.0, generator=torch.Generator().manual_seed(0), capacity=c, **kwargs
        ).new_tokens
        for c in (None, 3)
    ]
    assert torch.equal(*draws)


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_rows_past_the_capacity_exit(model, context):
    """One step where every row is hard (threshold above 1), capacity 1: row 0 runs the
    deeper layers (the token of a step without a capacity), rows 1 and 2 emit the exit's
    token (that of a step where everyone exits) and their deeper keys/values are an exited
    token's: from the exit-layer state (propagate) or none (routed)."""
    ids, mask = ragged_batch()
    hard = Routing(2, 1.5, "max_prob", context)
    (capped, token), (deep, _), (exited, _) = (prefilled(model, ids, mask, hard) for _ in range(3))
    got = early_exit_step(capped, token, GREEDY, hard._replace(capacity=1))
    want_deep = early_exit_step(deep, token, GREEDY, hard)
    want_exit = early_exit_step(exited, token, GREEDY, hard._replace(threshold=0.0))
    assert got.overflow.tolist() == got.exited.tolist() == [False, True, True]
    assert got.token[0] == want_deep.token[0] and torch.equal(got.token[1:], want_exit.token[1:])
    assert not torch.equal(want_deep.token, want_exit.token)  # the test can fail
    exited_rows = torch.tensor([1, 2])
    cols = capped.cache.length[exited_rows] - 1  # the column the step wrote
    for layer in range(2, LAYERS):  # the layers after the exit (0-based)
        for store in ("keys", "values"):
            got, want = (
                getattr(dec.cache, store)[layer][exited_rows, cols] for dec in (capped, exited)
            )
            assert torch.equal(got, want)
            assert (context == "routed") == (not got.any())  # routed: none (zeros)
    if context == "routed":
        assert not capped.cache.deep[exited_rows, cols].any()


def capped_teacher_forced(model, tokens, mask, threshold, context, capacity):
    """Teacher-forced two-stage inference on ``tokens [B, T + N]`` (prompts ``mask``, then
    what decoding generated) with the hard set that decoding with ``capacity`` leaves: the
    prompt tokens below the threshold (the prefill has no capacity), then at each decode
    step (the generated columns but the last, one per step) the first ``capacity`` hard
    rows in row order. Per row ``run_layers_routed`` (checked against running every layer
    on all tokens in ``test_model``) and the exit's prediction for the other tokens.
    Returns the predictions after each row's prompt ``[B, N]`` and how many hard generated
    tokens the capacity made exit."""
    seqs, prompt = rows(tokens, mask), mask.shape[1]
    real = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - prompt)], 1)
    states = [model.run_layers(model.embed(seq[None]), 1, 2) for seq in seqs]
    confidence = torch.full(tokens.shape, math.inf, dtype=torch.float64)
    for b, h in enumerate(states):
        confidence[b, real[b]] = model.exit_confidence(h, exit_layer=2).confidence[0]
    hard = confidence < threshold
    stepped = hard[:, prompt:-1].clone()
    kept = stepped & (stepped.long().cumsum(0) <= capacity)
    hard[:, prompt:-1] = kept
    predictions = []
    for b, h in enumerate(states):
        row_hard = hard[b, real[b]][None]
        deep = model.run_layers_routed(h, row_hard, 3, LAYERS, context=context)
        exit_prediction = model.exit_confidence(h, exit_layer=2).prediction
        prediction = torch.where(row_hard, model.exit_confidence(deep).prediction, exit_prediction)
        predictions.append(prediction[0, int(mask[b].sum()) - 1 : -1])
    return torch.stack(predictions), int((stepped & ~kept).sum())


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_decoding_with_a_small_capacity_equals_teacher_forced_capped_routing(
    model, threshold, context
):
    ids, mask = ragged_batch()
    kwargs = {"attention_mask": mask, "mode": "early-exit", "exit_layer": 2, "context": context}
    kwargs |= {"max_new_tokens": NEW, "threshold": threshold}
    capped = model.generate(ids, capacity=1, **kwargs)
    want, overflow = capped_teacher_forced(model, capped.tokens, mask, threshold, context, 1)
    assert torch.equal(capped.new_tokens, want)
    assert capped.stats.overflow_tokens == overflow > 0
    assert capped.stats.exited_tokens > overflow
    assert not torch.equal(capped.new_tokens, model.generate(ids, **kwargs).new_tokens)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and LEGO_TEST_CUDA=1 (interpreter off)")
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_decode_step_with_a_capacity_in_a_cuda_graph(context, backend):
    """Capture one decode step (greedy, capacity 1 of 3 rows), replay it step after step
    feeding its own token back: tokens, exits, overflows and the cache equal eager steps
    from the same prefill (float32)."""
    model = peaked_model().float().cuda()
    ids, mask = (t.cuda() for t in ragged_batch())
    routing = Routing(2, 0.3, "max_prob", context, capacity=1)
    with ops.use_backend(backend):
        (eager, token), (replayed, _), (scratch, _) = (
            prefilled(model, ids, mask, routing) for _ in range(3)
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
            for _ in range(2):
                early_exit_step(scratch, token, GREEDY, routing)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing CUDA call raises
        try:
            early_exit_step(scratch, token, GREEDY, routing)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static = token.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = early_exit_step(replayed, static, GREEDY, routing)
        overflows = 0
        for _ in range(NEW - 1):
            want = early_exit_step(eager, token, GREEDY, routing)
            graph.replay()
            for got, ref in zip(captured, want, strict=True):
                assert torch.equal(got, ref)
            overflows += int(want.overflow.sum())
            token = want.token
            static.copy_(captured.token)
        torch.cuda.synchronize()
        assert overflows > 0  # the capacity mattered
        assert torch.equal(replayed.cache.length, eager.cache.length)
        assert torch.equal(replayed.cache.deep, eager.cache.deep)
        stores = [dec.cache.keys + dec.cache.values for dec in (replayed, eager)]
        for got, ref in zip(*stores, strict=True):
            assert (got - ref).double().norm() <= 1e-5 * ref.double().norm()
