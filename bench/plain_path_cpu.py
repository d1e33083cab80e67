"""Wall clock of the trainer's plain path against its general path (the seed's
"automatic optimization"), one training step's loss forward + backward.

``Trainer.stage_losses`` takes the plain path (one forward through every layer, one
exit) when the only exit with a loss is the last layer; the general path computes
every stage's exit, zero-weight ones included. Layouts (``--stages`` notation):

- ``1-L:1``: one stage; both paths do the same work (the plain path skips nothing);
- ``1-E:0,E+1-L:1``: a zero-weight stage; the plain path skips its exit, which the
  general path computes and multiplies by 0;
- ``1-E:1,E+1-L:1``: deep supervision (two exits with loss; general path only), to
  show what one more exit costs.

A/B interleaved: each repeat times the plain path and then the general path of the same
batch, one after the other, so both see the same machine load; the table gives the
median of each and the median of the per-repeat ratios. Writes JSON (commit, versions,
date, load averages, every timing) and prints a markdown table.

Usage: ``python -m bench.plain_path_cpu [--dim 64 --layers 4 --exit-layer 2 --vocab
33278 --batch 64 --seq-len 32 --repeats 7] [--json results/plain-path-cpu.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import lego_kernels
from bench.common import git_commit
from lego import LegoModel, ModelConfig, Trainer, TrainingConfig
from lego.config import parse_stages
from lego_kernels import ops


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=33278)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def step_time(trainer: Trainer, ids: torch.Tensor, targets: torch.Tensor, plain: bool) -> float:
    """Seconds of one loss forward + backward on ``ids``/``targets`` by one path."""
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    trainer.stage_losses(ids, targets, plain=plain).backward()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq_len,
    )
    model = LegoModel(config)
    windows = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    ids, targets = windows[:, :-1], windows[:, 1:]
    e, n = args.exit_layer, args.layers
    layouts = {
        "one stage": (f"1-{n}:1", True),
        "zero-weight stage": (f"1-{e}:0,{e + 1}-{n}:1", True),
        "deep supervision": (f"1-{e}:1,{e + 1}-{n}:1", False),
    }
    load_before = os.getloadavg()
    commit = git_commit()  # before this run writes its results into the checkout
    results = []
    for name, (stages, has_plain) in layouts.items():
        trainer = Trainer(model, TrainingConfig(stages=parse_stages(stages)), quiet=True)
        paths = [True, False] if has_plain else [False]
        for plain in paths:  # warm-up
            step_time(trainer, ids, targets, plain)
        times: dict[str, list[float]] = {"plain": [], "general": []}
        for _ in range(args.repeats):
            for plain in paths:
                times["plain" if plain else "general"].append(
                    step_time(trainer, ids, targets, plain)
                )
        row = {"layout": name, "stages": stages, "times_s": times}
        row["general_s"] = statistics.median(times["general"])
        if has_plain:
            row["plain_s"] = statistics.median(times["plain"])
            ratios = [g / p for g, p in zip(times["general"], times["plain"], strict=True)]
            row["general_over_plain"] = statistics.median(ratios)
        results.append(row)
    report = {
        "benchmark": "bench.plain_path_cpu",
        "shape": vars(args),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "backend": ops.backend(ids.float()),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "lego_kernels": lego_kernels.__version__},
        "git": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    print(
        f"dim {args.dim}, {n} layers, exit after {e}, V {args.vocab}, {args.batch} x "
        f"{args.seq_len} tokens, {report['threads']} thread(s), torch {torch.__version__}, "
        f"load {load_before[0]:.1f} -> {report['load_average_after'][0]:.1f}"
    )
    print("| layout | stages | plain path (s) | general path (s) | general / plain |")
    print("|---|---|---|---|---|")
    for row in results:
        plain = f"{row['plain_s']:.3f}" if "plain_s" in row else "-"
        ratio = f"{row['general_over_plain']:.2f}x" if "general_over_plain" in row else "-"
        print(
            f"| {row['layout']} | `{row['stages']}` | {plain} | {row['general_s']:.3f} | {ratio} |"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
