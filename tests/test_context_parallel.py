"""Context-parallel training of the whole model (issue 21 item 1: ring attention and
DeepSpeed-Ulysses): the MPI-free pieces - learned positions of a slice (contiguous or
zig-zag), the model's attention kernel field, the Ulysses all-to-all reshapes on a simulated
group, the cost model's bytes by hand - and, under real mpiexec at 1-4 ranks, the loss curve
equal to serial training with the bytes sent measured equal to the prediction."""

import contextlib
import dataclasses

import numpy as np
import pytest

from tfcourse import train
from tfcourse.course.launch import run_mpi
from tfcourse.nn import attention, model
from tfcourse.nn.positional import learned_positions_backward, learned_positions_forward
from tfcourse.perf import costmodel

STEPS = 3
SP = "tfcourse.parallel.sequence_parallel"


def test_learned_positions_of_a_slice_are_the_slice_of_the_whole():
    table = np.arange(12.0).reshape(6, 2)
    out, cache = learned_positions_forward(table, 2, positions=3)
    np.testing.assert_array_equal(out, table[3:5])
    dtable = learned_positions_backward(np.ones((2, 2, 2)), cache)
    np.testing.assert_array_equal(dtable.sum(axis=1), [0, 0, 0, 4, 4, 0])
    with pytest.raises(ValueError, match=r"seq_len: expected at most max_len=6 - positions 5"):
        learned_positions_forward(table, 2, positions=5)


def test_learned_positions_of_zigzag_chunks_are_those_rows():
    table = np.arange(12.0).reshape(6, 2)
    positions = np.array([1, 4])  # zig-zag over 2 ranks of T=6 ... rank 1: chunks 1 and 4
    out, cache = learned_positions_forward(table, 2, positions=positions)
    np.testing.assert_array_equal(out, table[[1, 4]])
    dout = np.array([[[1.0, 1.0], [2.0, 2.0]]] * 3)  # batch of 3
    dtable = learned_positions_backward(dout, cache)
    np.testing.assert_array_equal(dtable[:, 0], [0, 3, 0, 0, 6, 0])
    for bad, message in [(np.array([1, 1]), r"positions: expected 2 distinct integer"),
                         (np.array([1.0, 2.0]), r"positions: expected 2 distinct integer"),
                         (np.array([1, 2, 3]), r"got an array of shape \(3,\)"),
                         (np.array([2, 6]), r"positions: expected positions in \[0, "
                                            r"max_len=6\) \(rows of table\), got 2 .. 6")]:
        with pytest.raises(ValueError, match=message):
            learned_positions_forward(table, 2, positions=bad)


def test_mha_with_a_causal_string_mask_equals_the_explicit_mask():
    rng = np.random.default_rng(0)
    params = attention.init_mha_params(16, 4, rng)
    x = rng.standard_normal((2, 5, 16))
    out, _ = attention.mha_forward(x, x, params, 4, "causal")
    np.testing.assert_array_equal(out, attention.mha_forward(x, x, params, 4,
                                                             attention.causal_mask(5))[0])
    with pytest.raises(ValueError, match=r"mask: expected a bool array, None or 'causal'"):
        attention.mha_forward(x, x, params, 4, "future")


class FakeComm:
    """Rank `rank` of p simulated in one process: Alltoall keeps what it was asked to send
    and fills recv from `incoming` (what every rank sent, from an earlier pass) if given."""

    def __init__(self, rank, size, incoming=None):
        self.rank, self.size, self.incoming, self.sent = rank, size, incoming, None

    def Alltoall(self, send, recv):  # noqa: N802 - mpi4py's name
        self.sent = send.copy()
        if self.incoming is not None:
            recv[...] = np.stack([self.incoming[s][self.rank] for s in range(self.size)])


class NoLog:
    def span(self, kind, nbytes=0):
        return contextlib.nullcontext()


def simulated_alltoall(fn, per_rank_inputs):
    """fn(comm, log, *xs) on every simulated rank (fn calls Alltoall once): a first pass
    collects what every rank sends, the second delivers it."""
    p = len(per_rank_inputs)
    comms = [FakeComm(r, p) for r in range(p)]
    for r in range(p):
        fn(comms[r], NoLog(), *per_rank_inputs[r])
    sent = [c.sent for c in comms]
    return [fn(FakeComm(r, p, sent), NoLog(), *per_rank_inputs[r]) for r in range(p)]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_ulysses_reshapes_split_heads_and_come_back(p):
    from tfcourse.parallel import context_parallel as cp
    rng = np.random.default_rng(p)
    whole = [rng.standard_normal((2, 4, 8, 3)) for _ in range(2)]  # (B, H, T, d_head)
    rows, heads = 8 // p, 4 // p
    slices = [[x[:, :, r * rows:(r + 1) * rows] for x in whole] for r in range(p)]
    by_heads = simulated_alltoall(cp.sequence_to_heads, slices)
    for r in range(p):  # rank r: all positions of heads [r H/p, (r + 1) H/p)
        for got, x in zip(by_heads[r], whole, strict=True):
            np.testing.assert_array_equal(got, x[:, r * heads:(r + 1) * heads])
    back = simulated_alltoall(cp.heads_to_sequence, [list(h) for h in by_heads])
    for r in range(p):
        for got, x in zip(back[r], slices[r], strict=True):
            np.testing.assert_array_equal(got, x)


def test_the_model_runs_the_attention_kernel_it_is_given():
    """SublayerOps.attention replaces only what runs between the projections: a kernel that
    calls the serial one (and counts) gives the serial model's loss and gradients bit for bit."""
    config = model.preset("tiny", 11, n_layers=2)
    params = model.init_params(config, 0)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    calls = []

    def forward(*args, **kwargs):
        calls.append("forward")
        return attention.local_attention_forward(*args, **kwargs)

    def backward(*args):
        calls.append("backward")
        return attention.local_attention_backward(*args)

    ops = model.SublayerOps(attention=attention.AttentionKernel(forward, backward))
    loss, grads = model.loss_and_grads(params, x, y, config, ops=ops)
    ref_loss, ref_grads = model.loss_and_grads(params, x, y, config)
    assert calls == ["forward"] * 2 + ["backward"] * 2
    assert loss == ref_loss and all(np.array_equal(grads[n], ref_grads[n]) for n in grads)


def test_ulysses_alltoall_bytes_by_hand():
    # B 16, T 32, d 32, p 4, float64: a rank's slice of one tensor is 16 x 8 x 32 values, an
    # all-to-all sends 3/4 of it; 8 tensors per layer (q, k, v, out; dout, dq, dk, dv)
    per = 16 * 8 * 32 * 0.75 * 8
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 4) == 8 * per
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 4, n_layers=2) == 16 * per == 393216
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 4, full_recompute=True) == 12 * per
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 2, n_layers=2) == 524288
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 1) == 0


@pytest.fixture(scope="module")
def serial_losses():
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    return train.train_lm(config, corpus, settings, progress="none")["losses"]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_ulysses_training_equals_serial_training(n_ranks, serial_losses):
    result = run_mpi(SP, ["--train", "--method", "ulysses", "--steps", str(STEPS)],
                     n_ranks=n_ranks, timeout=120).result
    assert result["world_size"] == n_ranks and result["method"] == "ulysses"
    assert result["positions_per_rank"] == 32 // n_ranks
    np.testing.assert_allclose(result["losses"], serial_losses, rtol=0, atol=1e-10)
    sent = np.array(result["attention_bytes_sent_per_step_per_rank"])
    predicted = costmodel.ulysses_alltoall_bytes(16, 32, 32, n_ranks, n_layers=2)
    assert result["predicted_attention_bytes_sent_per_step_per_rank"] == [predicted] * n_ranks
    assert sent.shape == (n_ranks, STEPS) and (sent == predicted).all()


@pytest.mark.mpi
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_ulysses_with_recomputation_equals_serial_and_full_replays_the_alltoalls(recompute):
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size, recompute=recompute)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    reference = train.train_lm(config, corpus, settings, progress="none")["losses"]
    result = run_mpi(SP, ["--train", "--method", "ulysses", "--steps", str(STEPS),
                          "--recompute", recompute], n_ranks=2, timeout=120).result
    np.testing.assert_allclose(result["losses"], reference, rtol=0, atol=1e-10)
    sent = np.array(result["attention_bytes_sent_per_step_per_rank"])
    full = recompute == "full"
    predicted = costmodel.ulysses_alltoall_bytes(16, 32, 32, 2, 2, full_recompute=full)
    assert (sent == predicted).all() and predicted == (1.5 if full else 1) * 524288


def test_ring_training_bytes_by_hand():
    # B 16, T 32, d 32 (4 heads of 8), p 2 zig-zag: rank r holds chunks r and 3 - r of 4, 16
    # rows; it never sends the K, V of the block it receives last (16 rows). A row is 16 x 32
    # values of 8 bytes = 4096 bytes. Forward 2 x 16 rows (K, V), backward 4 x 16 (K, V, dK,
    # dV) and the 2 x 16 home: 128 rows per layer, 2 layers
    assert costmodel.ring_attention_bytes_sent(32, 2, 16, 4, 8, 8, True, n_layers=2) == \
        [128 * 4096 * 2] * 2 == [1048576] * 2
    # full recomputation replays the forward's 2 x 16 rows
    assert costmodel.ring_attention_bytes_sent(32, 2, 16, 4, 8, 8, True, 2, True) == \
        [160 * 4096 * 2] * 2
    # p 4: 8 rows per rank, 6 x 24 + 2 x 8 = 160 rows - more than at p 2, where Ulysses'
    # 8 (p - 1)/p B T/p d falls from 524288 to 393216 bytes
    assert costmodel.ring_attention_bytes_sent(32, 4, 16, 4, 8, 8, True, 2) == [1310720] * 4
    assert costmodel.ulysses_alltoall_bytes(16, 32, 32, 4, 2) == 393216 < 1310720


def serial_run(steps, **changes):
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size,
                          **{k: v for k, v in changes.items() if k == "recompute"})
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=steps,
                                   **{k: v for k, v in changes.items() if k == "seq_len"})
    return train.train_lm(config, corpus, settings, progress="none")["losses"]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_ring_training_equals_serial_training(n_ranks, serial_losses):
    result = run_mpi(SP, ["--train", "--method", "ring", "--steps", str(STEPS)],
                     n_ranks=n_ranks, timeout=120).result
    assert result["world_size"] == n_ranks and result["method"] == "ring"
    half = 32 // (2 * n_ranks)
    assert result["chunks"][0] == [[0, half], [32 - half, 32]]  # zig-zag: first and last
    np.testing.assert_allclose(result["losses"], serial_losses, rtol=0, atol=1e-10)
    sent = np.array(result["attention_bytes_sent_per_step_per_rank"])
    predicted = costmodel.ring_attention_bytes_sent(32, n_ranks, 16, 4, 8, 8, True, 2)
    assert result["predicted_attention_bytes_sent_per_step_per_rank"] == predicted
    assert sent.shape == (n_ranks, STEPS) and (sent == np.array(predicted)[:, None]).all()


@pytest.mark.mpi
def test_ring_training_at_three_ranks_equals_serial_training():
    """An odd ring: T = 30 in 6 zig-zag chunks of 5 (rank 1 holds positions 5-9 and 20-24)."""
    result = run_mpi(SP, ["--train", "--method", "ring", "--steps", "2", "--seq-len", "30"],
                     n_ranks=3, timeout=120).result
    assert result["chunks"][1] == [[5, 10], [20, 25]]
    np.testing.assert_allclose(result["losses"], serial_run(2, seq_len=30), rtol=0, atol=1e-10)


@pytest.mark.mpi
def test_ring_training_with_full_recomputation_replays_the_forward_ring():
    result = run_mpi(SP, ["--train", "--method", "ring", "--steps", "2", "--recompute",
                          "full"], n_ranks=2, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial_run(2, recompute="full"), rtol=0,
                               atol=1e-10)
    sent = np.array(result["attention_bytes_sent_per_step_per_rank"])
    assert (sent == 160 * 4096 * 2).all()
