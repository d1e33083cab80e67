"""pytest-benchmark: ``LegoModel.early_exit`` end to end against the full-depth forward.

Issue 6, target 4: dim 1024, 8 layers (16 heads), V = 32,000, bfloat16; 8 sequences
of 2,048 tokens (16K tokens); exit after layer 4 with the threshold at the 30%
quantile of the exit confidence, so 70% of the tokens exit. The target is a
wall-clock saving of at least 0.8x the analytic FLOPs saving; ``test_early_exit``
records both (``extra_info``: ``wall_saving``, ``flops_saving``, ``saving_ratio``)
from ``triton.testing.do_bench`` medians of the two paths, taken in the same run.

The full-depth baseline is what ``early_exit`` replaces: every layer on every
token, then the fused exit confidence (prediction) at the last layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import Tensor

from bench.common import run_benchmark
from lego.config import ModelConfig
from lego.model import LegoModel

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

CONFIG = ModelConfig(vocab_size=32000, dim=1024, num_layers=8, num_heads=16, max_seq_len=2048)
BATCH, SEQ_LEN, EXIT_LAYER, EXIT_SHARE = 8, 2048, 4, 0.7
GROUP = "early_exit end to end (dim 1024, 8 layers, V 32000, 16K tokens)"


@pytest.fixture(scope="module")
def setup() -> tuple[LegoModel, Tensor, float]:
    """The bf16 model, random ids ``[8, 2048]``, and the threshold at which 70% exit."""
    gen = torch.Generator("cuda").manual_seed(0)
    torch.manual_seed(0)
    model = LegoModel(CONFIG).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ_LEN), device="cuda", generator=gen)
    with torch.no_grad():
        h = model.run_layers(model.embed(ids), 1, EXIT_LAYER)
        confidence = model.exit_confidence(h, exit_layer=EXIT_LAYER).confidence
    threshold = float(torch.quantile(confidence.float().flatten(), 1.0 - EXIT_SHARE))
    return model, ids, threshold


def full_depth(model: LegoModel, ids: Tensor) -> Tensor:
    """Every layer on every token, then the last exit's prediction ``[B, T]``."""
    with torch.no_grad():
        h = model.run_layers(model.embed(ids), 1, model.config.num_layers)
        return model.exit_confidence(h).prediction


def test_full_depth_forward(
    benchmark: BenchmarkFixture, setup: tuple[LegoModel, Tensor, float]
) -> None:
    model, ids, _ = setup
    run_benchmark(
        benchmark,
        lambda: full_depth(model, ids),
        group=GROUP,
        flops=model.flops(BATCH, SEQ_LEN),
    )


def test_early_exit(benchmark: BenchmarkFixture, setup: tuple[LegoModel, Tensor, float]) -> None:
    from triton.testing import do_bench

    model, ids, threshold = setup

    def early_exit() -> Tensor:
        return model.early_exit(ids, exit_layer=EXIT_LAYER, threshold=threshold).prediction

    stats = model.early_exit(ids, exit_layer=EXIT_LAYER, threshold=threshold).stats
    run_benchmark(benchmark, early_exit, group=GROUP, flops=stats.flops)
    early_ms = do_bench(early_exit, return_mode="median")
    full_ms = do_bench(lambda: full_depth(model, ids), return_mode="median")
    wall_saving = 1.0 - early_ms / full_ms
    flops_saving = 1.0 - stats.flops_cost
    benchmark.extra_info.update(
        exit_ratio=stats.exit_ratio,
        early_exit_ms=early_ms,
        full_depth_ms=full_ms,
        wall_saving=wall_saving,
        flops_saving=flops_saving,
        saving_ratio=wall_saving / flops_saving,  # target 4: >= 0.8
    )
