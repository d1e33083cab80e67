"""lego.data: windows, batches, WikiText-2 (local folder and hub) and the synthetic corpus.

References: the token counts and vocabulary size in the data folder's README
(2,088,628 / 217,646 / 245,569 tokens, 33,278 words), and the raw file lines.
"""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from lego.data import (
    DATA_DIR_ENV,
    EOS,
    UNK,
    TextCodec,
    batch_indices,
    encode_lines,
    load_hub_text,
    load_text_files,
    load_wikitext2,
    load_wikitext103,
    make_windows,
    read_wikitext_lines,
    run_text_codec,
    seed_windows,
    synthetic_corpus,
)

DATA_DIR = os.environ.get(DATA_DIR_ENV)
needs_wikitext = pytest.mark.skipif(
    DATA_DIR is None or not os.path.isdir(DATA_DIR), reason="WikiText-2 copy not found"
)

TINY = {
    "train": ["the cat sat\n", "\n", "on the mat\n"],
    "valid": ["The dog sat\n"],
    "test": ["a cat\n", "\n"],
}


@pytest.fixture
def tiny_dir(tmp_path: Path) -> str:
    for split, lines in TINY.items():
        (tmp_path / f"wiki.{split}.tokens").write_text("".join(lines), encoding="utf-8")
    return str(tmp_path)


@pytest.fixture(scope="module")
def wikitext():
    return load_wikitext2(32)


def test_make_windows_contiguous_non_overlapping():
    ids = torch.arange(23)
    w = make_windows(ids, 4)
    assert w.shape == (4, 5) and w.dtype == torch.int64
    assert torch.equal(w.flatten(), ids[:20])  # windows tile the stream, the tail is dropped
    w[0, 0] = 99
    assert ids[0] == 0  # a copy, not a view
    assert make_windows(torch.arange(3), 4).shape == (0, 5)
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(ids, 0)
    with pytest.raises(ValueError, match="ids must be 1-D"):
        make_windows(ids.view(1, -1), 4)


def test_batch_indices_cover_every_index_once():
    batches = list(batch_indices(10, 4))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = torch.cat(list(batch_indices(10, 3, shuffle=True, generator=torch.Generator())))
    assert sorted(shuffled.tolist()) == list(range(10))
    a = list(batch_indices(10, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    b = list(batch_indices(10, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_indices(10, 0))


def test_tiny_folder_standard_tokenization(tiny_dir):
    corpus = load_wikitext2(2, data_dir=tiny_dir)
    # train: the cat sat <eos> <eos> on the mat <eos>; vocabulary in order of appearance.
    assert corpus.vocab == ("the", "cat", "sat", EOS, "on", "mat", UNK)
    assert corpus.train.tolist() == [[0, 1, 2], [3, 3, 4], [0, 5, 3]]
    # valid: "The dog sat <eos>": case kept, unseen words -> <unk>; one window, tail dropped.
    assert corpus.valid.tolist() == [[6, 6, 2]]
    assert corpus.test.tolist() == [[6, 1, 3]]


def test_tiny_folder_seed_tokenization(tiny_dir):
    corpus = load_wikitext2(2, data_dir=tiny_dir, variant="seed")
    # lowercase, no end-of-line token, vocabulary from train + valid.
    assert corpus.vocab == ("the", "cat", "sat", "on", "mat", "dog", UNK)
    assert corpus.train.tolist() == [[0, 1, 2], [3, 0, 4]]
    assert corpus.valid.tolist() == [[0, 5, 2]]
    assert corpus.test.shape == (0, 3)  # "a cat": 2 tokens, less than one window


def test_hub_gives_the_same_corpus_as_the_folder(tiny_dir, monkeypatch):
    calls = []

    def load_dataset(path, name):
        calls.append((path, name))
        hub_names = {"train": "train", "valid": "validation", "test": "test"}
        return {hub_names[s]: {"text": lines} for s, lines in TINY.items()}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    hub = load_wikitext2(2)
    assert calls == [("wikitext", "wikitext-2-v1")]
    local = load_wikitext2(2, data_dir=tiny_dir)
    assert hub.vocab == local.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(hub.split(split), local.split(split))


def test_missing_data_names_the_three_ways(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        read_wikitext_lines(str(tmp_path))
    message = str(err.value)
    assert "--data-dir" in message and DATA_DIR_ENV in message and "datasets" in message
    assert "wiki.train.tokens" in message

    def offline(path, name):
        raise ConnectionError("no internet")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_wikitext2(32)
    message = str(err.value)
    assert "no internet" in message and "--data-dir" in message and DATA_DIR_ENV in message


def test_bad_arguments(tiny_dir):
    with pytest.raises(ValueError, match="variant"):
        load_wikitext2(2, data_dir=tiny_dir, variant="raw")
    with pytest.raises(ValueError, match="samples"):
        load_wikitext2(2, data_dir=tiny_dir, samples=0)
    with pytest.raises(ValueError, match="split"):
        load_wikitext2(2, data_dir=tiny_dir).split("validation")


@needs_wikitext
def test_wikitext2_matches_the_data_readme(wikitext):
    assert wikitext.vocab_size == 33_278
    assert wikitext.train.shape == (2_088_628 // 33, 33)
    assert wikitext.valid.shape == (217_646 // 33, 33)
    assert wikitext.test.shape == (245_569 // 33, 33)
    with open(os.path.join(DATA_DIR, "wiki.train.tokens"), encoding="utf-8") as f:
        first = [f.readline() for _ in range(4)]
    expected = [w for line in first for w in [*line.split(), EOS]][:33]
    assert [wikitext.vocab[i] for i in wikitext.train[0]] == expected
    assert expected[:4] == [EOS, "=", "Valkyria", "Chronicles"]


@needs_wikitext
def test_wikitext2_samples_and_seed_variant():
    corpus = load_wikitext2(32, samples=1000)
    assert corpus.train.shape[0] == 1000
    assert corpus.valid.shape[0] == 217_646 // 33  # honest protocol: evaluation splits whole
    seed = load_wikitext2(32, samples=10_000, variant="seed", slicing="seed")
    # The original code's slices: 10,000 x 33 training tokens and 2,000 x 33 validation
    # tokens, windows of 33 every 32 tokens, whole batches of 64 only.
    assert seed.train.shape == (161 * 64, 33) and seed.valid.shape == (32 * 64, 33)
    assert all(w == w.lower() for w in seed.vocab) and EOS not in seed.vocab
    assert seed.vocab_size < corpus.vocab_size
    stream = torch.cat([seed.train[0], seed.train[1, 1:]])
    assert torch.equal(seed.train[1, 0], seed.train[0, -1]) and stream.numel() == 65


def original_batches(ids: list[int], seq_len: int, batch_size: int) -> list[list[int]]:
    """The windows of the original code's batching loop, written out: batch ``i`` starts
    at token ``i * batch_size * seq_len``, its rows every ``seq_len`` tokens, each row
    ``seq_len`` inputs and the next token; a batch with a missing row is dropped."""
    rows, stride = [], batch_size * seq_len
    for first in range(0, len(ids) - seq_len - 1, stride):
        batch = [ids[s : s + seq_len + 1] for s in range(first, first + stride, seq_len)]
        if all(len(row) == seq_len + 1 for row in batch):
            rows += batch
    return rows


@pytest.mark.parametrize(
    ("num_tokens", "seq_len", "batch_size"), [(100, 4, 3), (97, 5, 2), (30, 4, 8)]
)
def test_seed_windows_are_the_original_batches(num_tokens, seq_len, batch_size):
    ids = torch.arange(num_tokens) * 7 % 101
    windows = seed_windows(ids, seq_len, batch_size)
    expected = original_batches(ids.tolist(), seq_len, batch_size)
    assert windows.tolist() == expected and windows.shape[0] % batch_size == 0
    with pytest.raises(ValueError, match="batch_size"):
        seed_windows(ids, seq_len, 0)


def tiny_files(tmp_path: Path) -> tuple[str, str, str]:
    paths = []
    for split, lines in TINY.items():
        path = tmp_path / f"{split}.txt"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(str(path))
    return tuple(paths)


def test_text_files_word_tokens_read_as_wikitext(tiny_dir, tmp_path):
    text = load_text_files(2, tiny_files(tmp_path))
    wiki = load_wikitext2(2, data_dir=tiny_dir)
    assert text.vocab == wiki.vocab and text.tokenizer == "word" and text.name == "text"
    for split in ("train", "valid", "test"):
        assert torch.equal(text.split(split), wiki.split(split))
    # WikiText-103 reads a local folder with the same file names.
    assert torch.equal(load_wikitext103(2, data_dir=tiny_dir).train, wiki.train)
    with pytest.raises(FileNotFoundError, match=r"not found: /no/train\.txt"):
        load_text_files(2, ("/no/train.txt", *tiny_files(tmp_path)[1:]))
    with pytest.raises(ValueError, match="three paths"):
        load_text_files(2, tiny_files(tmp_path)[:2])
    with pytest.raises(FileNotFoundError, match="WikiText-103 not found"):
        load_wikitext103(2, data_dir=str(tmp_path / "none"))


def test_char_and_byte_tokens():
    lines = {"train": ["ab\n", "é\n"], "valid": ["ba\n"], "test": ["az"]}
    vocab, streams = encode_lines(lines, "char")
    # every line ends in one newline; vocabulary from train in order of appearance, <unk> last
    assert vocab == ("a", "b", "\n", "é", UNK)
    assert streams["train"].tolist() == [0, 1, 2, 3, 2]
    assert streams["test"].tolist() == [0, 4, 2]  # "z" is unknown
    vocab, streams = encode_lines(lines, "byte")
    assert len(vocab) == 256 and vocab[ord("a")] == "a"
    assert bytes(streams["train"].tolist()).decode("utf-8") == "ab\né\n"  # é is two bytes
    assert streams["train"].numel() == 6
    with pytest.raises(ValueError, match="tokenizer"):
        encode_lines(lines, "bpe")
    with pytest.raises(ValueError, match="word tokenization"):
        encode_lines(lines, "char", "seed")


def test_hub_text_streams_the_rows_of_three_splits(monkeypatch):
    rows = {"train": [f"w{i} x" for i in range(10)], "validation": [f"x w{i}" for i in range(6)]}
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        if split not in rows:
            raise ValueError(f"unknown split {split}")
        return iter({"text": text, "id": i} for i, text in enumerate(rows[split]))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_hub_text(
        2, "org/data", "en", splits=("train[:8]", "validation[:3]", "validation[3:]")
    )
    assert calls == [("org/data", "en", s, True) for s in ("train", "validation", "validation")]
    assert corpus.name == "org/data:en" and corpus.vocab[:3] == ("w0", "x", EOS)
    # 8 rows of train, 3 words each (with <eos>): 24 tokens, 8 windows of 3.
    assert corpus.train.shape == (8, 3)
    valid_words = [corpus.vocab[i] for i in corpus.valid.flatten()]
    assert valid_words == ["x", "w0", EOS, "x", "w1", EOS, "x", "w2", EOS]
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        load_hub_text(2, "org/data")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_hub_text(
            2, "org/data", splits=("train", "validation", "validation"), text_column="body"
        )
    with pytest.raises(ValueError, match="NAME\\[START:STOP\\]"):
        load_hub_text(2, "org/data", splits=("train", "validation", "validation[a:]"))


def test_synthetic_corpus_easy_tokens_are_deterministic():
    corpus = synthetic_corpus(16, vocab_size=32, num_hard=8, train_windows=200, seed=3)
    assert corpus.train.shape == (200, 17) and corpus.vocab_size == 32
    for split in ("train", "valid", "test"):
        windows, hard = corpus.split(split), corpus.hard[split]
        inputs, targets = windows[:, :-1], windows[:, 1:]
        assert torch.equal(hard, inputs < 8)
        # An easy context always has the same, smaller, successor.
        easy_in, easy_out = inputs[~hard], targets[~hard]
        assert (easy_out < easy_in).all()
        table = torch.full((32,), -1)
        table[easy_in] = easy_out
        assert torch.equal(table[easy_in], easy_out)
    # Hard contexts are followed by every token of the vocabulary, about uniformly.
    hard_targets = corpus.train[:, 1:][corpus.hard["train"]]
    counts = torch.bincount(hard_targets, minlength=32).float()
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()
    assert 0.3 < corpus.hard["train"].float().mean() < 0.6
    again = synthetic_corpus(16, vocab_size=32, num_hard=8, train_windows=200, seed=3)
    assert torch.equal(again.train, corpus.train)
    with pytest.raises(ValueError, match="num_hard"):
        synthetic_corpus(16, vocab_size=8, num_hard=8)
    with pytest.raises(ValueError, match="valid_windows"):
        synthetic_corpus(16, valid_windows=0)


@pytest.mark.parametrize("variant", ["standard", "seed"])
def test_text_codec_of_a_run_has_the_corpus_vocabulary(tiny_dir, variant):
    corpus = load_wikitext2(2, data_dir=tiny_dir, variant=variant, samples=1)
    protocol = "seed" if variant == "seed" else "honest"
    config = {"dataset": "wikitext-2", "protocol": protocol, "data_dir": tiny_dir}
    codec = run_text_codec({**config, "vocab_size": corpus.vocab_size})
    assert codec == corpus.codec == TextCodec(corpus.vocab, variant)
    assert TextCodec(**codec.state()) == codec
    with pytest.raises(ValueError, match="LEGO_DATA_DIR"):
        run_text_codec({**config, "vocab_size": corpus.vocab_size + 1})
    synthetic = run_text_codec({"dataset": "synthetic", "protocol": "honest", "vocab_size": 8})
    assert synthetic == synthetic_corpus(4, vocab_size=8, num_hard=2, train_windows=1).codec
    with pytest.raises(ValueError, match="save the model again"):
        run_text_codec({**config, "dataset": "text", "vocab_size": 3})


def test_text_codec_encodes_like_the_corpus_and_decodes_back(tiny_dir):
    standard = TextCodec(load_wikitext2(2, data_dir=tiny_dir).vocab, "standard")
    # As the training split's ids (no <eos> appended to a prompt); unknown words -> <unk>.
    assert standard.encode("the cat sat") == ([0, 1, 2], [])
    assert standard.encode("The  dog\tsat") == ([6, 6, 2], ["The", "dog"])
    assert standard.decode([0, 5, 3]) == "the mat <eos>"
    seed = TextCodec(load_wikitext2(2, data_dir=tiny_dir, variant="seed").vocab, "seed")
    assert seed.encode("The DOG sat") == ([0, 5, 2], [])  # lowercased first
    no_unk = TextCodec(("a", "b"), "standard")
    assert no_unk.encode("a c b") == ([0, 1], ["c"])  # no <unk> word: dropped, still listed
    with pytest.raises(ValueError, match="variant"):
        TextCodec(("a",), "bpe")
    with pytest.raises(ValueError, match="tokenizer='word'"):
        TextCodec(("a",), "seed", "char")


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_text_codec_of_characters_and_bytes_encodes_like_the_corpus(tmp_path, tokenizer):
    lines = {"train": ["abc ab\n"], "valid": ["ba\n"], "test": ["cab é\n"]}
    files = []
    for split, text in lines.items():
        files.append(str(tmp_path / f"{split}.txt"))
        (tmp_path / f"{split}.txt").write_text(text[0], encoding="utf-8")
    codec = load_text_files(2, tuple(files), tokenizer=tokenizer).codec
    assert codec.tokenizer == tokenizer and TextCodec(**codec.state()) == codec
    vocab, streams = encode_lines(lines, tokenizer)
    assert codec.vocab == vocab
    ids, unknown = codec.encode("cab é")
    assert ids == streams["test"][: len(ids)].tolist()  # as the test split's ids, no end of line
    if tokenizer == "char":
        assert unknown == ["é"] and codec.decode(ids) == "cab <unk>"
    else:
        assert unknown == [] and codec.decode(ids) == "cab é" and len(ids) == 6
