"""lego.trainer: stage losses, the plain path, early stopping, evaluation.

References: per-exit losses from ``lego_kernels.reference.norm_head_logits`` +
``torch.nn.functional.cross_entropy`` in float64 on layers run one by one
(float32 tolerance: relative error 1e-5); the synthetic corpus's known optimum
(easy targets predictable, hard ones uniform).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lego import LegoModel, ModelConfig, StageConfig, TrainingConfig
from lego.data import synthetic_corpus
from lego.trainer import Trainer, evaluate, exit_outputs
from lego_kernels import ops, reference

RTOL = 1e-5  # float32, CPU reference path


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


def tiny_model(num_layers: int = 3, vocab_size: int = 32, **kwargs) -> LegoModel:
    config = ModelConfig(
        vocab_size=vocab_size, dim=16, num_layers=num_layers, num_heads=2, max_seq_len=16, **kwargs
    )
    return LegoModel(config)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_exit_loss(model: LegoModel, ids, targets, exit_layer: int) -> torch.Tensor:
    """Cross-entropy at ``exit_layer`` from the layers run one by one and the reference head."""
    h = model.embedding(ids)
    for block in model.layers[:exit_layer]:
        h = block(h)
    exit_head = model.exits[exit_layer - 1] if model.config.per_exit_heads else model.exits[0]
    logits = reference.norm_head_logits(
        h.double(),
        exit_head.head.weight.double(),
        exit_head.norm.weight.double(),
        norm="rms",
        eps=model.config.norm_eps,
    )
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("per_exit_heads", [False, True])
def test_deep_supervision_loss_is_the_weighted_sum_of_exit_losses(per_exit_heads):
    model = tiny_model(num_layers=3, per_exit_heads=per_exit_heads)
    config = TrainingConfig(
        stages=[StageConfig((1, 1), loss_weight=0.5), StageConfig((2, 3), loss_weight=2.0)]
    )
    trainer = Trainer(model, config, quiet=True)
    ids, targets = torch.randint(0, 32, (2, 2, 12))
    loss = trainer.stage_losses(ids, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = 0.5 * reference_exit_loss(model, ids, targets, 1)
    expected = expected + 2.0 * reference_exit_loss(model, ids, targets, 3)
    expected.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss.detach(), expected.detach()) < RTOL
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, expected_grads[name]) < RTOL, name


def test_plain_path_equals_general_path_and_skips_intermediate_exits(monkeypatch):
    model = tiny_model(num_layers=2)
    config = TrainingConfig(
        stages=[StageConfig((1, 1), loss_weight=0.0), StageConfig((2, 2), loss_weight=1.5)]
    )
    assert config.plain_path(2)
    trainer = Trainer(model, config, quiet=True)
    exits = []
    exit_loss = model.exit_loss

    def counting_exit_loss(h, targets, **kwargs):
        exits.append(kwargs)
        return exit_loss(h, targets, **kwargs)

    monkeypatch.setattr(model, "exit_loss", counting_exit_loss)
    ids, targets = torch.randint(0, 32, (2, 3, 10))
    results = {}
    for plain in (True, False):
        exits.clear()
        model.zero_grad()
        loss = trainer.stage_losses(ids, targets, plain=plain)
        loss.backward()
        results[plain] = (loss.detach(), [p.grad.clone() for p in model.parameters()], len(exits))
    assert results[True][2] == 1 and results[False][2] == 2  # plain: one exit only
    assert rel_err(results[True][0], results[False][0]) < RTOL
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert rel_err(a, b) < RTOL
    # The default takes the plain path here.
    exits.clear()
    trainer.stage_losses(ids, targets)
    assert len(exits) == 1
    with pytest.raises(ValueError, match="plain=True"):
        Trainer(model, TrainingConfig(stages=[StageConfig((1, 1))]), quiet=True).stage_losses(
            ids, targets, plain=True
        )


def test_trainer_learns_the_synthetic_corpus():
    corpus = synthetic_corpus(
        16, vocab_size=32, num_hard=8, train_windows=256, valid_windows=32, test_windows=32
    )
    model = LegoModel(ModelConfig(vocab_size=32, dim=32, num_layers=1, num_heads=2, max_seq_len=16))
    config = TrainingConfig(stages=[StageConfig((1, 1))])
    fit = Trainer(model, config, lr=1e-2, batch_size=16, quiet=True).fit(
        corpus.train, corpus.valid, epochs=4, patience=4
    )
    assert [r["epoch"] for r in fit.history] == [1, 2, 3, 4]
    nll, conf = exit_outputs(model, corpus.test)
    hard = corpus.hard["test"]
    uniform = math.log(32)
    # Optimum: 0 on easy targets, ln(V) on hard ones; uniform guessing: ln(V) everywhere.
    assert nll.mean() < 0.6 * uniform
    assert nll[~hard].mean() < 0.1
    assert (conf.prediction == corpus.test[:, 1:])[~hard].float().mean() > 0.95
    assert abs(nll[hard].mean() - uniform) < 0.3


def test_early_stopping_restores_the_best_epoch():
    corpus = synthetic_corpus(8, vocab_size=32, num_hard=8, train_windows=32)
    model = tiny_model(num_layers=1)
    scripted = iter([5.0, 4.0, 4.5, 6.0, 1.0])
    snapshots = []

    class Scripted(Trainer):
        def validate(self, windows):
            snapshots.append({k: v.clone() for k, v in self.model.state_dict().items()})
            return {"ppl": next(scripted)}

    fit = Scripted(model, TrainingConfig(stages=[StageConfig((1, 1))]), quiet=True).fit(
        corpus.train, corpus.valid, epochs=5, patience=1
    )
    # Epoch 3 does not improve: one epoch without improvement is patience 1, stop there
    # (the original code's rule: stop once `patience` epochs in a row did not improve).
    assert [r["val_ppl"] for r in fit.history] == [5.0, 4.0, 4.5]
    assert (fit.best_epoch, fit.best_val_ppl) == (2, 4.0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][name])
    assert not torch.equal(snapshots[1]["layers.0.wq.weight"], snapshots[2]["layers.0.wq.weight"])


@pytest.mark.parametrize(
    ("patience", "epochs_run"), [(0, 1), (1, 3), (2, 4), (3, 5)], ids=lambda v: str(v)
)
def test_early_stopping_runs_patience_epochs_without_improvement(patience, epochs_run):
    """The original's loop: a counter of epochs without improvement, reset on a new best,
    stop when it reaches ``patience`` (so ``patience=0`` stops after the first epoch)."""
    scores = [5.0, 4.0, 4.5, 4.2, 3.0]
    corpus = synthetic_corpus(8, vocab_size=32, num_hard=8, train_windows=16)
    scripted = iter(scores)

    class Scripted(Trainer):
        def validate(self, windows):
            return {"ppl": next(scripted)}

    fit = Scripted(
        tiny_model(num_layers=1), TrainingConfig(stages=[StageConfig((1, 1))]), quiet=True
    ).fit(corpus.train, corpus.valid, epochs=5, patience=patience)
    expected, best, counter = 0, float("inf"), 0
    for expected, score in enumerate(scores, 1):  # noqa: B007 (the loop's last value is used)
        best, counter = (score, 0) if score < best else (best, counter + 1)
        if counter >= patience:
            break
    assert len(fit.history) == expected == epochs_run


def test_evaluate_against_the_reference_and_two_stage_limits():
    model = tiny_model(num_layers=3)
    windows = torch.randint(0, 32, (5, 13))
    ids, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        logits = model(ids)
        ce = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten())
        acc = (logits.argmax(-1) == targets).double().mean()
    plain = evaluate(model, windows, batch_size=2)
    assert abs(plain["ppl"] - math.exp(ce)) / math.exp(ce) < RTOL
    assert abs(plain["acc"] - acc.item()) < 1e-6
    # Every token exits at layer 1 (threshold below any confidence): layer 1's numbers.
    low = evaluate(model, windows, batch_size=2, exit_layer=1, threshold=1e-9)
    layer1 = evaluate(model, windows, batch_size=2, exit_layer=1)
    assert low["exit_ratio"] == 1.0 and abs(low["layer_cost"] - 1 / 3) < 1e-12
    assert abs(low["ppl"] - layer1["ppl"]) / layer1["ppl"] < RTOL
    assert low["flops_cost"] < 1.0 and math.isnan(low["hard_ppl"])
    # No token exits (threshold above 1): the full model's numbers, plus the exit head's cost.
    high = evaluate(model, windows, batch_size=2, exit_layer=1, threshold=1.5)
    assert high["exit_ratio"] == 0.0 and high["layer_cost"] == 1.0 and high["flops_cost"] > 1.0
    assert abs(high["ppl"] - plain["ppl"]) / plain["ppl"] < RTOL
    assert abs(high["hard_ppl"] - plain["ppl"]) / plain["ppl"] < RTOL
    with pytest.raises(ValueError, match="exit_layer is required"):
        evaluate(model, windows, threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        evaluate(model, windows, threshold=-0.1)


def test_trainer_rejects_bad_settings():
    model = tiny_model(num_layers=2)
    config = TrainingConfig(stages=[StageConfig((1, 2))])
    with pytest.raises(ValueError, match="beyond the model"):
        Trainer(model, TrainingConfig(stages=[StageConfig((1, 3))]))
    with pytest.raises(ValueError, match="exit_layer"):
        Trainer(
            model, TrainingConfig(stages=[StageConfig((1, 2))], routing_threshold=0.5, exit_layer=2)
        )
    with pytest.raises(TypeError, match="TrainingConfig"):
        Trainer(model, [StageConfig((1, 2))])
    for kwargs, name in (
        ({"lr": 0.0}, "lr"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"batch_size": 0}, "batch_size"),
        ({"context": "full"}, "context"),
        ({"measure": "prob"}, "measure"),
    ):
        with pytest.raises(ValueError, match=name):
            Trainer(model, config, **kwargs)
    trainer = Trainer(model, config, quiet=True)
    windows = torch.randint(0, 32, (4, 9))
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit(windows, windows, epochs=0, patience=1)
    with pytest.raises(ValueError, match="patience"):
        trainer.fit(windows, windows, epochs=1, patience=-1)
    with pytest.raises(ValueError, match="train is empty"):
        trainer.fit(windows[:0], windows, epochs=1, patience=1)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(model, config)


@pytest.mark.parametrize("order", ["epoch", "once", "none"])
def test_batch_order(order):
    """``epoch``: a new order each epoch, from ``seed + epoch``; ``once``: epoch 1's order
    every epoch; ``none``: the data's order (the original code's fixed batch lists)."""
    windows = torch.arange(12)[:, None].expand(12, 9) % 32
    seen: list[list[int]] = []

    class Recording(Trainer):
        def batch_loss(self, batch):
            seen.append(batch[:, 0].tolist())
            return super().batch_loss(batch)

    trainer = Recording(
        tiny_model(num_layers=1),
        TrainingConfig(stages=[StageConfig((1, 1))]),
        batch_size=4,
        quiet=True,
        order=order,
        seed=5,
    )
    for epoch in (1, 2):
        trainer.train_epoch((windows,), epoch)
    epochs = [[i for batch in seen[:3] for i in batch], [i for batch in seen[3:] for i in batch]]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    first = torch.randperm(12, generator=torch.Generator().manual_seed(6)).tolist()
    expected = {
        "epoch": [first, torch.randperm(12, generator=torch.Generator().manual_seed(7)).tolist()],
        "once": [first, first],
        "none": [list(range(12))] * 2,
    }
    assert epochs == expected[order]
    with pytest.raises(ValueError, match="order"):
        Trainer(tiny_model(1), TrainingConfig(stages=[StageConfig((1, 1))]), order="random")


def test_dense_two_stage_limits_and_costs():
    """The original's evaluation: nothing exits above confidence 1 (the full model's
    numbers), everything at 0+ (the exit layer's); costs as a skipping run would count."""
    model = tiny_model(num_layers=3)
    windows = torch.randint(0, 32, (5, 13))
    full = evaluate(model, windows, batch_size=2)
    none = evaluate(model, windows, batch_size=2, exit_layer=1, threshold=1.5, dense=True)
    assert none["exit_ratio"] == 0 and none["layer_cost"] == 1
    assert none["ppl"] == pytest.approx(full["ppl"], rel=RTOL)
    assert none["hard_ppl"] == pytest.approx(full["ppl"], rel=RTOL)
    assert none["flops_cost"] == pytest.approx(1 + model.flops(1, 12, depth=0) / model.flops(1, 12))
    low = evaluate(model, windows, batch_size=2, exit_layer=1)
    every = evaluate(model, windows, batch_size=2, exit_layer=1, threshold=1e-9, dense=True)
    assert every["exit_ratio"] == 1 and every["layer_cost"] == pytest.approx(1 / 3)
    assert every["ppl"] == pytest.approx(low["ppl"], rel=RTOL) and math.isnan(every["hard_ppl"])
    with pytest.raises(ValueError, match="dense"):
        evaluate(model, windows, exit_layer=1, threshold=0.5, dense=True, time_full=True)
