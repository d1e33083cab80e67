"""``python -m lego.experiment``: Tables 1 and 2 from run JSON files, the threshold sweep.

Table inputs are tiny real runs of ``python -m lego.train`` on the synthetic corpus
(torch backend), plus hand-made result dicts where the arithmetic of the aggregation
is checked (mean and sample standard deviation over seeds).
"""

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from lego.config import ModelConfig
from lego.experiment import (
    DRAFT,
    load_model,
    load_run_corpus,
    load_runs,
    load_sweeps,
    main,
    sweep,
    table1,
    table2,
    table2_rows,
)
from lego.model import LegoModel
from lego.train import main as train
from lego.trainer import evaluate
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--samples", "48", "--seq-len", "8", "--dim", "16"]
TINY += ["--heads", "2", "--epochs", "1", "--batch-size", "8", "--quiet"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: ASHEM under both protocols and contexts, standard and deep
    supervision with early exit, the latter two saving their models."""
    root = tmp_path_factory.mktemp("runs")
    with ops.use_backend("torch"):
        for name, argv in {
            "table1/ashem-seed": ["--protocol", "seed"],
            "table2/ashem-propagate-s0": ["--save-model", str(root / "ashem.pt")],
            "table2/ashem-routed-s0": ["--context", "routed"],
            "table2/ashem-propagate-s1": ["--seed", "1"],
            "table2/standard-4l": ["--strategy", "standard", "--layers", "4"],
            "table2/deep": [
                *("--strategy", "deep-supervision", "--exit-ratio", "0.5"),
                *("--save-model", str(root / "deep.pt")),
            ],
        }.items():
            assert train([*TINY, *argv, "--out", str(root / f"{name}.json")]) == 0
    return root


def test_table1_puts_the_draft_next_to_each_seed_protocol_run(runs):
    found = load_runs(str(runs / "table1"))
    text = table1(found)
    lines = text.splitlines()
    assert lines[0] == "| metric | draft | seed 0 (cpu) |"
    ev = found[0]["eval"]
    assert f"| two-stage perplexity | 829.8 | {ev['two_stage_ppl']:.1f} |" in lines
    assert f"| tokens exiting at the exit layer | 70.40% | {100 * ev['exit_ratio']:.2f}% |" in lines
    assert "| compute cost, FLOPs with heads | - |" in text  # the draft has no FLOPs count
    assert len(lines) == 2 + len(DRAFT)


def test_table2_has_one_row_per_configuration(runs):
    found = load_runs(str(runs / "table2"))
    lines = table2(found).splitlines()
    labels = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]]
    assert labels == [
        "standard 2-layer (ASHEM phase 1)",
        "standard 4-layer",
        "deep supervision 4-layer, early exit",
        "ASHEM, context=propagate",
        "ASHEM, context=routed",
    ]
    seeds = {label: line.split(" | ")[1] for label, line in zip(labels, lines[2:], strict=True)}
    # Phase 1 of the propagate and routed runs of seed 0 is one model: counted once.
    assert seeds["standard 2-layer (ASHEM phase 1)"] == "0, 1"
    assert seeds["ASHEM, context=propagate"] == "0, 1"
    assert seeds["ASHEM, context=routed"] == "0"


def test_ashem_run_gives_its_phase1_row_with_analytic_costs(runs):
    (run,) = [r for r in load_runs(str(runs / "table2")) if r["path"].endswith("propagate-s0.json")]
    rows = table2_rows(run)
    low = rows["standard 2-layer (ASHEM phase 1)"]
    ev = run["eval"]
    assert (low["ppl"], low["acc"], low["hard_ppl"]) == (
        ev["phase1_ppl"],
        ev["phase1_acc"],
        ev["phase1_hard_ppl"],
    )
    shape = ModelConfig(**run["config"]["model"])
    two, four = (LegoModel(ModelConfig(**{**vars(shape), "num_layers": n})) for n in (2, 4))
    t = shape.max_seq_len
    assert low["layer_cost"] == 0.5
    assert low["flops_cost"] == pytest.approx(two.flops(1, t) / four.flops(1, t), rel=1e-12)
    high = rows["ASHEM, context=propagate"]
    assert high["wall_ratio"] == pytest.approx(ev["wall_time_s"] / ev["full_wall_time_s"])
    assert high["ppl"] == ev["two_stage_ppl"] and high["exit_ratio"] == ev["exit_ratio"]


def _run(seed, ppl, acc):
    return {
        "strategy": "standard",
        "protocol": "honest",
        "device": "cpu",
        "config": {"seed": seed, "layers": 4},
        "eval": {"split": "test", "ppl": ppl, "acc": acc},
    }


def test_table2_mean_and_sample_std_over_seeds():
    ppls, accs = [300.0, 310.0, 332.0], [0.20, 0.21, 0.25]
    text = table2([_run(s, p, a) for s, (p, a) in enumerate(zip(ppls, accs, strict=True))])
    row = text.splitlines()[2]
    ppl = f"{statistics.mean(ppls):.1f} ± {statistics.stdev(ppls):.1f}"
    acc = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}%"
    # Costs fixed by the configuration are shown once, not as "100.00 ± 0.00%".
    assert row == f"| standard 4-layer | 0, 1, 2 | {ppl} | {acc} | - | - | 100.00% | 100.00% | - |"


def test_load_runs_refuses_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"x\.json is not a python -m lego\.train result"):
        load_runs(str(tmp_path))


def test_sweep_points_are_two_stage_evaluations_at_validation_quantiles(runs):
    model, saved = load_model(str(runs / "deep.pt"))
    corpus = load_run_corpus(saved["config"])
    points = sweep(model, corpus, saved, [0.25, 0.75], batch_size=8, time_full=True)
    assert [p["target_exit_ratio"] for p in points] == [0.25, 0.75]
    assert points[0]["threshold"] > points[1]["threshold"]  # more exits: lower threshold
    assert points[0]["exit_ratio"] < points[1]["exit_ratio"]
    again = evaluate(
        model, corpus.test, batch_size=8, exit_layer=2, threshold=points[1]["threshold"]
    )
    assert again["ppl"] == pytest.approx(points[1]["ppl"], rel=1e-9)
    assert points[1]["full_wall_time_s"] > 0


def test_cli_tables_and_sweep_write_their_files(runs, tmp_path, capsys):
    md = tmp_path / "tables.md"
    argv = ["tables", "--table1", str(runs / "table1"), "--table2", str(runs / "table2")]
    assert main([*argv, "--out", str(md)]) == 0
    assert md.read_text().strip() == capsys.readouterr().out.strip()
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    models = [str(runs / "deep.pt"), str(runs / "ashem.pt")]
    argv = ["sweep", *models, "--exit-ratios", "0.3,0.6", "--json", str(out), "--time-full"]
    assert main([*argv, "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert len(report["models"]) == 2 and report["device"] == "cpu"
    for curve in report["models"].values():
        assert [p["target_exit_ratio"] for p in curve["points"]] == [0.3, 0.6]
        assert all(p["full_wall_time_s"] > 0 for p in curve["points"])
    table2_dir = str(runs / "table2")
    assert main(["plot", str(out), "--table2", table2_dir, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_names_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "m.pt", "--json", "x.json", "--exit-ratios", "0.5,1.2"])
    assert "every exit ratio must lie in (0, 1)" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a model")
    assert main(["sweep", str(bogus), "--json", str(tmp_path / "x.json")]) == 2
    assert "bogus.pt" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "x.json"), "--out", str(tmp_path / "p.png")]) == 2
    assert "x.json" in capsys.readouterr().err  # no such file


def _script_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of ``experiments/ashem_wikitext2.sh`` on a tiny synthetic corpus,
    every output under ``tmp_path``."""
    return {
        **os.environ,
        "RESULTS": str(tmp_path / "results"),
        "CKPT": str(tmp_path / "ckpt"),
        "MODELS": str(tmp_path / "models"),
        "EXTRA": " ".join([*TINY, "--samples", "48"]),
        "OMP_NUM_THREADS": "1",
        **settings,
    }


def test_script_runs_every_step_in_two_copies_and_skips_what_exists(tmp_path):
    """``experiments/ashem_wikitext2.sh`` on a tiny synthetic corpus: two copies at once
    share the runs (locks), then a third pass finds every result and skips it."""
    env = _script_env(tmp_path, SEEDS="0", PLOT=str(tmp_path / "sweep.png"))
    script = [str(ROOT / "experiments" / "ashem_wikitext2.sh"), "table1", "table2"]
    copies = [
        subprocess.Popen(["bash", *script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [copy.communicate()[0] for copy in copies]
    assert [copy.returncode for copy in copies] == [0, 0], logs
    results = tmp_path / "results"
    names = {"ashem-propagate", "ashem-routed", "standard-4l", "deep-supervision"}
    assert {p.name for p in (results / "table2").iterdir()} == {f"{n}-seed0.json" for n in names}
    for name in names:  # each run started once, by one copy or the other
        assert sum(log.count(f"== {name}-seed0 (") for log in logs) == 1
    done = subprocess.run(
        ["bash", *script, "sweep", "tables"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exists, skipped") == 5  # table1 and the four table2 runs
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    tables = (results / "tables.md").read_text()
    assert "ASHEM, context=routed" in tables and "| metric | draft | seed 0 (cpu) |" in tables


def test_script_shape2_step_runs_table3_sweep_and_plot(tmp_path):
    """The ``shape2`` step: the five rows at 4 -> 8 layers (exit after 4), the sweep of
    its seed-0 models, its plot, and Table 3 in ``tables`` (tiny width from EXTRA)."""
    env = _script_env(tmp_path, SHAPE2_SEEDS="0", PLOT2=str(tmp_path / "sweep2.png"))
    # Table 3's own budget and sweep ratios (EXTRA without its --samples, which would win).
    assert TINY[2:4] == ["--samples", "48"]
    env.update(EXTRA=" ".join(TINY[:2] + TINY[4:]), SHAPE2_SAMPLES="40", SWEEP_RATIOS="0.25,0.75")
    script = [str(ROOT / "experiments" / "ashem_wikitext2.sh"), "shape2", "tables"]
    done = subprocess.run(["bash", *script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = tmp_path / "results"
    runs = load_runs(str(results / "shape2"))
    assert {Path(r["path"]).name for r in runs} == {
        f"{n}-shape2-seed0.json"
        for n in ("ashem-propagate", "ashem-routed", "standard-8l", "deep-supervision")
    }
    for run in runs:
        config = run["config"]
        assert config["samples"] == 40
        if run["strategy"] == "ashem":
            assert (config["phase1_layers"], config["phase2_layers"]) == (4, 8)
        else:
            assert config["layers"] == 8
            if run["strategy"] == "deep-supervision":
                assert config["exit_layer"] == 4
    lines = table2(runs).splitlines()
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == [
        "standard 4-layer (ASHEM phase 1)",
        "standard 8-layer",
        "deep supervision 8-layer, early exit",
        "ASHEM, context=propagate",
        "ASHEM, context=routed",
    ]
    sweeps = sorted((results / "shape2-sweep").iterdir())
    assert [p.name for p in sweeps] == [
        "ashem-propagate-shape2-seed0.json",
        "deep-supervision-shape2-seed0.json",
    ]
    for path in sweeps:
        (model,) = json.loads(path.read_text())["models"].values()
        assert [p["target_exit_ratio"] for p in model["points"]] == [0.25, 0.75]
    assert (tmp_path / "sweep2.png").read_bytes()[:4] == b"\x89PNG"
    tables = (results / "tables.md").read_text()
    budget = "40 training windows, at most 1 epoch per run (ASHEM: per phase), on cpu"
    assert f"Table 3 (honest protocol, second shape; {budget})\n\n" + table2(runs) in tables


def test_plot_joins_a_models_points_from_several_files_and_refuses_repeats(runs, tmp_path):
    model = str(runs / "deep.pt")
    low, high, png = tmp_path / "low.json", tmp_path / "high.json", tmp_path / "p.png"
    assert main(["sweep", model, "--exit-ratios", "0.2", "--json", str(low), "--quiet"]) == 0
    assert main(["sweep", model, "--exit-ratios", "0.8", "--json", str(high), "--quiet"]) == 0
    curves, datasets = load_sweeps([str(high), str(low)])
    assert datasets == {"synthetic"}
    (points,) = curves.values()
    assert [p["target_exit_ratio"] for p in points] == [0.2, 0.8]
    assert main(["plot", str(high), str(low), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again.json"
    assert main(["sweep", model, "--exit-ratios", "0.8", "--json", str(again), "--quiet"]) == 0
    with pytest.raises(ValueError, match=r"again\.json: .* at exit ratio 0\.8 is in another"):
        load_sweeps([str(low), str(high), str(again)])
    assert main(["plot", str(low), str(high), str(again), "--out", str(png)]) == 2
