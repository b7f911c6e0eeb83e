"""Tests for tfcourse.data: vocabularies, toy seq2seq tasks, batching and the char corpus."""

import math
import sys

import numpy as np
import pytest

from tfcourse.data import (
    TASKS,
    CharCorpus,
    CharVocab,
    lm_batch,
    make_task,
    seq2seq_batch,
    split_held_out,
    unigram_cross_entropy,
    zen_of_python,
)

PAD, BOS, EOS = CharVocab.PAD, CharVocab.BOS, CharVocab.EOS


def test_vocab_round_trip_and_layout():
    vocab = CharVocab("cab")
    assert (PAD, BOS, EOS) == (0, 1, 2)
    assert vocab.size == 6
    ids = vocab.encode("abcab")
    assert ids.dtype == np.int64
    assert ids.tolist() == [4, 5, 3, 4, 5]  # symbols keep their given order after the specials
    assert vocab.decode(ids) == "abcab"
    with_specials = [BOS, 3, 4, EOS, PAD]
    assert vocab.decode(with_specials) == "ca"
    assert vocab.decode(with_specials, strip_special=False) == "<bos>ca<eos><pad>"
    assert CharVocab("aab") == CharVocab("ab")
    assert vocab.encode("").shape == (0,)


def test_vocab_rejects_bad_input():
    vocab = CharVocab("ab")
    with pytest.raises(ValueError, match=r"text: expected characters from 'ab', got 'z' at pos"):
        vocab.encode("az")
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 4\], got 5"):
        vocab.decode([5])
    with pytest.raises(ValueError, match="symbols: expected one or more single char.*got 'ab'"):
        CharVocab(["ab"])
    with pytest.raises(ValueError, match="symbols: expected one or more single characters"):
        CharVocab("")


@pytest.mark.parametrize(
    "name, solve",
    [
        ("copy", lambda s: s),
        ("reverse", lambda s: "".join(reversed(s))),
        ("sort", lambda s: "".join(sorted(s))),
        ("addition", lambda s: str(int(s.split("+")[0]) + int(s.split("+")[1]))),
    ],
)
def test_task_targets_and_arrays_agree(name, solve):
    data = make_task(name, 50, seed=0, min_len=3, max_len=7)
    assert len(data) == 50
    assert data.src.shape == (50, 7) and data.tgt_in.shape == data.tgt_out.shape == (50, 8)
    for arr in (data.src, data.tgt_in, data.tgt_out, data.src_lengths):
        assert arr.dtype == np.int64
    for row, (source, target) in enumerate(data.pairs):
        assert target == solve(source)
        assert 3 <= len(source) <= 7 and data.src_lengths[row] == len(source)
        assert data.vocab.decode(data.src[row]) == source
        assert data.vocab.decode(data.tgt_in[row]) == target
        assert data.vocab.decode(data.tgt_out[row]) == target
    if name == "addition":
        operands = [part for source, _ in data.pairs for part in source.split("+")]
        assert all(part == "0" or not part.startswith("0") for part in operands)
        assert set(data.vocab.symbols) == set("0123456789+")


def test_padding_bos_eos_layout_by_hand():
    assert TASKS == ("copy", "reverse", "sort", "addition")
    # Letters "abcdefgh" get ids 3..10; digits "0".."9" get 3..12 and "+" gets 13.
    data = make_task("reverse", 1, seed=0, min_len=3, max_len=3)
    source = data.pairs[0][0]
    src = [3 + "abcdefgh".index(c) for c in source]
    np.testing.assert_array_equal(data.src[0], src)
    np.testing.assert_array_equal(data.tgt_in[0], [BOS, src[2], src[1], src[0]])
    np.testing.assert_array_equal(data.tgt_out[0], [src[2], src[1], src[0], EOS])

    data = make_task("addition", 100, seed=0, min_len=3, max_len=4)
    row = next(i for i, (s, t) in enumerate(data.pairs) if len(s) == 3 and len(t) == 1)
    (a, plus, b), (total,) = data.pairs[row]  # e.g. ("3+4", "7")
    assert plus == "+" and int(total) == int(a) + int(b)
    np.testing.assert_array_equal(data.src[row], [3 + int(a), 13, 3 + int(b), PAD])
    np.testing.assert_array_equal(data.tgt_in[row], [BOS, 3 + int(total), PAD, PAD, PAD])
    np.testing.assert_array_equal(data.tgt_out[row], [3 + int(total), EOS, PAD, PAD, PAD])


def test_tasks_are_deterministic():
    a, b = make_task("sort", 20, seed=5), make_task("sort", 20, seed=5)
    c = make_task("sort", 20, seed=6)
    assert a.pairs == b.pairs
    np.testing.assert_array_equal(a.tgt_out, b.tgt_out)
    assert a.pairs != c.pairs


def test_held_out_split_is_disjoint():
    data = make_task("copy", 300, seed=0, min_len=3, max_len=3)  # 512 strings: duplicates
    assert len({s for s, _ in data.pairs}) < 300
    train, test = split_held_out(data, 40, seed=1)
    train_sources = {s for s, _ in train.pairs}
    test_sources = [s for s, _ in test.pairs]
    assert len(test) == 40 and len(set(test_sources)) == 40
    assert train_sources.isdisjoint(test_sources)
    assert len(train) + len(test) <= len(data)
    assert train.vocab == data.vocab
    for part in (train, test):
        for row, (source, _) in enumerate(part.pairs):
            assert part.vocab.decode(part.src[row]) == source
    again, _ = split_held_out(data, 40, seed=1)
    assert again.pairs == train.pairs


def test_seq2seq_batch_depends_only_on_seed_and_step():
    data = make_task("copy", 64, seed=0)
    src, tgt_in, tgt_out, lengths = seq2seq_batch(data, 8, seed=3, step=5)
    assert src.shape == (8, 8) and tgt_in.shape == tgt_out.shape == (8, 9)
    assert lengths.shape == (8,)
    for step in range(5):  # drawing earlier batches must not change batch 5
        seq2seq_batch(data, 8, seed=3, step=step)
    again = seq2seq_batch(data, 8, seed=3, step=5)
    for x, y in zip((src, tgt_in, tgt_out, lengths), again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(src, seq2seq_batch(data, 8, seed=3, step=6)[0])
    assert not np.array_equal(src, seq2seq_batch(data, 8, seed=4, step=5)[0])


def test_lm_batch_windows():
    ids = np.arange(100, 120)
    x, y = lm_batch(ids, batch_size=16, seq_len=5, seed=0, step=0)
    assert x.shape == y.shape == (16, 5) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    offsets = x[:, 0] - 100
    assert offsets.min() >= 0 and offsets.max() <= len(ids) - 6
    np.testing.assert_array_equal(x, offsets[:, None] + 100 + np.arange(5))
    x2, _ = lm_batch(ids, 16, 5, seed=0, step=0)
    np.testing.assert_array_equal(x, x2)
    x_last, y_last = lm_batch(np.arange(6), 4, 5, seed=0, step=1)  # only one window fits
    np.testing.assert_array_equal(y_last, np.tile(np.arange(1, 6), (4, 1)))
    with pytest.raises(ValueError, match=r"ids: expected at least seq_len \+ 1 = 6 tokens, got 5"):
        lm_batch(np.arange(5), 2, 5, seed=0, step=0)


def test_unigram_cross_entropy_by_hand():
    vocab = CharVocab("ab")
    expected = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert unigram_cross_entropy(vocab.encode("aab"), vocab.size) == pytest.approx(expected)
    assert unigram_cross_entropy(vocab.encode("aaaa"), vocab.size) == 0.0
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 3\]"):
        unigram_cross_entropy([4], 4)


def test_zen_corpus_is_silent_and_complete(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "this", raising=False)  # force a fresh, printing import
    text = zen_of_python()
    assert capsys.readouterr().out == ""
    assert text.startswith("The Zen of Python, by Tim Peters")
    assert "Beautiful is better than ugly." in text
    corpus = CharCorpus.from_text(text)
    assert corpus.vocab.symbols == tuple(sorted(set(text)))
    assert corpus.vocab.decode(corpus.ids) == text
    assert unigram_cross_entropy(corpus.ids, corpus.vocab.size) < math.log(corpus.vocab.size)


def test_corpus_from_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("héllo\n", encoding="utf-8")
    corpus = CharCorpus.from_file(path)
    assert corpus.text == "héllo\n" and corpus.ids.shape == (6,)
    with pytest.raises(ValueError, match="path: no text file at .*missing.txt"):
        CharCorpus.from_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="path: .*empty.txt' is empty"):
        CharCorpus.from_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="text: expected a non-empty string"):
        CharCorpus.from_text("")


TINY = make_task("copy", 5, seed=0)


@pytest.mark.parametrize(
    "function, args, message",
    [
        (make_task, ("multiply", 5, 0), r"name: expected one of \['copy', 'reverse', 'sort', 'add"),
        (make_task, ("copy", 0, 0), "n_examples: expected a positive integer"),
        (make_task, ("copy", 5, -1), "seed: expected a non-negative integer"),
        (make_task, ("copy", 5, 0, 4, 3), "max_len: expected at least min_len = 4, got 3"),
        (make_task, ("addition", 5, 0, 2), "min_len: expected at least 3 for addition"),
        (split_held_out, (TINY, 5, 0), "n_test: expected fewer than the 5 distinct sources"),
        (split_held_out, ([], 1, 0), "data: expected a Seq2SeqData"),
        (seq2seq_batch, (TINY, 6, 0, 0), r"batch_size: expected at most len\(data\) = 5, got 6"),
        (seq2seq_batch, (TINY, 2, 0, -1), "step: expected a non-negative integer, got -1"),
        (lm_batch, (np.arange(10.0), 2, 3, 0, 0), "ids: expected integers"),
        (lm_batch, (np.arange(10), 2, 0, 0, 0), "seq_len: expected a positive integer"),
    ],
)
def test_bad_arguments_are_named(function, args, message):
    with pytest.raises(ValueError, match=message):
        function(*args)
