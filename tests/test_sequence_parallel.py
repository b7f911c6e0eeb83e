"""Sequence parallelism: the pure pieces of ring attention (chunks, ring schedule, online
softmax merge, block gradients, score-block counts, cost model), and real mpiexec runs on 1-4
ranks whose output and gradients equal full single-process causal attention."""

import numpy as np
import pytest

from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn.attention import (
    block_attention_grads,
    block_scores,
    causal_block_kind,
    causal_block_mask,
    causal_mask,
    empty_partial,
    finish_partial,
    merge_partials,
    partial_softmax,
    sdpa_backward,
    sdpa_forward,
    softmax,
)
from tfcourse.parallel.plans.sequence import (
    chunk_positions,
    rank_score_blocks,
    ring_block_owner,
    ring_schedule,
    score_block_counts,
    score_blocks,
    sequence_chunks,
)
from tfcourse.perf import costmodel

MODULE = "tfcourse.parallel.sequence_parallel"


def qkv(seed, n_q, n_k, d=4, lead=(2, 3)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(lead + (n_q, d)), rng.standard_normal(lead + (n_k, d)),
            rng.standard_normal(lead + (n_k, d)))


# --------------------------------------------------------------------------- chunks and ring


def test_sequence_chunks_contiguous_and_zigzag():
    assert sequence_chunks(13, 4) == [[(0, 4)], [(4, 7)], [(7, 10)], [(10, 13)]]
    assert sequence_chunks(13, 2, zigzag=True) == [[(0, 4), (10, 13)], [(4, 7), (7, 10)]]
    assert sequence_chunks(12, 3, zigzag=True) == [[(0, 2), (10, 12)], [(2, 4), (8, 10)],
                                                   [(4, 6), (6, 8)]]
    for n in range(8, 20):
        for p in range(1, 5):
            for zigzag in (False, True):
                positions = np.concatenate([chunk_positions(c)
                                            for c in sequence_chunks(n, p, zigzag)])
                assert sorted(positions) == list(range(n))  # every position exactly once


def test_sequence_shorter_than_the_chunks_is_rejected():
    with pytest.raises(ValueError, match="at least world_size=4 positions.*got seq_len=3"):
        sequence_chunks(3, 4)
    with pytest.raises(ValueError, match="at least 2 \\* world_size=6 positions.*seq_len=5"):
        sequence_chunks(5, 3, zigzag=True)
    assert sequence_chunks(4, 4)[-1] == [(3, 4)]


def test_ring_schedule_visits_every_block_exactly_once():
    for p in range(1, 7):
        steps = ring_schedule(p)
        assert steps[0] == list(range(p))  # each rank starts with its own block
        for held in steps:
            assert sorted(held) == list(range(p))  # at every step a permutation of blocks
        for rank in range(p):
            assert sorted(step[rank] for step in steps) == list(range(p))
            for s in range(p - 1):  # the block a rank holds next is its left neighbour's
                assert steps[s + 1][rank] == steps[s][(rank - 1) % p]
        # after the last step rank r holds block r + 1: one more pass right sends it home
        assert [ring_block_owner(r, p - 1, p) for r in range(p)] == \
            [(r + 1) % p for r in range(p)]


def test_causal_block_kinds_and_mask():
    assert causal_block_kind((4, 8), (8, 12)) == "skip"
    assert causal_block_kind((4, 8), (0, 4)) == "full"
    assert causal_block_kind((4, 8), (0, 5)) == "full"  # key 4 is query 4 itself
    assert causal_block_kind((4, 8), (0, 6)) == "masked"
    assert causal_block_kind((4, 8), (4, 8)) == "masked"
    assert causal_block_kind((4, 5), (4, 5)) == "full"  # one query, itself
    np.testing.assert_array_equal(causal_block_mask((3, 7), (3, 7)), causal_mask(4))
    np.testing.assert_array_equal(causal_block_mask((0, 10), (0, 10)), causal_mask(10))
    assert not causal_block_mask((0, 3), (5, 7)).any()
    assert causal_block_mask((5, 7), (0, 3)).all()


def test_score_block_counts_hand_computed():
    # L = 8, p = 2. Contiguous chunks [0, 4) and [4, 8): rank 0 needs only its diagonal
    # block, rank 1 the block of rank 0 and its own diagonal.
    assert score_block_counts(8, 2) == [1, 2]
    # Zig-zag chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    # rank 0: chunk 0 x {0}, chunk 3 x {0, 1, 2, 3} -> 5; rank 1: 1 x {0, 1}, 2 x {0, 1, 2} -> 5
    assert score_block_counts(8, 2, zigzag=True) == [5, 5]
    assert score_block_counts(8, 4) == [1, 2, 3, 4]
    assert score_block_counts(16, 4, zigzag=True) == [9] * 4  # 2p + 1 each
    kinds = [b.kind for b in rank_score_blocks(8, 2, 0, zigzag=True)]
    assert sorted(kinds) == ["full", "full", "full", "masked", "masked"]  # 2 diagonals
    entries = [sum((b.q_range[1] - b.q_range[0]) * (b.k_range[1] - b.k_range[0])
                   for b in rank_score_blocks(8, 2, r, zigzag)) for r in range(2)
               for zigzag in (False, True)]
    assert entries == [16, 20, 32, 20]


def test_score_blocks_rows_follow_the_concatenated_chunks():
    blocks = score_blocks([(0, 2), (6, 8)], [(2, 4), (4, 6)])
    assert [(b.q_rows, b.k_rows, b.kind) for b in blocks] == [
        (slice(0, 2), slice(0, 2), "skip"), (slice(0, 2), slice(2, 4), "skip"),
        (slice(2, 4), slice(0, 2), "full"), (slice(2, 4), slice(2, 4), "full")]


# --------------------------------------------------------------------------- online softmax


def test_merged_partials_equal_softmax_attention_over_the_union_of_keys():
    q, k, v = qkv(0, 5, 9)
    mask = np.random.default_rng(1).random((5, 9)) < 0.7
    mask[:, 0] = True  # every query keeps at least one key
    mask[:, 6:] = False  # the last block is fully masked
    blocks = [slice(0, 3), slice(3, 6), slice(6, 9)]
    parts = []
    for cols in blocks:
        scores = block_scores(q, k[..., cols, :])
        np.copyto(scores, -np.inf, where=~mask[:, cols])
        parts.append(partial_softmax(scores, v[..., cols, :]))
    assert np.all(parts[2][0] == -np.inf) and np.all(parts[2][1] == 0)
    expected, _ = sdpa_forward(q, k, v, mask)
    scale = 1 / np.sqrt(q.shape[-1])
    full_scores = np.where(mask, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    expected_lse = np.log(np.sum(np.exp(full_scores), axis=-1, keepdims=True))
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = empty_partial(q.shape, v.shape[-1], q.dtype)
        for i in order:
            merged = merge_partials(merged, parts[i])
        out, lse = finish_partial(merged)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-13)
        np.testing.assert_allclose(lse, expected_lse, rtol=0, atol=1e-13)
    # merging is associative: (a + b) + c == a + (b + c)
    left = merge_partials(merge_partials(parts[0], parts[1]), parts[2])
    right = merge_partials(parts[0], merge_partials(parts[1], parts[2]))
    for a, b in zip(left, right, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_partials_stay_finite_for_huge_scores_and_queries_with_no_keys():
    scores = np.array([[1000.0, 999.0], [-np.inf, -np.inf]])
    v = np.array([[1.0, 0.0], [0.0, 1.0]])
    part = partial_softmax(scores, v)
    nothing = partial_softmax(np.full((2, 3), -np.inf), np.ones((3, 2)))
    out, lse = finish_partial(merge_partials(nothing, part))
    np.testing.assert_allclose(out[0], softmax(scores[0]) @ v)
    np.testing.assert_allclose(lse[0], 1000 + np.log(1 + np.exp(-1)))
    assert np.all(out[1] == 0) and lse[1] == -np.inf  # a query with no keys: zeros, no NaN


def test_block_gradients_summed_over_key_blocks_equal_full_attention_backward():
    n = 7
    q, k, v = qkv(2, n, n)
    dout = np.random.default_rng(3).standard_normal(q.shape)
    out, cache = sdpa_forward(q, k, v, causal_mask(n))
    expected = sdpa_backward(dout, cache)
    key_blocks = [(0, 3), (3, 5), (5, 7)]
    partial = empty_partial(q.shape, v.shape[-1], q.dtype)
    for lo, hi in key_blocks:
        scores = block_scores(q, k[..., lo:hi, :], (0, n), (lo, hi))
        partial = merge_partials(partial, partial_softmax(scores, v[..., lo:hi, :]))
    ring_out, lse = finish_partial(partial)
    np.testing.assert_allclose(ring_out, out, rtol=0, atol=1e-14)
    delta = np.sum(dout * ring_out, axis=-1, keepdims=True)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for lo, hi in key_blocks:
        scores = block_scores(q, k[..., lo:hi, :], (0, n), (lo, hi))
        dq_b, dk[..., lo:hi, :], dv[..., lo:hi, :] = block_attention_grads(
            scores, q, k[..., lo:hi, :], v[..., lo:hi, :], dout, lse, delta)
        dq += dq_b
    for got, want in zip((dq, dk, dv), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- cost model


def test_sequence_cost_model_hand_computed():
    assert costmodel.full_attention_score_bytes(8, 1, 2, 8) == 8 * 8 * 2 * 8
    assert costmodel.ring_attention_score_entries(8, 2) == [16, 32]
    assert costmodel.ring_attention_score_entries(8, 2, zigzag=True) == [20, 20]
    assert costmodel.ring_attention_flops(8, 2, 1, 1, 3) == [14 * 3 * 16, 14 * 3 * 32]
    # 13 over 2 ranks: chunks of 7 and 6; the largest block is own chunk x chunk 0
    assert costmodel.ring_attention_peak_score_bytes(13, 2, 1, 2, 8) == [7 * 7 * 16, 6 * 7 * 16]
    # Per rank: forward K, V of its own block; backward K, V, dK, dV of its own block, then
    # dK, dV of its neighbour's block home: 2 * 4 + 4 * 4 + 2 * 4 = 32 rows
    assert costmodel.ring_attention_bytes_sent(8, 2, 1, 1, 1, 1) == [32, 32]
    assert costmodel.ring_attention_bytes_sent(13, 2, 1, 1, 1, 1) == [2 * 7 + 4 * 7 + 2 * 6,
                                                                       2 * 6 + 4 * 6 + 2 * 7]
    assert costmodel.ring_attention_bytes_sent(8, 1, 1, 1, 1, 1) == [0]
    with pytest.raises(ValueError, match=r"at least 2 \* world_size=8.*seq_len=5"):
        costmodel.ring_attention_score_entries(5, 4, zigzag=True)


def test_cost_model_agrees_with_the_block_lists():
    for n in (8, 13, 30):
        for p in (1, 2, 3, 4):
            for zigzag in (False, True):
                blocks = [rank_score_blocks(n, p, r, zigzag) for r in range(p)]
                sizes = [[(b.q_range[1] - b.q_range[0]) * (b.k_range[1] - b.k_range[0])
                          for b in rank] for rank in blocks]
                assert costmodel.ring_attention_score_entries(n, p, zigzag) == \
                    [sum(s) for s in sizes]
                assert costmodel.ring_attention_peak_score_bytes(n, p, 1, 1, 1, zigzag) == \
                    [max(s) for s in sizes]


def test_zigzag_balances_the_causal_work():
    p = 4
    contiguous = costmodel.ring_attention_score_entries(4096, p)
    zigzag = costmodel.ring_attention_score_entries(4096, p, zigzag=True)
    # rank r attends to r + 1 chunks of keys: the last rank does p times the first's work
    assert [c / contiguous[0] for c in contiguous] == pytest.approx([1, 2, 3, 4])
    assert max(zigzag) / min(zigzag) < 1.01
    # the same useful (key <= query) entries, plus half-wasted diagonal blocks: p of size
    # (n / p)^2 contiguous, 2p of size (n / 2p)^2 zig-zag
    useful, n = 4096 * 4097 // 2, 4096
    assert sum(contiguous) == useful + p * (n // p) * (n // p - 1) // 2
    assert sum(zigzag) == useful + 2 * p * (n // (2 * p)) * (n // (2 * p) - 1) // 2


# --------------------------------------------------------------------------- real MPI runs


def run_sp(n_ranks, seq_len, *args):
    return run_mpi(MODULE, ["--seq-len", str(seq_len), "--seed", "3", "--heads", "2",
                            "--d-head", "8", *args], n_ranks=n_ranks, timeout=60).result


CASES = [(1, 13, False)] + [(n, L, False) for n in (2, 3, 4) for L in (12, 13)] + \
    [(n, L, True) for n in (2, 3) for L in (12, 13)]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, seq_len, zigzag", CASES)
def test_ring_attention_equals_full_attention(n_ranks, seq_len, zigzag):
    result = run_sp(n_ranks, seq_len, *(["--zigzag"] if zigzag else []))
    assert (result["world_size"], result["seq_len"], result["zigzag"]) == \
        (n_ranks, seq_len, zigzag)
    assert result["chunks"] == [[list(c) for c in rank]
                                for rank in sequence_chunks(seq_len, n_ranks, zigzag)]
    assert result["max_abs_err_out"] < 1e-10
    assert result["max_abs_err_grad"] < 1e-10
    assert result["bytes_sent"] == result["bytes_sent_predicted"]
    assert result["peak_score_block_bytes"] == result["peak_score_block_bytes_predicted"]
    assert result["score_entries"] == result["score_entries_predicted"]
    assert result["score_blocks"] == score_block_counts(seq_len, n_ranks, zigzag)
    if n_ranks >= 2:
        assert max(result["peak_score_block_bytes"]) < result["full_score_bytes"]
        assert min(result["bytes_sent"]) > 0
    else:
        assert result["peak_score_block_bytes"] == [result["full_score_bytes"]]
        assert result["bytes_sent"] == [0]


@pytest.mark.mpi
def test_float32_ring_attention_is_close_to_full_attention():
    result = run_sp(3, 13, "--dtype", "float32")
    assert result["max_abs_err_out"] < 1e-5 and result["max_abs_err_grad"] < 1e-5
    assert result["full_score_bytes"] == 2 * 13 * 13 * 4


@pytest.mark.mpi
def test_zigzag_run_reports_both_layouts_and_balances_them():
    result = run_sp(4, 64, "--zigzag")
    by_layout = result["score_entries_by_layout"]
    assert by_layout["zigzag"] == result["score_entries"]
    assert max(by_layout["contiguous"]) / min(by_layout["contiguous"]) == pytest.approx(4)
    assert result["load_imbalance"] < 1.05


@pytest.mark.mpi
def test_sequence_shorter_than_world_size_is_rejected_clearly():
    with pytest.raises(MPIJobError, match="seq_len: expected at least world_size=4.*seq_len=3"):
        run_sp(4, 3)
