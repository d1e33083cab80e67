"""Bad input everywhere public gives a ValueError/TypeError/IndexError naming the argument.

One table of bad calls across ``lego_kernels.ops``, ``LegoModel``, the trainer, ASHEM
and the configs (each: the exception type and the argument's name, which the message
must contain), and one of bad command lines (exit status 2, one line on stderr naming
the flag). The reference is the contract itself: the type and the name in the message.
"""

import math

import pytest
import torch

from lego import ASHEMConfig, LegoModel, ModelConfig, StageConfig, TrainingConfig, run_ashem
from lego.data import synthetic_corpus
from lego.train import main
from lego.trainer import Trainer, evaluate
from lego_kernels import ops

V, D = 16, 8
MODEL = LegoModel(ModelConfig(vocab_size=V, dim=D, num_layers=2, num_heads=2, max_seq_len=6))
IDS = torch.zeros(2, 4, dtype=torch.long)
H = torch.zeros(2, 4, D)
X = torch.randn(3, D)
W = torch.randn(V, D)
T = torch.zeros(3, dtype=torch.long)
PLAN = ops.route(torch.tensor([0.1, 0.9, 0.2]), 0.5)
STAGES = [StageConfig((1, 2))]
VE, TE = ValueError, TypeError
CE, LOGITS = ops.norm_head_cross_entropy, ops.norm_head_logits


def early_exit(**kwargs):
    return MODEL.early_exit(IDS, **kwargs)


def model_config(**kwargs):
    return ModelConfig(**{"vocab_size": V, **kwargs})


BAD_CALLS = [
    # lego_kernels.ops
    (TE, "x", lambda: LOGITS(T, W)),
    (VE, "weight", lambda: LOGITS(X, W[:, :4])),
    (VE, "norm", lambda: LOGITS(X, W, norm="batch")),
    (VE, "eps", lambda: LOGITS(X, W, eps=0.0)),
    (VE, "norm_weight", lambda: LOGITS(X, W, torch.ones(3))),
    (VE, "norm_bias", lambda: LOGITS(X, W, None, torch.ones(D))),
    (VE, "measure", lambda: ops.exit_confidence(X, W, measure="prob")),
    (VE, "logits", lambda: ops.confidence_from_logits(torch.tensor(1.0))),
    (TE, "targets", lambda: CE(X, W, T.float())),
    (VE, "targets", lambda: CE(X, W, T[:2])),
    (VE, "targets", lambda: CE(X, W, T + V)),
    (VE, "reduction", lambda: CE(X, W, T, reduction="avg")),
    (TE, "ignore_index", lambda: CE(X, W, T, ignore_index=1.5)),
    (VE, "token_weights", lambda: CE(X, W, T, token_weights=torch.ones(2))),
    (VE, "threshold", lambda: ops.route(torch.rand(3), math.nan)),
    (VE, "capacity", lambda: ops.route(torch.rand(3), 0.5, capacity=-1)),
    (TE, "plan", lambda: ops.gather_tokens(X, [0, 1])),
    (TE, "src", lambda: ops.scatter_tokens(X, X[:2].double(), PLAN)),
    (VE, "name", lambda: ops.use_backend("cuda").__enter__()),
    (VE, "name", lambda: ops.use_schedule("fast").__enter__()),
    (TE, "grad", lambda: ops.schedule(X, W, grad=1)),
    # LegoModel
    (TE, "config", lambda: LegoModel({"vocab_size": V})),
    (TE, "ids", lambda: MODEL(IDS.float())),
    (VE, "ids", lambda: MODEL(IDS[0])),
    (VE, "ids", lambda: MODEL(IDS + V)),
    (VE, "ids", lambda: MODEL(IDS - 1)),
    (VE, "max_seq_len", lambda: MODEL(torch.zeros(1, 7, dtype=torch.long))),
    (VE, "exit_layer", lambda: MODEL(IDS, exit_layer=0)),
    (VE, "exit_layer", lambda: MODEL.exit_logits(H, exit_layer=3)),
    (TE, "exit_layer", lambda: MODEL(IDS, exit_layer="1")),
    (VE, "start", lambda: MODEL.run_layers(H, 0, 2)),
    (VE, "h", lambda: MODEL.run_layers(H[..., :4], 1, 2)),
    (TE, "hard", lambda: MODEL.run_layers_routed(H, IDS, 2, 2)),
    (VE, "context", lambda: early_exit(exit_layer=1, threshold=0.5, context="full")),
    (VE, "measure", lambda: early_exit(exit_layer=1, threshold=0.5, measure="prob")),
    (VE, "exit_layer", lambda: early_exit(exit_layer=2, threshold=0.5)),
    (VE, "threshold", lambda: early_exit(exit_layer=1, threshold=math.nan)),
    (VE, "capacity", lambda: early_exit(exit_layer=1, threshold=0.5, capacity=-1)),
    (TE, "capacity", lambda: early_exit(exit_layer=1, threshold=0.5, capacity=2.0)),
    (TE, "capacity", lambda: early_exit(exit_layer=1, threshold=0.5, capacity=True)),
    (VE, "num_layers", lambda: MODEL.extend(2)),
    (VE, "k", lambda: MODEL.freeze_lower(3)),
    # trainer and ASHEM
    (VE, "lr", lambda: Trainer(MODEL, TrainingConfig(STAGES), lr=0.0)),
    (TE, "config", lambda: Trainer(MODEL, STAGES)),
    (VE, "threshold", lambda: evaluate(MODEL, torch.zeros(2, 5, dtype=torch.long), threshold=-1.0)),
    (VE, "protocol", lambda: run_ashem(MODEL, synthetic_corpus(4), ASHEMConfig(), protocol="x")),
    # configs
    (VE, "vocab_size", lambda: ModelConfig(vocab_size=0)),
    (TE, "dim", lambda: model_config(dim="64")),
    (VE, "num_heads", lambda: model_config(dim=10, num_heads=4)),
    (VE, "norm", lambda: model_config(norm="batch")),
    (VE, "norm_eps", lambda: model_config(norm_eps=-1.0)),
    (VE, "layers", lambda: StageConfig((2, 1))),
    (VE, "loss_weight", lambda: StageConfig((1, 1), loss_weight=-1.0)),
    (VE, "stages", lambda: TrainingConfig([])),
    (VE, "stages", lambda: TrainingConfig([StageConfig((1, 2)), StageConfig((2, 3))])),
    (VE, "routing_threshold", lambda: TrainingConfig(STAGES, routing_threshold=1.5)),
    (VE, "stages", lambda: TrainingConfig(STAGES).check_model(1)),
    (VE, "hard_example_ratio", lambda: ASHEMConfig(hard_example_ratio=1.0)),
    (VE, "phase2_layers", lambda: ASHEMConfig(phase1_layers=2, phase2_layers=2)),
    (VE, "phase2_lr", lambda: ASHEMConfig(phase2_lr=math.inf)),
]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


def test_at_least_thirty_bad_calls_are_listed():
    assert len(BAD_CALLS) >= 30


@pytest.mark.parametrize(
    ("error", "argument", "call"),
    BAD_CALLS,
    ids=[f"{i}-{argument}" for i, (_, argument, _) in enumerate(BAD_CALLS)],
)
def test_bad_call_names_the_argument(error, argument, call):
    with pytest.raises(error) as info:
        call()
    assert argument in str(info.value), str(info.value)


BAD_FLAGS = [
    (["--resume"], "--resume"),
    (["--batch-size", "0"], "--batch-size"),
    (["--phase2-patience", "x"], "--phase2-patience"),
    (["--strategy", "standard", "--exit-layer", "0"], "--exit-layer"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_names_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err
