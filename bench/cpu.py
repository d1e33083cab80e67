"""``python -m bench.cpu``: the exit-head ops on the CPU, one thread, against their peers.

    python -m bench.cpu [--shapes cpu-28k,seed,cpu-256] [--reps 5]
        [--peers reference,eager,compile] [--out bench/results/cpu]

Every shape runs in float32 (N tokens of width D into a V-word head, RMSNorm first):
``cpu-28k`` (2048, 64, 28911), ``seed`` (2048, 64, 69830), ``cpu-256`` (4096, 256, 32000).

| op | pass | lego | peers |
|---|---|---|---|
| ``cross_entropy`` | fwd+bwd | ``ops.norm_head_cross_entropy`` (mean) | reference, eager, compile |
| ``confidence`` | fwd | ``ops.exit_confidence`` (max_prob) | reference, eager, compile |

lego is ``lego_kernels.ops`` with its default schedule (``ops.schedule``: ``chunked`` on the CPU);
``reference`` is ``lego_kernels.reference``, the recompute order the CPU ran before the chunked
schedule; ``eager`` is ``bench.impls``' ``F.cross_entropy(F.linear(F.rms_norm(x), W))`` (and the
eager confidence), ``compile`` is ``torch.compile(dynamic=False)`` of that same function.

Timing: ``torch.set_num_threads(1)``; one warm-up call each (compilation), then ``--reps``
rounds in which every implementation runs once, in turn (interleaved, so that a change of the
machine's load hits all of them alike); the median per implementation. Memory, in a separate
call: the peak resident memory above the call's start, minus the gradients the call returns
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with ``malloc_trim(0)`` first so
that freed heap pages do not hide new ones; Linux only). Also the minor page faults of a call
(median) and the load average, since the machine may be shared. Writes ``cpu.json`` and
``cpu.md`` into ``--out`` (commit, dirty flag, machine, versions, date) after each shape.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench import impls
from bench.common import EPS, Shape, forward_backward, head_flops, machine_info
from bench.compare import parse_names, rel_diff
from lego_kernels import ops, reference

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", 64, 32, 1000),  # the smoke test's
        Shape("cpu-28k", 2048, 64, 28911),
        Shape("seed", 2048, 64, 69830),
        Shape("cpu-256", 4096, 256, 32000),
    )
}
DEFAULT_SHAPES = "cpu-28k,seed,cpu-256"
OPS = ("cross_entropy", "confidence")
PEERS = ("reference", "eager", "compile")
# Targets (issue 18): lego time over a peer's, and lego memory over compile's.
TARGETS = {
    ("cross_entropy", "compile"): 1.0,
    ("cross_entropy", "reference"): 0.7,
    ("confidence", "compile"): 1.0,
}


@dataclass
class Row:
    """One implementation of one op at one shape: its median time, memory and page faults."""

    shape: str
    op: str
    passes: str
    impl: str
    ms: float | None = None
    gflops: float | None = None
    extra_mib: float | None = None
    page_faults: int | None = None
    lego_ratio: float | None = None  # lego ms / this ms (< 1: lego is faster)
    rel_diff: float | None = None  # of the output, against eager
    note: str = ""


# ----------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench.cpu: no {field} in /proc/self/status (needs Linux)")


def peak_extra_mib(fn: Callable[[], Tensor], leaves: Sequence[Tensor]) -> float:
    """Peak resident memory of one ``fn()`` above what was resident before, minus the
    gradients of ``leaves`` it produces, in MiB (Linux: ``/proc/self``)."""
    for t in leaves:
        t.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    grads = sum(t.grad.nbytes for t in leaves if t.grad is not None)
    del out
    return (peak - before) / 1024 - grads / 2**20


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_impls(
    op: str, shape: Shape, peers: Sequence[str]
) -> tuple[dict[str, Callable[[], Tensor]], tuple[Tensor, ...]]:
    """The calls of lego and each peer on shared inputs, and the leaves they make gradients of."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = shape.tokens, shape.dim, shape.vocab
    grad = op == "cross_entropy"
    x = torch.randn(n, d, generator=gen).requires_grad_(grad)
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).requires_grad_(grad)
    norm_weight = (1.0 + 0.1 * torch.randn(d, generator=gen)).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), generator=gen)
    leaves = (x, weight, norm_weight) if grad else ()
    if grad:
        fns = {
            "lego": impls.lego_cross_entropy,
            "reference": lambda x, w, t, nw: reference.norm_head_cross_entropy(
                x, w, t, nw, eps=EPS
            ),
            "eager": impls.eager_cross_entropy,
            "compile": torch.compile(impls.eager_cross_entropy, dynamic=False),
        }
        calls = {
            name: forward_backward(lambda f=f: f(x, weight, targets, norm_weight), leaves)
            for name, f in fns.items()
        }
    else:
        fns = {
            "lego": impls.lego_confidence,
            "reference": lambda x, w, nw: reference.exit_confidence(x, w, nw, eps=EPS).confidence,
            "eager": impls.eager_confidence,
            "compile": torch.compile(impls.eager_confidence, dynamic=False),
        }
        calls = {name: (lambda f=f: f(x, weight, norm_weight)) for name, f in fns.items()}
    return {name: calls[name] for name in ("lego", *peers)}, leaves


def measure(op: str, shape: Shape, peers: Sequence[str], reps: int) -> list[Row]:
    """Time every implementation of ``op`` at ``shape``, interleaved, and measure its memory."""
    passes = "fwd+bwd" if op == "cross_entropy" else "fwd"
    calls, leaves = make_impls(op, shape, peers)
    rows = {name: Row(shape.name, op, passes, name) for name in calls}
    outputs, times, faults = {}, {name: [] for name in calls}, {name: [] for name in calls}
    for name, fn in calls.items():
        start = time.perf_counter()
        outputs[name] = fn().detach()  # warm-up (compilation for torch.compile)
        if name == "compile":
            rows[name].note = f"first call (compilation) {time.perf_counter() - start:.1f} s"
    for _ in range(reps):
        for name, fn in calls.items():
            minflt, start = _minor_faults(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
            faults[name].append(_minor_faults() - minflt)
    flops = head_flops(shape, backward=op == "cross_entropy")
    for name, fn in calls.items():
        row = rows[name]
        row.ms = sorted(times[name])[len(times[name]) // 2]
        row.gflops = flops / (row.ms * 1e-3) / 1e9
        row.page_faults = sorted(faults[name])[len(faults[name]) // 2]
        row.extra_mib = peak_extra_mib(fn, leaves)
        if "eager" in outputs:
            row.rel_diff = rel_diff(outputs[name], outputs["eager"])
    for row in rows.values():
        row.lego_ratio = rows["lego"].ms / row.ms
    return list(rows.values())


# ----------------------------------------------------------------------------- reporting


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_info(reps: int) -> dict:
    """Commit, dirty flag, machine, versions, threads, load and date of this run."""
    info = machine_info("cpu")
    info.update(
        commit=_git("rev-parse", "--short", "HEAD") or "unknown",
        dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        reps=reps,
        load_average_start=[round(v, 2) for v in os.getloadavg()],
        platform=platform.platform(),
    )
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def target_lines(rows: Sequence[Row]) -> list[str]:
    """Each target of the issue with its measured ratio, per shape."""
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        for op in OPS:
            found = {r.impl: r for r in rows if (r.shape, r.op) == (shape, op)}
            lego = found.get("lego")
            if lego is None or lego.ms is None:
                continue
            for (target_op, peer), limit in TARGETS.items():
                if target_op == op and peer in found:
                    ratio = lego.ms / found[peer].ms
                    verdict = "met" if ratio <= limit else "**missed**"
                    lines.append(
                        f"{shape} {op} ({lego.passes}): {ratio:.2f}x {peer}'s time "
                        f"(target <= {limit}x): {verdict}"
                    )
            compiled = found.get("compile")
            if compiled is not None and compiled.extra_mib and lego.extra_mib is not None:
                verdict = "met" if lego.extra_mib <= compiled.extra_mib else "**missed**"
                lines.append(
                    f"{shape} {op}: peak extra memory {lego.extra_mib:.0f} MiB vs compile's "
                    f"{compiled.extra_mib:.0f} MiB (target <= compile's): {verdict}"
                )
    return lines


def provenance(info: dict) -> str:
    """The run's commit, date, machine, versions and load, as two lines of markdown."""
    return (
        f"Commit {info['commit']}{' (dirty tree)' if info['dirty'] else ''}; {info['date']}; "
        f"{info['cpu']} ({info['cores']} cores), {info['threads']} thread; torch "
        f"{info['torch']}, triton {info['triton']}, Python {info['python']}.\n"
        f"Load average at the start: {info['load_average_start']}, at the end: "
        f"{info.get('load_average_end', '?')}. Median of {info['reps']} interleaved rounds, "
        "float32, `python -m bench.cpu`."
    )


def summary_table(rows: Sequence[Row]) -> str:
    """One line per shape and op: lego's time, its ratio to each peer's, and the memory."""
    header = (
        "| shape (N, D, V) | op | lego ms | lego / reference | lego / eager | lego / compile "
        "| extra MiB, lego / compile |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for shape in dict.fromkeys(r.shape for r in rows):
        for op in OPS:
            found = {r.impl: r for r in rows if (r.shape, r.op) == (shape, op)}
            if "lego" not in found:
                continue
            lego, s = found["lego"], SHAPES[shape]
            ratios = [f"{lego.ms / found[p].ms:.2f}x" if p in found else "" for p in PEERS]
            compiled = found.get("compile")
            memory = f"{lego.extra_mib:.0f} / {compiled.extra_mib:.0f}" if compiled else ""
            cells = [
                f"{shape} ({s.tokens}, {s.dim}, {s.vocab:,})",
                f"{op} ({lego.passes})",
                f"{lego.ms:.0f}",
                *ratios,
                memory,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(info: dict, rows: Sequence[Row]) -> str:
    header = (
        "| shape (N, D, V) | op | pass | impl | median ms | GFLOP/s | lego / impl "
        "| extra MiB | page faults | rel. diff | note |"
    )
    lines = [
        "# lego_kernels on the CPU",
        "",
        provenance(info),
        "",
        summary_table(rows),
        "",
        header,
        "|" + "---|" * header.count(" | ") + "---|",
    ]
    for r in rows:
        s = SHAPES[r.shape]
        cells = [
            f"{r.shape} ({s.tokens}, {s.dim}, {s.vocab})",
            r.op,
            r.passes,
            r.impl,
            _fmt(r.ms, ".1f"),
            _fmt(r.gflops, ".1f"),
            _fmt(r.lego_ratio, ".2f"),
            _fmt(r.extra_mib, ".0f"),
            "" if r.page_faults is None else str(r.page_faults),
            _fmt(r.rel_diff, ".1e"),
            r.note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    targets = target_lines(rows)
    if targets:
        lines += ["", "Targets:", "", *(f"- {t}" for t in targets)]
    lines += [
        "",
        "Notes:",
        "- lego: `lego_kernels.ops` with its default schedule "
        f"(`{ops.schedule(torch.empty(1, 1), torch.empty(1, 1), grad=True)}` on the CPU); "
        "reference: `lego_kernels.reference` (logits recomputed in backward); eager: "
        "`F.cross_entropy(F.linear(F.rms_norm(x), W))` and the eager confidence; compile: "
        "`torch.compile(dynamic=False)` of the eager functions.",
        "- GFLOP/s counts 2NDV (fwd) or 6NDV (fwd+bwd); lego / impl < 1: lego is faster.",
        "- extra MiB: peak resident memory of one call above its start, minus the gradients "
        "it returns; page faults: minor page faults of one call (median).",
        "- rel. diff: ||out - eager|| / ||eager|| of the output (the loss, the confidence).",
        "",
    ]
    return "\n".join(lines)


def write_outputs(info: dict, rows: Sequence[Row], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    info = {**info, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    with open(os.path.join(out, "cpu.json"), "w") as f:
        json.dump({"meta": info, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(out, "cpu.md"), "w") as f:
        f.write(to_markdown(info, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu",
        description="lego_kernels' exit-head ops on one CPU thread vs reference, eager, compile.",
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="default %(default)s")
    parser.add_argument("--ops", default=",".join(OPS), help="default %(default)s")
    parser.add_argument("--peers", default=",".join(PEERS), help="default %(default)s")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "cpu"),
        help="output folder (default bench/results/cpu)",
    )
    args = parser.parse_args(argv)
    shapes = [SHAPES[n] for n in parse_names(parser, "--shapes", args.shapes, list(SHAPES))]
    op_names = parse_names(parser, "--ops", args.ops, OPS)
    peers = parse_names(parser, "--peers", args.peers, PEERS)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    torch.set_num_threads(1)
    info = run_info(args.reps)
    rows: list[Row] = []
    for shape in shapes:
        for op in op_names:
            for row in measure(op, shape, peers, args.reps):
                rows.append(row)
                print(
                    f"{row.shape} {row.op} ({row.passes}) {row.impl}: {row.ms:.1f} ms, "
                    f"{row.extra_mib:.0f} MiB extra, lego/impl {row.lego_ratio:.2f} {row.note}",
                    flush=True,
                )
            gc.collect()
        write_outputs(info, rows, args.out)
    for line in target_lines(rows):
        print(line)
    print(f"bench.cpu: wrote cpu.json and cpu.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
