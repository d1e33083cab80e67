"""``python -m bench.compile``: eager PyTorch against ``torch.compile`` on the CPU, in one run.

    python -m bench.compile [--workloads train,early_exit] [--reps 7] [--threads 1]
        [--batch 2 --seq-len 256 ...] [--out bench/results/cpu]

Every workload runs eager and compiled (``torch.compile(fullgraph=True)``, inductor) on
the torch backend of ``lego_kernels`` (the plain-PyTorch reference that CPU tensors run):

- ``train``: a training step of the draft's model (dim 64, 4 heads, 4 layers,
  V = 33,278, batch 64 x 32 tokens): ``Trainer.stage_losses`` + backward, on the plain
  path (one loss, at the last layer) and with deep supervision (stages (1, 2) and (3, 4),
  one exit loss each); the optimizer step, the same code for both, is left out;
- ``early_exit``: ``LegoModel.early_exit`` with targets at the layer-dominated shape of
  ``bench.early_exit_cpu`` (dim 1024, 16 heads, 8 layers, exit after layer 4, V = 32,000;
  fewer tokens by default: 2 x 256), the threshold at which 70% of the tokens exit,
  ``capacity`` = 35% of the tokens (room for every hard token, some slots free). Rows:
  eager without capacity (the host reads the hard count), eager and compiled with it.

Timing: the calls of a workload's implementations are interleaved (one call each, in
turn, ``--reps`` times) after one warm-up call each (for a compiled one: the compilation,
reported as ``compile s``), so that they see the same machine load; the median is
reported, and ``vs eager`` = eager median / this median (> 1: faster). Also reported: the
relative difference ``||out - eager|| / ||eager||`` of the loss (train) or of the
per-token NLL (early_exit), and the host synchronizations of one eager call
(``lego_kernels.compile_safety.SyncCounter``). Writes ``compile.json`` and ``compile.md``
(commit, machine, load, date) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench.common import git_commit, machine_info
from bench.early_exit_cpu import add_shape_args, make_model
from lego import LegoModel, ModelConfig, StageConfig, TrainingConfig
from lego.trainer import Trainer
from lego_kernels import ops
from lego_kernels.compile_safety import SyncCounter

WORKLOADS = ("train", "early_exit")
DRAFT = {"vocab_size": 33278, "dim": 64, "num_heads": 4, "num_layers": 4, "max_seq_len": 32}
DRAFT_BATCH = 64


@dataclass
class Row:
    """One implementation of one workload; times in seconds."""

    workload: str
    impl: str
    median_s: float
    times_s: list[float]
    compile_s: float | None
    vs_eager: float
    rel_diff: float | None
    scalar_reads: int | None
    dynamic_shapes: int | None


@dataclass
class Workload:
    """Named zero-argument calls (each returns the tensor compared with ``impls["eager"]``)
    and which of them are compiled."""

    name: str
    impls: dict[str, Callable[[], Tensor]]
    compiled: tuple[str, ...]


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile(fn, fullgraph=True)``: inductor, no graph break allowed."""
    return torch.compile(fn, fullgraph=True)


def train_workloads(seed: int) -> list[Workload]:
    """The draft's model, plain path and deep supervision, eager and compiled."""
    torch.manual_seed(seed)
    model = LegoModel(ModelConfig(**DRAFT))
    windows = torch.randint(0, DRAFT["vocab_size"], (DRAFT_BATCH, DRAFT["max_seq_len"] + 1))
    inputs, targets = windows[:, :-1], windows[:, 1:]

    def step(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(inputs, targets)
            loss.backward()
            return loss.detach()

        return run

    workloads = []
    stage_sets = {
        "train step, plain (1 loss)": [StageConfig((1, 4))],
        "train step, deep supervision (2 losses)": [StageConfig((1, 2)), StageConfig((3, 4))],
    }
    for name, stages in stage_sets.items():
        trainer = Trainer(model, TrainingConfig(stages), quiet=True)
        impls = {"eager": step(trainer.stage_losses)}
        impls["torch.compile"] = step(compiled(trainer.stage_losses))
        workloads.append(Workload(name, impls, ("torch.compile",)))
    return workloads


def early_exit_workload(args: argparse.Namespace) -> Workload:
    """Two-stage inference at the layer-dominated shape, with and without capacity."""
    model = make_model(args, torch.device("cpu"))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    targets = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    with torch.no_grad():
        lower = model.run_layers(model.embed(ids), 1, args.exit_layer)
        confidence = model.exit_confidence(lower, exit_layer=args.exit_layer).confidence
    threshold = torch.quantile(confidence.flatten(), 1 - args.exit_ratio).item()
    capacity = math.ceil(args.capacity_ratio * ids.numel())

    def call(ids: Tensor, targets: Tensor, capacity: int | None) -> Tensor:
        out = model.early_exit(
            ids, exit_layer=args.exit_layer, threshold=threshold, targets=targets, capacity=capacity
        )
        return out.nll

    compiled_call = compiled(call)
    name = (
        f"early_exit (dim {args.dim}, {args.layers} layers, exit {args.exit_layer}, "
        f"V {args.vocab}, {args.batch} x {args.seq_len} tokens, capacity {capacity})"
    )
    impls = {
        "eager": lambda: call(ids, targets, capacity),
        "eager, no capacity": lambda: call(ids, targets, None),
        "torch.compile": lambda: compiled_call(ids, targets, capacity),
    }
    return Workload(name, impls, ("torch.compile",))


def rel_diff(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def timed(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(workload: Workload, reps: int) -> list[Row]:
    """Warm-up (compile) calls, then ``reps`` interleaved rounds; one row per impl."""
    first, outputs = {}, {}
    for name, fn in workload.impls.items():
        first[name], outputs[name] = timed(fn)
        print(f"  {name}: first call {first[name]:.2f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in workload.impls}
    for rep in range(reps):
        for name, fn in workload.impls.items():
            times[name].append(timed(fn)[0])
        done = ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items())
        print(f"  round {rep + 1}/{reps}: {done}", flush=True)
    eager_median = statistics.median(times["eager"])
    rows = []
    for name, fn in workload.impls.items():
        syncs = None
        if name not in workload.compiled:  # a dispatch mode and torch.compile do not mix
            with SyncCounter() as syncs:
                fn()
        median = statistics.median(times[name])
        rows.append(
            Row(
                workload=workload.name,
                impl=name,
                median_s=median,
                times_s=times[name],
                compile_s=first[name] if name in workload.compiled else None,
                vs_eager=eager_median / median,
                rel_diff=None if name == "eager" else rel_diff(outputs[name], outputs["eager"]),
                scalar_reads=None if syncs is None else syncs.scalar_reads,
                dynamic_shapes=None if syncs is None else syncs.dynamic_shapes,
            )
        )
    return rows


def to_markdown(meta: dict, rows: Sequence[Row]) -> str:
    m = meta["machine"]
    lines = [
        "# torch.compile against eager PyTorch on the CPU",
        "",
        f"`{' '.join(['python -m bench.compile', *meta['argv']])}`: commit {meta['commit']}"
        f"{' (uncommitted changes)' if meta['dirty'] else ''}, {m['date']}, {m['card']}, "
        f"{meta['cpu_count']} cores, {meta['threads']} thread(s), load average (1 min) "
        f"{meta['load_before']:.1f} before and {meta['load_after']:.1f} after, torch "
        f"{m['torch']}, lego_kernels backend `{meta['lego_backend']}`, {meta['reps']} "
        "interleaved rounds.",
        "",
        "| workload | impl | median s | vs eager | compile s | rel. diff | syncs per call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
        diff = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
        syncs = "-" if r.scalar_reads is None else f"{r.scalar_reads} + {r.dynamic_shapes}"
        lines.append(
            f"| {r.workload} | {r.impl} | {r.median_s:.3f} | {r.vs_eager:.2f}x | {compile_s} "
            f"| {diff} | {syncs} |"
        )
    lines += [
        "",
        "- vs eager: eager median / this median (> 1: faster than eager).",
        "- compile s: the first call (compilation + one run), not in the median.",
        "- rel. diff: ||out - eager|| / ||eager|| of the loss (train) or the per-token NLL "
        "(early_exit).",
        "- syncs per call: scalar reads + dynamic-shape ops of one eager call "
        "(SyncCounter); not counted for compiled calls (a dispatch mode disables "
        "torch.compile; tests/test_compile_safety.py counts inside the compiled graphs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compile", description="eager vs torch.compile on the CPU"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    add_shape_args(parser, batch=2, seq_len=256)  # early_exit's shape
    parser.add_argument("--capacity-ratio", type=float, default=0.35)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not names or any(n not in WORKLOADS for n in names):
        parser.error(f"--workloads: choose from {','.join(WORKLOADS)}, got {args.workloads!r}")
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")

    commit = git_commit()  # before this run writes its results into the checkout
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    with ops.use_backend("torch"):
        workloads = train_workloads(args.seed) if "train" in names else []
        if "early_exit" in names:
            workloads.append(early_exit_workload(args))
        for workload in workloads:
            print(workload.name, flush=True)
            rows += measure(workload, args.reps)
    meta = {
        **commit,
        "machine": machine_info("cpu"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "lego_backend": "torch",
        "reps": args.reps,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    markdown = to_markdown(meta, rows)
    with open(os.path.join(args.out, "compile.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
