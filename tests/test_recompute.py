"""Activation recomputation (issue 19): the same gradients, bit for bit, from less memory.

"selective" drops each block's attention weights and recomputes them in the backward pass;
"full" keeps only each block's input and runs the block's forward again (Korthikanti et al.
2022). The references are the model without recomputation (the numbers), the arrays the
caches really hold and tracemalloc's count of what a step allocates (the memory)."""

import dataclasses

import numpy as np
import pytest

from tfcourse import train
from tfcourse.nn import model
from tfcourse.perf import costmodel as cm
from tfcourse.perf.memory import step_memory

CONFIG = model.TransformerConfig(vocab_size=13, d_model=16, n_heads=4, n_layers=3, d_ff=24,
                                 max_len=12)


def batch(config, b=3, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, config.vocab_size, (b, config.max_len)) for _ in range(2))


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_same_loss_and_gradients_bit_for_bit(recompute, dropout):
    config = dataclasses.replace(CONFIG, dropout=dropout)
    params = model.init_params(config, 0)
    x, y = batch(config)
    want = model.loss_and_grads(params, x, y, config, rng=np.random.default_rng(4))
    got = model.loss_and_grads(params, x, y, dataclasses.replace(config, recompute=recompute),
                               rng=np.random.default_rng(4))
    assert got[0] == want[0]
    for name in params:  # the same operations on the same inputs: identical, not just close
        assert np.array_equal(got[1][name], want[1][name]), name
    if dropout:  # and the recomputed dropout masks are the first run's: a fresh draw differs
        other = model.loss_and_grads(params, x, y, config, rng=np.random.default_rng(5))
        assert other[0] != want[0]


def _array_bytes(cache, exclude_ids) -> int:
    """Bytes of the distinct arrays a cache holds (views counted once, parameters left out)."""
    seen = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            base = obj
            while base.base is not None:
                base = base.base
            if id(base) not in exclude_ids:
                seen[id(base)] = base.nbytes
        elif isinstance(obj, tuple | list):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    walk(cache)
    return sum(seen.values())


@pytest.mark.parametrize("recompute", model.RECOMPUTE)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_what_each_block_keeps_is_the_cost_model_s_formula(recompute, dtype):
    config = dataclasses.replace(CONFIG, recompute=recompute, dtype=dtype)
    params = model.init_params(config, 0)
    x, _ = batch(config, b=2)
    _, caches = model.forward_pass(params, x, config)
    blocks = caches[1:-1]  # between the embedding and the head
    assert len(blocks) == config.n_layers
    exclude = {id(v) for v in params.values()}
    kept = {_array_bytes(cache, exclude) for _, cache, _ in blocks}
    formula = cm.activation_bytes_per_layer(2, config.max_len, config.d_model, config.n_heads,
                                            config.d_ff, np.dtype(dtype).itemsize,
                                            recompute=recompute)
    assert kept == {formula}  # every block alike; "full": its input only (2 x 12 x 16 values)


def test_selective_drops_the_term_that_grows_with_the_square_of_the_sequence():
    none, selective, full = (cm.activation_bytes_per_layer(4, 1024, 64, 8, 256, 4, recompute=r)
                             for r in model.RECOMPUTE)
    weights = 4 * 8 * 1024 * 1024 * 4
    assert none - selective == weights - 1024 * 1024  # the float weights out, the bool mask in
    assert full == 4 * 1024 * 64 * 4 < selective < none
    with pytest.raises(ValueError, match="recompute: expected one of"):
        cm.activation_bytes_per_layer(4, 1024, 64, 8, 256, 4, recompute="some")


@pytest.mark.parametrize("recompute", model.RECOMPUTE)
def test_measured_memory_per_layer_is_the_formula(recompute):
    """tracemalloc's count of what the forward pass keeps, for 5 blocks minus 2 blocks, is 3
    blocks' worth: the formula, within 2 % (Python's small objects, the tuples and dicts of
    the caches, come on top)."""
    kept = {}
    for layers in (2, 5):
        config = dataclasses.replace(CONFIG, n_layers=layers, recompute=recompute,
                                     max_len=32, d_model=32, d_ff=64)
        params = model.init_params(config, 0)
        kept[layers] = step_memory(params, *batch(config, b=4), config)["kept"]
    formula = cm.activation_bytes_per_layer(4, 32, 32, 4, 64, 8, recompute=recompute)
    assert (kept[5] - kept[2]) / 3 == pytest.approx(formula, rel=0.02)


def test_recomputation_lowers_the_peak_of_a_step():
    config = dataclasses.replace(CONFIG, n_layers=6, max_len=32, d_model=32, d_ff=64)
    params = model.init_params(config, 0)
    x, y = batch(config, b=4)
    peaks = [step_memory(params, x, y, dataclasses.replace(config, recompute=r))["peak"]
             for r in model.RECOMPUTE]
    assert peaks[0] > peaks[1] > peaks[2]


def test_a_run_may_resume_with_another_recompute(tmp_path):
    args = train.parse_args(["--steps", "2", "--checkpoint", str(tmp_path / "ck")])
    setup = train.training_setup(args)
    train.train_lm(setup.config, setup.corpus, setup.settings, str(tmp_path / "ck"),
                   progress="none")
    resumed = train.parse_args(["--steps", "3", "--resume", str(tmp_path / "ck"),
                                "--recompute", "full"])
    with pytest.raises(ValueError, match="--resume: this run changes the checkpoint's settings"):
        train.training_setup(resumed)  # --steps changed: refused, but not for --recompute
    resumed = train.parse_args(["--steps", "2", "--resume", str(tmp_path / "ck"),
                                "--recompute", "full"])
    with pytest.raises(ValueError, match="nothing left to train"):
        train.training_setup(resumed)


def test_inference_never_recomputes():
    config = dataclasses.replace(CONFIG, recompute="full")
    params = model.init_params(config, 0)
    x, _ = batch(config)
    assert np.array_equal(model.forward(params, x, config),
                          model.forward(params, x, dataclasses.replace(config, recompute="none")))


PROGRAMS = [  # (module, ranks, extra arguments): every training program, odd sizes included
    ("tfcourse.parallel.data_parallel", 3, ["--allreduce", "ring"]),
    ("tfcourse.parallel.data_parallel", 2, ["--zero", "2"]),
    ("tfcourse.parallel.data_parallel", 3, ["--zero", "3"]),
    ("tfcourse.parallel.tensor_parallel", 2, []),
    ("tfcourse.parallel.pipeline_parallel", 3, ["--schedule", "1f1b", "--microbatches", "2"]),
    ("tfcourse.parallel.hybrid", 4, ["--dp", "2", "--tp", "2"]),
    ("tfcourse.parallel.tensor_parallel", 2, ["--sequence-parallel"]),
    ("tfcourse.parallel.hybrid", 3, ["--pp", "3", "--tp", "1", "--dp", "1",
                                     "--microbatches", "2"]),
    ("tfcourse.parallel.hybrid", 4, ["--pp", "2", "--tp", "2", "--microbatches", "3"]),
]


@pytest.fixture(scope="module")
def serial_losses():
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=3, batch_size=6)
    config = model.preset("tiny", corpus.vocab.size, n_layers=3)
    return train.train_lm(config, corpus, settings, progress="none")["losses"]


@pytest.mark.mpi
@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("module, ranks, extra", PROGRAMS,
                         ids=[f"{m.rsplit('.', 1)[1]}-{n}-{'-'.join(e)}" for m, n, e in PROGRAMS])
def test_every_training_program_recomputes_and_still_trains_the_serial_model(
        module, ranks, extra, recompute, serial_losses):
    from tfcourse.course.launch import run_mpi

    result = run_mpi(module, ["--config", "tiny", "--steps", "3", "--batch-size", "6",
                              "--layers", "3", "--recompute", recompute, *extra],
                     n_ranks=ranks, timeout=120).result
    assert np.allclose(result["losses"], serial_losses, rtol=1e-10, atol=0)


def test_the_serial_trainer_takes_recompute_from_the_command_line():
    losses = {}
    for recompute in model.RECOMPUTE:
        setup = train.training_setup(train.parse_args(["--steps", "2", "--recompute",
                                                       recompute]))
        assert setup.config.recompute == recompute
        losses[recompute] = train.train_lm(setup.config, setup.corpus, setup.settings,
                                           progress="none")["losses"]
    assert losses["selective"] == losses["none"] == losses["full"]


@pytest.mark.mpi
@pytest.mark.parametrize("module, ranks, extra", [
    ("tfcourse.parallel.tensor_parallel", 2, []),
    ("tfcourse.parallel.pipeline_parallel", 2, ["--microbatches", "2"]),
    ("tfcourse.parallel.hybrid", 4, ["--pp", "2", "--tp", "2"]),
], ids=["tp2", "pp2", "pp2-tp2"])
def test_every_rank_s_traced_step_peak_falls_with_full_recomputation(module, ranks, extra):
    from tfcourse.course.launch import run_mpi

    peaks = {}
    for recompute in ("none", "full"):
        result = run_mpi(module, ["--config", "tiny", "--steps", "1", "--batch-size", "8",
                                  "--layers", "4", "--recompute", recompute, "--trace-memory",
                                  *extra], n_ranks=ranks, timeout=120).result
        peaks[recompute] = result["step_peak_bytes"]
        assert len(peaks[recompute]) == ranks and all(p > 0 for p in peaks[recompute])
    assert all(full < none for full, none in zip(peaks["full"], peaks["none"], strict=True))
