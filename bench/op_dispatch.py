"""What the ``torch.library`` custom ops cost per call in eager mode, on the CPU (not a test).

    python -m bench.op_dispatch [--calls 300] [--rounds 7] [--out DIR]

Each row times one public call of ``lego_kernels.ops`` (validation, dispatch, the custom op)
against the same work done by calling the op's implementation directly (the functions that
``lego_kernels.library`` runs on the torch backend), in the same process, one thread: per
round ``--calls`` calls of each, interleaved; a row's time is the median over the rounds of
the mean per call. Rows: ``exit_confidence`` on 4 x 64 tokens (V = 256) and on one token at
dim 512, V = 33,278 (a decode step of the dim-512 generation model); ``route`` + ``gather`` +
``scatter`` on 64 tokens of width 64. Writes ``op_dispatch.json`` and ``op_dispatch.md``
(commit, machine, load, date) into ``--out`` (default ``bench/results/cpu/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench.common import git_commit, machine_info
from lego_kernels import chunked, ops, reference

EPS = 1e-6


def _confidence_pair(tokens: int, dim: int, vocab: int) -> tuple[Callable, Callable]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * dim**-0.5
    norm_weight = torch.ones(dim)

    def public() -> object:
        return ops.exit_confidence(x, weight, norm_weight, eps=EPS).confidence

    def direct() -> object:
        with torch.no_grad():
            return chunked.exit_confidence(
                x, weight, norm_weight, None, "rms", EPS, "max_prob", False
            )[0]

    return public, direct


def _routing_pair(tokens: int, dim: int) -> tuple[Callable, Callable]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=gen)
    confidence = torch.rand(tokens, generator=gen)

    def public() -> object:
        plan = ops.route(confidence, 0.5)
        return ops.scatter_tokens(h, ops.gather_tokens(h, plan), plan)

    def direct() -> object:
        plan = reference.route(confidence, 0.5)
        return reference.scatter_rows(h, reference.gather_rows(h, plan.indices), plan.indices)

    return public, direct


WORKLOADS: dict[str, Callable[[], tuple[Callable, Callable]]] = {
    "exit_confidence, 4 x 64 tokens, V 256": lambda: _confidence_pair(4, 64, 256),
    "exit_confidence, 1 token, dim 512, V 33,278": lambda: _confidence_pair(1, 512, 33278),
    "route + gather + scatter, 64 x 64": lambda: _routing_pair(64, 64),
}


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(name: str, calls: int, rounds: int) -> dict[str, object]:
    """One row: the median per-call time of the public call and of the direct one."""
    public, direct = WORKLOADS[name]()
    assert torch.equal(public(), direct()), f"{name}: the two calls disagree"
    times: dict[str, list[float]] = {"public": [], "direct": []}
    for _ in range(rounds):
        for label, fn in (("public", public), ("direct", direct)):
            times[label].append(_per_call_us(fn, calls))
    public_us, direct_us = (statistics.median(times[k]) for k in ("public", "direct"))
    return {
        "workload": name,
        "public_us": public_us,
        "direct_us": direct_us,
        "extra_us": public_us - direct_us,
        "ratio": public_us / direct_us,
        "times_us": times,
    }


def to_markdown(meta: dict, rows: Sequence[dict]) -> str:
    lines = [
        "# Eager cost of a `lego_kernels.ops` call over its implementation (CPU)",
        "",
        f"`python -m bench.op_dispatch`: commit {meta['commit']}"
        f"{' (dirty tree)' if meta['dirty'] else ''}, {meta['machine']['date']}, "
        f"{meta['machine']['card']}, 1 thread, load average (1 min) {meta['load'][0]:.1f}, "
        f"torch {meta['machine']['torch']}; {meta['calls']} calls per round, median of "
        f"{meta['rounds']} interleaved rounds.",
        "",
        "| workload | `ops` call (us) | implementation called directly (us) | extra (us) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['public_us']:.1f} | {r['direct_us']:.1f} | "
            f"{r['extra_us']:.1f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round (300)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    args = parser.parse_args(argv)
    for flag in ("calls", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ops.use_backend("torch"):
            rows = [measure(name, args.calls, args.rounds) for name in WORKLOADS]
    finally:
        torch.set_num_threads(threads)
    meta = {
        **git_commit(),
        "machine": machine_info("cpu"),
        "load": list(os.getloadavg()),
        "calls": args.calls,
        "rounds": args.rounds,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "op_dispatch.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    text = to_markdown(meta, rows)
    with open(os.path.join(args.out, "op_dispatch.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
