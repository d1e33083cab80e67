"""lego.strategies: the registry, a strategy from outside the package, stage layouts and
the LayerSkip-style strategy.

References: the loss of LayerSkip's step written out here from the model's own exits
(``LegoModel.forward`` at each exit layer, tested in test_model.py, and
``torch.nn.functional.cross_entropy``) with the depth scales of ``lego.exit_loss``.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lego.strategies.base
from lego import LegoModel, ModelConfig, StageConfig, TrainingConfig
from lego.exit_loss import loss_scales
from lego.experiment import table2_rows
from lego.strategies import (
    ENTRY_POINT_GROUP,
    LayerSkipTrainer,
    Strategy,
    load_strategy,
    register,
    strategy_names,
)
from lego.train import main
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--samples", "32", "--seq-len", "8", "--dim", "16"]
TINY += ["--heads", "2", "--epochs", "1", "--batch-size", "8", "--quiet"]
BUILTIN = ("standard", "deep-supervision", "ashem", "layerskip")


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Path:
    """``my_strategies.py`` in a folder outside the package: CONTRIBUTING.md's example."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Adding a training strategy") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "my_strategies.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def tiny_model(num_layers: int = 3) -> LegoModel:
    config = ModelConfig(vocab_size=32, dim=16, num_layers=num_layers, num_heads=2, max_seq_len=8)
    return LegoModel(config)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_and_loads_the_builtin_strategies(capsys):
    assert strategy_names()[:4] == BUILTIN
    for name in BUILTIN:
        strategy = load_strategy(name)
        assert isinstance(strategy, Strategy) and strategy.name == name and strategy.description
    with pytest.raises(SystemExit) as done:
        main(["--strategy", "list"])
    assert done.value.code == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing][:4] == list(BUILTIN)


def test_bad_strategy_specs_name_the_problem():
    with pytest.raises(ValueError, match="unknown strategy 'bogus'; known: standard, "):
        load_strategy("bogus")
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        load_strategy("no_such_module:Thing")
    with pytest.raises(ValueError, match="path in os is not a Strategy subclass"):
        load_strategy("os:path")
    with pytest.raises(TypeError, match="Strategy subclass with a name"):
        register(int)

    class Taken(Strategy):
        name = "ashem"

    with pytest.raises(ValueError, match="'ashem' is taken"):
        register(Taken)


def test_entry_point_strategy_is_found_by_name(outside, monkeypatch):
    point = importlib.metadata.EntryPoint(
        name="ramped", value="my_strategies:RampedExit", group=ENTRY_POINT_GROUP
    )

    def entry_points(group):
        return [point] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(lego.strategies.base.importlib.metadata, "entry_points", entry_points)
    assert "ramped" in strategy_names()
    assert load_strategy("ramped").name == "ramped-exit"


def test_strategy_defined_outside_the_package_trains_through_the_command_line(outside):
    """CONTRIBUTING.md's example, from its own folder, through ``python -m lego.train`` in a
    fresh process: no edit to ``lego/``."""
    out = outside / "ramped.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(outside), str(ROOT)]), OMP_NUM_THREADS="1")
    argv = ["--strategy", "my_strategies:RampedExit", "--ramp", "0.3", "--layers", "2"]
    argv += ["--exit-layer", "1", "--exit-ratio", "0.5", *TINY, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "lego.train", *argv],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "ramped-exit on synthetic" in done.stdout and "tokens exiting early" in done.stdout
    results = json.loads(out.read_text())
    assert results["strategy"] == "ramped-exit" and results["config"]["ramp"] == 0.3
    assert results["eval"]["exit_ratio"] == pytest.approx(0.5, abs=0.15)
    (label,) = table2_rows(results)  # the experiment finds the class from the JSON
    assert label == "ramped exit 2-layer, early exit"
    bad = subprocess.run(
        [sys.executable, "-m", "lego.train", *argv[:2], "--hard-ratio", "0.3"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "--hard-ratio does not apply to --strategy ramped-exit (it is a flag of ashem)" in (
        bad.stderr
    )


# ----------------------------------------------------------------------------- stage layouts


def test_any_stage_layout_from_the_command_line(tmp_path):
    out = tmp_path / "stages.json"
    argv = [*TINY, "--strategy", "deep-supervision", "--layers", "3", "--exit-layer", "1"]
    argv += ["--stages", "1:0.3,2-3:1", "--stage-loss", "every", "--loss-scale", "linear_l"]
    assert main([*argv, "--out", str(out)]) == 0
    training = json.loads(out.read_text())["config"]["training"]
    assert [(s["layers"], s["loss_weight"]) for s in training["stages"]] == [
        ([1, 1], 0.3),
        ([2, 3], 1.0),
    ]
    assert (training["stage_loss"], training["loss_scale"]) == ("every", "linear_l")
    config = TrainingConfig(
        stages=[StageConfig((1, 1), 0.3), StageConfig((2, 3), 1.0)],
        stage_loss="every",
        loss_scale="linear_l",
    )
    # Exits at 1, 2 (scaled: linear_l over {1, 2} = 1/3, 2/3) and the last layer (weight 1).
    layers, weights = zip(*config.layer_weights(3), strict=True)
    assert layers == (1, 2, 3) and weights == pytest.approx((0.3 / 3, 2 / 3, 1.0))


# ----------------------------------------------------------------------------- LayerSkip


def layerskip_reference(model, windows, exits, scale, active):
    """``exit_L + sum_{l in active} scale_l * exit_l`` from the model's own exits."""
    ids, targets = windows[:, :-1], windows[:, 1:]
    num_layers = model.config.num_layers
    scales = dict(zip(exits, loss_scales(scale, exits, num_layers), strict=True))

    def loss_at(layer):
        return F.cross_entropy(model(ids, exit_layer=layer).flatten(0, 1), targets.flatten())

    return loss_at(num_layers) + sum(scales[layer] * loss_at(layer) for layer in active)


def layerskip_config(exits, num_layers, scale):
    ends = [*exits, num_layers]
    starts = [1, *(e + 1 for e in ends[:-1])]
    stages = [StageConfig((s, e)) for s, e in zip(starts, ends, strict=True)]
    return TrainingConfig(stages=stages, loss_scale=scale)


@pytest.mark.parametrize("curriculum", [None, "rotational", "gradual"])
def test_layerskip_loss_is_the_early_exit_loss_with_its_curriculum(curriculum, monkeypatch):
    model = tiny_model(4)
    exits = (1, 2, 3)
    trainer = LayerSkipTrainer(
        model, layerskip_config(exits, 4, "sum_l"), curriculum=curriculum, quiet=True
    )
    windows = torch.randint(0, 32, (3, 9))
    expected_active = {
        None: [(1, 2, 3)] * 4,
        "rotational": [(1,), (2,), (3,), (1,)],
        # exit l is on once step / 4 >= 0.5 * (4 - l + 1) / 4: 3 from step 1, 1 and 2 from 2
        "gradual": [(), (3,), (1, 2, 3), (1, 2, 3)],
    }[curriculum]
    seen = []
    exit_loss = model.exit_loss

    def recording(h, targets, **kwargs):
        seen.append(kwargs.get("exit_layer"))
        return exit_loss(h, targets, **kwargs)

    monkeypatch.setattr(model, "exit_loss", recording)
    trainer.total_steps = 4
    for step, active in enumerate(expected_active):
        trainer.step = step
        seen.clear()
        loss = trainer.batch_loss(windows)
        assert seen == [*active, 4]  # only the active exits (and the last layer) computed
        reference = layerskip_reference(model, windows, exits, "sum_l", active)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_layer_dropout_rises_with_depth_and_skips_whole_sequences():
    model = tiny_model(2)
    config = layerskip_config((1,), 2, "uniform")
    trainer = LayerSkipTrainer(model, config, layer_dropout=1.0, curriculum=None, quiet=True)
    assert [trainer.dropout_rate(layer) for layer in (1, 2)] == [0.0, 1.0]
    windows = torch.randint(0, 32, (4, 9))
    ids, targets = windows[:, :-1], windows[:, 1:]
    model.train()
    # p_2 = 1: every sequence skips layer 2, so the last exit reads layer 1's states.
    layer1 = F.cross_entropy(model(ids, exit_layer=1).flatten(0, 1), targets.flatten())
    assert trainer.batch_loss(windows).item() == pytest.approx(2 * layer1.item(), rel=1e-5)
    model.eval()  # no dropout at evaluation
    reference = layerskip_reference(model, windows, (1,), "uniform", (1,))
    assert trainer.batch_loss(windows).item() == pytest.approx(reference.item(), rel=1e-5)
    half = LayerSkipTrainer(tiny_model(5), layerskip_config((2,), 5, "uniform"), layer_dropout=0.4)
    assert [half.dropout_rate(layer) for layer in range(1, 6)] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.4]
    )
    with pytest.raises(ValueError, match="layer_dropout"):
        LayerSkipTrainer(model, config, layer_dropout=1.5)
    with pytest.raises(ValueError, match="curriculum"):
        LayerSkipTrainer(model, config, curriculum="sometimes")


def test_layerskip_trains_and_exits_through_the_command_line(tmp_path):
    out = tmp_path / "layerskip.json"
    argv = [*TINY, "--strategy", "layerskip", "--layers", "3", "--exit-layer", "1"]
    argv += ["--exit-ratio", "0.5", "--curriculum", "rotational", "--layer-dropout", "0.3"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    training = results["config"]["training"]
    assert [s["layers"] for s in training["stages"]] == [[1, 1], [2, 2], [3, 3]]
    assert training["loss_scale"] == "sum_l" and results["config"]["layer_dropout"] == 0.3
    assert {"exit_ratio", "hard_ppl", "flops_cost"} <= results["eval"].keys()
    (label,) = table2_rows(results)
    assert label == "LayerSkip 3-layer, early exit"
