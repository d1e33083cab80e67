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

from lego.ashem import EVAL_KEYS
from lego.experiment import load_model, load_run_corpus
from lego.train import main
from lego.trainer import evaluate, exit_outputs
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--samples", "8", "--seq-len", "8", "--dim", "16"]
TINY_RUN = [*TINY, "--heads", "2", "--epochs", "1", "--batch-size", "4", "--quiet"]
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
    (["--strategy", "standard", "--threshold", "0.5", "--exit-ratio", "0.3"], "give one"),
    (["--strategy", "deep-supervision", "--exit-ratio", "1"], "--exit-ratio"),
    (["--strategy", "ashem", "--exit-ratio", "0.5"], "--exit-ratio does not apply"),
    (["--phase1-from", "phase1.pt"], "--phase1-from needs --checkpoint-dir"),
    (
        ["--strategy", "standard", "--phase1-from", "p.pt", "--checkpoint-dir", "/no/such/dir"],
        "--phase1-from does not apply",
    ),
    (
        [*TINY, "--heads", "2", "--phase1-from", "/no/such.pt", "--checkpoint-dir", "/tmp"],
        "no such checkpoint file",
    ),
    (
        [*TINY, "--heads", "2", "--strategy", "standard", "--exit-ratio", "0.5", "--layers", "2"],
        "--exit-layer (2) must lie below --layers (2)",
    ),
    (["--strategy", "no_such_module:Thing"], "cannot import no_such_module"),
    (["--strategy", "layerskip", "--hard-ratio", "0.3"], "(it is a flag of ashem)"),
    (["--strategy", "standard", "--stages", "1-4"], "--stages does not apply"),
    (["--strategy", "deep-supervision", "--stages", "1-2:x"], "--stages"),
    (["--strategy", "deep-supervision", "--stages", "3-4,1-2"], "ascending"),
    (["--strategy", "deep-supervision", "--stages", "1-2,3-5"], "beyond the model's 4 layers"),
    (["--strategy", "deep-supervision", "--loss-scale", "cubic"], "--loss-scale"),
    (["--strategy", "layerskip", "--layer-dropout", "2"], "--layer-dropout"),
    (["--strategy", "layerskip", "--exit-layers", "1,x"], "--exit-layers"),
    (["--strategy", "layerskip", "--exit-layers", "4"], "--exit-layers: exit_layers must lie"),
    (
        ["--strategy", "layerskip", "--exit-layers", "1", "--exit-ratio", "0.5"],
        "--exit-layer (2) has no exit loss",
    ),
    (["--arch", "gpt"], "--arch"),
    (["--eval-samples", "-1"], "--eval-samples"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--dataset", "synthetic", "--data-dir", "/tmp"], "--data-dir does not apply to --dataset"),
    (["--tokenizer", "byte"], "--tokenizer does not apply to --dataset wikitext-2"),
    (["--dataset", "text"], "--dataset text needs --data-files"),
    (["--dataset", "text", "--data-files", "a,b"], "three comma-separated files"),
    (["--dataset", "text", "--data-files", "/no/a,/no/b,/no/c"], "not found: /no/a"),
    (["--dataset", "text", "--data-files", "a,b,c", "--protocol", "seed"], "--protocol seed"),
    (["--dataset", "hf:"], "--dataset"),
    (["--dataset", "hf:x", "--hf-splits", "a,b,c[x:]"], "NAME[START:STOP]"),
    (["--hf-splits", "a,b,c"], "--hf-splits does not apply"),
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
    assert results["eval"].keys() == set(EVAL_KEYS) and results["eval"]["split"] == "test"
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
    argv = ["--strategy", "standard", "--samples", "40", "--protocol", "seed", "--layers", "2"]
    argv += ["--dim", "16", "--heads", "2", "--seq-len", "16", "--epochs", "1", "--quiet"]
    argv += ["--batch-size", "8"]
    assert main([*argv, "--exit-layer", "1", "--threshold", "0.01", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results.keys() >= TOP and results["dataset"] == "wikitext-2"
    ev = results["eval"]
    assert ev["split"] == "valid"  # seed protocol: the draft evaluated on validation
    assert {"ppl", "acc", "exit_ratio", "layer_cost", "flops_cost"} <= ev.keys()
    assert ev["ppl"] > 1 and 0 <= ev["exit_ratio"] <= 1
    assert len(results["history"]) == 1 and results["config"]["threshold"] == 0.01
    # The original code's slices: 40 x 17 training tokens, windows of 17 every 16 tokens,
    # whole batches of 8; validation a fifth of that.
    assert results["config"]["vocab_size"] > 1000 and ev["split"] == "valid"
    corpus = load_run_corpus(results["config"])
    assert corpus.train.shape == (40, 17) and corpus.valid.shape == (8, 17)


def test_deep_supervision_trains_both_exits(tmp_path):
    out = tmp_path / "deep.json"
    argv = [*TINY_RUN, "--strategy", "deep-supervision", "--layers", "2", "--exit-layer", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    stages = results["config"]["training"]["stages"]
    assert [s["layers"] for s in stages] == [[1, 1], [2, 2]]
    assert set(results["eval"]) == {"split", "ppl", "acc"}  # no threshold: no exit numbers


def test_exit_ratio_picks_the_threshold_on_validation_and_saves_the_model(tmp_path):
    out, saved_path = tmp_path / "deep.json", tmp_path / "deep.pt"
    argv = [*TINY_RUN, "--samples", "64", "--strategy", "deep-supervision", "--layers", "2"]
    argv += ["--exit-layer", "1", "--exit-ratio", "0.5", "--save-model", str(saved_path)]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    ev, threshold = results["eval"], results["threshold"]
    assert ev.keys() >= {"exit_ratio", "hard_ppl", "wall_time_s", "full_wall_time_s"}
    assert ev["full_wall_time_s"] > 0 and ev["wall_time_s"] > 0

    model, saved = load_model(str(saved_path))
    assert saved["threshold"] == threshold and saved["exit_layer"] == 1
    assert json.loads(json.dumps(saved["config"])) == results["config"]
    corpus = load_run_corpus(saved["config"])
    assert saved["text"] == corpus.codec.state()  # for generate
    # The threshold is the validation split's 50% quantile: half its tokens exit.
    _, conf = exit_outputs(model, corpus.valid, exit_layer=1)
    n = conf.confidence.numel()
    assert abs((conf.confidence >= threshold).float().mean().item() - 0.5) <= 1 / n
    # The saved model is the one evaluated: the test numbers come out again.
    again = evaluate(model, corpus.test, batch_size=4, exit_layer=1, threshold=threshold)
    for key in ("ppl", "acc", "exit_ratio", "hard_ppl", "flops_cost"):
        assert again[key] == pytest.approx(ev[key], rel=1e-6), key


def test_phase1_from_gives_the_run_that_trains_phase1_itself(tmp_path):
    """``--context routed --phase1-from`` the propagate run's ``phase1.pt`` = a routed run
    from scratch (phase 1 does not read ``--context``), minus the wall times."""
    argv = [*TINY_RUN, "--samples", "32", "--phase1-layers", "1", "--phase2-layers", "2"]
    argv += ["--epochs", "2"]
    first = tmp_path / "propagate"
    assert main([*argv, "--checkpoint-dir", str(first), "--out", str(tmp_path / "p.json")]) == 0
    assert (first / "phase1.pt").is_file()
    routed = [*argv, "--context", "routed"]
    assert main([*routed, "--out", str(tmp_path / "full.json")]) == 0
    shared = ["--phase1-from", str(first / "phase1.pt"), "--checkpoint-dir", str(tmp_path / "r")]
    assert main([*routed, *shared, "--out", str(tmp_path / "from.json")]) == 0

    def numbers(name):
        results = json.loads((tmp_path / name).read_text())
        history = [
            {k: v for k, v in r.items() if not k.endswith("time_s")} for r in results["history"]
        ]
        ev = {k: v for k, v in results["eval"].items() if not k.endswith("wall_time_s")}
        return history, ev, results["threshold"]

    assert numbers("from.json") == numbers("full.json")


def test_phase1_from_refuses_other_settings(tmp_path, capsys):
    argv = [*TINY_RUN, "--samples", "32", "--phase1-layers", "1", "--phase2-layers", "2"]
    first = tmp_path / "first"
    assert main([*argv, "--checkpoint-dir", str(first), "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    shared = ["--phase1-from", str(first / "phase1.pt"), "--checkpoint-dir", str(tmp_path / "b")]
    assert main([*argv, "--seed", "1", *shared, "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "--seed: checkpoint 0, now 1" in err and "start from the file of a run" in err


def test_an_existing_out_is_never_overwritten_silently(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    argv = [*TINY_RUN, "--strategy", "standard", "--layers", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2 and out.read_text() == "keep me"
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["strategy"] == "standard"
    # The default name is numbered when taken.
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0 and main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [
        "standard-synthetic-honest-seed0-2.json",
        "standard-synthetic-honest-seed0.json",
    ]


def test_eval_cap_batch_size_and_commit_stamp(tmp_path):
    out, saved_path = tmp_path / "r.json", tmp_path / "m.pt"
    argv = [*TINY_RUN, "--samples", "64", "--strategy", "standard", "--layers", "2"]
    argv += ["--eval-samples", "3", "--eval-batch-size", "2", "--save-model", str(saved_path)]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert results["git"]["commit"] == commit and isinstance(results["git"]["dirty"], bool)
    assert results["versions"]["lego_kernels"] and results["date"][:2] == "20"
    corpus = load_run_corpus(results["config"])
    assert corpus.valid.shape[0] == corpus.test.shape[0] == 3 and corpus.train.shape[0] == 64
    model, _ = load_model(str(saved_path))
    again = evaluate(model, corpus.test, batch_size=3)
    assert again["ppl"] == pytest.approx(results["eval"]["ppl"], rel=1e-6)


def test_text_files_with_byte_tokens_train(tmp_path):
    files = []
    for split, text in (
        ("train", "héllo wörld\n" * 40),
        ("valid", "hello\n" * 8),
        ("test", "wörld\n" * 8),
    ):
        path = tmp_path / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        files.append(str(path))
    out = tmp_path / "text.json"
    argv = ["--dataset", "text", "--data-files", ",".join(files), "--tokenizer", "byte"]
    argv += [*TINY_RUN[2:], "--strategy", "standard", "--layers", "2", "--samples", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["config"]["vocab_size"] == 256 and results["config"]["tokenizer"] == "byte"
    assert results["dataset"] == "text" and results["eval"]["ppl"] < 256
