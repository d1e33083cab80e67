"""Command line: ``python -m lego.generate``, text continuation with a trained model.

Loads a model saved by ``python -m lego.train --save-model PATH`` (its weights, its
early-exit settings and the vocabulary of its corpus), continues each ``--prompt`` in
one batch (left-padded), prints the continuations and a stats table: tokens/s of the
chosen mode next to full-depth decoding of the same prompts measured in the same
process, exit ratio or draft acceptance rate, and analytic FLOPs against full depth::

    python -m lego.generate --model runs/models/deep.pt --prompt "the game was" \\
        --prompt "in 1998 , the" --mode self-speculative --draft-tokens 4
    python -m lego.generate --model runs/models/deep.pt --prompt "the game was" \\
        --mode early-exit --threshold 0.2 --temperature 0.8 --top-p 0.9 --seed 1

``--exit-layer``, ``--threshold``, ``--context`` and ``--measure`` default to the model
file's own (a deep-supervision model saved without a threshold needs ``--threshold``
for early exit). Words outside the vocabulary become ``<unk>`` with a warning. Model
files written before ``lego.train`` stored the vocabulary get an error; ``--add-vocabulary``
rebuilds it from the file's saved run settings and adds it to the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import torch

from lego.checkpoint import save_atomic
from lego.data import TEXT_KEY, TextCodec, run_text_codec
from lego.experiment import load_model
from lego.generation import MODES, GenerationStats, generate
from lego.model import CONTEXTS, LegoModel
from lego.train import ArgumentParser
from lego_kernels.reference import MEASURES

DEFAULT_MAX_NEW_TOKENS = 40


def load_generation_model(path: str, device: str = "cpu") -> tuple[LegoModel, TextCodec, dict]:
    """A model saved by ``python -m lego.train --save-model``, its TextCodec and its saved
    settings; ``ValueError`` saying how to re-save a file without a vocabulary."""
    model, saved = load_model(path, device)
    if TEXT_KEY not in saved:
        raise ValueError(
            f"{path} was saved without its vocabulary (before lego.train stored it), so text "
            f"cannot be turned into ids; re-save it with `python -m lego.generate --model {path} "
            "--add-vocabulary` (rebuilds it from the saved run settings and the data), or "
            "retrain with python -m lego.train ... --save-model"
        )
    return model, TextCodec(**saved[TEXT_KEY]), saved


def add_vocabulary(path: str) -> TextCodec:
    """Write the vocabulary of the corpus that the model file ``path`` was trained on into
    the file (atomically; everything else is kept); returns it."""
    _, saved = load_model(path)
    codec = run_text_codec(saved["config"])
    if len(codec.vocab) != saved["model_config"]["vocab_size"]:
        raise ValueError(f"the rebuilt vocabulary does not fit {path}'s model")
    save_atomic({**saved, TEXT_KEY: codec.state()}, path)
    return codec


def encode_prompts(codec: TextCodec, prompts: list[str], device: str) -> tuple[torch.Tensor, ...]:
    """``prompts`` as left-padded ids ``[B, T]`` (pad id 0) and their bool attention mask;
    words outside the vocabulary are mapped to ``<unk>`` with a warning."""
    encoded = []
    for i, text in enumerate(prompts):
        ids, unknown = codec.encode(text)
        if unknown:
            warnings.warn(
                f"--prompt {i + 1}: words outside the vocabulary mapped to <unk>: "
                + ", ".join(unknown),
                stacklevel=2,
            )
        if not ids:
            raise ValueError(f"--prompt {i + 1} ({text!r}) has no word the model knows")
        encoded.append(ids)
    width = max(len(ids) for ids in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.int64)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = True
    return ids.to(device), mask.to(device)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m lego.generate",
        description="Continue text prompts with a model saved by python -m lego.train "
        "--save-model; print the continuations and tokens/s against full-depth decoding.",
    )
    add = p.add_argument
    add("--model", required=True, help="a file written by python -m lego.train --save-model")
    add("--prompt", action="append", help="text to continue (repeat for a batch)")
    add(
        "--max-new-tokens",
        type=int,
        help=f"tokens per prompt (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in the "
        "model's max_seq_len)",
    )
    add("--mode", choices=MODES, default="full", help="default: %(default)s")
    add("--exit-layer", type=int, help="early-exit / draft layer (default: the model file's)")
    add("--threshold", type=float, help="early-exit confidence threshold (default: the file's)")
    add("--context", choices=CONTEXTS, help="early-exit context (default: the file's)")
    add("--measure", choices=MEASURES, help="early-exit confidence (default: the file's)")
    add("--draft-tokens", type=int, default=4, help="self-speculative drafts per round (4)")
    add("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    add("--top-k", type=int, help="sample from the k most likely tokens (default: all)")
    add("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: 1)")
    add("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--json", metavar="FILE", help="also write prompts, continuations and stats here")
    add(
        "--add-vocabulary",
        action="store_true",
        help="add the vocabulary to an older --model file (from its saved run settings) and exit",
    )
    return p


def settings_for(args: argparse.Namespace, saved: dict, prompt_len: int, max_len: int) -> dict:
    """The keyword arguments of ``generate`` from the flags and the model file's defaults."""
    room = max_len - prompt_len
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, room)
        if max_new < 1:
            raise ValueError(f"the prompts ({prompt_len} tokens) fill max_seq_len {max_len}")
    settings: dict[str, Any] = {
        "max_new_tokens": max_new,
        "mode": args.mode,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    if args.mode != "full":
        exit_layer = saved["exit_layer"] if args.exit_layer is None else args.exit_layer
        settings["exit_layer"] = exit_layer
    if args.mode == "early-exit":
        threshold = args.threshold
        if threshold is None:
            if not saved["threshold"] > 0:
                raise ValueError(
                    "--mode early-exit needs --threshold: this model file has no early-exit "
                    "threshold (it was trained with --threshold 0)"
                )
            threshold = saved["threshold"]
        settings["threshold"] = threshold
        settings["context"] = args.context or saved["context"]
        settings["measure"] = args.measure or saved["measure"]
    if args.mode == "self-speculative":
        settings["draft_tokens"] = args.draft_tokens
    return settings


def stats_table(stats: dict[str, GenerationStats]) -> str:
    """The stats of each run (``{label: stats}``, the full-depth run labelled ``"full"``)
    as a text table; speeds are relative to the ``"full"`` run."""
    full = stats["full"]
    rows = [
        ("tokens generated", lambda s: f"{s.new_tokens}"),
        ("decode steps", lambda s: f"{s.decode_steps}"),
        ("wall time (s)", lambda s: f"{s.wall_time_s:.3f}"),
        ("tokens/s", lambda s: f"{s.tokens_per_s:.1f}"),
        ("tokens/s vs full", lambda s: f"{s.tokens_per_s / full.tokens_per_s:.2f}x"),
        ("FLOPs vs full depth", lambda s: f"{s.flops_cost:.3f}"),
        ("exit ratio", lambda s: "-" if s.exit_ratio is None else f"{100 * s.exit_ratio:.1f}%"),
        (
            "draft acceptance",
            lambda s: "-" if s.acceptance_rate is None else f"{100 * s.acceptance_rate:.1f}%",
        ),
        (
            "tokens per verification",
            lambda s: (
                "-" if s.tokens_per_verification is None else f"{s.tokens_per_verification:.2f}"
            ),
        ),
    ]
    labels = list(stats)
    width = max(len(label) for label, _ in rows)
    cells = [[fmt(stats[label]) for label in labels] for _, fmt in rows]
    col = max(len(c) for c in [*labels, *(c for row in cells for c in row)])
    lines = [" " * width + "".join(f"  {label:>{col}}" for label in labels)]
    for (label, _), row in zip(rows, cells, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"  {c:>{col}}" for c in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lego.generate``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.add_vocabulary:
            codec = add_vocabulary(args.model)
            print(f"added the {len(codec.vocab)}-word vocabulary ({codec.variant}) to {args.model}")
            return 0
        if not args.prompt:
            raise ValueError("give at least one --prompt TEXT")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu")
        model, codec, saved = load_generation_model(args.model, args.device)
        ids, mask = encode_prompts(codec, args.prompt, args.device)
        settings = settings_for(args, saved, ids.shape[1], model.config.max_seq_len)

        def run(kwargs: dict[str, Any]) -> Any:
            """A short warm-up call (first-call allocations are not timed), then the run."""
            gen = torch.Generator(args.device).manual_seed(args.seed)
            warm_up = {**kwargs, "max_new_tokens": min(2, kwargs["max_new_tokens"])}
            generate(model, ids, attention_mask=mask, generator=gen, **warm_up)
            gen.manual_seed(args.seed)
            return generate(model, ids, attention_mask=mask, generator=gen, **kwargs)

        out = run(settings)
        stats = {args.mode: out.stats}
        if args.mode != "full":
            shared = ("max_new_tokens", "temperature", "top_k", "top_p")
            stats["full"] = run({"mode": "full", **{k: settings[k] for k in shared}}).stats
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    continuations = [codec.decode(row) for row in out.new_tokens.tolist()]
    for row, prompt in enumerate(args.prompt):
        print(f"[{row + 1}] {prompt}\n    -> {continuations[row]}")
    print()
    print(stats_table(stats))
    if args.json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        record = {
            "model": args.model,
            "settings": {**settings, "seed": args.seed, "device": args.device},
            "prompts": args.prompt,
            "continuations": continuations,
            "stats": {label: s.as_dict() for label, s in stats.items()},
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
