"""pytest-benchmark: the fused exit-head ops of ``lego_kernels.ops`` on the GPU.

Each test times one op at each case of ``LEGO_BENCH_CASES`` (forward, and
forward + backward where the op has a backward) and records its TFLOP/s at the
median against ``2*N*D*V`` (forward) or ``6*N*D*V`` (forward + backward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bench import impls
from bench.common import Case, forward_backward, head_flops, make_head_inputs, run_benchmark

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture


def test_norm_head_logits_fwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, weight, norm_weight, _ = make_head_inputs(case, "cuda")
    run_benchmark(
        benchmark,
        lambda: impls.lego_logits(x, weight, norm_weight),
        group="norm_head_logits fwd",
        flops=head_flops(case.shape, backward=False),
    )


def test_norm_head_logits_fwd_bwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, weight, norm_weight, _ = make_head_inputs(case, "cuda", requires_grad=True)
    grad_logits = torch.randn(case.shape.tokens, case.shape.vocab, device="cuda", dtype=case.dtype)
    run_benchmark(
        benchmark,
        forward_backward(
            lambda: impls.lego_logits(x, weight, norm_weight), (x, weight, norm_weight), grad_logits
        ),
        group="norm_head_logits fwd+bwd",
        flops=head_flops(case.shape, backward=True),
    )


def test_exit_confidence_fwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, weight, norm_weight, _ = make_head_inputs(case, "cuda")
    run_benchmark(
        benchmark,
        lambda: impls.lego_confidence(x, weight, norm_weight),
        group="exit_confidence fwd",
        flops=head_flops(case.shape, backward=False),
    )


def test_norm_head_cross_entropy_fwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, weight, norm_weight, targets = make_head_inputs(case, "cuda")
    run_benchmark(
        benchmark,
        lambda: impls.lego_cross_entropy(x, weight, targets, norm_weight),
        group="norm_head_cross_entropy fwd",
        flops=head_flops(case.shape, backward=False),
    )


def test_norm_head_cross_entropy_fwd_bwd(benchmark: BenchmarkFixture, case: Case) -> None:
    x, weight, norm_weight, targets = make_head_inputs(case, "cuda", requires_grad=True)
    run_benchmark(
        benchmark,
        forward_backward(
            lambda: impls.lego_cross_entropy(x, weight, targets, norm_weight),
            (x, weight, norm_weight),
        ),
        group="norm_head_cross_entropy fwd+bwd",
        flops=head_flops(case.shape, backward=True),
    )
