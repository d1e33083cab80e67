"""Tokens/s of ``LegoModel.generate``'s modes against full-depth decoding (not a timed test).

    python -m bench.generate MODEL.pt [MODEL.pt ...] [--batch 1,8] [--prompt-len 8]
        [--max-new-tokens 24] [--temperature 0] [--reps 5] [--threads 1]
        [--device cpu|cuda] [--out DIR]

For each model saved by ``python -m lego.train --save-model`` (a trained exit), the
prompts are the first ``--prompt-len`` tokens of the first 8 windows of its test split;
batch 1 decodes them one by one, batch 8 together (greedy: the same tokens; with
``--temperature``, sampling from a generator seeded 0 for each call). Rows:

- ``full``: every layer, KV cache (the baseline of every ratio);
- ``early-exit`` at target exit ratios 50/70/90%: the threshold is the quantile of the
  exit confidence over full-depth greedy continuations of 32 *validation* prompts
  (teacher-forced ``early_exit`` scores), so the ratio measured on the test prompts
  is near, not at, the target; the model file's ``context`` and ``measure``;
- ``self-speculative`` with 2/4/6 drafts per round.

Each rep times every row once, in turn (interleaved, so drifts in machine load hit all
rows alike); a row's time is its median over the reps (batch 1: the sum of its 8
calls). Reported per row: tokens/s, speed over ``full``, the analytic FLOPs over
full-depth decoding of the same tokens (``GenerationStats.flops_cost``), the exit ratio
or draft acceptance rate, and the issue's targets: early exit's wall-clock saving
(``1 - time / full time``) at least 0.8x its FLOPs saving (``1 - flops_cost``, when
at least 1%); self-speculative at least 1.5x the tokens/s of ``full``. Writes
``generate.json`` and ``generate.md`` (``generate-temperature<T>.*`` when sampling;
commit, machine, load, date) into ``--out``
(default ``bench/results/<device>/``, ``cpu`` or the card's name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import git_commit, machine_info
from bench.compare import card_slug
from lego.ashem import confidence_threshold
from lego.experiment import load_run_corpus
from lego.generate import load_generation_model
from lego.generation import GenerationStats, generate
from lego.model import LegoModel

EXIT_RATIOS = (0.5, 0.7, 0.9)
DRAFT_TOKENS = (2, 4, 6)
NUM_PROMPTS = 8
CALIBRATION_PROMPTS = 32
EARLY_EXIT_TARGET = 0.8  # wall-clock saving over FLOPs saving
MIN_FLOPS_SAVING = 0.01  # below it the ratio of the savings means nothing: no target
SPECULATIVE_TARGET = 1.5  # tokens/s over full


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="files written by python -m lego.train --save-model")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default: 1,8)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per prompt (24)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--reps", type=int, default=5, help="timed reps per row (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output folder (default: bench/results/<device>)")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if any(b < 1 or NUM_PROMPTS % b for b in args.batch):
        p.error(f"--batch: each size must divide the {NUM_PROMPTS} prompts, got {args.batch}")
    if args.reps < 1 or args.threads < 1 or args.prompt_len < 1:
        p.error("--reps, --threads and --prompt-len must be >= 1")
    if not args.temperature >= 0:
        p.error(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    return args


def calibrate(
    model: LegoModel, prompts: torch.Tensor, saved: dict, max_new_tokens: int
) -> dict[float, float]:
    """Threshold of each target exit ratio: the quantile of the exit confidence at the
    positions that predict full-depth greedy continuations of ``prompts``."""
    tokens = generate(model, prompts, max_new_tokens=max_new_tokens).tokens
    scored = model.early_exit(
        tokens, exit_layer=saved["exit_layer"], threshold=2.0, measure=saved["measure"]
    )
    confidence = scored.confidence[:, prompts.shape[1] - 1 : -1]
    return {ratio: confidence_threshold(confidence, 1.0 - ratio) for ratio in EXIT_RATIOS}


def rows_for(saved: dict, thresholds: dict[float, float]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, generate keywords)`` of every benchmark row."""
    rows: list[tuple[str, dict[str, Any]]] = [("full", {"mode": "full"})]
    for ratio, threshold in thresholds.items():
        settings = {"mode": "early-exit", "exit_layer": saved["exit_layer"]}
        settings |= {"threshold": threshold, "context": saved["context"]}
        rows.append((f"early-exit {100 * ratio:.0f}%", settings | {"measure": saved["measure"]}))
    for k in DRAFT_TOKENS:
        settings = {"mode": "self-speculative", "exit_layer": saved["exit_layer"]}
        rows.append((f"self-speculative k={k}", settings | {"draft_tokens": k}))
    return rows


def total(stats: list[GenerationStats]) -> dict[str, Any]:
    """The counts of several calls added up (one batch-1 call per prompt)."""
    out: dict[str, Any] = {}
    for key in ("new_tokens", "decode_steps", "wall_time_s", "flops", "full_flops"):
        out[key] = sum(getattr(s, key) for s in stats)
    for key in ("exited_tokens", "verifications", "drafted_tokens", "accepted_tokens"):
        values = [getattr(s, key) for s in stats]
        out[key] = None if values[0] is None else sum(values)
    return out


def measure_model(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every row at every batch size for the model file ``path``."""
    model, _, saved = load_generation_model(path, args.device)
    corpus = load_run_corpus(saved["config"])
    test = corpus.test[:NUM_PROMPTS, : args.prompt_len].to(args.device)
    calibration = corpus.valid[:CALIBRATION_PROMPTS, : args.prompt_len].to(args.device)
    thresholds = calibrate(model, calibration, saved, args.max_new_tokens)
    rows = rows_for(saved, thresholds)
    config = model.config
    result: dict[str, Any] = {
        "model": path,
        "shape": {
            "dim": config.dim,
            "layers": config.num_layers,
            "heads": config.num_heads,
            "vocab": config.vocab_size,
            "exit_layer": saved["exit_layer"],
            "context": saved["context"],
        },
        "strategy": saved["strategy"],
        "thresholds": {f"{100 * r:.0f}%": t for r, t in thresholds.items()},
        "batches": {},
    }
    for batch in args.batch:
        chunks = test.split(batch)

        def run(settings: dict[str, Any], chunks: tuple[torch.Tensor, ...] = chunks) -> list:
            return [
                generate(
                    model,
                    ids,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    generator=torch.Generator(args.device).manual_seed(0),
                    **settings,
                )
                for ids in chunks
            ]

        for _, settings in rows:  # warm-up
            run(settings)
        times: dict[str, list[float]] = {label: [] for label, _ in rows}
        counts: dict[str, dict[str, Any]] = {}
        tokens: dict[str, torch.Tensor] = {}
        for rep in range(args.reps):
            for label, settings in rows:
                outs = run(settings)
                counts[label] = total([o.stats for o in outs])
                times[label].append(counts[label]["wall_time_s"])
                tokens[label] = torch.cat([o.new_tokens for o in outs])
            print(f"  {path} batch {batch}: rep {rep + 1}/{args.reps}", file=sys.stderr)
        full_time = statistics.median(times["full"])
        table = []
        for label, settings in rows:
            c = counts[label]
            median = statistics.median(times[label])
            row = {
                "row": label,
                **{k: v for k, v in settings.items() if k != "mode"},
                "mode": settings["mode"],
                "median_time_s": median,
                "times_s": times[label],
                "tokens_per_s": c["new_tokens"] / median,
                "speed_vs_full": full_time / median,
                "flops_cost": c["flops"] / c["full_flops"],
                **{k: c[k] for k in ("new_tokens", "decode_steps", "flops", "full_flops")},
                "same_tokens_as_full": bool(torch.equal(tokens[label], tokens["full"])),
            }
            if c["exited_tokens"] is not None:
                row["exit_ratio"] = c["exited_tokens"] / c["new_tokens"]
                flops_saving, wall_saving = 1 - row["flops_cost"], 1 - median / full_time
                row["wall_saving"], row["flops_saving"] = wall_saving, flops_saving
                row["target_met"] = (
                    None
                    if flops_saving < MIN_FLOPS_SAVING
                    else wall_saving >= EARLY_EXIT_TARGET * flops_saving
                )
            if c["drafted_tokens"] is not None:
                row["acceptance_rate"] = c["accepted_tokens"] / c["drafted_tokens"]
                row["tokens_per_verification"] = 1 + c["accepted_tokens"] / c["verifications"]
                row["target_met"] = row["speed_vs_full"] >= SPECULATIVE_TARGET
            table.append(row)
        result["batches"][str(batch)] = table
    return result


def _target(row: dict[str, Any]) -> str:
    if "target_met" not in row:
        return ""
    if row["target_met"] is None:
        return "n/a (FLOPs saving < 1%)"
    if row["mode"] == "early-exit":
        ratio = row["wall_saving"] / row["flops_saving"]
        return f"{'met' if row['target_met'] else 'missed'} ({ratio:.2f}x of the FLOPs saving)"
    return "met" if row["target_met"] else "missed"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: a header with the run's provenance, one table per model."""
    m = results["machine"]
    temperature = results["temperature"]
    decoding = "greedy" if temperature == 0 else f"sampling at temperature {temperature}"
    same = {True: "yes", False: "no"}
    lines = [
        "# `python -m bench.generate`",
        "",
        f"{m['date']}, commit {results['commit']}{' (dirty tree)' if results['dirty'] else ''}, "
        f"{m['card']}, {results['threads']} thread(s), load average {results['load_average']} "
        f"at the start; torch {m['torch']}; prompts of {results['prompt_len']} tokens, "
        f"{results['max_new_tokens']} new tokens each, {decoding}, median of {results['reps']} "
        "reps.",
    ]
    for model in results["models"]:
        s = model["shape"]
        lines += [
            "",
            f"## {os.path.basename(model['model'])}: dim {s['dim']}, {s['layers']} layers, "
            f"exit after layer {s['exit_layer']}, V = {s['vocab']:,} ({model['strategy']}, "
            f"context {s['context']})",
            "",
            "| batch | row | tokens/s | vs full | FLOPs vs full | exit ratio | acceptance "
            "| same tokens as full | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for batch, table in model["batches"].items():
            for row in table:
                exit_ratio = f"{100 * row['exit_ratio']:.1f}%" if "exit_ratio" in row else ""
                accept = f"{100 * row['acceptance_rate']:.1f}%" if "acceptance_rate" in row else ""
                lines.append(
                    f"| {batch} | {row['row']} | {row['tokens_per_s']:.1f} | "
                    f"{row['speed_vs_full']:.2f}x | {row['flops_cost']:.3f} | {exit_ratio} | "
                    f"{accept} | {same[row['same_tokens_as_full']] if temperature == 0 else '-'} | "
                    f"{_target(row)} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join("bench", "results", card_slug(args.device))
    results: dict[str, Any] = {
        **git_commit(),
        "machine": machine_info(args.device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "reps": args.reps,
        "models": [],
    }
    os.makedirs(out, exist_ok=True)
    name = "generate" if args.temperature == 0 else f"generate-temperature{args.temperature:g}"
    with torch.no_grad():
        for path in args.models:
            results["models"].append(measure_model(path, args))
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(results, f, indent=2)
            with open(os.path.join(out, f"{name}.md"), "w") as f:
                f.write(markdown(results))
    print(markdown(results))
    print(f"written to {out}/{name}.json and {name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
