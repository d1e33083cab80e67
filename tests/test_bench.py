"""CPU smoke tests of the benchmark plumbing (``bench/``); the timings themselves need a GPU.

``bench.compare`` runs at the ``tiny`` shape with the torch backend and the eager
peers; the tests check the JSON, markdown and PNG it writes. Reference for the
outputs: the eager PyTorch functions of ``bench.impls``, relative error
``||out - eager|| / ||eager||`` under 1e-5 in float32 and 2e-2 in bfloat16 (eager
runs the head GEMM in bfloat16, lego_kernels accumulates in float32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bench import common, compare
from lego_kernels import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """One CPU run of ``python -m bench.compare`` at tiny bf16 and fp32, eager peers only."""
    out = str(tmp_path_factory.mktemp("compare"))
    argv = ["--device", "cpu", "--shapes", "tiny,tiny:fp32", "--peers", "eager,gemm", "--out", out]
    with ops.use_backend("torch"):
        status = compare.main(argv)
    return status, out


def test_compare_json(smoke: tuple[int, str]) -> None:
    status, out = smoke
    assert status == 0
    with open(os.path.join(out, "compare.json")) as f:
        result = json.load(f)
    meta, rows = result["meta"], result["rows"]
    assert meta["device"] == "cpu" and meta["lego_backend"] == "torch"
    assert meta["machine"]["torch"] == torch.__version__
    assert {"card", "driver", "triton", "date"} <= set(meta["machine"])

    expected = {
        ("logits", "fwd"): ["lego", "eager"],
        ("confidence", "fwd"): ["lego", "lego-fused", "lego-chunked", "eager", "gemm"],
        ("cross_entropy", "fwd+bwd"): ["lego", "lego-fused", "lego-chunked", "eager"],
        ("routing", "fwd"): ["lego", "lego-capacity", "eager"],
    }
    shape = common.SHAPES["tiny"]
    for case in common.parse_cases("tiny,tiny:fp32"):
        dtype = case.dtype_name
        for (op, passes), names in expected.items():
            got = [r for r in rows if r["dtype"] == dtype and r["op"] == op]
            assert [r["impl"] for r in got] == names
            assert all(r["passes"] == passes and r["shape"] == "tiny" for r in got)
            assert all(r["ms"] > 0 for r in got), got
            lego = got[0]
            for r in got:
                if op == "routing":
                    num_hard = common.make_routing_inputs(case, "cpu").num_hard
                    nbytes = common.routing_bytes(num_hard, shape.dim, case.dtype)
                    assert r["tbps"] == pytest.approx(nbytes / (r["ms"] * 1e-3) / 1e12)
                    assert r["tflops"] is None
                    assert r["rel_diff"] == 0.0  # a copy of rows: exact
                else:
                    flops = common.head_flops(shape, backward=op == "cross_entropy")
                    assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
                    if r["impl"] != "gemm":  # gemm returns logits, not the op's output
                        assert r["rel_diff"] < TOLERANCE[dtype], r
                if r["impl"].startswith("lego"):
                    assert r["lego_speedup"] is None
                else:
                    assert r["lego_speedup"] == pytest.approx(r["ms"] / lego["ms"])
                assert r["extra_mib"] is None  # memory is measured on CUDA only
    assert len(rows) == 2 * sum(len(v) for v in expected.values())


def test_compare_markdown_and_png(smoke: tuple[int, str]) -> None:
    _, out = smoke
    with open(os.path.join(out, "compare.json")) as f:
        rows = json.load(f)["rows"]
    with open(os.path.join(out, "compare.md")) as f:
        text = f.read()
    assert compare.TABLE_HEADER in text
    table = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(table) == len(rows)
    columns = compare.TABLE_HEADER.count("|") - 1
    assert all(line.count("|") - 1 == columns for line in table)
    lego_ce = next(r for r in rows if r["op"] == "cross_entropy" and r["impl"] == "lego")
    assert (
        f"| tiny | {lego_ce['dtype']} | cross_entropy | fwd+bwd | lego | {lego_ce['ms']:.4g} |"
        in text
    )
    assert "no fused norm" in text  # the note on how the peers get their norm
    assert "smoke run" in text  # a CPU run says it is not a benchmark
    if importlib.util.find_spec("matplotlib") is not None:
        with open(os.path.join(out, "compare.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_keeps_going_after_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    case = common.parse_cases("tiny")[0]

    def broken() -> None:
        raise RuntimeError("kernel exploded\nsecond line")

    def missing() -> None:
        raise ImportError("No module named 'liger_kernel'")

    impl_list = [
        compare.Impl("lego", lambda: broken),
        compare.Impl("liger", missing),
        compare.Impl("eager", lambda: lambda: torch.ones(3)),
    ]
    rows = compare.measure_op(case, "cross_entropy", impl_list, "cpu", flops=10, nbytes=None)
    assert [r.impl for r in rows] == ["lego", "liger", "eager"]
    assert rows[0].ms is None and rows[0].note == "failed: RuntimeError: kernel exploded"
    assert rows[1].ms is None and rows[1].note.startswith("skipped: not installed (ImportError")
    assert rows[2].ms > 0 and rows[2].lego_speedup is None  # no lego time to compare with

    # A failing lego_kernels row makes the command exit with status 1.
    monkeypatch.setattr(compare.impls, "lego_confidence", lambda *args: broken())
    argv = ["--device", "cpu", "--shapes", "tiny", "--ops", "confidence", "--peers", "eager"]
    with ops.use_backend("torch"):
        assert compare.main([*argv, "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ops", "logits,bogus"], "--ops: unknown"),
        (["--peers", "eager,torch"], "--peers: unknown"),
        (["--shapes", "seed,huge"], "--shapes: unknown shape 'huge'"),
        (["--shapes", "seed:int8"], "--shapes: unknown dtype 'int8'"),
        (["--dtype", "fp64"], "--dtype must be one of"),
    ],
)
def test_compare_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        compare.main(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_cases_and_inputs() -> None:
    cases = common.parse_cases("seed, gpt2:fp32,tiny", "bf16")
    assert [c.label for c in cases] == ["seed-bf16", "gpt2-fp32", "tiny-bf16"]
    assert cases[1].dtype == torch.float32 and cases[0].shape == common.Shape(
        "seed", 2048, 64, 69830
    )
    with pytest.raises(ValueError, match="LEGO_BENCH_CASES is empty"):
        common.parse_cases(" , ", arg="LEGO_BENCH_CASES")
    assert common.head_flops(common.SHAPES["llama3"], backward=False) == 2 * 8192 * 4096 * 128256

    tiny = cases[2]
    x, weight, norm_weight, targets = common.make_head_inputs(tiny, "cpu", requires_grad=True)
    assert x.shape == (64, 32) and weight.shape == (1000, 32) and norm_weight.shape == (32,)
    assert x.dtype == weight.dtype == torch.bfloat16 and x.requires_grad and weight.is_leaf
    assert targets.dtype == torch.int64 and 0 <= int(targets.min()) <= int(targets.max()) < 1000
    again = common.make_head_inputs(tiny, "cpu")
    assert torch.equal(again.x, x.detach())  # the same inputs for every implementation

    routing = common.make_routing_inputs(tiny, "cpu")
    assert routing.num_hard == 20 == int((routing.confidence < routing.threshold).sum())
    assert common.routing_bytes(routing.num_hard, 32, torch.bfloat16) == 4 * 20 * 32 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the suite's skip without CUDA")
def test_benchmark_suite_skips_without_cuda() -> None:
    """``python -m pytest bench`` collects every benchmark and skips it, with the reason."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "needs a CUDA GPU" in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "error" not in summary


def test_target_lines() -> None:
    """Issue 6's targets 1-3 are read off the rows (synthetic numbers here)."""

    def row(shape: str, op: str, impl: str, ms: float | None, **extra: float) -> compare.Row:
        return compare.Row(shape, "bf16", op, "fwd", impl, ms=ms, **extra)

    rows = [
        row("seed", "confidence", "lego", 0.05),
        row("seed", "confidence", "compile", 0.38),
        row("llama3", "confidence", "lego", 14.0),
        row("llama3", "confidence", "gemm", 12.5),
        row("gpt2", "cross_entropy", "lego", 5.0, extra_mib=100.0),
        row("gpt2", "cross_entropy", "cce", 10.2, extra_mib=40.0),
        row("gpt2", "cross_entropy", "liger", None),  # not installed: not a peer to beat
        row("llama3", "routing", "lego", 0.05, tbps=1.61),
    ]
    assert compare.target_lines({"copy_tbps": 4.0}, rows) == [
        "1. confidence, seed bf16: 7.60x torch.compile's speed (target >= 5x): met",
        "1. confidence, llama3 bf16: 1.12x the bare GEMM's time (target <= 1.10x): **missed**",
        "2. cross_entropy fwd+bwd, gpt2 bf16: 2.04x the best peer (cce) (target > 1x): met; "
        "extra memory 2.50x CCE's (target <= 2x): **missed**",
        "3. routing (lego), llama3 bf16: 40% of the copy bandwidth (target >= 60%): **missed**",
    ]


def test_plain_path_benchmark_writes_its_ratios(tmp_path: pathlib.Path) -> None:
    """``python -m bench.plain_path_cpu`` at a tiny shape: one row per layout, the ratio
    of the medians' runs and the commit stamp in its JSON."""
    out = tmp_path / "plain.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["--dim", "16", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq-len", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.plain_path_cpu", *argv, "--repeats", "2", "--json", str(out)],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {row["layout"]: row for row in report["results"]}
    assert list(rows) == ["one stage", "zero-weight stage", "deep supervision"]
    for name in ("one stage", "zero-weight stage"):
        row = rows[name]
        assert len(row["times_s"]["plain"]) == len(row["times_s"]["general"]) == 2
        times = row["times_s"]
        ratios = [g / p for g, p in zip(times["general"], times["plain"], strict=True)]
        assert row["general_over_plain"] == pytest.approx(sum(ratios) / 2)  # median of two
    assert "general_over_plain" not in rows["deep supervision"]
    assert report["git"]["commit"] and report["threads"] == 1
    assert "| zero-weight stage | `1-2:0,3-4:1` |" in result.stdout


def test_cpu_benchmark_writes_its_results(tmp_path: pathlib.Path) -> None:
    """``python -m bench.cpu`` at the tiny shape (no compile): rows, ratios, files, provenance."""
    from bench import cpu

    threads = torch.get_num_threads()
    try:
        argv = ["--shapes", "tiny", "--reps", "1", "--peers", "reference,eager"]
        with ops.use_backend("torch"):  # what the command runs without TRITON_INTERPRET
            assert cpu.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "cpu.json") as f:
        result = json.load(f)
    meta, rows = result["meta"], result["rows"]
    assert meta["threads"] == 1 and meta["commit"] and "dirty" in meta and meta["date"]
    assert len(meta["load_average_start"]) == 3
    for op, passes in (("cross_entropy", "fwd+bwd"), ("confidence", "fwd")):
        got = [r for r in rows if r["op"] == op]
        assert [r["impl"] for r in got] == ["lego", "reference", "eager"]
        for r in got:
            assert r["passes"] == passes and r["ms"] > 0 and r["extra_mib"] is not None
            assert r["lego_ratio"] == pytest.approx(got[0]["ms"] / r["ms"])
            assert r["rel_diff"] < 1e-5  # the same loss / confidence as eager PyTorch
    text = (tmp_path / "cpu.md").read_text()
    assert "x reference's time (target <= 0.7x)" in text and meta["commit"] in text
    assert text.count("| tiny (64, 32, 1000) |") == len(rows)


def test_cpu_benchmark_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import cpu

    with pytest.raises(SystemExit) as info:
        cpu.main(["--shapes", "huge"])
    assert info.value.code == 2 and "--shapes" in capsys.readouterr().err


def test_readme_cpu_table_is_the_committed_run() -> None:
    """The README's CPU table and its provenance are what ``bench.cpu`` makes of the committed
    ``bench/results/cpu/cpu.json``, digit for digit."""
    from bench import cpu

    with open(os.path.join(ROOT, "bench", "results", "cpu", "cpu.json")) as f:
        result = json.load(f)
    rows = [cpu.Row(**r) for r in result["rows"]]
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert cpu.summary_table(rows) in text
    assert cpu.provenance(result["meta"]) in text
    assert {r.shape for r in rows} == set(cpu.DEFAULT_SHAPES.split(","))


def test_op_dispatch_benchmark_writes_both_timings(tmp_path: pathlib.Path) -> None:
    """``python -m bench.op_dispatch`` at 2 calls x 2 rounds: every workload, both timings,
    the ratio of their medians, provenance; bad counts are usage errors."""
    from bench import op_dispatch

    threads = torch.get_num_threads()
    assert op_dispatch.main(["--calls", "2", "--rounds", "2", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    with open(tmp_path / "op_dispatch.json") as f:
        result = json.load(f)
    assert result["meta"]["commit"] and result["meta"]["machine"]["date"]
    rows = result["rows"]
    assert [r["workload"] for r in rows] == list(op_dispatch.WORKLOADS)
    for r in rows:
        assert len(r["times_us"]["public"]) == len(r["times_us"]["direct"]) == 2
        assert r["ratio"] == pytest.approx(r["public_us"] / r["direct_us"])
    text = (tmp_path / "op_dispatch.md").read_text()
    assert all(f"| {r['workload']} |" in text for r in rows)
    with pytest.raises(SystemExit):
        op_dispatch.main(["--calls", "0", "--out", str(tmp_path)])
