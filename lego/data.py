"""Data for the LEGO trainer: WikiText-2 and -103, text files, hub datasets, a synthetic corpus.

Every split becomes a tensor of windows of ``seq_len + 1`` token ids,
``int64 [num_windows, seq_len + 1]``: a window's first ``seq_len`` ids are the
inputs, its last ``seq_len`` ids the targets. Windows are contiguous and
non-overlapping (``make_windows``), or, with ``slicing="seed"``, cut as the
original research code cut them (``seed_windows``: neighbours share one token,
only whole batches, the first ``samples`` windows' worth of training tokens and a
fifth of that of validation).

Sources:

- WikiText-2 (``wikitext-2-v1``) and WikiText-103 (``wikitext-103-v1``) from a
  local folder holding ``wiki.{train,valid,test}.tokens`` (plain file reading, no
  ``datasets`` needed), else from the Hugging Face hub (``wikitext``) through
  ``datasets``, imported only then. One line of a file is one row of the hub's
  ``text`` column.
- Three local text files (``load_text_files``) and any text dataset of the hub by
  name (``load_hub_text``, streamed).

Tokenizations (``encode_lines``): ``"word"``, ``"char"``, ``"byte"``. The word
tokenization has two variants:

- ``"standard"``: split on whitespace, one ``<eos>`` token per line, vocabulary
  from the training split (33,278 words on the full WikiText-2).
- ``"seed"``: the paper draft's variant, lowercase, split on whitespace with no
  end-of-line token, vocabulary from train + validation; test words outside
  it map to ``<unk>``. (The original lowercased the *raw* WikiText-2, where rare
  words are not yet ``<unk>``; only ``wikitext-2-v1`` is read here.)
"""

from __future__ import annotations

import itertools
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

SPLITS = ("train", "valid", "test")
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
VARIANTS = ("standard", "seed")
TOKENIZERS = ("word", "char", "byte")
SLICINGS = ("standard", "seed")
WIKITEXT_CONFIGS = ("wikitext-2-v1", "wikitext-103-v1")
EOS = "<eos>"
UNK = "<unk>"
DATA_DIR_ENV = "LEGO_DATA_DIR"


@dataclass(frozen=True)
class Corpus:
    """Windows of token ids for the three splits, and the vocabulary.

    ``train``/``valid``/``test``: ``int64 [num_windows, seq_len + 1]``.
    ``hard``: synthetic corpus only, for each split a ``bool [num_windows, seq_len]``
    mask of the targets that cannot be predicted (drawn at random); ``None`` otherwise.
    ``tokenizer``: how text became ids (``TOKENIZERS``; ``vocab[i]`` is token ``i``);
    ``variant``: the word tokenization's variant (``VARIANTS``).
    """

    name: str
    vocab: tuple[str, ...]
    train: Tensor
    valid: Tensor
    test: Tensor
    hard: dict[str, Tensor] | None = None
    tokenizer: str = "word"
    variant: str = "standard"

    @property
    def codec(self) -> TextCodec:
        """How text becomes this corpus's ids and back (what a saved model keeps)."""
        return TextCodec(self.vocab, self.variant, self.tokenizer)

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


def _line_words(line: str, variant: str) -> list[str]:
    """The word tokens of one line: whitespace split plus ``<eos>`` (``"standard"``), or
    lowercased with no end-of-line token (``"seed"``)."""
    if variant == "seed":
        return line.lower().split()
    return [*line.split(), EOS]


def word_index(lines: dict[str, list[str]], variant: str = "standard") -> dict[str, int]:
    """Word -> id of the word tokenization of ``lines`` (split -> lines): the words of
    the training split (``"seed"``: training and validation) in order of first
    appearance, ``<unk>`` last unless seen."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    index: dict[str, int] = {}
    for split in ("train", "valid") if variant == "seed" else ("train",):
        for line in lines[split]:
            for w in _line_words(line, variant):
                index.setdefault(w, len(index))
    index.setdefault(UNK, len(index))
    return index


def _encode_words(lines: list[str], index: dict[str, int], variant: str) -> Tensor:
    unk = index[UNK]
    ids = array("q")
    for line in lines:
        ids.extend(index.get(w, unk) for w in _line_words(line, variant))
    return torch.frombuffer(ids, dtype=torch.int64) if ids else torch.zeros(0, dtype=torch.int64)


def _line_text(line: str) -> str:
    """A line as the character and byte tokenizers read it: one ``\n`` at its end."""
    return line.rstrip("\r\n") + "\n"


def check_tokenization(tokenizer: str, variant: str) -> None:
    """``ValueError`` naming the argument unless ``tokenizer`` is one of ``TOKENIZERS`` and
    ``variant`` one of ``VARIANTS`` that applies to it (``"seed"`` only for words)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if tokenizer != "word" and variant != "standard":
        raise ValueError(f"variant {variant!r} is a word tokenization; use tokenizer='word'")


def encode_lines(
    lines: dict[str, list[str]], tokenizer: str = "word", variant: str = "standard"
) -> tuple[tuple[str, ...], dict[str, Tensor]]:
    """The vocabulary and the int64 token stream ``[num_tokens]`` of every split.

    ``tokenizer``: ``"word"`` (``variant`` as in the module docstring), ``"char"``
    (characters, every line ending in ``\n``; vocabulary from the training split in
    order of appearance, ``<unk>`` last for characters it lacks) or ``"byte"`` (the
    UTF-8 bytes of the same text; the 256 byte values, written as Latin-1 characters).
    """
    check_tokenization(tokenizer, variant)
    if tokenizer == "word":
        index = word_index(lines, variant)
        return tuple(index), {s: _encode_words(lines[s], index, variant) for s in SPLITS}
    text = {s: "".join(_line_text(line) for line in lines[s]) for s in SPLITS}
    if tokenizer == "byte":
        streams = {
            s: torch.tensor(list(text[s].encode("utf-8")), dtype=torch.int64) for s in SPLITS
        }
        return tuple(bytes([b]).decode("latin-1") for b in range(256)), streams
    index = {c: i for i, c in enumerate(dict.fromkeys(text["train"]))}
    index.setdefault(UNK, len(index))
    unk = index[UNK]
    streams = {s: torch.tensor([index.get(c, unk) for c in text[s]]) for s in SPLITS}
    return tuple(index), streams


def _missing_data_error(
    reason: str, name: str = "WikiText-2", hub: str = "wikitext-2-v1"
) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found ({reason}). Provide it in one of three ways: pass --data-dir DIR "
        f"(data_dir=...) with wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens; set the "
        f"{DATA_DIR_ENV} environment variable to such a folder; or go online with the `datasets` "
        f"package installed to download it from the hub (wikitext / {hub})."
    )


def read_wikitext_lines(
    data_dir: str | None = None, *, config: str = "wikitext-2-v1"
) -> dict[str, list[str]]:
    """The lines of each split of WikiText (``config``: ``"wikitext-2-v1"`` or
    ``"wikitext-103-v1"``, the hub's configuration names).

    Source: ``data_dir`` (a folder of ``wiki.{train,valid,test}.tokens``), else for
    WikiText-2 the ``LEGO_DATA_DIR`` environment variable, else the hub (needs
    ``datasets`` and a connection). Raises ``FileNotFoundError`` naming the ways.
    """
    if config not in WIKITEXT_CONFIGS:
        raise ValueError(f"config must be one of {WIKITEXT_CONFIGS}, got {config!r}")
    name = "WikiText-2" if config == "wikitext-2-v1" else "WikiText-103"
    if data_dir is None and config == "wikitext-2-v1":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        paths = {s: os.path.join(data_dir, f"wiki.{s}.tokens") for s in SPLITS}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise _missing_data_error(f"missing {', '.join(missing)}", name, config)
        return {split: read_lines(path) for split, path in paths.items()}
    try:
        import datasets
    except ImportError as e:
        raise _missing_data_error(
            "no local folder given and `datasets` is not installed", name, config
        ) from e
    try:
        hub = datasets.load_dataset("wikitext", config)
    except Exception as e:  # offline, hub down, ...: every failure means "no data"
        raise _missing_data_error(
            f"no local folder given and the hub failed: {e}", name, config
        ) from e
    return {split: list(hub[HUB_SPLITS[split]]["text"]) for split in SPLITS}


def read_lines(path: str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (each with its end of line)."""
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def seed_windows(ids: Tensor, seq_len: int, batch_size: int) -> Tensor:
    """The original code's windows of the stream ``ids`` (int64 ``[num_tokens]``):
    ``seq_len + 1`` tokens every ``seq_len`` tokens (window ``k`` is
    ``ids[k * seq_len : k * seq_len + seq_len + 1]``, so neighbours share one token),
    as many as fill whole batches of ``batch_size``: int64 ``[n, seq_len + 1]`` with
    ``n`` a multiple of ``batch_size`` (a copy)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if ids.numel() < seq_len + 1:
        return ids.new_zeros(0, seq_len + 1)
    windows = ids.unfold(0, seq_len + 1, seq_len)
    return windows[: windows.shape[0] // batch_size * batch_size].clone()


def corpus_from_streams(
    name: str,
    vocab: tuple[str, ...],
    streams: dict[str, Tensor],
    seq_len: int,
    *,
    samples: int | None = None,
    slicing: str = "standard",
    batch_size: int = 64,
    tokenizer: str = "word",
    variant: str = "standard",
) -> Corpus:
    """A ``Corpus`` of the token streams of every split (made by ``encode_lines`` with
    ``tokenizer`` and ``variant``).

    ``slicing="standard"``: contiguous, non-overlapping windows (``make_windows``);
    ``samples`` keeps the first ``samples`` training windows, the evaluation splits stay
    whole. ``slicing="seed"`` (the original code's, ``samples`` required): the first
    ``samples * (seq_len + 1)`` training tokens and the first
    ``int(0.2 * samples) * (seq_len + 1)`` tokens of validation (and of test, which the
    original has not), cut by ``seed_windows`` into whole batches of ``batch_size``.
    """
    if slicing not in SLICINGS:
        raise ValueError(f"slicing must be one of {SLICINGS}, got {slicing!r}")
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1 (or None for all windows), got {samples}")
    if slicing == "seed":
        if samples is None:
            raise ValueError("slicing='seed' needs samples (the original code's num_samples)")
        tokens = {"train": samples, "valid": int(0.2 * samples), "test": int(0.2 * samples)}
        windows = {
            s: seed_windows(streams[s][: tokens[s] * (seq_len + 1)], seq_len, batch_size)
            for s in SPLITS
        }
        empty = [s for s in ("train", "valid") if windows[s].shape[0] == 0]
        if empty:
            raise ValueError(
                f"slicing='seed' with samples={samples}: the {' and '.join(empty)} slice "
                f"holds less than one whole batch of {batch_size} windows; raise samples "
                f"(--samples) to at least {5 * batch_size} or lower batch_size (--batch-size)"
            )
    else:
        windows = {s: make_windows(streams[s], seq_len) for s in SPLITS}
        if samples is not None:
            windows["train"] = windows["train"][:samples]
    return Corpus(name=name, vocab=vocab, tokenizer=tokenizer, variant=variant, **windows)


def load_wikitext2(
    seq_len: int,
    *,
    data_dir: str | None = None,
    samples: int | None = None,
    variant: str = "standard",
    slicing: str = "standard",
    batch_size: int = 64,
) -> Corpus:
    """WikiText-2 as windows of ``seq_len + 1`` token ids.

    ``variant``: ``"standard"`` or ``"seed"`` (see the module docstring); ``samples``,
    ``slicing`` and ``batch_size`` as in ``corpus_from_streams`` (``"seed"``: the
    original code's slices of the training and validation streams).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    vocab, streams = encode_lines(read_wikitext_lines(data_dir), "word", variant)
    return corpus_from_streams(
        "wikitext-2",
        vocab,
        streams,
        seq_len,
        samples=samples,
        slicing=slicing,
        batch_size=batch_size,
        variant=variant,
    )


def load_wikitext103(
    seq_len: int, *, data_dir: str | None = None, samples: int | None = None
) -> Corpus:
    """WikiText-103 (``wikitext-103-v1``, standard word tokenization, 267,735 words on the
    full data) from ``data_dir`` (the same three file names as WikiText-2) or the hub."""
    lines = read_wikitext_lines(data_dir, config="wikitext-103-v1")
    vocab, streams = encode_lines(lines, "word")
    return corpus_from_streams("wikitext-103", vocab, streams, seq_len, samples=samples)


def load_text_files(
    seq_len: int,
    files: tuple[str, str, str],
    *,
    tokenizer: str = "word",
    samples: int | None = None,
) -> Corpus:
    """A corpus from three local UTF-8 text files ``(train, valid, test)``, tokenized by
    ``tokenizer`` (``encode_lines``; ``"word"`` reads them as WikiText: whitespace split,
    ``<eos>`` per line, vocabulary from the training file)."""
    if not isinstance(files, (tuple, list)) or len(files) != 3:
        raise ValueError(f"files must be three paths (train, valid, test), got {files!r}")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"data file(s) not found: {', '.join(missing)}")
    lines = {split: read_lines(path) for split, path in zip(SPLITS, files, strict=True)}
    vocab, streams = encode_lines(lines, tokenizer)
    return corpus_from_streams(
        "text", vocab, streams, seq_len, samples=samples, tokenizer=tokenizer
    )


def parse_split(spec: str) -> tuple[str, int | None, int | None]:
    """``"name"`` or ``"name[start:stop]"`` (row numbers, either may be empty) ->
    ``(name, start, stop)``; ``ValueError`` naming the spec otherwise."""
    match = re.fullmatch(r"([\w.-]+)(?:\[(\d*):(\d*)\])?", spec.strip())
    if match is None:
        raise ValueError(
            f"split {spec!r} must be NAME or NAME[START:STOP] with row numbers, "
            "e.g. validation[:2000]"
        )
    name, start, stop = match.groups()
    return name, int(start) if start else None, int(stop) if stop else None


def load_hub_text(
    seq_len: int,
    path: str,
    config: str | None = None,
    *,
    splits: tuple[str, str, str] = ("train", "validation", "test"),
    text_column: str = "text",
    tokenizer: str = "word",
    samples: int | None = None,
) -> Corpus:
    """Any text dataset of the Hugging Face hub (``datasets.load_dataset(path, config,
    split=..., streaming=True)``, so only the rows read are downloaded).

    ``splits``: the hub splits that become train, valid and test, each ``"name"`` or
    ``"name[start:stop]"`` (rows ``start..stop - 1``; e.g. a small C4 sample:
    ``("train[:20000]", "validation[:2000]", "validation[2000:4000]")``); one row of
    ``text_column`` is one line for ``tokenizer``.
    """
    if len(splits) != 3:
        raise ValueError(f"splits must name three hub splits (train, valid, test), got {splits!r}")
    parsed = [parse_split(spec) for spec in splits]
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(f"{path}: the `datasets` package is not installed") from e
    lines = {}
    for split, (name, start, stop) in zip(SPLITS, parsed, strict=True):
        try:
            rows = datasets.load_dataset(path, config, split=name, streaming=True)
            taken = itertools.islice(rows, start, stop)
            lines[split] = [row[text_column] for row in taken]
        except KeyError as e:
            raise ValueError(f"{path}: split {name!r} has no column {text_column!r}") from e
        except Exception as e:  # offline, no such dataset or split, ...
            raise FileNotFoundError(
                f"{path} ({config or 'default'} configuration), split {name!r}: the hub failed: {e}"
            ) from e
        if not lines[split]:
            raise ValueError(f"{path}: split {splits[SPLITS.index(split)]!r} has no rows")
    vocab, streams = encode_lines(lines, tokenizer)
    name = path if config is None else f"{path}:{config}"
    return corpus_from_streams(name, vocab, streams, seq_len, samples=samples, tokenizer=tokenizer)


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

    ``vocab``: the corpus's tokens, id = position; ``tokenizer``: ``"word"`` (split on
    whitespace; ``variant="seed"`` lowercases first, see the module docstring),
    ``"char"`` or ``"byte"`` (UTF-8 bytes; ``vocab`` holds them as Latin-1 characters).
    A prompt is one line of text: no ``<eos>`` (or end of line) is appended to it.
    """

    vocab: tuple[str, ...]
    variant: str = "standard"
    tokenizer: str = "word"

    def __post_init__(self) -> None:
        check_tokenization(self.tokenizer, self.variant)
        object.__setattr__(self, "vocab", tuple(self.vocab))

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """``(ids, unknown)``: the ids of the tokens of ``text``, tokens outside the
        vocabulary mapped to ``<unk>`` (or dropped if it has none) and listed in ``unknown``."""
        if self.tokenizer == "byte":
            return list(text.encode("utf-8")), []
        index = {w: i for i, w in enumerate(self.vocab)}
        if self.tokenizer == "char":
            tokens = list(text)
        else:
            tokens = (text.lower() if self.variant == "seed" else text).split()
        unknown = [w for w in tokens if w not in index]
        unk = index.get(UNK)
        ids = [index.get(w, unk) for w in tokens]
        return [i for i in ids if i is not None], unknown

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: words joined by spaces, characters as they are, bytes
        decoded as UTF-8 (a broken sequence shows as U+FFFD)."""
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        sep = "" if self.tokenizer == "char" else " "
        return sep.join(self.vocab[i] for i in ids)

    def state(self) -> dict[str, object]:
        """A plain dict (what a model file stores); ``TextCodec(**state)`` rebuilds it."""
        return {"vocab": list(self.vocab), "variant": self.variant, "tokenizer": self.tokenizer}


def run_text_codec(config: dict) -> TextCodec:
    """The TextCodec of the corpus that a ``python -m lego.train`` run on WikiText-2 or the
    synthetic corpus used, from the run's JSON ``config`` (``dataset``, ``protocol``,
    ``data_dir``, ``vocab_size``): for model files saved before they stored it."""
    if config["dataset"] == "synthetic":
        return TextCodec(synthetic_vocab(config["vocab_size"]))
    if config["dataset"] != "wikitext-2":
        raise ValueError(
            f"a {config['dataset']!r} run's vocabulary cannot be rebuilt from its config; "
            "save the model again with `python -m lego.train --save-model`"
        )
    variant = "seed" if config["protocol"] == "seed" else "standard"
    vocab = tuple(word_index(read_wikitext_lines(config["data_dir"]), variant))
    if len(vocab) != config["vocab_size"]:
        raise ValueError(
            f"the WikiText-2 found now has {len(vocab)} words, the run's model "
            f"{config['vocab_size']}; point --data-dir / LEGO_DATA_DIR at the copy it was "
            "trained on"
        )
    return TextCodec(vocab, variant)
