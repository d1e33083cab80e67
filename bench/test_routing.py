"""pytest-benchmark: routing (``ops.route`` + ``gather_tokens`` + ``scatter_tokens``) on the GPU.

At the N and D of each case of ``LEGO_BENCH_CASES``, 30% of the tokens hard.
Forward passes record TB/s at the median against ``4*K*D`` elements
(``bench.common.routing_bytes``); issue 6's target 3 is the ``llama3`` case
(N = 8192, D = 4096) at 60% or more of the card's device-to-device copy bandwidth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bench import impls
from bench.common import Case, forward_backward, make_routing_inputs, routing_bytes, run_benchmark
from lego_kernels import ops

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture


def test_route_gather_scatter_fwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, base, confidence, threshold, num_hard = make_routing_inputs(case, "cuda")
    run_benchmark(
        benchmark,
        lambda: impls.lego_route_gather_scatter(x, base, confidence, threshold),
        group="route+gather+scatter fwd",
        nbytes=routing_bytes(num_hard, case.shape.dim, case.dtype),
    )


def test_route_gather_scatter_capacity_fwd(benchmark: BenchmarkFixture, case: Case) -> None:
    """The static-shape plan (``capacity``). ``extra_info["host_sync"]`` is ``None`` when a
    warm call ran under ``torch.cuda.set_sync_debug_mode("error")`` without synchronizing,
    else the error that a synchronizing call raised."""
    x, base, confidence, threshold, num_hard = make_routing_inputs(case, "cuda")

    def run() -> torch.Tensor:
        return impls.lego_route_gather_scatter(x, base, confidence, threshold, capacity=num_hard)

    run()  # compilation may synchronize; the check is about warm calls
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        host_sync = None
    except RuntimeError as exc:
        host_sync = str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    benchmark.extra_info["host_sync"] = host_sync
    run_benchmark(
        benchmark,
        run,
        group="route+gather+scatter (capacity) fwd",
        nbytes=routing_bytes(num_hard, case.shape.dim, case.dtype),
    )


def test_gather_scatter_fwd_bwd(benchmark: BenchmarkFixture, case: Case) -> None:
    """Gather + scatter and their backward, for a plan built once outside the timing."""
    x, base, confidence, threshold, _ = make_routing_inputs(case, "cuda")
    x.requires_grad_(True)
    base.requires_grad_(True)
    plan = ops.route(confidence, threshold)
    grad_out = torch.randn_like(base)
    run_benchmark(
        benchmark,
        forward_backward(
            lambda: ops.scatter_tokens(base, ops.gather_tokens(x, plan), plan), (x, base), grad_out
        ),
        group="gather+scatter fwd+bwd",
    )
