"""What the benchmarks share: canonical shapes, inputs, FLOP/byte counts, timers, machine info.

Canonical shapes (DESIGN section 6), N tokens of width D into a V-word head:
``seed`` (2048, 64, 69830), ``gpt2`` (8192, 768, 50257), ``llama3`` (8192, 4096, 128256).
``tiny`` (64, 32, 1000) exists only for the CPU smoke test of the plumbing.

A *case* is a shape and a dtype, written ``shape[:dtype]`` (``seed``, ``seed:fp32``);
the pytest-benchmark suite and ``bench.compare`` parse the same spelling.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lego.train import git_stamp

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

EPS = 1e-6  # RMSNorm epsilon used by every benchmark
ROUTE_FRACTION = 0.3  # share of hard tokens in the routing benchmarks (issue 6, target 3)
DEFAULT_CASES = "seed,gpt2,llama3,seed:fp32"


class Shape(NamedTuple):
    """``tokens`` N, ``dim`` D and ``vocab`` V of an exit-head problem."""

    name: str
    tokens: int
    dim: int
    vocab: int


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", 64, 32, 1000),
        Shape("seed", 2048, 64, 69830),
        Shape("gpt2", 8192, 768, 50257),
        Shape("llama3", 8192, 4096, 128256),
    )
}

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


class Case(NamedTuple):
    """One benchmark configuration: a shape and a dtype name (a key of ``DTYPES``)."""

    shape: Shape
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        """``seed-bf16``: a test id and a file-name-safe label."""
        return f"{self.shape.name}-{self.dtype_name}"


def parse_cases(spec: str, default_dtype: str = "bf16", *, arg: str = "--shapes") -> list[Case]:
    """``"seed,gpt2,seed:fp32"`` -> cases; an entry without ``:dtype`` takes ``default_dtype``.

    ``arg`` names the option or variable the spec came from, for the error message.
    """
    if default_dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {default_dtype!r}")
    cases = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, _, dtype_name = entry.partition(":")
        dtype_name = dtype_name or default_dtype
        if name not in SHAPES:
            raise ValueError(f"{arg}: unknown shape {name!r}; choose from {sorted(SHAPES)}")
        if dtype_name not in DTYPES:
            raise ValueError(
                f"{arg}: unknown dtype {dtype_name!r} in {entry!r}; choose from {sorted(DTYPES)}"
            )
        cases.append(Case(SHAPES[name], dtype_name))
    if not cases:
        raise ValueError(f"{arg} is empty; give shapes such as 'seed,gpt2' or 'seed:fp32'")
    return cases


# ----------------------------------------------------------------------------- inputs


class HeadInputs(NamedTuple):
    """Inputs of the exit-head ops: ``x [N, D]``, ``weight [V, D]``, ``norm_weight [D]``
    (all of the case's dtype) and ``targets`` int64 ``[N]``."""

    x: Tensor
    weight: Tensor
    norm_weight: Tensor
    targets: Tensor


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: str) -> Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def make_head_inputs(
    case: Case, device: str, *, requires_grad: bool = False, seed: int = 0
) -> HeadInputs:
    """Random head inputs for ``case`` on ``device``, the same for every implementation.

    ``x`` is standard normal, ``weight`` has std ``D**-0.5`` (unit-scale logits),
    ``norm_weight`` is ``1 + 0.1 * normal``. With ``requires_grad`` the three
    float tensors are leaves that require grad.
    """
    n, d, v = case.shape.tokens, case.shape.dim, case.shape.vocab
    gen = torch.Generator(device).manual_seed(seed)
    x = _randn((n, d), gen, device).to(case.dtype)
    weight = (_randn((v, d), gen, device) * d**-0.5).to(case.dtype)
    norm_weight = (1.0 + 0.1 * _randn((d,), gen, device)).to(case.dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    for t in (x, weight, norm_weight):
        t.requires_grad_(requires_grad)
    return HeadInputs(x, weight, norm_weight, targets)


class RoutingInputs(NamedTuple):
    """Inputs of the routing ops: token states ``x [N, D]``, the ``base [N, D]`` that
    hard rows are scattered into, ``confidence`` float32 ``[N]`` and the ``threshold``.
    Exactly ``num_hard`` tokens have ``confidence < threshold``, spread at random."""

    x: Tensor
    base: Tensor
    confidence: Tensor
    threshold: float
    num_hard: int


def make_routing_inputs(
    case: Case, device: str, *, fraction: float = ROUTE_FRACTION, seed: int = 0
) -> RoutingInputs:
    """Routing inputs for ``case`` (N and D of its shape) with ``fraction`` of hard tokens."""
    n, d = case.shape.tokens, case.shape.dim
    gen = torch.Generator(device).manual_seed(seed)
    x = _randn((n, d), gen, device).to(case.dtype)
    base = _randn((n, d), gen, device).to(case.dtype)
    # A random permutation of 0, 1/N, ..., (N-1)/N: exactly ceil(fraction * N) below fraction.
    confidence = torch.randperm(n, generator=gen, device=device).float() / n
    num_hard = int((confidence < fraction).sum())
    return RoutingInputs(x, base, confidence, fraction, num_hard)


# ----------------------------------------------------------------------------- counts


def head_flops(shape: Shape, *, backward: bool) -> int:
    """FLOPs of the head GEMMs: ``2*N*D*V`` forward, ``6*N*D*V`` forward + backward."""
    return (6 if backward else 2) * shape.tokens * shape.dim * shape.vocab


def routing_bytes(num_hard: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes that gather + scatter of ``num_hard`` rows must move: ``4*K*D*itemsize``.

    Gather reads and writes ``K x D``, scatter reads and writes ``K x D`` (the
    count behind the issue's anchor: 0.092 ms = 0.86 TB/s at K = 30% of 8192,
    D = 4096, bf16). The out-of-place copy of the untouched rows is not counted.
    """
    return 4 * num_hard * dim * dtype.itemsize


def forward_backward(
    fn: Callable[[], Tensor], leaves: Sequence[Tensor], grad_output: Tensor | None = None
) -> Callable[[], Tensor]:
    """A call that clears the leaves' gradients, runs ``fn().backward(grad_output)`` and
    returns the detached output: repeated calls never accumulate gradients.
    ``grad_output`` is needed when ``fn`` returns a non-scalar."""

    def run() -> Tensor:
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad_output)
        return out.detach()

    return run


# ----------------------------------------------------------------------------- timing


def cuda_timer() -> float:
    """``time.perf_counter`` after ``torch.cuda.synchronize()``: a pytest-benchmark timer.

    pytest-benchmark reads the timer before and after each round of
    ``iterations`` calls, so a round is timed from an idle GPU to an idle GPU and
    the launches inside it overlap like in a training step.
    """
    torch.cuda.synchronize()
    return time.perf_counter()


def run_benchmark(
    benchmark: BenchmarkFixture,
    fn: Callable[[], object],
    *,
    group: str,
    flops: int | None = None,
    nbytes: int | None = None,
    budget_s: float = 0.5,
) -> None:
    """Time ``fn`` with pytest-benchmark's pedantic mode on a warm GPU.

    One warm-up call (Triton compilation and autotuning), then rounds of
    ``iterations`` back-to-back calls, each round timed by :func:`cuda_timer`
    (the suite's conftest sets it): about 2 ms or more per round, about
    ``budget_s`` in all. The inputs stay in L2 where they fit (unlike
    ``bench.compare``'s ``do_bench``, which flushes it). Records the case's
    TFLOP/s (``flops``) or TB/s (``nbytes``) at the median in ``extra_info``.
    """
    benchmark.group = group
    fn()
    start = cuda_timer()
    fn()
    once = max(cuda_timer() - start, 1e-6)
    iterations = max(1, min(50, int(2e-3 / once)))
    rounds = max(5, min(100, int(budget_s / (once * iterations))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    if flops is not None:
        benchmark.extra_info["flops"] = flops
        benchmark.extra_info["tflops_at_median"] = flops / median / 1e12
    if nbytes is not None:
        benchmark.extra_info["bytes"] = nbytes
        benchmark.extra_info["tbps_at_median"] = nbytes / median / 1e12


def cpu_median_ms(fn: Callable[[], object], *, reps: int = 5) -> float:
    """Median wall-clock milliseconds of ``reps`` calls of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- machine


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def git_commit() -> dict[str, object]:
    """``{"commit": short sha, "dirty": tracked files changed?}`` of this checkout
    (``lego.train.git_stamp``, as the training runs record it; ``"unknown"`` outside a
    git checkout)."""
    return git_stamp() or {"commit": "unknown", "dirty": None}


def machine_info(device: str) -> dict[str, str]:
    """Card, driver, CUDA, torch/triton/peer versions and UTC date of this run."""
    if device == "cuda":
        card, driver, cuda = torch.cuda.get_device_name(), _nvidia_driver(), torch.version.cuda
    else:
        card, driver, cuda = f"cpu ({platform.processor() or platform.machine()})", "-", "-"
    return {
        "card": card,
        "driver": driver,
        "cuda": str(cuda),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
