"""Wall clock of two-stage inference (``LegoModel.early_exit``) against the full-depth forward.

One run per row, not a timed test. The default shape is the one of issue 4, where the
layers dominate the head: dim 1024, 8 layers, exit after layer 4, V = 32,000, 16 x 1024
tokens, 70% of the tokens exiting (the threshold is the 30% quantile of the exit
confidence of a random model). Rows:

- ``full-depth forward``: embedding, all layers on all tokens, last exit's confidence
  and prediction (the same outputs as ``early_exit``, no ``N x V`` logits kept);
- ``early_exit <context>``: two-stage inference at the threshold;
- ``early_exit propagate, none exit``: threshold 2, so every token runs the routed deep
  layers: the routed path's overhead against the dense one;
- ``full-depth forward (again)``: the baseline once more, to show how steady the machine was
  (``time / mean full`` divides by the mean of the two baseline runs).

Usage: ``python -m bench.early_exit_cpu [--batch 16 --seq-len 1024 ...] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lego import LegoModel, ModelConfig
from lego_kernels import ops


def add_shape_args(parser: argparse.ArgumentParser, batch: int, seq_len: int) -> None:
    """The flags of the model's shape, the exit, the exit ratio and the seed (default: the
    layer-dominated shape of issue 4), and the batch of ``batch x seq_len`` tokens."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--exit-ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(parser, batch=16, seq_len=1024)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args: argparse.Namespace, device: torch.device) -> LegoModel:
    """The random-initialized model of the shape flags (seeded by ``--seed``), in eval mode."""
    torch.manual_seed(args.seed)
    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq_len,
    )
    return LegoModel(config).to(device).eval()


@torch.no_grad()
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    model = make_model(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    print(
        f"device {device} (ops backend {ops.backend(ids.float())}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(
        f"dim {args.dim}, {args.layers} layers, exit at {args.exit_layer}, V {args.vocab}, "
        f"{args.batch} x {args.seq_len} tokens, target exit ratio {args.exit_ratio}"
    )

    lower = model.run_layers(model.embed(ids), 1, args.exit_layer)
    confidence = model.exit_confidence(lower, exit_layer=args.exit_layer).confidence
    threshold = torch.quantile(confidence.flatten().float(), 1 - args.exit_ratio).item()
    del lower, confidence

    def full_depth(ids: torch.Tensor) -> float:
        synchronize(device)
        start = time.perf_counter()
        model.exit_confidence(model.run_layers(model.embed(ids), 1, args.layers))
        synchronize(device)
        return time.perf_counter() - start

    runs = [
        ("early_exit propagate", "propagate", threshold),
        ("early_exit routed", "routed", threshold),
        ("early_exit propagate, none exit", "propagate", 2.0),
    ]
    warm = ids[:1, :64]  # first calls pay one-time setup: warm every path on a small slice
    full_depth(warm)
    for _, context, thr in runs:
        model.early_exit(warm, exit_layer=args.exit_layer, threshold=thr, context=context)

    # The full-depth forward runs first and last: their spread shows how steady the machine was.
    rows = [("full-depth forward", 0.0, 1.0, 1.0, full_depth(ids))]
    for name, context, thr in runs:
        out = model.early_exit(ids, exit_layer=args.exit_layer, threshold=thr, context=context)
        s = out.stats
        rows.append((name, s.exit_ratio, s.layer_cost, s.flops_cost, s.wall_time_s))
    rows.append(("full-depth forward (again)", 0.0, 1.0, 1.0, full_depth(ids)))
    full_s = (rows[0][-1] + rows[-1][-1]) / 2

    print()
    print("| run | exit ratio | layer_cost | flops_cost | wall s | time / mean full |")
    print("|---|---|---|---|---|---|")
    for name, ratio, layer_cost, flops_cost, wall in rows:
        print(
            f"| {name} | {ratio:.3f} | {layer_cost:.3f} | {flops_cost:.3f} | {wall:.2f} "
            f"| {wall / full_s:.3f} |"
        )


if __name__ == "__main__":
    main()
