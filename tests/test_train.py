"""``python -m lego.train``: bad flags give one line and exit 2; runs write the issue's JSON.

Runs call ``lego.train.main`` in-process on the torch backend with tiny models; one
subprocess run checks that a bad value reaches the shell without a traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego.train import main
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--samples", "8", "--seq-len", "8", "--dim", "16"]
TINY_RUN = [*TINY, "--heads", "2", "--epochs", "1", "--batch-size", "4", "--quiet"]
ASHEM_EVAL = {
    "split",
    "phase1_ppl",
    "phase1_acc",
    "phase1_hard_ppl",
    "two_stage_ppl",
    "two_stage_acc",
    "hard_ppl",
    "exit_ratio",
    "layer_cost",
    "flops_cost",
}
TOP = {
    "strategy",
    "protocol",
    "dataset",
    "device",
    "versions",
    "config",
    "history",
    "wall_time_s",
    "eval",
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


BAD = [
    (["--strategy", "bogus"], "--strategy"),
    (["--dataset", "ptb"], "--dataset"),
    (["--context", "full"], "--context"),
    (["--measure", "prob"], "--measure"),
    (["--protocol", "draft"], "--protocol"),
    (["--epochs", "0"], "--epochs"),
    (["--dim", "abc"], "--dim"),
    (["--samples", "-1"], "--samples"),
    (["--seq-len", "0"], "--seq-len"),
    (["--batch-size", "2.5"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--patience", "-1"], "--patience"),
    (["--hard-ratio", "1.5"], "--hard-ratio"),
    (["--threshold", "-0.1", "--strategy", "standard"], "--threshold"),
    (["--strategy", "ashem", "--threshold", "0.5"], "--threshold does not apply"),
    (["--strategy", "ashem", "--layers", "4"], "--layers does not apply"),
    (["--strategy", "ashem", "--exit-layer", "1"], "--exit-layer does not apply"),
    (["--strategy", "standard", "--hard-ratio", "0.3"], "--hard-ratio does not apply"),
    (["--strategy", "deep-supervision", "--phase2-lr", "1e-3"], "--phase2-lr does not apply"),
    (["--device", "tpu9"], "--device"),
    (["--device", "meta"], "--device"),
    (["--no-such-flag"], "unrecognized arguments"),
    ([*TINY, "--heads", "3"], "divisible"),
    ([*TINY, "--heads", "2", "--phase1-layers", "4"], "phase2_layers"),
    (
        [*TINY, "--heads", "2", "--strategy", "deep-supervision", "--layers", "2"],
        "--exit-layer (2) must lie below --layers (2)",
    ),
    (
        [*TINY, "--heads", "2", "--strategy", "standard", "--threshold", "0.5", "--layers", "1"],
        "--exit-layer",
    ),
    (["--data-dir", "/no/such/folder"], "LEGO_DATA_DIR"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_give_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([*argv, "--out", str(tmp_path / "r.json")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m lego.train: error:"), err
    assert expected in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available here")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_subprocess_bad_value_has_no_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "lego.train", *TINY, "--heads", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "num_heads" in result.stderr


def test_ashem_writes_the_json(tmp_path, capsys):
    out = tmp_path / "ashem.json"
    argv = [*TINY_RUN, "--samples", "32", "--phase1-layers", "1", "--phase2-layers", "2"]
    assert main([*argv, "--seed", "3", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert TOP | {"threshold", "hard_ratio", "phase1", "phase2"} <= results.keys()
    assert (results["strategy"], results["protocol"], results["dataset"]) == (
        "ashem",
        "honest",
        "synthetic",
    )
    assert results["device"] == "cpu" and results["versions"]["torch"] == torch.__version__
    config = results["config"]
    assert config["seed"] == 3 and config["phase2_layers"] == 2 and config["hard_ratio"] == 0.5
    assert config["ashem"]["phase2_lr"] == 1e-4 and config["model"]["num_layers"] == 1
    assert results["eval"].keys() >= ASHEM_EVAL and results["eval"]["split"] == "test"
    for phase in ("phase1", "phase2"):
        assert {"best_epoch", "val_ppl", "history"} <= results[phase].keys()
    assert [r["phase"] for r in results["history"]] == ["phase1", "phase2"]
    assert abs(results["hard_ratio"] - 0.5) < 0.01
    table = capsys.readouterr().out
    assert "two-stage perplexity" in table and "FLOPs cost" in table and str(out) in table


@pytest.mark.skipif(
    not os.path.isdir(os.environ.get("LEGO_DATA_DIR", "")), reason="WikiText-2 copy not found"
)
def test_standard_with_early_exit_on_wikitext2_writes_the_json(tmp_path):
    out = tmp_path / "standard.json"
    argv = ["--strategy", "standard", "--samples", "32", "--protocol", "seed", "--layers", "2"]
    argv += ["--dim", "16", "--heads", "2", "--seq-len", "16", "--epochs", "1", "--quiet"]
    assert main([*argv, "--exit-layer", "1", "--threshold", "0.01", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results.keys() >= TOP and results["dataset"] == "wikitext-2"
    ev = results["eval"]
    assert ev["split"] == "valid"  # seed protocol: the draft evaluated on validation
    assert {"ppl", "acc", "exit_ratio", "layer_cost", "flops_cost"} <= ev.keys()
    assert ev["ppl"] > 1 and 0 <= ev["exit_ratio"] <= 1
    assert len(results["history"]) == 1 and results["config"]["threshold"] == 0.01


def test_deep_supervision_trains_both_exits(tmp_path):
    out = tmp_path / "deep.json"
    argv = [*TINY_RUN, "--strategy", "deep-supervision", "--layers", "2", "--exit-layer", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    stages = results["config"]["training"]["stages"]
    assert [s["layers"] for s in stages] == [[1, 1], [2, 2]]
    assert set(results["eval"]) == {"split", "ppl", "acc"}  # no threshold: no exit numbers
