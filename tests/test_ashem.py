"""lego.ashem: threshold, hard-token mining, phase 2 on frozen lower layers, protocols.

References: the synthetic corpus's known hard tokens (random, so a trained model is
never confident on them), exact order statistics for the threshold, and bit-identity
of every parameter that existed before phase 2.
"""

import dataclasses
import math
import os

import pytest
import torch

from lego import ASHEMConfig, LegoModel, ModelConfig
from lego.ashem import EVAL_KEYS, SEED_EVAL_KEYS, confidence_threshold, hard_token_states, run_ashem
from lego.data import load_wikitext2, synthetic_corpus
from lego_kernels import ops


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


def snapshot_before_phase2(model: LegoModel, monkeypatch) -> dict[str, torch.Tensor]:
    """Record every parameter just before ``run_ashem`` extends the model."""
    saved = {}
    extend = model.extend

    def recording_extend(num_layers: int) -> None:
        saved.update({n: p.detach().clone() for n, p in model.named_parameters()})
        extend(num_layers)

    monkeypatch.setattr(model, "extend", recording_extend)
    return saved


def check_phase2_froze_the_lower_model(model: LegoModel, saved: dict, low: int) -> None:
    params = dict(model.named_parameters())
    assert saved  # phase 2 ran
    for name, before in saved.items():
        assert torch.equal(params[name], before), f"{name} changed in phase 2"
    new = [n for n in params if n not in saved]
    assert all(n.startswith("layers.") for n in new)  # shared head: no new exit
    assert {int(n.split(".")[1]) for n in new} == set(range(low, model.config.num_layers))


def test_confidence_threshold_is_an_order_statistic():
    confidence = torch.rand(7, 13)
    for ratio in (0.1, 0.5, 0.93):
        threshold = confidence_threshold(confidence, ratio)
        assert (confidence < threshold).sum() == int(ratio * confidence.numel())
    with pytest.raises(ValueError, match="ratio"):
        confidence_threshold(confidence, 1.0)
    with pytest.raises(ValueError, match="empty"):
        confidence_threshold(confidence[:0], 0.5)


def test_hard_token_states_are_the_exit_layer_states():
    model = LegoModel(ModelConfig(vocab_size=20, dim=8, num_layers=2, num_heads=2))
    windows = torch.randint(0, 20, (5, 7))
    hard = torch.rand(5, 6) < 0.5
    states, targets = hard_token_states(model, windows, hard, exit_layer=1, batch_size=2)
    with torch.no_grad():
        h = model.layers[0](model.embedding(windows[:, :-1]))
    assert torch.equal(targets, windows[:, 1:][hard])
    assert torch.allclose(states, h[hard], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("context", ["propagate", "routed"])
def test_ashem_end_to_end_on_the_synthetic_corpus(context, monkeypatch):
    corpus = synthetic_corpus(
        16, vocab_size=32, num_hard=8, train_windows=256, valid_windows=32, test_windows=48
    )
    torch.manual_seed(0)
    model = LegoModel(ModelConfig(vocab_size=32, dim=32, num_layers=1, num_heads=2, max_seq_len=16))
    saved = snapshot_before_phase2(model, monkeypatch)
    config = ASHEMConfig(
        phase1_layers=1, phase1_lr=1e-2, phase1_patience=3, phase2_layers=2, phase2_lr=1e-3
    )
    result = run_ashem(model, corpus, config, context=context, epochs=4, batch_size=16, quiet=True)
    check_phase2_froze_the_lower_model(model, saved, low=1)
    assert model.config.num_layers == 2
    assert abs(result.hard_ratio - 0.5) < 0.01  # of the training split, by construction
    assert result.eval.keys() == set(EVAL_KEYS) and result.eval["split"] == "test"
    assert 1 <= result.phase1.best_epoch <= 4 and 1 <= result.phase2.best_epoch <= 4
    ev = result.eval
    assert abs(ev["exit_ratio"] - 0.5) < 0.1
    # The truly random targets are the ones that do not exit.
    with torch.no_grad():
        out = model.early_exit(
            corpus.test[:, :-1],
            exit_layer=1,
            threshold=result.threshold,
            context=context,
            targets=corpus.test[:, 1:],
        )
    truly_hard = corpus.hard["test"]
    assert (~out.exited)[truly_hard].float().mean() > 0.95
    assert out.exited.float().mean().item() == pytest.approx(ev["exit_ratio"])
    assert abs(math.exp(out.nll.mean().item()) - ev["two_stage_ppl"]) / ev["two_stage_ppl"] < 1e-5
    assert ev["phase1_hard_ppl"] > ev["phase1_ppl"]
    assert ev["layer_cost"] == pytest.approx(ev["exit_ratio"] * 0.5 + (1 - ev["exit_ratio"]))
    assert 0 < ev["flops_cost"] < 1.2


def test_ashem_seed_protocol_is_the_original_procedure(monkeypatch):
    """Seed protocol: mined on validation, phase 2 trains the new layers and the shared
    head on isolated hard tokens (length-1 sequences), evaluation dense on validation;
    checked against the original's computations written out here."""
    corpus = synthetic_corpus(
        8, vocab_size=32, num_hard=8, train_windows=128, valid_windows=32, test_windows=8
    )
    model = LegoModel(ModelConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2, max_seq_len=8))
    saved = snapshot_before_phase2(model, monkeypatch)
    seen = []
    layer = model.layers[0].__class__
    forward = layer.forward

    def recording_forward(self, h):
        seen.append(h.shape[1])
        return forward(self, h)

    config = ASHEMConfig(phase1_layers=1, phase2_layers=3, phase1_patience=0, phase2_patience=1)
    monkeypatch.setattr(layer, "forward", recording_forward)
    result = run_ashem(model, corpus, config, protocol="seed", epochs=2, batch_size=8, quiet=True)
    params = dict(model.named_parameters())
    for name in ("embedding.weight", "layers.0.wq.weight", "layers.0.down.weight"):
        assert torch.equal(params[name], saved[name]), name
    assert not torch.equal(params["exits.0.head.weight"], saved["exits.0.head.weight"])
    assert result.eval.keys() == set(SEED_EVAL_KEYS) and result.eval["split"] == "valid"
    assert abs(result.hard_ratio - 0.5) < 0.01  # of the validation split
    assert 1 in seen  # phase 2 fed the new layers length-1 sequences
    assert 1 <= len(result.phase2.history) <= 2

    valid, threshold, targets = corpus.valid, result.threshold, corpus.valid[:, 1:]
    rms = torch.nn.functional.rms_norm
    with torch.no_grad():
        h1 = model.layers[0](model.embedding(valid[:, :-1]))  # frozen: as when mined
        old_logits = (
            rms(h1, (16,), saved["exits.0.norm.weight"], 1e-6) @ saved["exits.0.head.weight"].T
        )
        mined = torch.softmax(old_logits, -1).amax(-1) < threshold
        head = model.exits[0]
        # The original's hard-token perplexity: each mined state alone through layers 2-3.
        alone = h1[mined][:, None, :]
        for block in model.layers[1:]:
            alone = block(alone)
        isolated = torch.nn.functional.cross_entropy(
            head.head(head.norm(alone[:, 0])), targets[mined]
        )
        # Dense two-stage: every layer on every token, each token's exit by the new head.
        logits1 = head.head(head.norm(h1))
        full = h1
        for block in model.layers[1:]:
            full = block(full)
        hard = torch.softmax(logits1, -1).amax(-1) < threshold
        logits = torch.where(hard[..., None], head.head(head.norm(full)), logits1)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    ev = result.eval
    assert ev["hard_ppl"] == pytest.approx(math.exp(isolated.item()), rel=1e-5)
    assert ev["two_stage_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert ev["exit_ratio"] == pytest.approx(1 - hard.float().mean().item())
    assert ev["two_stage_hard_ppl"] == pytest.approx(math.exp(nll[hard].mean().item()), rel=1e-5)
    assert ev["layer_cost"] == pytest.approx((1 + 2 * hard.float().mean().item()) / 3)


@pytest.mark.skipif(
    not os.path.isdir(os.environ.get("LEGO_DATA_DIR", "")), reason="WikiText-2 copy not found"
)
def test_ashem_on_a_wikitext2_slice(monkeypatch):
    corpus = load_wikitext2(16, samples=48)
    corpus = dataclasses.replace(corpus, valid=corpus.valid[:24], test=corpus.test[:24])
    torch.manual_seed(0)
    model = LegoModel(
        ModelConfig(vocab_size=corpus.vocab_size, dim=16, num_layers=1, num_heads=2, max_seq_len=16)
    )
    saved = snapshot_before_phase2(model, monkeypatch)
    config = ASHEMConfig(phase1_layers=1, phase2_layers=2, phase1_lr=1e-2, hard_example_ratio=0.3)
    result = run_ashem(model, corpus, config, epochs=2, batch_size=16, quiet=True)
    check_phase2_froze_the_lower_model(model, saved, low=1)
    assert abs(result.hard_ratio - 0.3) < 0.01
    assert 0.5 < result.eval["exit_ratio"] < 0.9
    ppl = [result.eval[k] for k in ("phase1_ppl", "two_stage_ppl", "hard_ppl")]
    assert all(math.isfinite(p) and 1 < p < corpus.vocab_size * 10 for p in ppl)


def test_run_ashem_rejects_bad_settings():
    corpus = synthetic_corpus(8, train_windows=8, valid_windows=2, test_windows=2)
    model = LegoModel(ModelConfig(vocab_size=64, dim=16, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="phase1_layers"):
        run_ashem(model, corpus, ASHEMConfig(phase1_layers=1, phase2_layers=2))
    with pytest.raises(ValueError, match="protocol"):
        run_ashem(model, corpus, ASHEMConfig(), protocol="draft")
    with pytest.raises(TypeError, match="ASHEMConfig"):
        run_ashem(model, corpus, {"phase1_layers": 2})
