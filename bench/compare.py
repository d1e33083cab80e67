"""``python -m bench.compare``: ``lego_kernels`` side by side with its peers, same inputs.

    python -m bench.compare [--shapes seed,gpt2,llama3] [--dtype bf16]
        [--ops logits,confidence,cross_entropy,routing] [--peers eager,compile,gemm,liger,cce]
        [--out DIR] [--device cuda|cpu]

For every case (``shape[:dtype]``, see ``bench.common``) and op, every
implementation runs on the same inputs:

| op | pass | lego_kernels | peers |
|---|---|---|---|
| ``logits`` | fwd | ``ops.norm_head_logits`` | eager, compile |
| ``confidence`` | fwd | ``ops.exit_confidence`` (x3) | eager, compile, gemm (bare ``x @ W.T``) |
| ``cross_entropy`` | fwd+bwd | ``ops.norm_head_cross_entropy`` (x3) | eager, compile, liger, cce |
| ``routing`` | fwd | ``ops.route`` + gather + scatter, also with ``capacity`` | eager |

x3: three rows, ``lego``, the default schedule (``ops.schedule``, named in the row's note), and
``lego-fused`` and ``lego-chunked``, each schedule forced with ``ops.use_schedule``.

Time: median of ``triton.testing.do_bench`` on CUDA (warm, L2 flushed between
calls); median of a few wall-clock calls on CPU (plumbing only, not a benchmark).
Reported: median ms, TFLOP/s (``2NDV`` fwd, ``6NDV`` fwd+bwd), TB/s for routing
(``4*K*D`` bytes), peak extra memory on CUDA, the speedup of lego over each peer
(peer ms / lego ms), lego's extra memory over the peer's, and each output's
relative difference from the eager output. Writes ``compare.json``, ``compare.md``
and ``compare.png`` into ``--out`` (rewritten after each case, so an interrupted
run keeps what it measured). Exit status 1 when a lego_kernels row failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench import impls
from bench.common import (
    DEFAULT_CASES,
    Case,
    cpu_median_ms,
    forward_backward,
    head_flops,
    machine_info,
    make_head_inputs,
    make_routing_inputs,
    parse_cases,
    routing_bytes,
)
from lego_kernels import ops

OPS = ("logits", "confidence", "cross_entropy", "routing")
PEERS = ("eager", "compile", "gemm", "liger", "cce")
OP_PEERS = {
    "logits": ("eager", "compile"),
    "confidence": ("eager", "compile", "gemm"),
    "cross_entropy": ("eager", "compile", "liger", "cce"),
    "routing": ("eager",),
}
NOTES = (
    "Same inputs for every implementation; RMSNorm (eps 1e-6) before the head everywhere.",
    "eager: F.rms_norm and the head GEMM in the input dtype, softmax statistics and "
    "cross-entropy in float32; compile: torch.compile(dynamic=False) of that same function.",
    "Liger (LigerFusedLinearCrossEntropyLoss) and CCE (linear_cross_entropy, its default "
    "impl='cce' with gradient filtering) have no fused norm: they get F.rms_norm's output.",
    "gemm: the bare x @ W.T, the floor for the confidence pass (issue 6, target 1).",
    "lego: the default schedule (ops.schedule; the note names it); lego-fused, lego-chunked: "
    "that schedule forced with ops.use_schedule.",
    "lego speedup = peer ms / lego ms (> 1: lego is faster); lego mem ratio = lego extra "
    "memory / peer extra memory.",
    "extra MiB: peak CUDA memory allocated during one call minus what was allocated before "
    "(the inputs), minus the gradients of the inputs for fwd+bwd.",
    "routing: K = 30% of N hard tokens; TB/s counts 4*K*D elements (gather and scatter each "
    "read and write K x D), the out-of-place copy of the other rows is not counted.",
    "rel. diff: ||out - eager|| / ||eager|| of the op's output (the loss for cross_entropy).",
)


@dataclass
class Row:
    """One implementation of one op at one case; ``ms is None`` when it was skipped."""

    shape: str
    dtype: str
    op: str
    passes: str
    impl: str
    ms: float | None = None
    tflops: float | None = None
    tbps: float | None = None
    extra_mib: float | None = None
    lego_speedup: float | None = None
    lego_mem_ratio: float | None = None
    rel_diff: float | None = None
    note: str = ""


class Skip(Exception):
    """Raised by an implementation's ``make`` when it cannot run here; the message says why."""


@dataclass(frozen=True)
class Impl:
    """A named implementation of an op on the shared inputs.

    ``make()`` builds the zero-argument call (it raises ``ImportError`` for a missing
    peer, ``Skip`` for one that cannot run on this device); the call returns the
    tensor compared with the eager output. ``leaves``
    are the inputs whose gradients a fwd+bwd call produces.
    """

    name: str
    make: Callable[[], Callable[[], Tensor]]
    leaves: tuple[Tensor, ...] = ()


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile`` of an eager function with static shapes."""
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- the ops


def scheduled(fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    """``fn`` run inside ``ops.use_schedule(name)``."""

    def run(*args: Tensor) -> Tensor:
        with ops.use_schedule(name):
            return fn(*args)

    return run


def default_schedule(op: str, case: Case, device: str) -> str:
    """The schedule ``ops`` picks for ``op`` at ``case`` (no memory: expanded scalars)."""
    x, w = (
        torch.zeros((), dtype=case.dtype, device=device).expand(n, case.shape.dim)
        for n in (case.shape.tokens, case.shape.vocab)
    )
    return ops.schedule(x, w, grad=op == "cross_entropy")


def head_impls(op: str, case: Case, device: str, peers: Sequence[str]) -> list[Impl]:
    """lego_kernels first (each schedule), then the requested peers of a head op."""
    backward = op == "cross_entropy"
    x, weight, norm_weight, targets = make_head_inputs(case, device, requires_grad=backward)
    leaves = (x, weight, norm_weight)
    if op == "cross_entropy":

        def run_loss(loss: impls.HeadLoss) -> Callable[[], Tensor]:
            return forward_backward(lambda: loss(x, weight, targets, norm_weight), leaves)

        def run_cuda_peer(make_loss: Callable[[], impls.HeadLoss]) -> Callable[[], Tensor]:
            loss = make_loss()  # ImportError first: "not installed" says more than "no CUDA"
            if device != "cuda":
                raise Skip("needs CUDA (Triton kernels without a CPU path)")
            return run_loss(loss)

        makers = {
            "lego": lambda: run_loss(impls.lego_cross_entropy),
            "lego-fused": lambda: run_loss(scheduled(impls.lego_cross_entropy, "fused")),
            "lego-chunked": lambda: run_loss(scheduled(impls.lego_cross_entropy, "chunked")),
            "eager": lambda: run_loss(impls.eager_cross_entropy),
            "compile": lambda: run_loss(compiled(impls.eager_cross_entropy)),
            "liger": lambda: run_cuda_peer(impls.liger_cross_entropy),
            "cce": lambda: run_cuda_peer(impls.cce_cross_entropy),
        }
    else:
        lego_fn, eager_fn = {
            "logits": (impls.lego_logits, impls.eager_logits),
            "confidence": (impls.lego_confidence, impls.eager_confidence),
        }[op]

        def run_head(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[], Tensor]:
            return lambda: fn(x, weight, norm_weight)

        makers = {
            "lego": lambda: run_head(lego_fn),
            "lego-fused": lambda: run_head(scheduled(lego_fn, "fused")),
            "lego-chunked": lambda: run_head(scheduled(lego_fn, "chunked")),
            "eager": lambda: run_head(eager_fn),
            "compile": lambda: run_head(compiled(eager_fn)),
            "gemm": lambda: lambda: impls.head_gemm(x, weight),
        }
    schedules = [f"lego-{name}" for name in ops.SCHEDULES] if op != "logits" else []
    names = ["lego", *schedules, *(p for p in OP_PEERS[op] if p in peers)]
    return [Impl(name, makers[name], leaves if backward else ()) for name in names]


def routing_impls(case: Case, device: str, peers: Sequence[str]) -> tuple[list[Impl], int]:
    """lego routing without and with ``capacity``, then eager; and the number of hard rows."""
    x, base, confidence, threshold, num_hard = make_routing_inputs(case, device)
    found = [
        Impl(
            "lego", lambda: lambda: impls.lego_route_gather_scatter(x, base, confidence, threshold)
        ),
        Impl(
            "lego-capacity",
            lambda: (
                lambda: impls.lego_route_gather_scatter(
                    x, base, confidence, threshold, capacity=num_hard
                )
            ),
        ),
    ]
    if "eager" in peers:
        found.append(
            Impl(
                "eager",
                lambda: lambda: impls.eager_route_gather_scatter(x, base, confidence, threshold),
            )
        )
    return found, num_hard


# ----------------------------------------------------------------------------- measuring


def median_ms(fn: Callable[[], Tensor], device: str) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, a wall clock on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return cpu_median_ms(fn, reps=3)


def extra_mib(fn: Callable[[], Tensor], leaves: Sequence[Tensor]) -> float:
    """Peak CUDA memory of one ``fn()`` call beyond what was allocated before it
    (and beyond the leaves' gradients that the call produces), in MiB."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = sum(t.grad.nbytes for t in leaves if t.grad is not None)
    del out
    return (peak - before - grads) / 2**20


def copy_tbps() -> float:
    """Device-to-device copy bandwidth of this GPU in TB/s (bytes read + written, 1 GiB)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def rel_diff(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``inf`` for a NaN or a shape mismatch)."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.double(), ref.double()
    err = float(
        torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)
    )
    return err if err == err else float("inf")


def short_error(exc: BaseException) -> str:
    """``TypeName: first line of the message``, at most 160 characters."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text[:160]


def measure_op(
    case: Case, op: str, impl_list: list[Impl], device: str, flops: int | None, nbytes: int | None
) -> list[Row]:
    """Time every implementation; the first is lego_kernels, the eager one is the check's
    reference. Failures and missing peers become rows with a note."""
    passes = "fwd+bwd" if op == "cross_entropy" else "fwd"
    rows, outputs = [], {}
    for impl in impl_list:
        row = Row(case.shape.name, case.dtype_name, op, passes, impl.name)
        rows.append(row)
        try:
            fn = impl.make()
        except ImportError as exc:
            row.note = f"skipped: not installed ({short_error(exc)})"
            continue
        except Skip as exc:
            row.note = f"skipped: {exc}"
            continue
        except Exception as exc:  # e.g. a peer that does not import against this torch
            row.note = f"failed: {short_error(exc)}"
            continue
        try:
            start = time.perf_counter()
            outputs[impl.name] = fn().detach()  # warm-up; compiles torch.compile and Triton
            warm_s = time.perf_counter() - start
            row.ms = median_ms(fn, device)
            if device == "cuda":
                row.extra_mib = extra_mib(fn, impl.leaves)
            if impl.name == "compile":
                row.note = f"first call (compilation) {warm_s:.1f} s"
        except Exception as exc:  # a peer (or lego) failing must not stop the comparison
            row.ms = None
            row.note = f"failed: {short_error(exc)}"
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        if flops is not None:
            row.tflops = flops / (row.ms * 1e-3) / 1e12
        if nbytes is not None:
            row.tbps = nbytes / (row.ms * 1e-3) / 1e12
    ref = outputs.get("eager")
    lego = rows[0]
    for row in rows:
        if ref is not None and row.impl in outputs and row.impl != "gemm":
            row.rel_diff = rel_diff(outputs[row.impl], ref)
        if row.impl.startswith("lego") or row.ms is None or lego.ms is None:
            continue
        row.lego_speedup = row.ms / lego.ms
        if row.extra_mib and lego.extra_mib is not None:
            row.lego_mem_ratio = lego.extra_mib / row.extra_mib
    return rows


# ----------------------------------------------------------------------------- the run


def run(
    cases: Sequence[Case], op_names: Sequence[str], peers: Sequence[str], device: str, out: str
) -> tuple[dict, list[Row]]:
    """Measure every case and op, rewriting the outputs in ``out`` after each case."""
    meta = {
        "machine": machine_info(device),
        "device": device,
        "lego_backend": ops.backend(torch.empty(0, device=device)),
        "copy_tbps": copy_tbps() if device == "cuda" and "routing" in op_names else None,
        "cases": [case.label for case in cases],
        "ops": list(op_names),
        "peers": list(peers),
        "notes": list(NOTES),
    }
    rows: list[Row] = []
    for case in cases:
        torch._dynamo.reset()  # each case compiles afresh, never against a stale guard
        for op in op_names:
            if op == "routing":
                impl_list, num_hard = routing_impls(case, device, peers)
                flops, nbytes = None, routing_bytes(num_hard, case.shape.dim, case.dtype)
            else:
                impl_list = head_impls(op, case, device, peers)
                flops, nbytes = head_flops(case.shape, backward=op == "cross_entropy"), None
            for row in measure_op(case, op, impl_list, device, flops, nbytes):
                if row.impl == "lego" and op in ("confidence", "cross_entropy"):
                    chosen = f"schedule: {default_schedule(op, case, device)}"
                    row.note = f"{chosen}; {row.note}" if row.note else chosen
                if row.tbps is not None and meta["copy_tbps"]:
                    share = f"{row.tbps / meta['copy_tbps']:.0%} of copy bandwidth"
                    row.note = f"{row.note}; {share}" if row.note else share
                rows.append(row)
                print(format_row(row), flush=True)
            del impl_list  # frees this op's inputs, outputs and gradients
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        write_outputs(meta, rows, out)
    return meta, rows


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_row(row: Row) -> str:
    """One line of progress output."""
    parts = [f"{row.shape}:{row.dtype} {row.op} ({row.passes}) {row.impl}:"]
    for value, unit in (
        (row.ms, "ms"),
        (row.tflops, "TFLOP/s"),
        (row.tbps, "TB/s"),
        (row.extra_mib, "MiB extra"),
    ):
        if value is not None:
            parts.append(f"{value:.4g} {unit}")
    return " ".join([*parts, row.note]).strip()


TABLE_HEADER = (
    "| shape | dtype | op | pass | impl | median ms | TFLOP/s | TB/s | extra MiB "
    "| lego speedup | lego mem ratio | rel. diff | note |"
)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def target_lines(meta: dict, rows: Sequence[Row]) -> list[str]:
    """Issue 6's targets 1-3, each with the measured numbers, for the cases that ran."""

    def find(shape: str, dtype: str, op: str, impl: str) -> Row | None:
        found = [r for r in rows if (r.shape, r.dtype, r.op, r.impl) == (shape, dtype, op, impl)]
        return found[0] if found and found[0].ms else None

    lines = []
    lego = find("seed", "bf16", "confidence", "lego")
    peer = find("seed", "bf16", "confidence", "compile")
    if lego and peer:
        speedup = peer.ms / lego.ms
        lines.append(
            f"1. confidence, seed bf16: {speedup:.2f}x torch.compile's speed "
            f"(target >= 5x): {_verdict(speedup >= 5)}"
        )
    lego = find("llama3", "bf16", "confidence", "lego")
    peer = find("llama3", "bf16", "confidence", "gemm")
    if lego and peer:
        ratio = lego.ms / peer.ms
        lines.append(
            f"1. confidence, llama3 bf16: {ratio:.2f}x the bare GEMM's time "
            f"(target <= 1.10x): {_verdict(ratio <= 1.10)}"
        )
    for shape, dtype in dict.fromkeys((r.shape, r.dtype) for r in rows if r.op == "cross_entropy"):
        lego = find(shape, dtype, "cross_entropy", "lego")
        peers = [
            r
            for r in rows
            if (r.shape, r.dtype, r.op) == (shape, dtype, "cross_entropy")
            and r.ms
            and r.impl != "lego"
        ]
        if not lego or not peers:
            continue
        best = min(peers, key=lambda r: r.ms)
        text = (
            f"2. cross_entropy fwd+bwd, {shape} {dtype}: {best.ms / lego.ms:.2f}x the best peer "
            f"({best.impl}) (target > 1x): {_verdict(lego.ms < best.ms)}"
        )
        cce = find(shape, dtype, "cross_entropy", "cce")
        if cce and cce.extra_mib and lego.extra_mib is not None:
            mem = lego.extra_mib / cce.extra_mib
            text += f"; extra memory {mem:.2f}x CCE's (target <= 2x): {_verdict(mem <= 2)}"
        lines.append(text)
    for impl in ("lego", "lego-capacity"):
        lego = find("llama3", "bf16", "routing", impl)
        if lego and lego.tbps and meta["copy_tbps"]:
            share = lego.tbps / meta["copy_tbps"]
            lines.append(
                f"3. routing ({impl}), llama3 bf16: {share:.0%} of the copy bandwidth "
                f"(target >= 60%): {_verdict(share >= 0.6)}"
            )
    return lines


def to_markdown(meta: dict, rows: Sequence[Row]) -> str:
    """The comparison as a markdown page: machine, method, one table, notes."""
    m = meta["machine"]
    if meta["device"] == "cuda":
        timing = (
            "median of `triton.testing.do_bench` (warm-up 25 ms, 100 ms of repeats, L2 flushed)"
        )
    else:
        timing = (
            "median of 3 wall-clock calls on the CPU: a smoke run of the plumbing, not a benchmark"
        )
    lines = [
        "# lego_kernels vs peers",
        "",
        f"Card: {m['card']} (driver {m['driver']}, CUDA {m['cuda']}); torch {m['torch']}, "
        f"triton {m['triton']}, liger-kernel {m['liger_kernel']}, "
        f"cut-cross-entropy {m['cut_cross_entropy']}; {m['date']}.",
        f"lego_kernels backend: `{meta['lego_backend']}`. Timing: {timing}.",
    ]
    if meta["copy_tbps"]:
        lines.append(
            f"Device-to-device copy (1 GiB, bytes read + written): {meta['copy_tbps']:.2f} TB/s."
        )
    lines += [
        "",
        TABLE_HEADER,
        "|" + "---|" * TABLE_HEADER.count(" | ") + "---|",
    ]
    for r in rows:
        cells = [
            r.shape,
            r.dtype,
            r.op,
            r.passes,
            r.impl,
            _fmt(r.ms, ".4g"),
            _fmt(r.tflops, ".4g"),
            _fmt(r.tbps, ".4g"),
            _fmt(r.extra_mib, ".1f"),
            _fmt(r.lego_speedup, ".2f"),
            _fmt(r.lego_mem_ratio, ".2f"),
            _fmt(r.rel_diff, ".1e"),
            r.note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    targets = target_lines(meta, rows)
    if targets:
        lines += [
            "",
            "Issue 6 targets (target 4, early exit, is in the pytest-benchmark suite):",
            "",
        ]
        lines += [f"- {t}" for t in targets]
    lines += ["", "Notes:", *(f"- {note}" for note in meta["notes"]), ""]
    return "\n".join(lines)


def write_png(meta: dict, rows: Sequence[Row], path: str) -> bool:
    """Bar chart of median ms per case, one panel per op (log scale). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r.ms is not None]
    panels = list(dict.fromkeys((r.op, r.passes) for r in timed))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (op, passes) in zip(axes[0], panels, strict=True):
        op_rows = [r for r in timed if r.op == op]
        cases = list(dict.fromkeys(f"{r.shape}\n{r.dtype}" for r in op_rows))
        names = list(dict.fromkeys(r.impl for r in op_rows))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, case in enumerate(cases):
                for r in op_rows:
                    if r.impl == name and f"{r.shape}\n{r.dtype}" == case:
                        xs.append(i + (j - (len(names) - 1) / 2) * width)
                        ys.append(r.ms)
            ax.bar(xs, ys, width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel("median ms (log scale)")
        ax.set_title(f"{op} ({passes})")
        ax.legend(fontsize=8)
    m = meta["machine"]
    fig.suptitle(f"lego_kernels vs peers - {m['card']} - torch {m['torch']} - {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(meta: dict, rows: Sequence[Row], out: str) -> None:
    """``compare.json``, ``compare.md`` and (with matplotlib) ``compare.png`` in ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(to_markdown(meta, rows))
    if not write_png(meta, rows, os.path.join(out, "compare.png")):
        print("compare: no PNG written (matplotlib is not installed)", file=sys.stderr)


def card_slug(device: str) -> str:
    """``nvidia-h100-80gb-hbm3``: the card's name as a folder name (``cpu`` on the CPU)."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def parse_names(
    parser: argparse.ArgumentParser, arg: str, value: str, allowed: Sequence[str]
) -> list[str]:
    """The comma-separated names of ``value``; a parser error (exit 2) naming ``arg`` for an
    unknown name or an empty list."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(
            f"{arg}: unknown or empty {unknown or value!r}; choose from {','.join(allowed)}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (1 when a lego_kernels row failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="lego_kernels vs eager, torch.compile, Liger and CCE on the same inputs.",
    )
    parser.add_argument(
        "--shapes",
        default=DEFAULT_CASES,
        help="cases shape[:dtype], comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--dtype", default="bf16", help="dtype of cases without one (bf16|fp16|fp32)"
    )
    parser.add_argument("--ops", default=",".join(OPS), help="default %(default)s")
    parser.add_argument("--peers", default=",".join(PEERS), help="default %(default)s")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<card>)")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.shapes, args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    op_names = parse_names(parser, "--ops", args.ops, OPS)
    peers = parse_names(parser, "--peers", args.peers, PEERS)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible; use --device cpu (plumbing only)")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", card_slug(args.device))
    _, rows = run(cases, op_names, peers, args.device, out)
    print(f"compare: wrote compare.json, compare.md, compare.png to {out}")
    failed = [r for r in rows if r.impl.startswith("lego") and r.ms is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
