"""Configs: defaults, derived values, and one clear error per bad value."""

import dataclasses

import pytest

from lego import ASHEMConfig, ModelConfig, StageConfig, TrainingConfig
from lego.config import parse_stages


def test_model_config_defaults_and_hidden_dim():
    config = ModelConfig(vocab_size=100)
    assert (config.dim, config.num_layers, config.num_heads, config.norm) == (64, 2, 4, "rms")
    assert config.head_dim == 16
    assert config.hidden_dim == 176  # 8/3 * 64 = 170.7, rounded up to a multiple of 8
    assert ModelConfig(vocab_size=10, dim=48, num_heads=2).hidden_dim == 128
    assert ModelConfig(vocab_size=10, hidden_dim=100).hidden_dim == 100
    # the resolved width survives a round trip through asdict (how the trainer saves configs)
    assert ModelConfig(**dataclasses.asdict(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 32


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"vocab_size": 0}, "vocab_size", ValueError),
        ({"vocab_size": 10.0}, "vocab_size", TypeError),
        ({"dim": 0}, "dim", ValueError),
        ({"num_layers": 0}, "num_layers", ValueError),
        ({"num_layers": True}, "num_layers", TypeError),
        ({"num_heads": 0}, "num_heads", ValueError),
        ({"dim": 64, "num_heads": 5}, "num_heads", ValueError),
        ({"dim": 12, "num_heads": 4}, "rotary", ValueError),  # head_dim 3 is odd
        ({"max_seq_len": 0}, "max_seq_len", ValueError),
        ({"hidden_dim": 0}, "hidden_dim", ValueError),
        ({"norm": "batch"}, "norm", ValueError),
        ({"norm": None}, "norm", ValueError),
        ({"norm_eps": 0.0}, "norm_eps", ValueError),
        ({"norm_eps": float("nan")}, "norm_eps", ValueError),
        ({"rope_base": -1.0}, "rope_base", ValueError),
        ({"per_exit_heads": 1}, "per_exit_heads", TypeError),
    ],
)
def test_model_config_rejects(kwargs, field, error):
    with pytest.raises(error, match=field):
        ModelConfig(**{"vocab_size": 10, **kwargs})


def test_stage_config():
    stage = StageConfig(layers=[1, 2])
    assert stage.layers == (1, 2) and stage.loss_weight == 1.0
    assert StageConfig((3, 3), loss_weight=0).loss_weight == 0


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"layers": (2, 1)}, "start <= end", ValueError),
        ({"layers": (0, 2)}, "start", ValueError),
        ({"layers": (1,)}, "layers", TypeError),
        ({"layers": (1, 2.5)}, "end", TypeError),
        ({"layers": (1, 2), "loss_weight": -0.5}, "loss_weight", ValueError),
        ({"layers": (1, 2), "loss_weight": float("inf")}, "loss_weight", ValueError),
    ],
)
def test_stage_config_rejects(kwargs, field, error):
    with pytest.raises(error, match=field):
        StageConfig(**kwargs)


def test_training_config_exit_layers_and_plain_path():
    deep = TrainingConfig(stages=[StageConfig((1, 2), 0.5), StageConfig((3, 4))])
    assert isinstance(deep.stages, tuple)
    assert deep.exit_layers == (2, 4)
    assert not deep.plain_path(4)

    standard = TrainingConfig(stages=[StageConfig((1, 4))])
    assert standard.plain_path(4)
    assert not standard.plain_path(5)  # its loss is not at the last layer of a 5-layer model

    zero_first = TrainingConfig(stages=[StageConfig((1, 2), 0.0), StageConfig((3, 4))])
    assert zero_first.plain_path(4)  # only the last exit carries loss
    routed = TrainingConfig(stages=[StageConfig((1, 4))], routing_threshold=0.6, exit_layer=2)
    assert not routed.plain_path(4)  # routing needs the exit at exit_layer

    # a stage may start above layer 1 (e.g. phase 2 trains the new layers 3..4 only)
    assert TrainingConfig(stages=[StageConfig((3, 4))]).exit_layers == (4,)


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"stages": []}, "stages", ValueError),
        ({"stages": [(1, 2)]}, "stages", TypeError),
        ({"stages": [StageConfig((1, 2)), StageConfig((2, 3))]}, "non-overlapping", ValueError),
        ({"stages": [StageConfig((3, 4)), StageConfig((1, 2))]}, "ascending", ValueError),
        ({"stages": [StageConfig((1, 2), 0.0)]}, "loss_weight", ValueError),
        ({"routing_threshold": -0.1}, "routing_threshold", ValueError),
        ({"routing_threshold": 1.5}, "routing_threshold", ValueError),
        ({"routing_threshold": float("nan")}, "routing_threshold", ValueError),
        ({"exit_layer": 0}, "exit_layer", ValueError),
    ],
)
def test_training_config_rejects(kwargs, field, error):
    with pytest.raises(error, match=field):
        TrainingConfig(**{"stages": [StageConfig((1, 2))], **kwargs})


def test_training_config_check_model():
    config = TrainingConfig(stages=[StageConfig((1, 2)), StageConfig((3, 4))], exit_layer=2)
    config.check_model(4)
    with pytest.raises(ValueError, match="stages"):
        config.check_model(3)
    with pytest.raises(ValueError, match="exit_layer"):
        TrainingConfig(stages=[StageConfig((1, 2))], exit_layer=3).check_model(2)
    with pytest.raises(ValueError, match="stages"):
        config.plain_path(3)


def test_ashem_config_defaults_are_the_seed():
    config = ASHEMConfig()
    assert dataclasses.astuple(config) == (2, 1e-3, 1, 0.5, 4, 1e-4, 3)


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"phase1_layers": 0}, "phase1_layers", ValueError),
        ({"phase1_lr": 0.0}, "phase1_lr", ValueError),
        ({"phase1_patience": -1}, "phase1_patience", ValueError),
        ({"hard_example_ratio": 0.0}, "hard_example_ratio", ValueError),
        ({"hard_example_ratio": 1.0}, "hard_example_ratio", ValueError),
        ({"hard_example_ratio": "0.5"}, "hard_example_ratio", TypeError),
        ({"phase2_layers": 2}, "phase2_layers", ValueError),
        ({"phase2_lr": -1e-4}, "phase2_lr", ValueError),
        ({"phase2_patience": 1.5}, "phase2_patience", TypeError),
    ],
)
def test_ashem_config_rejects(kwargs, field, error):
    with pytest.raises(error, match=field):
        ASHEMConfig(**kwargs)


def test_layer_weights_stage_loss_and_depth_scales():
    stages = [StageConfig((1, 2), 0.5), StageConfig((3, 4), 2.0)]
    assert TrainingConfig(stages=stages).layer_weights(4) == ((2, 0.5), (4, 2.0))
    every = TrainingConfig(stages=stages, stage_loss="every")
    assert every.layer_weights(4) == ((1, 0.5), (2, 0.5), (3, 2.0), (4, 2.0))
    assert not every.plain_path(4)
    # inv_l over the exits 1, 2, 3 (1/1, 1/2, 1/3, normalized); the last layer is not scaled.
    scaled = TrainingConfig(stages=stages, stage_loss="every", loss_scale="inv_l")
    total = 1 + 1 / 2 + 1 / 3
    expected = (0.5 / total, 0.5 / 2 / total, 2.0 / 3 / total, 2.0)
    assert [w for _, w in scaled.layer_weights(4)] == pytest.approx(expected)
    # a zero-weight exit keeps its place (the general path computes it) and no scale share
    zero = TrainingConfig(
        stages=[StageConfig((1, 2), 0.0), StageConfig((3, 4))], loss_scale="sum_l"
    )
    assert zero.layer_weights(4) == ((2, 0.0), (4, 1.0)) and zero.plain_path(4)
    with pytest.raises(ValueError, match="stage_loss"):
        TrainingConfig(stages=stages, stage_loss="all")
    with pytest.raises(ValueError, match="loss_scale"):
        TrainingConfig(stages=stages, loss_scale="log_l")
    with pytest.raises(ValueError, match="beyond"):
        TrainingConfig(stages=stages).layer_weights(3)


def test_parse_stages():
    assert parse_stages("1-2:0.3, 3-4:1.0") == (
        StageConfig((1, 2), 0.3),
        StageConfig((3, 4), 1.0),
    )
    assert parse_stages("3") == (StageConfig((3, 3)),)
    for bad, match in (("1-2:x", "could not convert"), ("a", "START-END"), ("2-1", "start <= end")):
        with pytest.raises(ValueError, match=f"--stages: .*{match}"):
            parse_stages(bad)
