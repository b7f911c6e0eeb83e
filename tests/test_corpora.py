"""Issue 23 item 1: a generated corpus whose entropy is known. The closed-form entropy rate
and the Bayes floor of a window are checked against independent computations: by hand on
small sources, and by counting a long sample of the text."""

import dataclasses
import math

import numpy as np
import pytest

from tfcourse import data, train
from tfcourse.course.launch import run_mpi
from tfcourse.nn import model


def two_word_source(transition):
    t = np.array(transition, dtype=float)
    return data.WordMarkovSource(("ab", "cd"), t, data._stationary(t))


def test_entropy_rate_by_hand():
    # always the other word: nothing to learn after the first word
    assert data.markov_entropy_per_char(two_word_source([[0, 1], [1, 0]])) == 0.0
    # a fair coin per word, 3 characters per word ("ab " or "cd ")
    assert data.markov_entropy_per_char(two_word_source([[0.5, 0.5], [0.5, 0.5]])) == \
        pytest.approx(math.log(2) / 3)
    # unequal: from "ab" always "cd"; from "cd" a coin; pi = (1/3, 2/3)
    rate = data.markov_entropy_per_char(two_word_source([[0, 1], [0.5, 0.5]]))
    assert rate == pytest.approx((2 / 3) * math.log(2) / 3)


def word_sequence(text):
    return text.split(" ")[1:-1]  # the first and last words may be cut


def test_entropy_rate_equals_a_long_sample_counted_word_by_word():
    """An independent estimate: -mean ln P(w_k | w_(k-1)) over the words of a long sample,
    divided by the mean characters per word (the sample, not the stationary distribution)."""
    source = data.word_markov_source(0)
    words = word_sequence(data.markov_text(source, 2**19, seed=5))
    index = {w: i for i, w in enumerate(source.words)}
    ids = np.array([index[w] for w in words])
    nats = -np.log(source.transition[ids[:-1], ids[1:]]).mean()
    chars = np.mean([len(w) + 1 for w in words])
    assert nats / chars == pytest.approx(data.markov_entropy_per_char(source), rel=0.02)


def conditional_entropy_by_counting(ids, order):
    """H(next | previous `order` characters) from the counts of a long sample, in nats."""
    windows = np.lib.stride_tricks.sliding_window_view(ids, order + 1)
    contexts, joint = {}, {}
    for w in map(tuple, windows):
        contexts[w[:-1]] = contexts.get(w[:-1], 0) + 1
        joint[w] = joint.get(w, 0) + 1
    n = len(windows)
    return -sum(c / n * math.log(c / contexts[w[:-1]]) for w, c in joint.items())


@pytest.mark.parametrize("order", [1, 2])
def test_window_floor_equals_the_counted_conditional_entropy(order):
    """With a window of `order` known characters the Bayes floor of predicting the next one
    is H(next | those characters): counted from a long sample, it must match the filter."""
    source = data.word_markov_source(0)
    held = data.markov_corpus(split="held-out")
    counted = conditional_entropy_by_counting(held.ids, order)
    x, y = data.lm_batch(held.ids, 8000, order, seed=3, step=0)
    # the filter predicts y[:, t] from x[:, :t + 1]; keep only the last target, which has
    # exactly `order` characters of context
    floor = data.markov_window_floor(source, x, y[:, :])
    shorter = data.markov_window_floor(source, x[:, :order - 1], y[:, :order - 1]) \
        if order > 1 else None
    last = floor * order - (shorter * (order - 1) if shorter is not None else 0)
    assert last == pytest.approx(counted, rel=0.03)


def test_window_floor_falls_to_the_entropy_rate():
    source = data.word_markov_source(0)
    held = data.markov_corpus(split="held-out")
    rate = data.markov_entropy_per_char(source)
    floors = [data.markov_window_floor(source, *data.lm_batch(held.ids, 64, t, 0, 0))
              for t in (8, 32, 128)]
    assert floors[0] > floors[1] > floors[2] > rate
    assert floors[2] < 1.2 * rate < floors[0]


def test_deterministic_source_floor_is_only_the_first_word():
    """Always the other word: once a space has been seen nothing is uncertain."""
    source = two_word_source([[0, 1], [1, 0]])
    vocab = data.CharVocab(source.alphabet)
    ids = vocab.encode(data.markov_text(source, 300, seed=0))
    x, y = ids[None, 3:33], ids[None, 4:34]  # starts at a word: fully determined
    assert data.markov_window_floor(source, x, y) == pytest.approx(0.0, abs=1e-12)


def test_markov_corpus_is_deterministic_and_splits_by_seed():
    train, again = data.markov_corpus(), data.markov_corpus()
    held = data.markov_corpus(split="held-out")
    assert train.text == again.text and len(train.text) == len(held.text) == 2**18
    assert train.text[:1000] != held.text[:1000] and train.vocab == held.vocab
    assert set(train.text) <= set(data.MARKOV_LETTERS + " ")
    source = data.word_markov_source(0)
    assert np.allclose(source.transition.sum(axis=1), 1) and (source.stationary > 0).all()
    assert np.allclose(source.stationary @ source.transition, source.stationary)
    with pytest.raises(ValueError, match=r"name: expected one of \['markov'\], got 'zipf'"):
        data.markov_corpus("zipf")
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'held-out', got 'test'"):
        data.markov_corpus(split="test")
    assert dataclasses.is_dataclass(source)


@pytest.mark.mpi
def test_every_program_trains_on_the_named_corpus_as_serial_training():
    """--corpus reaches every training program through training_setup: data parallelism on
    the markov corpus follows serial training on it."""
    corpus = train.load_corpus(name="markov")
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=3)
    serial = train.train_lm(model.preset("tiny", corpus.vocab.size), corpus, settings,
                            progress="none")["losses"]
    result = run_mpi("tfcourse.parallel.data_parallel", ["--corpus", "markov", "--steps", "3"],
                     n_ranks=2, timeout=120).result
    assert result["config"]["vocab_size"] == 30 == corpus.vocab.size
    np.testing.assert_allclose(result["losses"], serial, rtol=0, atol=1e-10)
