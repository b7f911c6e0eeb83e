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


@pytest.mark.parametrize("dp, tp", [(2, 2), (1, 4)])
def test_sequence_parallel_replicas_equal_serial(dp, tp):
    result = run_mpi("tfcourse.parallel.hybrid",
                     ["--steps", str(STEPS), "--layers", str(LAYERS), "--batch-size", "8",
                      "--dp", str(dp), "--tp", str(tp), "--sequence-parallel"],
                     n_ranks=dp * tp, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial_losses(8), rtol=1e-10, atol=0)


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
