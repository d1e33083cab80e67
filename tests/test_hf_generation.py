"""``lego.hf.generation``: decoding Hugging Face models with their own cache.

References: ``model.generate(do_sample=False)`` (``mode="full"``, greedy
self-speculative, early exit that no token takes), the same ``generate`` on the model
cut after the exit layer (early exit that every token takes), teacher-forced early exit
built here with hooks on the model's own forward (every deeper layer on every token,
exited tokens frozen at their exit state, their keys masked for ``"routed"``), and the
exact joint distribution of two sampled tokens (self-speculative sampling). Tiny random
models from ``tests/hf_models.py``, torch backend of the ops, one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import FAMILIES, one_thread_torch_backend, tiny_model  # noqa: E402, F401

from lego.hf import apply_lego, generate  # noqa: E402
from lego_kernels import ops  # noqa: E402


def prompts(rows: int = 3, length: int = 7, vocab: int = 300, seed: int = 2):
    """Left-padded prompts ``(input_ids, attention_mask)`` of lengths 7, 5, 3."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, : 2 * row] = 0
    return ids, mask


def hf_greedy(model, ids, mask, new: int, eos: int | None = None) -> torch.Tensor:
    """``model.generate`` greedy; rows padded with ``eos`` after it (to ``T + new`` columns)."""
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0 if eos is None else eos,
    )
    return torch.nn.functional.pad(out, (0, ids.shape[1] + new - out.shape[1]), value=eos or 0)


# ----------------------------------------------------------------------------- greedy = HF


@pytest.mark.parametrize("family", FAMILIES)
def test_full_and_self_speculative_greedy_equal_model_generate(family: str) -> None:
    model = tiny_model(family).eval()
    ids, mask = prompts()
    ref = hf_greedy(model, ids, mask, 10)
    full = generate(model, ids, attention_mask=mask, max_new_tokens=10, mode="full")
    assert torch.equal(full.tokens, ref)
    assert full.stats.flops == full.stats.full_flops  # the same count, two ways
    for exit_layer, draft_tokens in ((1, 1), (2, 3), (3, 5)):
        out = generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=10,
            mode="self-speculative",
            exit_layer=exit_layer,
            draft_tokens=draft_tokens,
        )
        assert torch.equal(out.tokens, ref), (exit_layer, draft_tokens)
        assert torch.equal(out.new_tokens, ref[:, ids.shape[1] :])
        assert 0 <= out.stats.acceptance_rate <= 1 and out.stats.new_tokens == 30


def test_self_speculative_rows_that_finish_at_different_steps() -> None:
    model = tiny_model("llama").eval()
    ids, mask = prompts()
    free = hf_greedy(model, ids, mask, 12)[:, ids.shape[1] :]
    eos = int(free[0, 4])  # row 0 stops at its 5th token; the others at theirs, if any
    ref = hf_greedy(model, ids, mask, 12, eos=eos)
    out = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        mode="self-speculative",
        exit_layer=2,
        draft_tokens=3,
        eos_id=eos,
    )
    assert torch.equal(out.tokens, ref)
    assert out.stats.new_tokens < 36 and (out.new_tokens[0, 5:] == eos).all()


def test_generate_on_a_patched_model_and_model_generate_after_patching() -> None:
    model = tiny_model("qwen2").eval()
    ids, mask = prompts()
    ref = hf_greedy(model, ids, mask, 6)
    apply_lego(model, exit_layers=(2,))
    assert torch.equal(hf_greedy(model, ids, mask, 6), ref)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, exit_layer=2)
    assert torch.equal(out.tokens, ref)


# ----------------------------------------------------------------------------- early exit


def layers_of(model) -> torch.nn.ModuleList:
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def teacher_forced_early_exit(model, seq, real, exit_layer: int, threshold: float, context: str):
    """Predictions of early exit on whole sequences ``seq [B, S]`` (left padding ``~real``):
    exited tokens (exit confidence >= threshold) predict with the exit; every deeper layer
    runs on every token, but exited tokens keep their exit state (and, ``"routed"``, give
    no keys to the deeper layers). Positions count real tokens, as in ``generate``."""
    positions = (real.long().cumsum(1) - 1).masked_fill(~real, 0)
    layers = layers_of(model)
    state = {}
    capture = layers[exit_layer].register_forward_pre_hook(
        lambda _m, args: state.setdefault("exit", args[0])
    )
    model(seq, attention_mask=real.long(), position_ids=positions)
    capture.remove()
    head = model.lm_head.weight
    norm = model.base_model.norm if hasattr(model.base_model, "norm") else model.base_model.ln_f
    conf = ops.exit_confidence(
        state["exit"],
        head,
        norm.weight,
        getattr(norm, "bias", None),
        norm="layer" if isinstance(norm, torch.nn.LayerNorm) else "rms",
        eps=norm.eps if isinstance(norm, torch.nn.LayerNorm) else norm.variance_epsilon,
    )
    hard = (conf.confidence < threshold) & real
    frozen = state["exit"]
    length = seq.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    routed_mask = (causal & (real & hard)[:, None, :])[:, None]  # [B, 1, S, S]

    def freeze(_module, _args, out):
        return torch.where(hard[..., None], out, frozen)

    def mask_keys(_module, args, kwargs):
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = routed_mask
            return args, kwargs
        return (args[0], args[1], routed_mask, *args[3:]), kwargs  # GPT-2 block

    handles = [layer.register_forward_hook(freeze) for layer in layers[exit_layer:]]
    if context == "routed":
        handles += [
            layer.register_forward_pre_hook(mask_keys, with_kwargs=True)
            for layer in layers[exit_layer:]
        ]
    logits = model(seq, attention_mask=real.long(), position_ids=positions).logits
    for handle in handles:
        handle.remove()
    return torch.where(hard, logits.argmax(-1), conf.prediction), hard


@torch.no_grad()
def median_threshold(model, ids, mask, exit_layer: int) -> float:
    """A threshold half-way between two exit confidences near the prompts' median."""
    real = mask.bool()
    layers = layers_of(model)
    state = {}
    handle = layers[exit_layer].register_forward_pre_hook(
        lambda _m, args: state.setdefault("exit", args[0])
    )
    model(ids, attention_mask=mask)
    handle.remove()
    logits = model.lm_head(
        (model.base_model.norm if hasattr(model.base_model, "norm") else model.base_model.ln_f)(
            state["exit"]
        )
    )
    values = torch.softmax(logits.double(), -1).amax(-1)[real].sort().values
    middle = len(values) // 2
    return float(values[middle - 1] + values[middle]) / 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_early_exit_decoding_equals_teacher_forced_early_exit(family: str, context: str) -> None:
    model = tiny_model(family).eval()
    ids, mask = prompts()
    threshold = median_threshold(model, ids, mask, 2)
    out = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        mode="early-exit",
        exit_layer=2,
        threshold=threshold,
        context=context,
    )
    real = torch.cat([mask.bool(), torch.ones_like(out.new_tokens, dtype=torch.bool)], 1)
    with torch.no_grad():
        preds, hard = teacher_forced_early_exit(model, out.tokens, real, 2, threshold, context)
    prompt_len = ids.shape[1]
    assert torch.equal(out.new_tokens, preds[:, prompt_len - 1 : -1])
    exited = ~hard[:, prompt_len - 1 : -1]
    assert 0 < exited.float().mean() < 1  # both kinds of rows were decoded
    assert out.stats.exit_ratio == pytest.approx(exited.float().mean().item())


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_early_exit_thresholds_zero_and_above_one(context: str) -> None:
    model = tiny_model("mistral").eval()
    ids, mask = prompts()
    full = hf_greedy(model, ids, mask, 6)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "mode": "early-exit", "exit_layer": 2}
    none_exit = generate(model, ids, threshold=1.5, context=context, **kwargs)
    assert torch.equal(none_exit.tokens, full) and none_exit.stats.exit_ratio == 0
    cut = copy.deepcopy(model)  # the model cut after layer 2: what "every token exits" decodes
    cut.model.layers = cut.model.layers[:2]
    cut.config.num_hidden_layers = 2
    all_exit = generate(model, ids, threshold=0.0, context=context, **kwargs)
    assert torch.equal(all_exit.tokens, hf_greedy(cut, ids, mask, 6))
    assert all_exit.stats.exit_ratio == 1


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "full"},
        {"mode": "self-speculative", "exit_layer": 2, "draft_tokens": 2},
        {"mode": "early-exit", "exit_layer": 2, "threshold": 0.0034},
    ],
)
def test_sampling_is_reproducible_with_a_generator(kwargs: dict) -> None:
    model = tiny_model("gpt2").eval()
    ids, mask = prompts()

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            generator=gen,
            **kwargs,
        ).tokens

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_self_speculative_sampling_follows_the_full_models_distribution() -> None:
    """16,000 rows from one prompt, two sampled tokens each (the second one speculated):
    the empirical joint distribution against the exact one of the full model (total
    variation; sampling noise alone gives about 0.02 here), and against the exit's own
    joint distribution, which the test must be able to tell apart."""
    vocab, rows = 8, 16000
    model = tiny_model("llama", vocab=vocab, layers=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper distributions: the exit and full model differ
    prompt = torch.tensor([[1, 5, 3, 6]])
    out = generate(
        model,
        prompt.expand(rows, -1),
        max_new_tokens=2,
        mode="self-speculative",
        exit_layer=1,
        draft_tokens=1,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    cut = copy.deepcopy(model)  # the model cut after layer 1: the draft's distribution
    cut.model.layers = cut.model.layers[:1]
    cut.config.num_hidden_layers = 1
    seconds = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    with torch.no_grad():
        first = model(prompt).logits[0, -1].softmax(-1)
        exact = first[:, None] * model(seconds).logits[:, -1].softmax(-1)  # [x1, x2]
        draft = first[:, None] * cut(seconds).logits[:, -1].softmax(-1)
    counts = torch.zeros(vocab, vocab)
    counts.index_put_(tuple(out.new_tokens.T), torch.ones(rows), accumulate=True)
    assert 0.5 * (counts / rows - exact).abs().sum() < 0.05
    assert 0.5 * (draft - exact).abs().sum() > 0.15
    assert 0 < out.stats.acceptance_rate < 1  # drafts were both kept and rejected


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "fast"}, ValueError, "mode"),
        ({"mode": "self-speculative"}, ValueError, "exit_layer"),
        ({"exit_layer": 4}, ValueError, "exit_layer"),
        ({"exit_layer": 1.0}, TypeError, "exit_layer"),
        ({"mode": "full", "exit_layer": 1}, ValueError, "exit_layer"),
        ({"mode": "early-exit", "exit_layer": 1}, ValueError, "threshold"),
        ({"mode": "early-exit", "exit_layer": 1, "threshold": "0.5"}, TypeError, "threshold"),
        ({"exit_layer": 1, "threshold": 0.5}, ValueError, "threshold"),
        ({"exit_layer": 1, "draft_tokens": 0}, ValueError, "draft_tokens"),
        ({"exit_layer": 1, "max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"exit_layer": 1, "max_new_tokens": 300}, ValueError, "max_new_tokens"),
        ({"exit_layer": 1, "top_p": 1.5}, ValueError, "top_p"),
        ({"exit_layer": 1, "temperature": -1.0}, ValueError, "temperature"),
        ({"exit_layer": 1, "eos_id": 300}, ValueError, "eos_id"),
        ({"exit_layer": 1, "measure": "top1"}, ValueError, "measure"),
        ({"exit_layer": 1, "context": "skip"}, ValueError, "context"),
        ({"exit_layer": 1, "generator": 0}, TypeError, "generator"),
        ({"exit_layer": 1, "attention_mask": torch.ones(2, 3)}, ValueError, "attention_mask"),
    ],
)
def test_bad_generate_arguments_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    model = tiny_model("llama").eval()
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        generate(model, torch.ones(1, 4, dtype=torch.long), **kwargs)


def test_bad_models_and_prompts() -> None:
    model = tiny_model("gpt2").eval()
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        generate(torch.nn.Linear(2, 2), torch.ones(1, 2, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, torch.ones(1, 2), max_new_tokens=1, mode="full")
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.full((1, 2), 300), max_new_tokens=1, mode="full")
    with pytest.raises(ValueError, match="attention_mask"):
        generate(
            model,
            torch.ones(1, 2, dtype=torch.long),
            attention_mask=torch.zeros(1, 2, dtype=torch.long),
            max_new_tokens=1,
            mode="full",
        )
