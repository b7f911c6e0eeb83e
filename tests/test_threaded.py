"""Data parallelism over threads (tfcourse.threaded) and the malloc settings
(tfcourse.allocator): the threaded step equals the one-thread step, its blocks really run at
the same time, and keeping freed memory really removes the page faults."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from tfcourse import threaded
from tfcourse.nn import model

VOCAB, PAD = 11, 0


def setup(batch=5, seq=6, dtype="float64", dropout=0.0):
    config = model.preset("tiny", VOCAB, dtype=dtype, dropout=dropout)
    params = model.init_params(config, 3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, VOCAB, (batch, seq))
    targets = rng.integers(1, VOCAB, (batch, seq))
    return config, params, tokens, targets


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_threaded_step_equals_the_one_thread_step(threads):
    config, params, tokens, targets = setup(batch=5)
    loss, grads = threaded.loss_and_grads(params, tokens, targets, config, threads)
    ref_loss, ref_grads = model.loss_and_grads(params, tokens, targets, config)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    assert set(grads) == set(params)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14)
        assert grads[name].dtype == params[name].dtype


def test_blocks_are_weighted_by_their_counted_tokens_not_equally():
    """Padding makes the blocks count different numbers of tokens: an equal-weight mean of
    the blocks' losses is wrong, and this case tells the two apart."""
    config, params, tokens, targets = setup(batch=4)
    targets[:2, 1:] = PAD  # block 0 counts 2 tokens, block 1 counts 12
    loss, grads = threaded.loss_and_grads(params, tokens, targets, config, 2, ignore_index=PAD)
    ref_loss, ref_grads = model.loss_and_grads(params, tokens, targets, config, PAD)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14)
    halves = [model.loss_and_grads(params, tokens[r], targets[r], config, PAD)[0]
              for r in (slice(0, 2), slice(2, 4))]
    assert abs(np.mean(halves) - ref_loss) > 1e-3  # the misconception is caught above


def test_one_thread_is_exactly_the_model_step_and_float32_stays_float32():
    config, params, tokens, targets = setup(dtype="float32")
    loss, grads = threaded.loss_and_grads(params, tokens, targets, config, 1)
    ref_loss, ref_grads = model.loss_and_grads(params, tokens, targets, config)
    assert loss == ref_loss
    for name in params:
        np.testing.assert_array_equal(grads[name], ref_grads[name])
    loss2, grads2 = threaded.loss_and_grads(params, tokens, targets, config, 2)
    assert all(g.dtype == np.float32 for g in grads2.values())
    assert loss2 == pytest.approx(ref_loss, rel=1e-5)


def test_more_threads_than_sequences_and_nothing_counted():
    config, params, tokens, targets = setup(batch=2)
    loss, _ = threaded.loss_and_grads(params, tokens, targets, config, 8)
    assert loss == pytest.approx(model.loss_and_grads(params, tokens, targets, config)[0])
    targets[:] = PAD
    loss, grads = threaded.loss_and_grads(params, tokens, targets, config, 2, ignore_index=PAD)
    assert loss == 0.0 and all(not g.any() for g in grads.values())


@pytest.mark.parametrize("batch,threads,sizes", [(5, 2, [2, 3]), (7, 3, [2, 3, 2]),
                                                 (2, 4, [1, 1]), (6, 1, [6])])
def test_batch_blocks_cover_the_batch_without_empty_blocks(batch, threads, sizes):
    blocks = threaded.batch_blocks(batch, threads)
    assert [b.stop - b.start for b in blocks] == sizes
    assert blocks[0].start == 0 and blocks[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:], strict=False))


def test_the_blocks_run_at_the_same_time(monkeypatch):
    """Each block waits at a barrier for the other: run one after the other, they would
    time out instead of meeting."""
    barrier = threading.Barrier(2, timeout=20)
    seen = set()
    real = model.loss_and_grads

    def meeting(*args, **kwargs):
        seen.add(threading.get_ident())
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "loss_and_grads", meeting)
    config, params, tokens, targets = setup(batch=4)
    threaded.loss_and_grads(params, tokens, targets, config, 2)
    assert len(seen) == 2 and threading.get_ident() not in seen


def test_dropout_blocks_draw_from_spawned_generators():
    config, params, tokens, targets = setup(batch=4, dropout=0.5)
    runs = [threaded.loss_and_grads(params, tokens, targets, config, 2,
                                    rng=np.random.default_rng(7))[0] for _ in range(2)]
    assert runs[0] == runs[1]  # seeded: reproducible
    no_dropout = model.loss_and_grads(params, tokens, targets,
                                      model.preset("tiny", VOCAB, dtype="float64"))[0]
    assert abs(runs[0] - no_dropout) > 1e-3


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_thread_counts_are_refused_by_name(threads):
    config, params, tokens, targets = setup()
    with pytest.raises(ValueError, match="threads"):
        threaded.loss_and_grads(params, tokens, targets, config, threads)


def test_bad_batches_are_refused_before_any_thread_starts():
    config, params, tokens, targets = setup()
    with pytest.raises(ValueError, match="targets"):
        threaded.loss_and_grads(params, tokens, targets[:, :3], config, 2)
    with pytest.raises(ValueError, match="tokens"):
        threaded.loss_and_grads(params, tokens + VOCAB, targets, config, 2)


FAULTS = """
import resource, sys
import numpy as np
from tfcourse.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rounds(n):
    for _ in range(n):
        arrays = [np.ones(1 << 20, dtype=np.float32) for _ in range(16)]  # 16 x 4 MiB
        del arrays
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keeping_freed_memory_removes_the_page_faults_of_repeated_steps():
    """A 'step' allocating and freeing 64 MiB: by default glibc gives much of it back (here
    about half of the 16,384 pages fault in again every step); kept, the next step reuses
    every page."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                             text=True, timeout=60, check=True)
        return float(out.stdout)

    pages = 16 * (4 << 20) // 4096
    assert faults("default") > 0.25 * pages  # the case shows the problem...
    assert faults("keep") < 0.02 * pages  # ...and the setting removes it


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_notebooks_fault_count_shows_the_training_step_faulting_less():
    from tfcourse.perf.measure import page_faults_per_step

    default = page_faults_per_step("small", keep_freed=False, steps=1)
    kept = page_faults_per_step("small", keep_freed=True, steps=1)
    assert default["faults"] > 2000  # a 'small' step touches fresh pages by the thousand
    assert kept["faults"] < default["faults"] / 4
