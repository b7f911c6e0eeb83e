"""Tensor parallelism under real mpiexec: same loss curve and gradients as the serial model."""

import dataclasses
import os

import numpy as np
import pytest
from conftest import TESTS_DIR

from tfcourse import train
from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn.model import init_params, preset
from tfcourse.parallel.plans.tensor import shard_axis, shard_params

STEPS = 5


def serial_losses(dtype="float64"):
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    return train.train_lm(preset("tiny", corpus.vocab.size, dtype=dtype), corpus, settings,
                          progress="none")["losses"]


@pytest.fixture(scope="module")
def serial():
    return serial_losses()


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_tp_matches_serial_losses_and_gradients(n_ranks, serial):
    result = run_mpi("tfcourse.parallel.tensor_parallel",
                     ["--steps", str(STEPS), "--check-grads"], n_ranks=n_ranks, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial, rtol=1e-10, atol=0)
    assert result["grad_max_rel_error"] < 1e-12
    # Megatron: one all-reduce per sublayer forward (g) and one backward (f)
    config = result["config"]
    assert result["allreduces_per_step"] == 4 * config["n_layers"]
    assert result["comm_bytes_per_step"] == result["predicted_comm_bytes_per_step"]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_sequence_parallel_matches_serial_and_sends_what_the_all_reduces_did(n_ranks, serial):
    args = ["--steps", str(STEPS), "--check-grads"]
    sp = run_mpi("tfcourse.parallel.tensor_parallel", [*args, "--sequence-parallel"],
                 n_ranks=n_ranks, timeout=120).result
    np.testing.assert_allclose(sp["losses"], serial, rtol=1e-10, atol=0)
    assert sp["grad_max_rel_error"] < 1e-12
    assert sp["activation_bytes_sent_per_step"] == sp["predicted_activation_bytes_sent_per_step"]
    tp = run_mpi("tfcourse.parallel.tensor_parallel", args, n_ranks=n_ranks, timeout=120).result
    assert tp["activation_bytes_sent_per_step"] == tp["predicted_activation_bytes_sent_per_step"]
    # the all-gathers and reduce-scatters send what the all-reduces sent, plus one gather of
    # the embedding's gradient: (p - 1)/p of a (B, T, d) array
    settings, config = sp["settings"], sp["config"]
    n = settings["batch_size"] * settings["seq_len"] * config["d_model"] * 8
    assert sp["activation_bytes_sent_per_step"] - tp["activation_bytes_sent_per_step"] == (
        (n_ranks - 1) / n_ranks * n)


@pytest.mark.mpi
def test_tp_float32_matches_serial_float32():
    result = run_mpi("tfcourse.parallel.tensor_parallel",
                     ["--steps", str(STEPS), "--dtype", "float32"], n_ranks=2, timeout=120).result
    np.testing.assert_allclose(result["losses"], serial_losses("float32"), rtol=1e-5)


@pytest.mark.mpi
def test_world_size_that_does_not_divide_heads_is_rejected():
    with pytest.raises(MPIJobError, match="3 ranks cannot split n_heads=4"):
        run_mpi("tfcourse.parallel.tensor_parallel", ["--steps", "1"], n_ranks=3, timeout=60)


def test_shards_concatenate_back_to_the_full_parameters():
    params = init_params(preset("tiny", 20), 0)
    p = 4
    shards = [shard_params(params, r, p) for r in range(p)]
    for name, value in params.items():
        axis = shard_axis(name)
        if axis is None:
            assert all(s[name] is value for s in shards)
        else:
            np.testing.assert_array_equal(np.concatenate([s[name] for s in shards], axis), value)
            assert shards[0][name].size == value.size // p


def test_which_parameters_are_split():
    assert shard_axis("blocks.0.attn.w_q") == 1 and shard_axis("blocks.3.attn.w_o") == 0
    assert shard_axis("blocks.1.ffn.w1") == 1 and shard_axis("blocks.1.ffn.w2") == 0
    assert shard_axis("blocks.1.attn.b_o") is None and shard_axis("blocks.1.ffn.b2") is None
    assert shard_axis("tok_emb") is None and shard_axis("blocks.0.ln1.gamma") is None


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
def test_tp_with_dropout_equals_the_serial_model_with_the_same_generator(n_ranks, monkeypatch):
    """TP runs the serial sublayers, dropout included (it was silently dropped when TP kept
    its own copy of them)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = run_mpi("mpi_tp_dropout", n_ranks=n_ranks, timeout=60).result
    assert result["dropout_effect"] > 1e-3  # dropout changes the gradients...
    assert result["loss_error"] < 1e-12  # ...and TP reproduces them exactly
    assert result["grad_error"] < 1e-12
