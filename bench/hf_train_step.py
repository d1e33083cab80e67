"""Memory and wall clock of a Hugging Face model's training step, patched by ``lego.hf`` or not.

A random-initialized ``LlamaForCausalLM`` built from a config (no download). Default
shape: hidden 512, 4 layers, 8 heads (4 key/value heads), MLP 1408, V = 128,256 (the
Llama 3 vocabulary), untied head, batch 4 x 512 tokens, float32. One step = forward
with ``labels=`` + backward (gradients kept allocated between steps, zeroed in place).
Rows, all on the same weights and batch, in one process:

- ``unpatched``: the model's own loss (full ``tokens x vocab`` logits, then
  ``cross_entropy``);
- ``unpatched, torch.compile``: the same model under ``torch.compile`` (inductor), its
  compilation outside the timings (``--no-compile`` drops the row);
- ``lego.hf``: after ``apply_lego(model)`` (fused norm + head + cross-entropy);
- ``lego.hf, exits 1-3``: ``apply_lego(model, exit_layers=(1, 2, 3))``, four losses.

Memory is measured with ``torch.profiler`` (``profile_memory=True``): the allocator's
allocation events of one step give ``peak``, the most bytes allocated at once during
the step above what was allocated before it, and ``largest``, the largest single
allocation. Speed: ``--reps`` steps of each row, interleaved (A B C D A B C D ...),
median seconds, one thread (``torch.set_num_threads``); ``time / unpatched`` divides
medians measured in the same run. The machine's load average is recorded next to them.

Usage: ``python -m bench.hf_train_step [--vocab 128256 --batch 4 --seq-len 512 ...]``;
writes ``bench/results/cpu/hf_train_step.json`` and ``.md`` (``--out`` another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import machine_info

MIB = 2**20
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")


class Allocations(NamedTuple):
    """``peak_bytes``: most bytes allocated at once above the start; ``largest_bytes``:
    the largest single allocation."""

    peak_bytes: int
    largest_bytes: int


def cpu_allocations(fn: Callable[[], object]) -> Allocations:
    """Allocations of one ``fn()`` call, from ``torch.profiler``'s allocator events.

    Each event carries the allocation's size (negative for a free) and the bytes
    allocated since the profiler started, so their maximum is the peak of ``fn``.
    """
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = largest = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            largest = max(largest, event.extra_fields.alloc_size)
            peak = max(peak, event.extra_fields.total_allocated)
    return Allocations(peak, largest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=DEFAULT_OUT)
    return parser.parse_args(argv)


def git_commit() -> str:
    """Short sha of HEAD, ``+dirty`` when the tree has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout

    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    return git("rev-parse", "--short", "HEAD").strip() + ("+dirty" if dirty else "")


def run(args: argparse.Namespace) -> dict:
    import transformers

    from lego.hf import apply_lego

    commit = git_commit()  # the code measured, before anything else can change the tree
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    print(
        f"Llama: hidden {args.hidden}, {args.layers} layers, V {args.vocab}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        f"{args.batch} x {args.seq_len} tokens; {torch.get_num_threads()} thread(s)",
        flush=True,
    )

    exits = tuple(range(1, args.layers))
    # (name, apply_lego's keywords or None for the unpatched model, what to call)
    variants: list[tuple[str, dict | None, Callable[..., object]]] = [("unpatched", None, model)]
    if not args.no_compile:
        variants.append(("unpatched, torch.compile", None, torch.compile(model)))
    variants.append(("lego.hf", {}, model))
    variants.append((f"lego.hf, exits {exits[0]}-{exits[-1]}", {"exit_layers": exits}, model))

    def step(lego_kwargs: dict | None, forward: Callable[..., object]) -> float:
        """One training step; the model is patched for it when ``lego_kwargs`` is a dict."""
        patch = None if lego_kwargs is None else apply_lego(model, **lego_kwargs)
        try:
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=False)
            return loss.item()
        finally:
            if patch is not None:
                patch.remove()

    rows = {}
    for name, lego_kwargs, forward in variants:
        start = time.perf_counter()
        loss = step(lego_kwargs, forward)  # warm-up (and, for torch.compile, the compilation)
        first_s = time.perf_counter() - start
        memory = cpu_allocations(lambda kw=lego_kwargs, fw=forward: step(kw, fw))
        rows[name] = {
            "loss": loss,
            "first_step_s": first_s,
            "peak_extra_mib": memory.peak_bytes / MIB,
            "largest_alloc_mib": memory.largest_bytes / MIB,
            "times_s": [],
        }
        print(f"{name}: loss {loss:.6f}, peak +{memory.peak_bytes / MIB:.0f} MiB", flush=True)
    for rep in range(args.reps):
        for name, lego_kwargs, forward in variants:
            start = time.perf_counter()
            step(lego_kwargs, forward)
            rows[name]["times_s"].append(time.perf_counter() - start)
        print(f"rep {rep + 1}/{args.reps}, load {os.getloadavg()[0]:.1f}", flush=True)
    base = statistics.median(rows["unpatched"]["times_s"])
    for row in rows.values():
        row["median_s"] = statistics.median(row["times_s"])
        row["time_vs_unpatched"] = row["median_s"] / base
    return {
        "benchmark": "bench.hf_train_step",
        "commit": commit,
        "machine": machine_info("cpu"),
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "args": vars(args),
        "weights_and_grads_mib": 2 * sum(p.numel() * 4 for p in model.parameters()) / MIB,
        "logits_mib": args.batch * args.seq_len * args.vocab * 4 / MIB,
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    args, machine = result["args"], result["machine"]
    lines = [
        f"# One training step of a random Llama, patched by lego.hf or not ({machine['date']})",
        "",
        f"`python -m bench.hf_train_step`, commit {result['commit']}, {machine['card']}, "
        f"{result['cpu_cores']} cores, {args['threads']} thread(s), load average "
        f"{result['load_average_1m_at_end']:.1f} at the end; torch {machine['torch']}, "
        f"transformers {result['transformers']}.",
        f"Shape: hidden {args['hidden']}, {args['layers']} layers, V {args['vocab']}, "
        f"{args['batch']} x {args['seq_len']} tokens, float32; weights + gradients "
        f"{result['weights_and_grads_mib']:.0f} MiB, one `tokens x vocab` float32 tensor "
        f"{result['logits_mib']:.0f} MiB.",
        "",
        "| step | loss | peak extra MiB | largest allocation MiB | median s | time / unpatched |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"| {name} | {row['loss']:.6f} | {row['peak_extra_mib']:.0f} | "
            f"{row['largest_alloc_mib']:.0f} | {row['median_s']:.2f} | "
            f"{row['time_vs_unpatched']:.2f} |"
        )
    lines += [
        "",
        "peak extra: most bytes allocated at once during the step above what was allocated "
        "before it (weights and gradients), from torch.profiler's allocator events; median of "
        f"{args['reps']} interleaved steps per row.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hf_train_step.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = to_markdown(result)
    with open(os.path.join(args.out, "hf_train_step.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
