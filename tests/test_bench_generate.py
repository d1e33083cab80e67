"""CPU smoke test of ``python -m bench.generate``'s plumbing (the timings are not checked).

One tiny synthetic model trained by ``python -m lego.train --save-model``, one rep: the
JSON and markdown carry every row, the provenance, and the lossless rows' tokens.
"""

import json

from bench import generate as bench_generate
from lego.train import main as train_main
from lego_kernels import ops


def test_bench_generate_writes_every_row(tmp_path):
    model = tmp_path / "deep.pt"
    argv = ["--dataset", "synthetic", "--samples", "64", "--seq-len", "12", "--dim", "16"]
    argv += ["--heads", "2", "--epochs", "1", "--batch-size", "8", "--quiet"]
    argv += ["--strategy", "deep-supervision", "--layers", "3", "--exit-layer", "1"]
    assert train_main([*argv, "--out", str(tmp_path / "run.json"), "--save-model", str(model)]) == 0
    out = tmp_path / "bench"
    bench_argv = [str(model), "--reps", "1", "--prompt-len", "4", "--max-new-tokens", "4"]
    with ops.use_backend("torch"):
        assert bench_generate.main([*bench_argv, "--out", str(out)]) == 0
    results = json.loads((out / "generate.json").read_text())
    assert results["commit"] and results["threads"] == 1 and results["machine"]["date"]
    (model_result,) = results["models"]
    assert model_result["shape"]["exit_layer"] == 1 and set(model_result["batches"]) == {"1", "8"}
    for table in model_result["batches"].values():
        rows = {row["row"]: row for row in table}
        assert list(rows) == [
            "full",
            "early-exit 50%",
            "early-exit 70%",
            "early-exit 90%",
            "self-speculative k=2",
            "self-speculative k=4",
            "self-speculative k=6",
        ]
        assert rows["full"]["speed_vs_full"] == 1.0 and rows["full"]["flops_cost"] == 1.0
        assert all(row["new_tokens"] == 8 * 4 for row in table)
        for k in (2, 4, 6):
            spec = rows[f"self-speculative k={k}"]
            assert spec["same_tokens_as_full"] and 0 <= spec["acceptance_rate"] <= 1
            assert spec["draft_tokens"] == k
        assert all(0 <= rows[f"early-exit {r}%"]["exit_ratio"] <= 1 for r in (50, 70, 90))
    # The 50/70/90% quantiles of the confidence: more exits, a lower threshold.
    thresholds = list(model_result["thresholds"].values())
    assert thresholds == sorted(thresholds, reverse=True)
    text = (out / "generate.md").read_text()
    assert results["commit"] in text and "| batch | row | tokens/s |" in text
