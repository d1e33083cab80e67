"""Data for the LEGO trainer: WikiText-2 (word level) and a synthetic corpus.

Every split becomes a tensor of contiguous, non-overlapping windows of
``seq_len + 1`` token ids, ``int64 [num_windows, seq_len + 1]``: a window's
first ``seq_len`` ids are the inputs, its last ``seq_len`` ids the targets.

WikiText-2 (``wikitext-2-v1``) is read from a local folder holding
``wiki.{train,valid,test}.tokens`` (plain file reading, no ``datasets``
needed), else from the Hugging Face hub (``wikitext`` / ``wikitext-2-v1``)
through ``datasets``, imported only then. One line of a file is one row of the
hub's ``text`` column.

Tokenization variants:

- ``"standard"``: split on whitespace, one ``<eos>`` token per line, vocabulary
  from the training split (33,278 words on the full data).
- ``"seed"``: the paper draft's variant, lowercase, split on whitespace with no
  end-of-line token, vocabulary from train + validation; test words outside
  it map to ``<unk>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

SPLITS = ("train", "valid", "test")
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
VARIANTS = ("standard", "seed")
EOS = "<eos>"
UNK = "<unk>"
DATA_DIR_ENV = "LEGO_DATA_DIR"


@dataclass(frozen=True)
class Corpus:
    """Windows of token ids for the three splits, and the vocabulary.

    ``train``/``valid``/``test``: ``int64 [num_windows, seq_len + 1]``.
    ``hard``: synthetic corpus only, for each split a ``bool [num_windows, seq_len]``
    mask of the targets that cannot be predicted (drawn at random); ``None`` otherwise.
    """

    name: str
    vocab: tuple[str, ...]
    train: Tensor
    valid: Tensor
    test: Tensor
    hard: dict[str, Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1

    def split(self, name: str) -> Tensor:
        """The windows of split ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def make_windows(ids: Tensor, seq_len: int) -> Tensor:
    """Cut a 1-D token stream into contiguous, non-overlapping windows.

    ``ids``: ``int64 [num_tokens]``. Returns ``int64 [num_tokens // (seq_len + 1), seq_len + 1]``
    (a copy); the incomplete tail is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    n = ids.numel() // (seq_len + 1)
    return ids[: n * (seq_len + 1)].view(n, seq_len + 1).clone()


def batch_indices(
    num: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield int64 index tensors that cover ``range(num)`` in batches of at most ``batch_size``.

    In order, or in a random order drawn from ``generator`` with ``shuffle``;
    the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(num, generator=generator) if shuffle else torch.arange(num)
    yield from order.split(batch_size)


def _words(lines: list[str], variant: str) -> list[str]:
    """Tokens of a split: whitespace split, plus ``<eos>`` per line in the standard variant."""
    if variant == "seed":
        return " ".join(lines).lower().split()
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    return words


def _missing_data_error(reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"WikiText-2 not found ({reason}). Provide it in one of three ways: pass --data-dir DIR "
        f"(data_dir=...) with wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens; set the "
        f"{DATA_DIR_ENV} environment variable to such a folder; or go online with the `datasets` "
        f"package installed to download it from the hub (wikitext / wikitext-2-v1)."
    )


def read_wikitext2_lines(data_dir: str | None = None) -> dict[str, list[str]]:
    """The lines of each split of WikiText-2 (``wikitext-2-v1``).

    Source: ``data_dir``, else the ``LEGO_DATA_DIR`` environment variable, else the hub
    (needs ``datasets`` and a connection). Raises ``FileNotFoundError`` naming the three ways.
    """
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        paths = {s: os.path.join(data_dir, f"wiki.{s}.tokens") for s in SPLITS}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise _missing_data_error(f"missing {', '.join(missing)}")
        lines = {}
        for split, path in paths.items():
            with open(path, encoding="utf-8") as f:
                lines[split] = f.readlines()
        return lines
    try:
        import datasets
    except ImportError as e:
        raise _missing_data_error("no local folder given and `datasets` is not installed") from e
    try:
        hub = datasets.load_dataset("wikitext", "wikitext-2-v1")
    except Exception as e:  # offline, hub down, ...: every failure means "no data"
        raise _missing_data_error(f"no local folder given and the hub failed: {e}") from e
    return {split: list(hub[HUB_SPLITS[split]]["text"]) for split in SPLITS}


def _vocabulary_index(words: dict[str, list[str]], variant: str) -> dict[str, int]:
    """Word -> id, in order of first appearance in the vocabulary splits, ``<unk>`` last."""
    vocab_splits = ("train", "valid") if variant == "seed" else ("train",)
    ordered = dict.fromkeys(w for split in vocab_splits for w in words[split])  # first seen
    ordered.setdefault(UNK)
    return {w: i for i, w in enumerate(ordered)}


def wikitext2_vocab(*, data_dir: str | None = None, variant: str = "standard") -> tuple[str, ...]:
    """The vocabulary of ``load_wikitext2(..., variant=variant)`` (it does not depend on
    ``seq_len`` or ``samples``), without building the windows."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    lines = read_wikitext2_lines(data_dir)
    words = {s: _words(lines[s], variant) for s in ("train", "valid")}
    return tuple(_vocabulary_index(words, variant))


def load_wikitext2(
    seq_len: int,
    *,
    data_dir: str | None = None,
    samples: int | None = None,
    variant: str = "standard",
    limit_eval: bool = False,
) -> Corpus:
    """WikiText-2 as windows of ``seq_len + 1`` token ids.

    ``samples`` keeps the first ``samples`` training windows (``None``: all). With
    ``limit_eval`` (the seed protocol) validation and test keep the same share of their
    windows; otherwise they stay whole. ``variant``: ``"standard"`` or ``"seed"`` (see the
    module docstring).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1 (or None for all windows), got {samples}")
    words = {s: _words(lines, variant) for s, lines in read_wikitext2_lines(data_dir).items()}
    index = _vocabulary_index(words, variant)
    unk = index[UNK]
    windows = {
        s: make_windows(torch.tensor([index.get(w, unk) for w in words[s]]), seq_len)
        for s in SPLITS
    }
    if samples is not None:
        share = min(1.0, samples / windows["train"].shape[0])
        windows["train"] = windows["train"][:samples]
        if limit_eval:
            for s in ("valid", "test"):
                windows[s] = windows[s][: max(1, round(share * windows[s].shape[0]))]
    return Corpus(name="wikitext-2", vocab=tuple(index), **windows)


def synthetic_corpus(
    seq_len: int,
    *,
    vocab_size: int = 64,
    num_hard: int = 16,
    train_windows: int = 512,
    valid_windows: int = 64,
    test_windows: int = 64,
    seed: int = 0,
) -> Corpus:
    """A corpus with known easy and hard tokens.

    Tokens ``0 .. num_hard - 1`` are hard contexts: the next token is uniformly random.
    Every other token ``e`` is an easy context: it is always followed by ``successor[e]``,
    a fixed token with a smaller id, so every easy run ends in a hard context. A model
    that learned the successor table reaches loss ``ln(vocab_size)`` on hard targets and
    0 on easy ones; ``Corpus.hard`` marks the hard targets (about 40% with the defaults).
    """
    if not 1 <= num_hard < vocab_size:
        raise ValueError(f"num_hard must be in [1, vocab_size), got {num_hard} for {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    successor = [0] * num_hard + [
        int(torch.randint(e, (1,), generator=g)) for e in range(num_hard, vocab_size)
    ]
    windows, hard = {}, {}
    for split, n in zip(SPLITS, (train_windows, valid_windows, test_windows), strict=True):
        if n < 1:
            raise ValueError(f"{split}_windows must be at least 1, got {n}")
        draws = torch.randint(vocab_size, (n * (seq_len + 1),), generator=g).tolist()
        stream = [draws[0]]
        for r in draws[1:]:
            prev = stream[-1]
            stream.append(r if prev < num_hard else successor[prev])
        windows[split] = make_windows(torch.tensor(stream), seq_len)
        hard[split] = windows[split][:, :-1] < num_hard
    return Corpus(name="synthetic", vocab=synthetic_vocab(vocab_size), hard=hard, **windows)


def synthetic_vocab(vocab_size: int) -> tuple[str, ...]:
    """The words of ``synthetic_corpus(..., vocab_size=vocab_size)``: ``t0, t1, ...``."""
    return tuple(f"t{i}" for i in range(vocab_size))


# ----------------------------------------------------------------------------- text <-> ids

TEXT_KEY = "text"  # where ``python -m lego.train --save-model`` stores a TextCodec's state


@dataclass(frozen=True)
class TextCodec:
    """How a trained model's text becomes token ids and back.

    ``vocab``: the corpus's words, id = position; ``variant``: its tokenization
    (``"standard"``: split on whitespace; ``"seed"``: lowercase first, see the module
    docstring). A prompt is one line of text: no ``<eos>`` is appended to it.
    """

    vocab: tuple[str, ...]
    variant: str

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        object.__setattr__(self, "vocab", tuple(self.vocab))

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """``(ids, unknown)``: the ids of the words of ``text``, words outside the
        vocabulary mapped to ``<unk>`` (or dropped if it has none) and listed in ``unknown``."""
        index = {w: i for i, w in enumerate(self.vocab)}
        words = (text.lower() if self.variant == "seed" else text).split()
        unknown = [w for w in words if w not in index]
        unk = index.get(UNK)
        ids = [index.get(w, unk) for w in words]
        return [i for i in ids if i is not None], unknown

    def decode(self, ids: list[int]) -> str:
        """The words of ``ids`` joined by spaces."""
        return " ".join(self.vocab[i] for i in ids)

    def state(self) -> dict[str, object]:
        """A plain dict (what a model file stores); ``TextCodec(**state)`` rebuilds it."""
        return {"vocab": list(self.vocab), "variant": self.variant}


def run_text_codec(config: dict) -> TextCodec:
    """The TextCodec of the corpus that a ``python -m lego.train`` run used, from the run's
    JSON ``config`` (``dataset``, ``protocol``, ``data_dir``, ``vocab_size``)."""
    if config["dataset"] == "synthetic":
        return TextCodec(synthetic_vocab(config["vocab_size"]), "standard")
    variant = "seed" if config["protocol"] == "seed" else "standard"
    vocab = wikitext2_vocab(data_dir=config["data_dir"], variant=variant)
    if len(vocab) != config["vocab_size"]:
        raise ValueError(
            f"the WikiText-2 found now has {len(vocab)} words, the run's model "
            f"{config['vocab_size']}; point --data-dir / LEGO_DATA_DIR at the copy it was "
            "trained on"
        )
    return TextCodec(vocab, variant)
