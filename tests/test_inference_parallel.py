"""Tensor-parallel decoding (issue 22, tfcourse.parallel.inference) under real mpiexec: the
tokens of the serial model.generate at 1, 2 and 4 ranks (greedy from a trained checkpoint,
sampled from an initialised model with a batch of prompts of different lengths), 2 n_layers
all-reduces of B x d values per decode step (of B x T for the prefill), each rank's KV cache
1/p of the serial one; bad input refused before any collective. And the cost model's decoding
formulas, checked by hand."""

import dataclasses
import math
import re

import pytest

from tfcourse import train
from tfcourse.course.launch import MPIJobError, MPITimeoutError, run_mpi
from tfcourse.nn import model
from tfcourse.perf import costmodel as cm

MODULE = "tfcourse.parallel.inference"
PROMPTS = ("Beautiful is", "Now is better than")

# --------------------------------------------------------------------------- the cost model


def test_tp_decode_comm_seconds_by_hand():
    """2 L ring all-reduces of B d bytes: each 2 (p-1) alpha + 2 (p-1)/p B d bytes beta."""
    # L=2, B=1, d=32, float64: 256 bytes. p=2: 2e-5 + 256e-9; p=4: 6e-5 + 1.5 x 256e-9
    assert cm.tp_decode_comm_seconds(2, 1, 32, 8, 2, 1e-5, 1e-9) == pytest.approx(
        4 * (2e-5 + 256e-9), rel=1e-12)
    assert cm.tp_decode_comm_seconds(2, 1, 32, 8, 4, 1e-5, 1e-9) == pytest.approx(
        4 * (6e-5 + 384e-9), rel=1e-12)
    assert cm.tp_decode_comm_seconds(2, 1, 32, 8, 1, 1e-5, 1e-9) == 0.0  # nothing to reduce
    # the prefill of T positions is the same call with batch B T
    assert cm.tp_decode_comm_seconds(4, 3 * 12, 128, 4, 2, 0.0, 1e-9) == pytest.approx(
        8 * 36 * 128 * 4 * 1e-9, rel=1e-12)
    with pytest.raises(ValueError, match="batch: expected a positive integer, got 0"):
        cm.tp_decode_comm_seconds(2, 0, 32, 8, 2, 1e-5, 1e-9)


def test_tp_decode_pays_off_width_by_hand():
    """d* = sqrt(p F alpha / (6 B)) without beta; with it the root of 6 B d^2 / F = p alpha +
    B d bytes beta; at d* the matmul time saved equals the all-reduces' time."""
    assert cm.tp_decode_pays_off_width(2, 1e-5, 0.0, 1e11) == pytest.approx(
        math.sqrt(2e6 / 6), rel=1e-12)  # 577.35
    # F B bytes beta = 1e11 x 4e-9 = 400; 24 B p F alpha = 4.8e7
    assert cm.tp_decode_pays_off_width(2, 1e-5, 1e-9, 1e11) == pytest.approx(
        (400 + math.sqrt(400**2 + 4.8e7)) / 12, rel=1e-12)  # 611.65
    for p, batch, beta in ((2, 1, 1e-9), (4, 8, 1e-9), (8, 3, 0.0)):
        d = cm.tp_decode_pays_off_width(p, 2e-6, beta, 5e10, batch, 4)
        n_layers = 3  # cancels
        saved = 2 * 12 * n_layers * d**2 * batch * (1 - 1 / p) / 5e10
        spent = 2 * n_layers * cm.ring_allreduce_time(batch * d * 4, p, 2e-6, beta)
        assert saved == pytest.approx(spent, rel=1e-10)
    # wider models need more ranks' worth of latency: d* grows as sqrt(p), shrinks with B
    assert cm.tp_decode_pays_off_width(8, 1e-5, 0.0, 1e11) == pytest.approx(
        2 * cm.tp_decode_pays_off_width(2, 1e-5, 0.0, 1e11))
    with pytest.raises(ValueError, match="p: expected at least 2 ranks"):
        cm.tp_decode_pays_off_width(1, 1e-5, 0.0, 1e11)
    with pytest.raises(ValueError, match="flops_per_s: expected a positive rate"):
        cm.tp_decode_pays_off_width(2, 1e-5, 0.0, 0.0)


# --------------------------------------------------------------------------- under mpiexec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A serial run's checkpoint (python -m tfcourse.train --steps 30 --checkpoint DIR) and its
    parameters: a trained model's sharper logits make greedy decoding say something."""
    folder = tmp_path_factory.mktemp("inference") / "ck"
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=30)
    result = train.train_lm(config, corpus, settings, str(folder), progress="none")
    return str(folder), result["params"], config


CASES = {  # name -> (the command line, how to build the serial reference)
    "greedy-from-checkpoint": (["--new-tokens", "20"], "checkpoint", 0.0, 0),
    "sampled-batch-of-3": (["--new-tokens", "12", "--temperature", "1.0", "--seed", "5",
                            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--batch", "3"],
                           "init", 1.0, 5),
}


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tp_decoding_gives_the_serial_tokens(case, n_ranks, trained):
    args, source, temperature, seed = CASES[case]
    folder, trained_params, config = trained
    if source == "checkpoint":
        args, params = [*args, "--checkpoint", folder], trained_params
    else:
        params = model.init_params(config, seed)
    result = run_mpi(MODULE, ["--tp", str(n_ranks), *args], n_ranks=n_ranks, timeout=120).result
    vocab = train.load_corpus().vocab
    n_new = result["new_tokens"]
    prompts = [vocab.encode(text) for text in result["prompts"]]
    expected = [model.generate(params, ids, n_new, config, temperature, seed).tolist()
                for ids in prompts]
    assert result["tokens"] == expected
    assert result["equals_serial"] and result["ranks_agree"]
    assert len({tuple(t) for t in result["tokens"]}) == len({tuple(p) for p in prompts})

    # Megatron's g: two all-reduces per layer, of B x d values per step, B x T for the prefill
    layers, width, batch = config.n_layers, config.d_model, len(prompts)
    longest = max(len(ids) for ids in prompts)
    assert result["prefill_allreduces"] == 2 * layers
    assert result["prefill_allreduce_bytes"] == 2 * layers * batch * longest * width * 8
    assert result["decode_step_allreduces"] == [2 * layers] * (n_new - 1)
    assert result["decode_step_allreduce_bytes"] == [2 * layers * batch * width * 8] * (n_new - 1)
    assert len(result["decode_step_seconds"]) == n_new - 1 and result["seconds_per_token"] > 0

    # each rank holds n_heads / p heads of every position's keys and values: 1/p of serial
    serial_cache = model.empty_kv_cache(params, config, batch)
    serial_cache.lengths[:] = [len(ids) + n_new - 1 for ids in prompts]
    assert result["kv_cache_positions"] == serial_cache.lengths.tolist()
    assert result["kv_cache_bytes_serial"] == serial_cache.nbytes
    assert result["kv_cache_bytes_per_rank"] == [serial_cache.nbytes // n_ranks] * n_ranks


@pytest.mark.mpi
def test_the_predicted_communication_uses_the_given_link():
    result = run_mpi(MODULE, ["--tp", "2", "--new-tokens", "3", "--alpha", "1e-5", "--beta",
                              "1e-9"], n_ranks=2, timeout=60).result
    assert result["predicted_comm_seconds_per_token"] == pytest.approx(4 * (2e-5 + 256e-9))
    assert result["bytes_sent_per_token_per_rank"] == 4 * 256  # 2 (p-1)/p of 4 x 256 bytes
    assert len(result["decode_step_comm_seconds"]) == 2


BAD = [  # (ranks, arguments, the message)
    (2, ["--tp", "2", "--new-tokens", "-1"],
     r"--new-tokens: expected a non-negative integer, got -1"),
    (2, ["--tp", "2", "--new-tokens", "4", "--temperature", "-0.5"],
     r"--temperature: expected a non-negative finite number, got -0\.5"),
    (3, ["--tp", "3", "--new-tokens", "4"],
     r"--tp: 3 ranks cannot split n_heads=4 evenly"),
    (2, ["--tp", "4", "--new-tokens", "4"],
     r"--tp: expected the number of ranks \(mpiexec -n\), 2, got 4"),
    (2, ["--tp", "2", "--new-tokens", "1", "--prompt", "Beautiful is better than ugly. "
         "Explicit is"], r"--prompt: expected 1 to max_len=32 characters .*, got 42"),
    (2, ["--tp", "2", "--new-tokens", "20", "--prompt", "Now is better than"],
     r"--new-tokens: the prompt 'Now is better than' has 18 characters, expected at most "
     r"max_len=32 - 18 = 14 new tokens, got 20"),
    (2, ["--tp", "2", "--new-tokens", "4", "--prompt", "Beautiful is €"],
     r"--prompt: expected characters from .*, got '€' at position 13"),
    (2, ["--tp", "2", "--new-tokens", "4", "--prompt", "a", "--prompt", "b", "--batch", "1"],
     r"--batch: expected at least the 2 prompts given, got 1"),
    (2, ["--tp", "2", "--new-tokens", "4", "--checkpoint", "no-such-folder"],
     r"--checkpoint: no checkpoint folder at 'no-such-folder'"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, args, match", BAD, ids=[b[2].split(":")[0] + str(i)
                                                          for i, b in enumerate(BAD)])
def test_bad_input_is_refused_before_any_collective(n_ranks, args, match, tmp_path):
    json_path = tmp_path / "result.json"
    with pytest.raises(MPIJobError) as info:
        run_mpi(MODULE, [*args, "--json", str(json_path)], n_ranks=n_ranks, timeout=60,
                json_result=False)
    assert not isinstance(info.value, MPITimeoutError), "a bad argument must not hang the job"
    assert re.search(match, str(info.value)), str(info.value)
    assert info.value.returncode == 2  # the program's own exit, on every rank
    assert "Traceback" not in info.value.stderr, info.value.stderr
    assert not json_path.exists()

