"""Setup of the pytest-benchmark GPU suite (``python -m pytest bench``).

- Without CUDA every benchmark is skipped, with the reason.
- With CUDA every benchmark is timed by ``bench.common.cuda_timer`` (a synchronizing
  wall clock), and the benchmark JSON's ``machine_info`` gets the card, driver,
  CUDA, torch/triton/peer versions and the date (``bench.common.machine_info``).
- ``LEGO_BENCH_CASES`` (default ``bench.common.DEFAULT_CASES``) picks the cases,
  e.g. ``LEGO_BENCH_CASES=seed,seed:fp32`` for a quick run.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import common

CASES = common.parse_cases(
    os.environ.get("LEGO_BENCH_CASES", common.DEFAULT_CASES), arg="LEGO_BENCH_CASES"
)
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=CASES, ids=[case.label for case in CASES])
def case(request: pytest.FixtureRequest) -> common.Case:
    """Each case of ``LEGO_BENCH_CASES`` (shape and dtype)."""
    return request.param


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark registers this marker too; registering it here keeps a run
    # without the plugin (where every benchmark is skipped) free of warnings.
    config.addinivalue_line("markers", "benchmark: pytest-benchmark settings")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if str(item.path).startswith(BENCH_DIR + os.sep)]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: the suite times the Triton kernels")
        for item in ours:
            item.add_marker(skip)
        return
    for item in ours:
        item.add_marker(pytest.mark.benchmark(timer=common.cuda_timer))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info.update(common.machine_info("cuda" if torch.cuda.is_available() else "cpu"))
