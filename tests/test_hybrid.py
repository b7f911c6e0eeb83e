"""The hybrid program (data parallelism over pipelines or tensor-parallel groups) under real
mpiexec on 1-4 ranks, odd sizes and uneven batch splits included: its loss curve must be the
serial trainer's, computed here in-process."""

import dataclasses
from functools import cache

import numpy as np
import pytest

from tfcourse import train
from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn.model import preset
from tfcourse.parallel.hybrid import grid_shape

pytestmark = pytest.mark.mpi
STEPS, LAYERS = 3, 4


@cache
def serial_losses(batch_size: int) -> tuple:
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS,
                                   batch_size=batch_size)
    config = preset("tiny", corpus.vocab.size, n_layers=LAYERS)
    return tuple(train.train_lm(config, corpus, settings, progress="none")["losses"])


CASES = [  # (dp, pp, tp, schedule, micro-batches, global batch)
    (1, 1, 1, "1f1b", 1, 8),
    (2, 1, 1, "1f1b", 1, 8), (1, 2, 1, "gpipe", 4, 8), (1, 1, 2, "1f1b", 1, 8),
    (3, 1, 1, "1f1b", 1, 8), (1, 3, 1, "1f1b", 2, 8),
    (2, 2, 1, "1f1b", 2, 8), (2, 2, 1, "gpipe", 3, 6), (2, 1, 2, "1f1b", 1, 6),
    (4, 1, 1, "1f1b", 1, 6),
    # 3D: pipeline stages that are tensor-parallel groups, with and without replicas (8 ranks
    # on 2 cores: a correctness run)
    (1, 2, 2, "1f1b", 2, 8), (1, 2, 2, "gpipe", 3, 6), (2, 2, 2, "1f1b", 2, 8),
    # zero bubble H1 (B and W split) in tensor-parallel stages and over replicas
    (1, 2, 2, "zb-h1", 4, 8), (2, 2, 1, "zb-h1", 3, 6),
]


@pytest.mark.parametrize("dp, pp, tp, schedule, m, batch", CASES,
                         ids=[f"dp{c[0]}-pp{c[1]}-tp{c[2]}-{c[3]}-m{c[4]}-B{c[5]}" for c in CASES])
def test_hybrid_loss_curve_equals_serial(dp, pp, tp, schedule, m, batch):
    result = run_mpi("tfcourse.parallel.hybrid",
                     ["--steps", str(STEPS), "--layers", str(LAYERS), "--batch-size", str(batch),
                      "--dp", str(dp), "--pp", str(pp), "--tp", str(tp),
                      "--schedule", schedule, "--microbatches", str(m)],
                     n_ranks=dp * pp * tp, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial_losses(batch), rtol=1e-10, atol=0)
    assert len(result["memory_bytes"]) == len(result["seconds_per_step_per_rank"]) == dp * pp * tp


SP_CASES = [  # (dp, pp, tp, schedule, micro-batches, global batch)
    (2, 1, 2, "1f1b", 1, 8), (1, 1, 4, "1f1b", 1, 8),
    # sequence parallelism inside pipeline stages: each tensor rank sends its slice onwards
    (1, 2, 2, "1f1b", 2, 8), (1, 2, 2, "gpipe", 3, 6), (2, 2, 2, "1f1b", 2, 8),
    (1, 2, 2, "zb-h1", 2, 8),
]


@pytest.mark.parametrize("dp, pp, tp, schedule, m, batch", SP_CASES,
                         ids=[f"dp{c[0]}-pp{c[1]}-tp{c[2]}-{c[3]}-m{c[4]}" for c in SP_CASES])
def test_sequence_parallel_equals_serial(dp, pp, tp, schedule, m, batch):
    result = run_mpi("tfcourse.parallel.hybrid",
                     ["--steps", str(STEPS), "--layers", str(LAYERS), "--batch-size", str(batch),
                      "--dp", str(dp), "--pp", str(pp), "--tp", str(tp), "--schedule", schedule,
                      "--microbatches", str(m), "--sequence-parallel"],
                     n_ranks=dp * pp * tp, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial_losses(batch), rtol=1e-10, atol=0)


ZERO_CASES = [  # (dp, pp, tp, sequence parallel): ZeRO-1 across the replicas
    (2, 1, 1, False), (3, 1, 1, False), (2, 2, 1, False), (2, 1, 2, True), (2, 2, 2, True),
]


@pytest.mark.parametrize("dp, pp, tp, sp", ZERO_CASES,
                         ids=[f"dp{c[0]}-pp{c[1]}-tp{c[2]}{'-sp' if c[3] else ''}"
                              for c in ZERO_CASES])
def test_zero_1_across_replicas_equals_serial_and_shards_the_optimizer(dp, pp, tp, sp):
    args = ["--steps", str(STEPS), "--layers", str(LAYERS), "--batch-size", "6", "--dp", str(dp),
            "--pp", str(pp), "--tp", str(tp), "--microbatches", "1" if pp == 1 else "2"]
    args += ["--sequence-parallel"] if sp else []
    plain = run_mpi("tfcourse.parallel.hybrid", args, n_ranks=dp * pp * tp, timeout=120).result
    zero = run_mpi("tfcourse.parallel.hybrid", [*args, "--zero", "1"], n_ranks=dp * pp * tp,
                   timeout=120).result
    np.testing.assert_allclose(zero["losses"], serial_losses(6), rtol=1e-10, atol=0)
    # each part's AdamW state is split over the dp replicas that hold that part, whole tensors
    # each: together they keep exactly one copy, and no rank keeps more than it did
    part = pp * tp  # ranks per replica; rank = replica * part + place in replica
    for place in range(part):
        mine = [zero["memory_bytes"][r * part + place]["optimizer (m, v)"] for r in range(dp)]
        whole = plain["memory_bytes"][place]["optimizer (m, v)"]
        assert sum(mine) == whole and max(mine) < whole
        assert zero["memory_bytes"][place]["parameters"] == plain["memory_bytes"][place][
            "parameters"]


def test_sequence_parallel_stages_send_a_tp_th_of_the_activations():
    bytes_sent = {}
    for flags in ([], ["--sequence-parallel"]):
        result = run_mpi("tfcourse.parallel.hybrid",
                         ["--steps", "1", "--layers", str(LAYERS), "--batch-size", "8",
                          "--pp", "2", "--tp", "2", "--microbatches", "2", *flags],
                         n_ranks=4, timeout=120).result
        bytes_sent[bool(flags)] = result["pipeline_bytes_sent"]
    # stage 0's ranks send 2 micro-batches of (4 rows, 32 positions, d 32) float64 forward
    whole = 2 * 4 * 32 * 32 * 8
    assert bytes_sent[False][:2] == [whole, whole]
    assert bytes_sent[True][:2] == [whole // 2, whole // 2]


def test_grid_shape_by_hand():
    assert grid_shape(4, 2, 2, 1) == (2, 2)
    assert grid_shape(6, 3, 1, 2) == (3, 2)
    with pytest.raises(ValueError, match=r"--dp/--pp/--tp: expected dp \* pp \* tp = the 4"):
        grid_shape(4, 3, 1, 1)
    assert grid_shape(8, 2, 2, 2) == (2, 4)  # 3D
    with pytest.raises(ValueError, match=r"got 2 \* 2 \* 2 = 8"):
        grid_shape(4, 2, 2, 2)


def test_more_replicas_than_rows_is_rejected():
    with pytest.raises(MPIJobError, match=r"batch_size: expected at least"):
        run_mpi("tfcourse.parallel.hybrid", ["--dp", "4", "--batch-size", "3", "--steps", "1"],
                n_ranks=4, timeout=60)
