"""``lego.hf.patch``: the patched loss, exits, curricula, confidence, Trainer and memory.

References: the unpatched model's own ``labels=`` loss and gradients (float32: loss
1e-6, gradients 1e-5 relative), and exit losses built by hand from
``output_hidden_states`` (pre-norm for every layer below the last) through the
model's own final norm and head with ``torch.nn.functional.cross_entropy``.
Everything runs on tiny random models (``tests/hf_models.py``) with the torch backend
of the ops, except one GPT-2 case through the Triton kernels (interpreter on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from hf_models import FAMILIES, batch, one_thread_torch_backend, tiny_model  # noqa: E402, F401

from bench.hf_train_step import cpu_allocations  # noqa: E402
from lego.hf import SUPPORTED, apply_lego, exit_confidence  # noqa: E402
from lego_kernels import ops, reference  # noqa: E402

CASES = [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False), ("gpt2", None)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def loss_and_grads(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


def assert_grads_close(grads: dict, ref: dict, tol: float = 1e-5) -> None:
    assert grads.keys() == ref.keys()
    for name in ref:
        if ref[name].abs().max() > 0:
            assert rel(grads[name], ref[name]) < tol, name


def hand_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's own final norm + head on the pre-norm ``hidden``."""
    base = model.base_model
    norm = base.norm if hasattr(base, "norm") else base.ln_f
    logits = model.lm_head(norm(hidden)).float()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_patched_loss_and_grads_equal_the_models_own(family: str, tied: bool | None) -> None:
    model = tiny_model(family, tied=tied)
    ids, mask, labels = batch()
    ref, ref_grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    apply_lego(model)
    out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.loss.dtype == torch.float32
    assert rel(out.loss, ref.loss) < 1e-6
    assert_grads_close(grads, ref_grads)
    tied_now = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied_now == (family == "gpt2" or bool(tied))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_num_items_in_batch_and_shift_labels_as_the_model(family: str) -> None:
    model = tiny_model(family)
    ids, mask, labels = batch()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, 7] = -100
    calls = [
        {"labels": labels, "num_items_in_batch": torch.tensor(40)},
        {"labels": labels, "num_items_in_batch": 9},
        {"labels": labels, "shift_labels": shifted},
        {"labels": labels.masked_fill(labels == -100, 7), "ignore_index": 7},
    ]
    refs = [model(input_ids=ids, attention_mask=mask, **kw).loss for kw in calls]
    apply_lego(model)
    for kw, ref in zip(calls, refs, strict=True):
        assert rel(model(input_ids=ids, attention_mask=mask, **kw).loss, ref) < 1e-6


def test_return_dict_false_and_positional_arguments() -> None:
    model = tiny_model("gpt2")
    ids, mask, labels = batch()
    ref = model(ids, None, mask, labels=labels).loss  # GPT-2 order: input_ids, cache, mask
    apply_lego(model)
    out = model(ids, None, mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and rel(out[0], ref) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_outputs(family: str) -> None:
    model = tiny_model(family).eval()
    ids, mask, labels = batch()
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    patch = apply_lego(model, exit_layers=(1, 2))
    plain = model(input_ids=ids, attention_mask=mask)  # no labels: the original forward
    assert torch.equal(plain.logits, before.logits)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    patch.remove()
    patch.remove()  # a second call does nothing
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert "forward" not in model.__dict__
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    apply_lego(model).remove()  # patchable again


# ----------------------------------------------------------------------------- exits

RAW_SCALES = {  # exits at layers 1 and 3: the unnormalized depth scales, by hand
    "uniform": (1.0, 1.0),
    "linear_l": (1.0, 3.0),
    "sum_l": (1.0, 4.0),
    "sqrt_l": (1.0, math.sqrt(3)),
    "inv_l": (1.0, 1 / 3),
    "inv_sqrt_l": (1.0, 1 / math.sqrt(3)),
}


def hand_exit_losses(model, ids, mask, labels) -> dict[int, torch.Tensor]:
    """Per-layer reference losses from the unpatched model's ``output_hidden_states``."""
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    layers = model.config.num_hidden_layers
    losses = {i: hand_loss(model, out.hidden_states[i], labels) for i in range(1, layers)}
    losses[layers] = out.loss  # hidden_states[-1] is already normalized: the model's loss
    return losses


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scale", sorted(RAW_SCALES))
def test_exit_loss_is_the_scaled_sum_of_hand_built_exit_losses(family: str, scale: str) -> None:
    model = tiny_model(family)
    ids, mask, labels = batch()
    ref = hand_exit_losses(model, ids, mask, labels)
    raw = RAW_SCALES[scale]
    weights = [r / sum(raw) for r in raw]
    expected = ref[4] + weights[0] * ref[1] + weights[1] * ref[3]
    patch = apply_lego(model, exit_layers=(3, 1), exit_loss_scale=scale)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(out.loss, expected) < 1e-6
    assert sorted(out.exit_losses) == [1, 3, 4]
    for layer, loss in out.exit_losses.items():
        assert rel(loss, ref[layer]) < 1e-6
    assert patch.step == 1


def test_exit_gradients_equal_the_hand_built_ones() -> None:
    model = tiny_model("qwen2")
    ids, mask, labels = batch()
    model.zero_grad()
    ref = hand_exit_losses(model, ids, mask, labels)
    (ref[4] + 0.25 * ref[1] + 0.75 * ref[2]).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    apply_lego(model, exit_layers=(1, 2), exit_weights=(0.25, 0.75))
    _, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_grads_close(grads, ref_grads)


def test_exits_under_gradient_checkpointing() -> None:
    model = tiny_model("llama")
    ids, mask, labels = batch()
    apply_lego(model, exit_layers=(1, 2))
    ref, ref_grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    for reentrant in (False, True):
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
        out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
        assert rel(out.loss, ref.loss) < 1e-6
        assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize(
    ("curriculum", "schedule"),
    [
        ("rotational", [(1,), (3,), (1,), (3,)]),
        # L = 4, fraction 0.5, 4 steps: exit 3 on from step/4 >= 0.25, exit 1 from 0.5
        ("gradual", [(), (3,), (1, 3), (1, 3)]),
    ],
)
def test_curricula_choose_the_exits_of_each_step(curriculum: str, schedule: list) -> None:
    model = tiny_model("mistral")
    ids, mask, labels = batch()
    ref = hand_exit_losses(model, ids, mask, labels)
    patch = apply_lego(model, exit_layers=(1, 3), curriculum=curriculum, total_steps=4)
    scale = dict(zip((1, 3), patch.scales, strict=True))
    for step, exits in enumerate(schedule):
        assert patch.step == step
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        expected = ref[4] + sum(scale[layer] * ref[layer] for layer in exits)
        assert rel(out.loss, expected) < 1e-6
        assert sorted(out.exit_losses) == [*exits, 4]
    model.eval()  # eval: every exit, the counter stays
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sorted(out.exit_losses) == [1, 3, 4] and patch.step == len(schedule)


def test_gradual_without_total_steps_names_it() -> None:
    model = tiny_model("llama")
    ids, mask, labels = batch()
    apply_lego(model, exit_layers=(1,), curriculum="gradual")
    with pytest.raises(ValueError, match="total_steps"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


# ----------------------------------------------------------------------------- Trainer


class Rows(torch.utils.data.Dataset):
    """A tiny in-memory dataset: fixed-length rows, some labels -100 (ragged counts)."""

    def __init__(self, count: int = 8, length: int = 10) -> None:
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 300, (count, length), generator=gen)
        self.labels = self.ids.clone()
        for row in range(count):
            self.labels[row, : row % 4] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(model, tmp_path, accumulation: int, callbacks=()) -> tuple[list[float], dict]:
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(), callbacks=list(callbacks)
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_steps_equal_the_unpatched_model(tmp_path, accumulation: int) -> None:
    ref_losses, ref_params = train(tiny_model("llama"), tmp_path / "ref", accumulation)
    model = tiny_model("llama")
    apply_lego(model)
    losses, params = train(model, tmp_path / "lego", accumulation)
    assert len(losses) == 3
    for loss, ref in zip(losses, ref_losses, strict=True):
        assert abs(loss - ref) / ref < 1e-5
    for name, ref in ref_params.items():
        assert rel(params[name], ref) < 1e-5, name


def test_trainer_callback_drives_the_curriculum_by_optimizer_step(tmp_path) -> None:
    model = tiny_model("gpt2")
    patch = apply_lego(model, exit_layers=(1, 2), curriculum="rotational")
    seen: list[list[int]] = []
    model.register_forward_hook(lambda _m, _a, out: seen.append(sorted(out.exit_losses)))
    train(model, tmp_path, accumulation=2, callbacks=[patch.trainer_callback()])
    # 3 optimizer steps x 2 micro-batches; both micro-batches of a step share its exit
    assert seen == [[1, 4], [1, 4], [2, 4], [2, 4], [1, 4], [1, 4]]
    assert patch.total_steps == 3 and not patch.count_steps


# ----------------------------------------------------------------------------- memory


def test_no_tokens_x_vocab_allocation_in_a_patched_step(monkeypatch) -> None:
    """Allocations measured by ``torch.profiler`` over forward + backward, N = 1024 tokens,
    V = 8192: N x V float32 is 32 MiB, far above every other tensor of the step (the
    reference's token chunks are set to 64 rows, 2 MiB of logits)."""
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 64)
    vocab, rows, length = 8192, 32, 32
    nxv = rows * length * vocab * 4
    model = tiny_model("llama", vocab=vocab, heads=2, layers=3)
    ids = torch.randint(0, vocab, (rows, length))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=False)

    step()  # gradients allocated once, outside the measurement
    unpatched = cpu_allocations(step)
    apply_lego(model, exit_layers=(1, 2))
    patched = cpu_allocations(step)
    assert unpatched.largest_bytes >= nxv  # the measurement sees the logits when they exist
    assert patched.largest_bytes < nxv / 8
    assert patched.peak_bytes < nxv / 2 < unpatched.peak_bytes


# ----------------------------------------------------------------------------- confidence


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
def test_exit_confidence_is_the_softmax_of_the_layers_state(family: str, measure: str) -> None:
    model = tiny_model(family).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for layer in range(1, 5):
        with torch.no_grad():
            logits = out.logits if layer == 4 else None
            if logits is None:
                base = model.base_model
                norm = base.norm if hasattr(base, "norm") else base.ln_f
                logits = model.lm_head(norm(out.hidden_states[layer]))
        probs = torch.softmax(logits.double(), -1)
        top2 = probs.topk(2, dim=-1).values
        expected = {
            "max_prob": top2[..., 0],
            "margin": top2[..., 0] - top2[..., 1],
            "entropy": 1 + (probs * probs.log()).sum(-1) / math.log(probs.shape[-1]),
        }[measure]
        conf = exit_confidence(model, ids, layer=layer, measure=measure, attention_mask=mask)
        assert conf.confidence.shape == ids.shape
        # entropy: 1 - H / ln V is near 0 here, so float32 rounding of H shows: absolute error
        assert (conf.confidence - expected).abs().max() < 1e-6
        assert measure == "entropy" or rel(conf.confidence, expected) < 1e-5
        assert torch.equal(conf.prediction, logits.argmax(-1))
        assert rel(conf.lse, torch.logsumexp(logits.double(), -1)) < 1e-6


# ----------------------------------------------------------------------------- pitfalls


def rms_head_loss(hidden, model, labels, norm_weight, eps: float) -> torch.Tensor:
    """The fused loss with RMSNorm on ``hidden``: what a hand-made call would compute."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return ops.norm_head_cross_entropy(hidden, model.lm_head.weight, targets, norm_weight, eps=eps)


def test_the_pre_norm_pitfall_is_impossible_through_the_api() -> None:
    """The loss and the last layer's confidence read the final norm's *input*; feeding the
    normalized ``hidden_states[-1]`` to the fused op (the trap) gives another number."""
    model = tiny_model("llama")
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    norm = model.model.norm
    twice = rms_head_loss(out.hidden_states[-1], model, labels, norm.weight, norm.variance_epsilon)
    assert abs(twice.item() - out.loss.item()) > 1e-3
    apply_lego(model)
    patched = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel(patched, out.loss) < 1e-6
    conf = exit_confidence(model, ids, layer=4, attention_mask=mask)
    assert torch.equal(conf.prediction, out.logits.argmax(-1))


def test_gpt2_gets_its_layernorm_not_rmsnorm() -> None:
    model = tiny_model("gpt2")
    ids, mask, labels = batch()
    ln_f = model.transformer.ln_f
    captured = {}
    handle = ln_f.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    handle.remove()
    as_rms = rms_head_loss(captured["x"], model, labels, ln_f.weight, ln_f.eps)  # norm= forgotten
    assert abs(as_rms.item() - ref.loss.item()) > 1e-3
    apply_lego(model)
    assert rel(model(input_ids=ids, attention_mask=mask, labels=labels).loss, ref.loss) < 1e-6


def test_patched_gpt2_through_the_triton_kernels() -> None:
    """Under the interpreter (tests/conftest.py) the fused kernels run: LayerNorm + bias, tied."""
    model = tiny_model("gpt2", layers=2)
    ids, mask, labels = batch(rows=2, length=8)
    ref, ref_grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    apply_lego(model, exit_layers=(1,))
    with ops.use_backend("auto"):
        if ops.backend(ids.float()) != "triton-interpreter":
            pytest.skip("TRITON_INTERPRET is off (LEGO_TEST_CUDA=1): CPU tensors use torch")
        out, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    with ops.use_backend("torch"):
        want, want_grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(out.exit_losses[2], ref.loss) < 1e-6
    assert rel(out.loss, want.loss) < 1e-6
    assert_grads_close(grads, want_grads)
    assert ref_grads.keys() == grads.keys()


# ----------------------------------------------------------------------------- errors


def test_unsupported_models_get_a_type_error_naming_the_supported_classes() -> None:
    config = transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    for model in (transformers.GPTNeoXForCausalLM(config), torch.nn.Linear(4, 4)):
        for call in (
            lambda m=model: apply_lego(m),
            lambda m=model: exit_confidence(m, torch.zeros(1, 2, dtype=torch.long), layer=1),
        ):
            with pytest.raises(TypeError, match="LlamaForCausalLM") as error:
                call()
            assert all(name in str(error.value) for name in SUPPORTED)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_layers": (0,)}, "exit_layers"),
        ({"exit_layers": (4,)}, "exit_layers"),
        ({"exit_layers": (1, 1)}, "exit_layers"),
        ({"exit_layers": (1.5,)}, "exit_layers"),
        ({"exit_layers": (1,), "exit_loss_scale": "square"}, "exit_loss_scale"),
        ({"exit_layers": (1, 2), "exit_weights": (1.0,)}, "exit_weights"),
        ({"exit_layers": (1,), "exit_weights": (-1.0,)}, "exit_weights"),
        ({"exit_layers": (1,), "exit_weights": ("a",)}, "exit_weights"),
        ({"exit_layers": (1,), "exit_weights": 0.5}, "exit_weights"),
        ({"exit_layers": (1,), "exit_weights": (1.0,), "exit_loss_scale": "inv_l"}, "exit_weights"),
        ({"curriculum": "random"}, "curriculum"),
        ({"total_steps": 0}, "total_steps"),
    ],
)
def test_bad_apply_lego_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        apply_lego(model, **kwargs)
    assert "forward" not in model.__dict__  # nothing was patched


def test_patching_twice_and_bad_confidence_arguments() -> None:
    model = tiny_model("llama")
    apply_lego(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_lego(model)
    ids = torch.zeros(1, 3, dtype=torch.long)
    for layer in (0, 5, True, 1.0):
        with pytest.raises(ValueError, match="layer"):
            exit_confidence(model, ids, layer=layer)
    with pytest.raises(ValueError, match="measure"):
        exit_confidence(model, ids, layer=2, measure="top1")
