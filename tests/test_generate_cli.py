"""``python -m lego.generate`` on models trained by ``python -m lego.train --save-model``.

The printed and written continuations are checked against ``LegoModel.generate`` on
the same ids, decoded with the file's vocabulary. Runs are in-process on the torch
backend with tiny models; one subprocess run checks the module entry point.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego.data import DATA_DIR_ENV, TEXT_KEY, UNK
from lego.generate import load_generation_model, main
from lego.train import main as train_main
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get(DATA_DIR_ENV)
needs_wikitext = pytest.mark.skipif(
    DATA_DIR is None or not os.path.isdir(DATA_DIR), reason="WikiText-2 copy not found"
)
TINY_RUN = ["--seq-len", "12", "--dim", "16", "--heads", "2", "--epochs", "1"]
TINY_RUN += ["--batch-size", "4", "--quiet", "--strategy", "deep-supervision"]
TINY_RUN += ["--layers", "3", "--exit-layer", "1"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    path = root / "deep.pt"
    argv = [*TINY_RUN, "--dataset", "synthetic", "--samples", "16", "--threshold", "0.2"]
    assert train_main([*argv, "--out", str(root / "run.json"), "--save-model", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def wikitext_model(tmp_path_factory) -> Path:
    """WikiText-2 with the seed protocol (lowercase words, the original code's slices)."""
    root = tmp_path_factory.mktemp("wikitext")
    path = root / "deep.pt"
    argv = [*TINY_RUN, "--dataset", "wikitext-2", "--protocol", "seed", "--samples", "40"]
    assert train_main([*argv, "--out", str(root / "run.json"), "--save-model", str(path)]) == 0
    return path


def test_continuations_and_stats_match_generate(synthetic_model, tmp_path, capsys):
    out = tmp_path / "gen.json"
    prompts = ["t20 t21 t22 t3", "t40"]
    argv = ["--model", str(synthetic_model), "--prompt", prompts[0], "--prompt", prompts[1]]
    argv += ["--mode", "self-speculative", "--draft-tokens", "2", "--max-new-tokens", "5"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())

    model, codec, saved = load_generation_model(str(synthetic_model))
    assert saved["exit_layer"] == 1  # --exit-layer defaults to the file's
    ids = torch.tensor([[20, 21, 22, 3], [0, 0, 0, 40]])
    mask = ids.new_tensor([[1, 1, 1, 1], [0, 0, 0, 1]]).bool()
    want = model.generate(ids, max_new_tokens=5, attention_mask=mask).new_tokens
    continuations = [codec.decode(row) for row in want.tolist()]
    assert record["continuations"] == continuations
    assert record["prompts"] == prompts
    for continuation in continuations:
        assert continuation in printed
    assert set(record["stats"]) == {"self-speculative", "full"}
    spec, full = record["stats"]["self-speculative"], record["stats"]["full"]
    assert spec["new_tokens"] == full["new_tokens"] == 10
    assert 0 <= spec["acceptance_rate"] <= 1 and full["flops_cost"] == 1.0
    for label in ("tokens/s vs full", "draft acceptance", "FLOPs vs full depth"):
        assert label in printed


def test_early_exit_takes_the_files_threshold_and_samples_reproducibly(synthetic_model, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        argv = ["--model", str(synthetic_model), "--prompt", "t30 t31", "--mode", "early-exit"]
        argv += ["--temperature", "1.0", "--top-k", "10", "--seed", "3", "--json", str(out)]
        assert main(argv) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["continuations"] == outs[1]["continuations"]
    settings = outs[0]["settings"]
    assert settings["threshold"] == 0.2 and settings["context"] == "propagate"
    assert settings["max_new_tokens"] == 10  # what fits: max_seq_len 12 - 2 prompt words
    assert 0 <= outs[0]["stats"]["early-exit"]["exit_ratio"] <= 1


@needs_wikitext
def test_wikitext_words_and_unknown_words(wikitext_model, tmp_path, capsys):
    model, codec, _ = load_generation_model(str(wikitext_model))
    assert codec.variant == "seed" and len(codec.vocab) == model.config.vocab_size
    out = tmp_path / "gen.json"
    argv = ["--model", str(wikitext_model), "--prompt", "The game was qwxzzy", "--json", str(out)]
    with pytest.warns(UserWarning, match="qwxzzy"):
        assert main([*argv, "--max-new-tokens", "3"]) == 0
    ids, unknown = codec.encode("The game was qwxzzy")
    assert unknown == ["qwxzzy"] and ids[-1] == codec.vocab.index(UNK)
    want = model.generate(torch.tensor([ids]), max_new_tokens=3).new_tokens[0].tolist()
    assert json.loads(out.read_text())["continuations"] == [codec.decode(want)]


@needs_wikitext
def test_old_model_file_gets_an_error_and_can_be_resaved(wikitext_model, tmp_path, capsys):
    old = tmp_path / "old.pt"
    saved = torch.load(wikitext_model, weights_only=False)
    del saved[TEXT_KEY]
    torch.save(saved, old)
    assert main(["--model", str(old), "--prompt", "the game"]) == 2
    err = capsys.readouterr().err
    assert "--add-vocabulary" in err and len(err.strip().splitlines()) == 1
    assert main(["--model", str(old), "--add-vocabulary"]) == 0
    resaved = torch.load(old, weights_only=False)
    assert resaved[TEXT_KEY] == torch.load(wikitext_model, weights_only=False)[TEXT_KEY]
    assert resaved.keys() == {*saved, TEXT_KEY}
    assert main(["--model", str(old), "--prompt", "the game", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "12"], "max_new_tokens"),  # 1 + 12 > max_seq_len 12
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--mode", "early-exit", "--exit-layer", "3", "--threshold", "0.5"], "exit_layer"),
        (["--mode", "self-speculative", "--draft-tokens", "0"], "draft_tokens"),
        (["--temperature", "1", "--top-p", "1.5"], "top_p"),
    ],
)
def test_bad_values_give_one_line(synthetic_model, capsys, flags, message):
    assert main(["--model", str(synthetic_model), "--prompt", "t1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_prompt_of_unknown_words_only(synthetic_model, capsys):
    with pytest.warns(UserWarning, match="qqq"):
        assert main(["--model", str(synthetic_model), "--prompt", "qqq"]) == 2
    assert "no word the model knows" in capsys.readouterr().err


def test_early_exit_without_any_threshold(tmp_path, capsys):
    path = tmp_path / "deep.pt"
    argv = [*TINY_RUN, "--dataset", "synthetic", "--samples", "8", "--out", str(tmp_path / "r")]
    assert train_main([*argv, "--save-model", str(path)]) == 0
    assert main(["--model", str(path), "--prompt", "t1", "--mode", "early-exit"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_module_entry_point(synthetic_model):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lego.generate", "--model", str(synthetic_model), "--mode", "x"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2 and "--mode" in done.stderr and "Traceback" not in done.stderr
