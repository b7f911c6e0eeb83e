"""Issue 23 item 2: held-out evaluation. train.held_out_loss is the model's loss on fixed
held-out windows; the serial trainer reports it every N steps and after the last; every
training program reports the same numbers, gathered on rank 0 from the layout's pieces of
the parameters (tested equal to serial training across layouts under mpiexec)."""

import argparse
import dataclasses

import numpy as np
import pytest

from tfcourse import data, train
from tfcourse.course.launch import run_mpi
from tfcourse.nn import model
from tfcourse.parallel.plans import placement

STEPS, EVERY = 6, 4


def test_held_out_loss_is_the_models_loss_on_fixed_windows():
    corpus = train.load_corpus(name="markov")
    held = data.markov_corpus(split="held-out").ids
    config = model.preset("tiny", corpus.vocab.size)
    params = model.init_params(config, 3)
    x, y = data.lm_batch(held, 64, 32, train.HELD_OUT_SEED, 0)
    expected = model.loss_and_grads(params, x, y, config)[0]
    assert train.held_out_loss(params, held, config, 32) == pytest.approx(expected, abs=1e-12)
    # the same windows whatever the run: not the training seed's
    assert train.held_out_loss(params, held, config, 32) == \
        train.held_out_loss(params, held, config, 32)


def test_evaluation_steps():
    assert [d for d in range(1, 26) if train.evaluate_now(d, 25, 10)] == [10, 20, 25]
    assert not any(train.evaluate_now(d, 25, 0) for d in range(1, 26))


def test_train_lm_reports_held_out_losses_at_the_evaluation_steps():
    corpus = train.load_corpus(name="markov")
    held = data.markov_corpus(split="held-out").ids
    config = model.preset("tiny", corpus.vocab.size)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    result = train.train_lm(config, corpus, settings, progress="none", held_out=held,
                            eval_every=EVERY)
    steps = [s for s, _ in result["held_out_losses"]]
    assert steps == [4, 6]
    final = result["held_out_losses"][-1][1]
    assert final == pytest.approx(train.held_out_loss(result["params"], held, config, 32))
    plain = train.train_lm(config, corpus, settings, progress="none")
    assert plain["losses"] == result["losses"] and "held_out_losses" not in plain
    with pytest.raises(ValueError, match=r"held_out: expected held-out token ids"):
        train.train_lm(config, corpus, settings, progress="none", eval_every=2)


def setup_args(**changes):
    args = train.parse_args([])
    return argparse.Namespace(**{**vars(args), **changes})


def test_held_out_split_of_a_text_keeps_the_last_fraction():
    zen = train.load_corpus()
    setup = train.training_setup(setup_args(eval_every=5))
    cut = len(zen.text) - round(0.1 * len(zen.text))
    assert setup.corpus.text == zen.text[:cut] and setup.eval_every == 5
    np.testing.assert_array_equal(setup.held_out, zen.ids[cut:])
    markov = train.training_setup(setup_args(eval_every=5, corpus="markov"))
    np.testing.assert_array_equal(markov.held_out, data.markov_corpus(split="held-out").ids)
    assert len(markov.corpus.text) == 2**18  # its own held-out text: nothing cut
    assert train.training_setup(setup_args()).held_out is None


def test_parameters_assemble_from_every_layouts_pieces():
    config = model.preset("tiny", 11)
    params = model.init_params(config, 0)
    shapes = model.param_shapes(config)
    layouts = {"tensor 2": [placement.tensor(r, 2) for r in range(2)],
               "replicated 3": [placement.replicated(r, dict.fromkeys(params, 0))
                                for r in range(3)]}
    for name, places in layouts.items():
        local = [place.take(params) for place in places]
        pieces = [placement.param_pieces(place, mine, shapes)
                  for place, mine in zip(places, local, strict=True)]
        whole = placement.assemble_params(pieces, shapes)
        assert all(np.array_equal(whole[n], params[n]) for n in params), name


PROGRAMS = {
    "data parallel": ("tfcourse.parallel.data_parallel", [], 2),
    "data parallel, 3 ranks": ("tfcourse.parallel.data_parallel", [], 3),
    "ZeRO-3": ("tfcourse.parallel.data_parallel", ["--zero", "3"], 2),
    "tensor parallel": ("tfcourse.parallel.tensor_parallel", [], 2),
    "pipeline": ("tfcourse.parallel.pipeline_parallel", [], 2),
    "hybrid dp x tp": ("tfcourse.parallel.hybrid", ["--dp", "2", "--tp", "2"], 4),
    "context parallel, ring": ("tfcourse.parallel.sequence_parallel",
                               ["--train", "--method", "ring"], 2),
    "context parallel, Ulysses": ("tfcourse.parallel.sequence_parallel",
                                  ["--train", "--method", "ulysses"], 2),
}


@pytest.fixture(scope="module")
def serial_held_out():
    corpus = train.load_corpus(name="markov")
    config = model.preset("tiny", corpus.vocab.size)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    return train.train_lm(config, corpus, settings, progress="none",
                          held_out=data.markov_corpus(split="held-out").ids,
                          eval_every=EVERY)["held_out_losses"]


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_every_program_reports_the_serial_held_out_losses(name, serial_held_out):
    module, extra, ranks = PROGRAMS[name]
    result = run_mpi(module, [*extra, "--corpus", "markov", "--steps", str(STEPS),
                              "--eval-every", str(EVERY)], n_ranks=ranks, timeout=120).result
    got = result["held_out_losses"]
    assert [s for s, _ in got] == [s for s, _ in serial_held_out] == [4, 6]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in serial_held_out],
                               rtol=0, atol=1e-10)


@pytest.mark.mpi
def test_expert_parallelism_reports_the_serial_moe_held_out_losses():
    corpus = train.load_corpus(name="markov")
    config = model.preset("tiny", corpus.vocab.size, n_experts=4, top_k=2)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    serial = train.train_lm(config, corpus, settings, progress="none",
                            held_out=data.markov_corpus(split="held-out").ids,
                            eval_every=EVERY)["held_out_losses"]
    result = run_mpi("tfcourse.parallel.expert_parallel",
                     ["--experts", "4", "--top-k", "2", "--corpus", "markov", "--steps",
                      str(STEPS), "--eval-every", str(EVERY)], n_ranks=2, timeout=120).result
    np.testing.assert_allclose(np.array(result["held_out_losses"]), np.array(serial), rtol=0,
                               atol=1e-10)
