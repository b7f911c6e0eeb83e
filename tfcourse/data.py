"""Data for the course, generated locally and deterministically from seeds (no downloads).

* `CharVocab`: characters <-> integer ids, with the special tokens PAD=0, BOS=1, EOS=2 first.
* Sequence-to-sequence toy tasks ("copy", "reverse", "sort", "addition") for the
  encoder-decoder: `make_task`, `split_held_out`, `seq2seq_batch`.
* A character corpus for the language model: `CharCorpus`, `zen_of_python`, `lm_batch`,
  and the baseline it must beat, `unigram_cross_entropy`.

Batches are drawn with np.random.default_rng([seed, step]): the batch at a given step depends
only on (seed, step), not on how many batches were drawn before. That is what makes resuming
from a checkpoint, and slicing one global batch across data-parallel ranks, exact.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfcourse.nn.validate import (
    as_int_array,
    require_ndim,
    require_nonnegative_int,
    require_positive_int,
)

# --------------------------------------------------------------------------- vocabulary


class CharVocab:
    """A character vocabulary: id 0, 1, 2 are PAD, BOS, EOS, then the symbols in order.

    `CharVocab("abc")` maps "a" -> 3, "b" -> 4, "c" -> 5 and has size 6. Repeated symbols are
    kept once, at their first position.
    """

    PAD, BOS, EOS = 0, 1, 2
    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, symbols: Iterable[str]):
        try:
            symbols = tuple(dict.fromkeys(symbols))
        except TypeError:
            raise ValueError(
                f"symbols: expected an iterable of characters, got {type(symbols).__name__}"
            ) from None
        bad = [s for s in symbols if not (isinstance(s, str) and len(s) == 1)]
        if not symbols or bad:
            found = f"{bad[0]!r}" if bad else "nothing"
            raise ValueError(f"symbols: expected one or more single characters, got {found}")
        self.symbols = symbols
        self._ids = {ch: i for i, ch in enumerate(symbols, start=len(self.SPECIAL_TOKENS))}
        self._tokens = self.SPECIAL_TOKENS + symbols

    @property
    def size(self) -> int:
        """Number of ids, special tokens included (the model's vocabulary size)."""
        return len(self._tokens)

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of `text`, as a 1-D int64 array (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        for position, ch in enumerate(text):
            if ch not in self._ids:
                raise ValueError(
                    f"text: expected characters from {''.join(self.symbols)!r}, got {ch!r} at "
                    f"position {position}"
                )
        return np.array([self._ids[ch] for ch in text], dtype=np.int64)

    def decode(self, ids, strip_special: bool = True) -> str:
        """The text for a 1-D sequence of ids.

        With strip_special=True, PAD, BOS and EOS are dropped wherever they occur (decoding
        does not stop at EOS); otherwise they appear as "<pad>", "<bos>", "<eos>".
        """
        ids = as_int_array("ids", ids, 0, self.size - 1)
        require_ndim("ids", ids, 1, 1)
        first = len(self.SPECIAL_TOKENS) if strip_special else 0
        return "".join(self._tokens[i] for i in ids.tolist() if i >= first)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.symbols == other.symbols

    def __hash__(self) -> int:
        return hash(self.symbols)

    def __repr__(self) -> str:
        return f"CharVocab({''.join(self.symbols)!r})"


# --------------------------------------------------------------------------- seq2seq tasks

LETTERS = "abcdefgh"
DIGITS = "0123456789"


def _solve_addition(source: str) -> str:
    a, b = source.split("+")
    return str(int(a) + int(b))


_SOLVERS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "addition": _solve_addition,
}
TASKS = tuple(_SOLVERS)


@dataclass(frozen=True, eq=False)
class Seq2SeqData:
    """A padded seq2seq data set; row i of every array belongs to pairs[i].

    src:         (N, S) int64, the source ids then PAD (S = max_len of make_task).
    tgt_in:      (N, T) int64, BOS + target ids, then PAD: the decoder's input (T = S + 1).
    tgt_out:     (N, T) int64, target ids + EOS, then PAD: what the decoder must predict at
                 each position; PAD marks positions the loss ignores.
    src_lengths: (N,) int64, number of real (non-PAD) source tokens.
    pairs:       the (source, target) strings.
    """

    vocab: CharVocab
    src: np.ndarray
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    src_lengths: np.ndarray
    pairs: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.pairs)


def _random_string(rng: np.random.Generator, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


def _random_number(rng: np.random.Generator, n_digits: int) -> str:
    """A uniformly random n-digit number without leading zeros (a single digit may be 0)."""
    first = DIGITS[int(rng.integers(0 if n_digits == 1 else 1, 10))]
    return first + _random_string(rng, DIGITS, n_digits - 1)


def _random_sum(rng: np.random.Generator, length: int) -> str:
    """A problem "a+b" of exactly `length` characters; the split between a and b is uniform."""
    n_a = int(rng.integers(1, length - 1))  # 1 .. length - 2 digits, leaving >= 1 for b
    return _random_number(rng, n_a) + "+" + _random_number(rng, length - 1 - n_a)


def _encode_pairs(vocab: CharVocab, pairs: list, width: int) -> Seq2SeqData:
    """Pad sources to `width` and targets (with BOS in front or EOS behind) to width + 1."""
    n = len(pairs)
    src = np.full((n, width), CharVocab.PAD, dtype=np.int64)
    tgt_in = np.full((n, width + 1), CharVocab.PAD, dtype=np.int64)
    tgt_out = np.full((n, width + 1), CharVocab.PAD, dtype=np.int64)
    for row, (source, target) in enumerate(pairs):
        source_ids, target_ids = vocab.encode(source), vocab.encode(target)
        src[row, : len(source_ids)] = source_ids
        tgt_in[row, 0] = CharVocab.BOS
        tgt_in[row, 1 : len(target_ids) + 1] = target_ids
        tgt_out[row, : len(target_ids)] = target_ids
        tgt_out[row, len(target_ids)] = CharVocab.EOS
    src_lengths = np.array([len(source) for source, _ in pairs], dtype=np.int64)
    return Seq2SeqData(vocab, src, tgt_in, tgt_out, src_lengths, list(pairs))


def make_task(name: str, n_examples: int, seed: int, min_len: int = 3, max_len: int = 8):
    """Generate `n_examples` random (source, target) pairs of a toy task as a Seq2SeqData.

    name:
      "copy"      "cabbage"  -> "cabbage"
      "reverse"   "cabbage"  -> "egabbac"
      "sort"      "cabbage"  -> "aabbceg"
      "addition"  "123+45"   -> "168"
    copy/reverse/sort use random strings over LETTERS ("abcdefgh"); addition uses numbers
    without leading zeros, the split of the source between the two operands being uniform.
    Every source has a uniformly random length in [min_len, max_len] (addition needs at least
    3 characters, "1+2"). Arrays are padded to S = max_len and T = max_len + 1 whatever the
    seed; targets are never longer than their source, so they always fit with BOS/EOS.
    """
    if name not in _SOLVERS:
        raise ValueError(f"name: expected one of {list(TASKS)}, got {name!r}")
    n_examples = require_positive_int("n_examples", n_examples)
    seed = require_nonnegative_int("seed", seed)
    min_len = require_positive_int("min_len", min_len)
    max_len = require_positive_int("max_len", max_len)
    if name == "addition" and min_len < 3:
        raise ValueError(f"min_len: expected at least 3 for addition ('1+2'), got {min_len}")
    if max_len < min_len:
        raise ValueError(f"max_len: expected at least min_len = {min_len}, got {max_len}")

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n_examples).tolist()
    if name == "addition":
        vocab = CharVocab(DIGITS + "+")
        sources = [_random_sum(rng, length) for length in lengths]
    else:
        vocab = CharVocab(LETTERS)
        sources = [_random_string(rng, LETTERS, length) for length in lengths]
    pairs = [(source, _SOLVERS[name](source)) for source in sources]
    return _encode_pairs(vocab, pairs, max_len)


def _step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for batch number `step`; it depends only on (seed, step)."""
    seed = require_nonnegative_int("seed", seed)
    return np.random.default_rng([seed, require_nonnegative_int("step", step)])


def _check_data(data) -> Seq2SeqData:
    if not isinstance(data, Seq2SeqData):
        raise ValueError(f"data: expected a Seq2SeqData (see make_task), got {type(data).__name__}")
    return data


def _take(data: Seq2SeqData, rows) -> Seq2SeqData:
    """The examples of `data` at the given row indices, as a new Seq2SeqData."""
    rows = np.asarray(rows, dtype=np.intp)
    return Seq2SeqData(
        data.vocab,
        data.src[rows],
        data.tgt_in[rows],
        data.tgt_out[rows],
        data.src_lengths[rows],
        [data.pairs[i] for i in rows.tolist()],
    )


def split_held_out(data, n_test: int, seed: int) -> tuple[Seq2SeqData, Seq2SeqData]:
    """Split into (train, test) so that no test source string occurs anywhere in train.

    n_test distinct sources are chosen at random; test holds one example of each, and train
    holds every example whose source is not among them (duplicates within train are kept).
    Exact-match accuracy on test then measures generalisation, not memorisation. Rows keep
    their original order.
    """
    data = _check_data(data)
    n_test = require_positive_int("n_test", n_test)
    seed = require_nonnegative_int("seed", seed)
    first_row = {}  # source string -> first row where it occurs
    for row, (source, _) in enumerate(data.pairs):
        first_row.setdefault(source, row)
    if n_test >= len(first_row):
        raise ValueError(
            f"n_test: expected fewer than the {len(first_row)} distinct sources in data "
            f"(train must not be empty), got {n_test}"
        )
    sources = list(first_row)
    chosen = np.random.default_rng(seed).choice(len(sources), size=n_test, replace=False)
    test_sources = {sources[i] for i in chosen.tolist()}
    test_rows = sorted(first_row[source] for source in test_sources)
    train_rows = [row for row, (source, _) in enumerate(data.pairs) if source not in test_sources]
    return _take(data, train_rows), _take(data, test_rows)


def seq2seq_batch(data, batch_size: int, seed: int, step: int):
    """Rows for training step `step`: returns (src, tgt_in, tgt_out, src_lengths).

    batch_size distinct rows are drawn with np.random.default_rng([seed, step]), so the
    batch depends only on (seed, step). Shapes: (B, S), (B, T), (B, T), (B,).
    """
    data = _check_data(data)
    batch_size = require_positive_int("batch_size", batch_size)
    if batch_size > len(data):
        raise ValueError(f"batch_size: expected at most len(data) = {len(data)}, got {batch_size}")
    rows = _step_rng(seed, step).choice(len(data), size=batch_size, replace=False)
    return data.src[rows], data.tgt_in[rows], data.tgt_out[rows], data.src_lengths[rows]


# --------------------------------------------------------------------------- character corpus


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A text, its character vocabulary (sorted unique characters) and its ids (1-D int64)."""

    text: str
    vocab: CharVocab
    ids: np.ndarray

    @classmethod
    def from_text(cls, text: str) -> CharCorpus:
        if not isinstance(text, str) or not text:
            found = repr(text) if isinstance(text, str) else type(text).__name__
            raise ValueError(f"text: expected a non-empty string, got {found}")
        vocab = CharVocab(sorted(set(text)))
        return cls(text, vocab, vocab.encode(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CharCorpus:
        """Read a UTF-8 text file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no text file at {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"path: {str(path)!r} is not UTF-8 text ({err})") from None
        if not text:
            raise ValueError(f"path: {str(path)!r} is empty")
        return cls.from_text(text)


def zen_of_python() -> str:
    """The Zen of Python (856 characters), the course's default tiny corpus.

    It ships with Python as the module `this`, ROT13-encoded; importing `this` prints it,
    so the import runs with stdout redirected.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def lm_batch(ids, batch_size: int, seq_len: int, seed: int, step: int):
    """Random windows of a token sequence for language modelling: returns (x, y).

    x, y: (batch_size, seq_len) int64 with y[:, t] = x[:, t + 1] (the next token), i.e.
    x = ids[o : o + seq_len] and y = ids[o + 1 : o + seq_len + 1] for an offset o drawn
    uniformly from [0, len(ids) - seq_len - 1] with np.random.default_rng([seed, step]).
    """
    ids = as_int_array("ids", ids, 0, np.iinfo(np.int64).max)
    require_ndim("ids", ids, 1, 1)
    batch_size = require_positive_int("batch_size", batch_size)
    seq_len = require_positive_int("seq_len", seq_len)
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"ids: expected at least seq_len + 1 = {seq_len + 1} tokens, got {len(ids)}"
        )
    offsets = _step_rng(seed, step).integers(0, len(ids) - seq_len, size=batch_size)
    windows = ids[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


def unigram_cross_entropy(ids, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of predicting every token by its frequency in `ids`.

    This is the entropy -sum_c p_c ln p_c of the unigram distribution p_c = count_c / N: the
    loss of a model that ignores context. A language model has to get below it.
    """
    vocab_size = require_positive_int("vocab_size", vocab_size)
    ids = as_int_array("ids", ids, 0, vocab_size - 1)
    if ids.size == 0:
        raise ValueError("ids: expected at least one token, got an empty array")
    counts = np.bincount(ids.ravel(), minlength=vocab_size)
    p = counts[counts > 0] / ids.size
    return float(-np.sum(p * np.log(p)))


# ------------------------------------------------------------- a corpus with a known floor

MARKOV_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class WordMarkovSource:
    """A language whose entropy is known exactly: words of a seeded lexicon, each followed by
    one of a few successor words drawn from a fixed distribution (a first-order Markov chain
    over words), spelled letter by letter with a space after every word.

    words: the lexicon (distinct lowercase strings); transition (W, W): row i is the
    distribution of the word after word i; stationary (W,): the chain's stationary
    distribution (the frequency of each word in a long text)."""

    words: tuple
    transition: np.ndarray
    stationary: np.ndarray

    @property
    def alphabet(self) -> str:
        return MARKOV_LETTERS + " "


def word_markov_source(seed: int = 0, n_words: int = 48, successors: int = 4,
                       min_len: int = 2, max_len: int = 7) -> WordMarkovSource:
    """A seeded WordMarkovSource: `n_words` distinct words of min_len..max_len letters, each
    with `successors` possible next words, weighted by a Dirichlet(1) draw. The chain is made
    irreducible (word i may always be followed by word i + 1), so its stationary distribution
    is unique."""
    seed = require_nonnegative_int("seed", seed)
    n_words = require_positive_int("n_words", n_words)
    successors = require_positive_int("successors", successors)
    if not 1 <= min_len <= max_len:
        raise ValueError(f"min_len, max_len: expected 1 <= min_len <= max_len, got {min_len}, "
                         f"{max_len}")
    rng = np.random.default_rng([seed, 23])
    words: dict[str, None] = {}
    while len(words) < n_words:
        length = int(rng.integers(min_len, max_len + 1))
        words["".join(rng.choice(list(MARKOV_LETTERS), size=length))] = None
    transition = np.zeros((n_words, n_words))
    for i in range(n_words):
        others = rng.choice(n_words, size=min(successors, n_words), replace=False)
        nexts = np.unique(np.concatenate([[(i + 1) % n_words], others]))
        transition[i, nexts] = rng.dirichlet(np.ones(len(nexts)))
    return WordMarkovSource(tuple(words), transition, _stationary(transition))


def _stationary(transition: np.ndarray) -> np.ndarray:
    """The left eigenvector of the transition matrix for eigenvalue 1, as a distribution."""
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def markov_entropy_per_char(source: WordMarkovSource) -> float:
    """The entropy rate of the source's text in nats per character, exactly.

    A text determines its word sequence (words end at spaces), so the text carries the word
    chain's information and no more: H_words = sum_i pi_i H(transition[i]) nats per word,
    spread over the mean E[len + 1] characters of a word and its space. No model, however
    large its context, can predict held-out text of this source below it on average."""
    p = source.transition
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    chars_per_word = np.array([len(w) + 1 for w in source.words])
    return float(source.stationary @ row_entropy / (source.stationary @ chars_per_word))


def markov_text(source: WordMarkovSource, n_chars: int, seed: int) -> str:
    """`n_chars` characters of the source, starting from a word drawn from the stationary
    distribution: the train and held-out texts are two seeds of one source."""
    n_chars = require_positive_int("n_chars", n_chars)
    rng = np.random.default_rng([require_nonnegative_int("seed", seed), 29])
    cumulative = np.cumsum(source.transition, axis=1)
    word = int(np.searchsorted(np.cumsum(source.stationary), rng.random()))
    pieces, total = [], 0
    for u in rng.random(n_chars):  # at least one character per word: enough draws
        pieces.append(source.words[word] + " ")
        total += len(pieces[-1])
        if total >= n_chars:
            break
        word = min(int(np.searchsorted(cumulative[word], u)), len(source.words) - 1)
    return "".join(pieces)[:n_chars]


# name: (lexicon seed, train seed, held-out seed, characters of each text)
MARKOV_CORPORA = {"markov": (0, 1, 2, 2**18)}


def markov_corpus(name: str = "markov", split: str = "train") -> CharCorpus:
    """A generated corpus of MARKOV_CORPORA: the train or held-out text of one source, with
    the source's fixed alphabet as vocabulary (so both splits encode alike)."""
    if name not in MARKOV_CORPORA:
        raise ValueError(f"name: expected one of {sorted(MARKOV_CORPORA)}, got {name!r}")
    if split not in ("train", "held-out"):
        raise ValueError(f"split: expected 'train' or 'held-out', got {split!r}")
    lexicon_seed, train_seed, held_seed, n_chars = MARKOV_CORPORA[name]
    source = word_markov_source(lexicon_seed)
    text = markov_text(source, n_chars, train_seed if split == "train" else held_seed)
    vocab = CharVocab(source.alphabet)
    return CharCorpus(text, vocab, vocab.encode(text))


def markov_window_floor(source: WordMarkovSource, x, y) -> float:
    """The lowest mean cross-entropy (nats per token) any model can reach on windows (x, y)
    of the source's text (lm_batch's windows, ids of `markov_corpus`'s vocabulary) when, like
    the language model, it sees only the window: the loss of the exact Bayes predictor.

    The text is a hidden Markov chain over states (word i, letter j of word i + " "), each
    emitting one known character; a window starts in a state drawn from the chain's
    stationary distribution. Filtering (the forward algorithm) gives p(y_t | x_0..x_t)
    exactly. It lies above markov_entropy_per_char - a window's first letters do not know the
    word they are in - and falls to it as windows grow."""
    vocab = CharVocab(source.alphabet)
    spelled = [w + " " for w in source.words]
    word_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(spelled)])
    emits = np.concatenate([vocab.encode(s) for s in spelled])
    starts = np.cumsum([0] + [len(s) for s in spelled])
    n = len(emits)
    step = np.zeros((n, n))                         # state -> next state probabilities
    for i, s in enumerate(spelled):
        for j in range(len(s) - 1):
            step[starts[i] + j, starts[i] + j + 1] = 1.0
        step[starts[i + 1] - 1, starts[:-1]] = source.transition[i]
    initial = source.stationary[word_of] / (source.stationary @ np.diff(starts))
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    total = 0.0
    for row_x, row_y in zip(x, y, strict=True):
        belief = initial * (emits == row_x[0])
        belief /= belief.sum()
        for target in row_y:
            predicted = belief @ step
            p = predicted[emits == target].sum()
            total -= np.log(p)
            belief = predicted * (emits == target)
            belief /= p
    return float(total / y.size)
