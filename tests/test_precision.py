"""Mixed precision (issue 19): 16-bit rounding checked against an independent rule, loss
scaling's update rule, the 2 + 2 + 12 bytes counted from real arrays, the serial trainer in
bf16 and fp16, and data parallelism in mixed precision under real mpiexec."""

import dataclasses
import json

import numpy as np
import pytest

from tfcourse import checkpoint, train
from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn import model, optim, precision
from tfcourse.nn.layers import linear_backward, linear_forward
from tfcourse.perf import costmodel

RNG = np.random.default_rng(0)


def nearest_bf16(x: np.ndarray) -> np.ndarray:
    """Reference: of the two bfloat16 neighbours of each float32 (its bits truncated, and the
    next one away from zero), the nearer in float64 arithmetic; a tie goes to the one whose
    last kept bit is 0."""
    bits = x.astype(np.float32).view(np.uint32)
    low_bits = bits & np.uint32(0xFFFF0000)
    high_bits = low_bits + np.uint32(0x10000)
    low = low_bits.view(np.float32).astype(np.float64)
    high = high_bits.view(np.float32).astype(np.float64)
    exact = x.astype(np.float64)
    d_low, d_high = np.abs(exact - low), np.abs(high - exact)
    even_low = ((low_bits >> 16) & 1) == 0
    pick_low = (d_low < d_high) | ((d_low == d_high) & even_low)
    return np.where(pick_low, low, high).astype(np.float32)


def test_bf16_rounding_is_round_to_nearest_even():
    x = np.concatenate([RNG.standard_normal(20000) * 10.0 ** RNG.integers(-30, 30, 20000),
                        [1.0, -2.5, 3.0e38, 1e-40]]).astype(np.float32)
    np.testing.assert_array_equal(precision.round_bf16(x), nearest_bf16(x))
    # exact ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7, and rounds to the even 1
    tie_down = np.float32(1 + 2.0**-8)
    tie_up = np.float32(1 + 3 * 2.0**-8)  # halfway between 1 + 2^-7 (odd) and 1 + 2^-6
    assert precision.round_bf16(np.array([tie_down]))[0] == 1.0
    assert precision.round_bf16(np.array([tie_up]))[0] == 1 + 2.0**-6


def test_bf16_keeps_inf_and_nan_and_overflows_like_ieee():
    x = np.array([np.inf, -np.inf, np.nan, np.float32(3.4028235e38)], dtype=np.float32)
    out = precision.round_bf16(x)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert out[3] == np.inf  # float32's largest value is above bfloat16's largest, 3.39e38
    # a NaN with only low mantissa bits set must not turn into inf
    odd_nan = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(precision.round_bf16(odd_nan))[0]


def test_bf16_is_the_top_half_of_a_float32_and_has_8_significant_bits():
    x = RNG.standard_normal(1000).astype(np.float32)
    stored = precision.encode(x, "bf16")
    assert stored.dtype == np.uint16 and stored.nbytes == 2 * x.size
    back = precision.decode(stored, "bf16")
    np.testing.assert_array_equal(back, precision.round_bf16(x))
    assert np.max(np.abs(back - x) / np.abs(x)) <= 2.0**-8  # half a unit in the 8th bit


def test_fp16_range_and_underflow():
    r = precision.round_fp16
    assert r(np.float32(65504.0)) == 65504.0
    assert r(np.float32(65520.0)) == np.inf  # halfway to 65536: overflows (ties to even)
    assert r(np.float32(2.0**-24)) == 2.0**-24  # the smallest subnormal
    assert r(np.float32(2.0**-25)) == 0.0  # half of it: a tie, to even zero - underflow
    assert r(np.float32(1 + 2.0**-11)) == 1.0
    stored = precision.encode(np.array([1.5, -2.0]), "fp16")
    assert stored.dtype == np.float16 and stored.nbytes == 4


def test_matmul_rounds_inputs_and_result_and_sums_in_float32():
    a = RNG.standard_normal((16, 64)).astype(np.float32)
    b = RNG.standard_normal((64, 8)).astype(np.float32)
    for p in ("bf16", "fp16"):
        exact = (precision.to_grid(a, p).astype(np.float64)
                 @ precision.to_grid(b, p).astype(np.float64))
        got = precision.matmul(a, b, p)
        np.testing.assert_array_equal(got, precision.to_grid(got, p))  # on the 16-bit grid
        unit = 2.0**-8 if p == "bf16" else 2.0**-11  # half a unit in the last place
        assert np.all(np.abs(got - exact) <= unit * np.abs(exact) + 1e-6)
    np.testing.assert_array_equal(precision.matmul(a, b, "fp32"), a @ b)


def test_loss_scaling_saves_gradients_fp16_would_flush_to_zero():
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    w = RNG.standard_normal((8, 3)).astype(np.float32)
    dout = np.full((4, 3), 1e-8, dtype=np.float32)  # below fp16's smallest subnormal
    _, cache = linear_forward(x, w, precision="fp16")
    dx_unscaled, dw_unscaled, _ = linear_backward(dout, cache)
    assert not dx_unscaled.any() and not dw_unscaled.any()  # all lost
    scale = 2.0**16
    dx, dw, _ = linear_backward(dout * np.float32(scale), cache)
    reference = (dout.astype(np.float64) @ precision.round_fp16(w).T.astype(np.float64))
    np.testing.assert_allclose(dx / scale, reference, rtol=2.0**-10)
    assert np.all(dw != 0)


def test_loss_scale_update_rule():
    state = optim.loss_scale_init(2.0**16)
    state, apply = optim.loss_scale_update(state, finite=False)
    assert not apply and state["scale"] == 2.0**15
    for _ in range(2):
        state, apply = optim.loss_scale_update(state, finite=True, growth_interval=3)
        assert apply and state["scale"] == 2.0**15
    state, apply = optim.loss_scale_update(state, finite=True, growth_interval=3)
    assert apply and state["scale"] == 2.0**16 and state["good_steps"] == 0
    with pytest.raises(FloatingPointError, match="4 steps in a row"):
        for _ in range(4):
            state, _ = optim.loss_scale_update(state, finite=False, max_skips=4)


def tiny(p: str) -> model.TransformerConfig:
    return model.preset("tiny", 40, dtype="float32", precision=p)


def batch(config):
    rng = np.random.default_rng(1)
    x = rng.integers(0, config.vocab_size, (4, 16))
    return x, np.roll(x, -1, axis=1)


def test_16_bit_gradients_are_close_to_float32_and_scale_exactly():
    x, y = batch(tiny("fp32"))
    params = model.init_params(tiny("fp32"), 0)
    _, g32 = model.loss_and_grads(params, x, y, tiny("fp32"))
    for p, tolerance in (("bf16", 0.05), ("fp16", 0.01)):
        half = train.half_weights(params, p)[1]
        _, g16 = model.loss_and_grads(half, x, y, tiny(p))
        for name in g32:
            if name.endswith("attn.b_k"):  # exactly 0 in theory (softmax ignores a shift)
                continue
            error = np.linalg.norm(g16[name] - g32[name]) / np.linalg.norm(g32[name])
            assert error < tolerance, (p, name, error)
        # a power-of-two loss scale changes no bit of a bf16 gradient (no underflow there)
        if p == "bf16":
            _, scaled = model.loss_and_grads(half, x, y, tiny(p), loss_scale=2.0**10)
            for name in g16:
                np.testing.assert_array_equal(scaled[name], g16[name] * 2.0**10)


def test_state_bytes_are_2_plus_2_plus_12_per_parameter_from_the_arrays():
    config = tiny("bf16")
    master = model.init_params(config, 0)
    n = model.count_params(master)
    x, y = batch(config)
    weights16, compute = train.half_weights(master, "bf16")
    _, grads = model.loss_and_grads(compute, x, y, config)
    opt_state = optim.adamw_init(master)
    settings = train.TrainSettings(steps=1)
    master2, opt_state, _, grads16, applied = train.mixed_precision_update(
        master, grads, opt_state, None, settings, 0, "bf16")
    assert applied
    counted = precision.state_bytes(master2, opt_state, weights16, grads16)
    assert counted == {"parameters": 2 * n, "gradients": 2 * n,
                       "optimizer (master, m, v)": 12 * n}
    assert counted == costmodel.training_state_bytes(n, 2, mixed_precision=True)
    assert all(w.dtype.itemsize == 2 for w in weights16.values())
    assert all(p.dtype == np.float32 for p in master2.values())


def test_an_overflowing_fp16_step_is_skipped_and_halves_the_scale():
    config = tiny("fp16")
    master = model.init_params(config, 0)
    grads = {name: np.ones_like(p) for name, p in master.items()}
    grads["head.b"][0] = 1e6  # beyond 65504: inf in fp16
    opt_state = optim.adamw_init(master)
    scale = optim.loss_scale_init(2.0**16)
    new, new_state, scale, _, applied = train.mixed_precision_update(
        master, grads, opt_state, scale, train.TrainSettings(steps=1), 0, "fp16")
    assert not applied and scale["scale"] == 2.0**15
    assert new is master and new_state is opt_state
    with pytest.raises(FloatingPointError, match="gradients: expected finite bf16"):
        train.mixed_precision_update(master, {n: g * np.inf for n, g in grads.items()},
                                     opt_state, None, train.TrainSettings(steps=1), 0, "bf16")


def test_the_three_precisions_train_to_the_same_loss():
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=60)
    results = {p: train.train_lm(model.preset("tiny", corpus.vocab.size, dtype="float32",
                                              precision=p), corpus, settings, progress="none")
               for p in precision.PRECISIONS}
    final = {p: r["losses"][-1] for p, r in results.items()}
    assert final["fp32"] < results["fp32"]["unigram_baseline"] - 0.3  # it learns
    for p in ("bf16", "fp16"):
        assert abs(final[p] - final["fp32"]) < 0.02, final
        assert results[p]["losses"] != results["fp32"]["losses"]  # really another arithmetic
    assert results["fp16"]["loss_scales"][0] == 2.0**16 and "loss_scales" not in results["bf16"]


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp8"], "--precision: expected one of"),
    (["--precision", "bf16", "--dtype", "float64"], "--dtype: mixed precision keeps float32"),
])
def test_bad_precision_arguments_are_refused_by_name(argv, message, tmp_path):
    args = train.parse_args(argv)
    with pytest.raises(ValueError, match=message):
        train.training_setup(args, precision.PRECISIONS)
    with pytest.raises(ValueError, match="dtype: mixed precision"):
        model.preset("tiny", 40, precision="bf16")  # float64 by default


def fp16_resume_case():
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size, dtype="float32", precision="fp16",
                          n_layers=2)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=110, batch_size=6)
    return corpus, config, settings


def test_an_fp16_run_resumed_anywhere_is_the_uninterrupted_run_bit_for_bit(tmp_path,
                                                                          monkeypatch):
    """The loss scale is saved with every checkpoint and resumed: started at 2^20 (the test's
    choice, not the library's 2^16), the first three steps overflow fp16 and are skipped, the
    scale halving each time; after 100 good steps it doubles. Runs resumed in the middle of
    the skips (step 2) and of the good-step count (step 50) take every step the same way."""
    monkeypatch.setattr(train, "loss_scale_init", lambda: optim.loss_scale_init(2.0**20))
    corpus, config, settings = fp16_resume_case()
    folder = tmp_path / "ck"
    whole = train.train_lm(config, corpus, settings, str(folder), checkpoint_every=1,
                           progress="none", keep=settings.steps)
    scales = whole["loss_scales"]
    assert scales[:4] == [2.0**20, 2.0**19, 2.0**18, 2.0**17]
    assert whole["skipped_steps"] == 3 and scales[102] == 2.0**17 and scales[103] == 2.0**18
    for step in range(1, settings.steps + 1):  # each checkpoint holds the state after it
        saved = checkpoint.read_manifest(checkpoint.step_folder(folder, step))["loss_scale"]
        assert saved["scale"] == (scales + [whole["loss_scale"]["scale"]])[step]
    assert checkpoint.read_manifest(checkpoint.step_folder(folder, 2))["loss_scale"] == {
        "scale": 2.0**18, "good_steps": 0, "skipped_in_a_row": 2}
    for at in (2, 50):
        resumed = train.train_lm(config, corpus, settings,
                                 resume_from=str(checkpoint.step_folder(folder, at)),
                                 progress="none")
        assert resumed["losses"] == whole["losses"]  # exactly, the saved ones included
        assert resumed["loss_scales"] == scales[at:]
        assert resumed["loss_scale"] == whole["loss_scale"]
        assert resumed["skipped_steps"] == (1 if at == 2 else 0)
        for name, value in whole["params"].items():
            np.testing.assert_array_equal(resumed["params"][name], value)


CLI = ["--steps", "4", "--batch-size", "6", "--layers", "1", "--progress", "none"]


def cli_checkpoint(tmp_path, name: str, precision: str, *flags: str) -> str:
    """A folder of checkpoints after steps 2 and 4 of the command line in `precision`."""
    folder = str(tmp_path / name)
    assert train.main([*CLI, "--precision", precision, "--checkpoint", folder,
                       "--checkpoint-every", "2", *flags]) == 0
    return folder


def edit_manifest(folder: str, step: int, change) -> str:
    """Rewrite the manifest of `step` in `folder` (as an older or damaged version would have
    written it); returns that step folder."""
    path = checkpoint.step_folder(folder, step) / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return str(path.parent)


@pytest.mark.parametrize("p", ["fp32", "bf16", "fp16"])
def test_the_command_line_resumes_every_precision_exactly(p, tmp_path):
    whole = cli_checkpoint(tmp_path, "ck", p, "--json", str(tmp_path / "whole.json"))
    step2 = checkpoint.step_folder(whole, 2)
    out = tmp_path / "resumed.json"
    assert train.main([*CLI, "--precision", p, "--resume", str(step2), "--json", str(out)]) == 0
    expected = json.loads((tmp_path / "whole.json").read_text())
    got = json.loads(out.read_text())
    assert got["losses"] == expected["losses"]
    assert got.get("loss_scale") == expected.get("loss_scale")
    assert ("loss_scale" in checkpoint.read_manifest(step2)) == (p == "fp16")


def test_a_checkpoint_without_a_loss_scale_resumes_in_fp32_and_bf16_but_not_fp16(tmp_path):
    """Checkpoints written before the loss scale was saved: fp32 and bf16 ones (even older
    fp32 ones, whose config had no precision) continue; an fp16 one cannot continue exactly
    and is refused, naming --resume."""
    old32 = edit_manifest(cli_checkpoint(tmp_path, "ck32", "fp32"), 2,
                          lambda m: m["config"].pop("precision"))
    assert train.main([*CLI, "--resume", old32]) == 0
    assert train.main([*CLI, "--precision", "bf16", "--resume",
                       str(checkpoint.step_folder(cli_checkpoint(tmp_path, "ck16b", "bf16"),
                                                  2))]) == 0
    old16 = edit_manifest(cli_checkpoint(tmp_path, "ck16", "fp16"), 2,
                          lambda m: m.pop("loss_scale"))
    args = train.parse_args([*CLI, "--precision", "fp16", "--resume", old16])
    with pytest.raises(ValueError, match=r"--resume: the checkpoint in .* holds no fp16 loss "
                                         r"scale .* start a new run without --resume"):
        train.training_setup(args, precision.PRECISIONS)


@pytest.mark.parametrize("saved, asked, message", [
    ("fp32", ["fp16"], r"trained with --precision fp32, this run asks for --precision fp16: "
                       r"resume it with --precision fp32 --dtype float64, or start a new run"),
    ("bf16", ["fp16"], r"trained with --precision bf16, this run asks for --precision fp16: "
                       r"resume it with --precision bf16, or"),
    ("fp16", ["bf16"], r"trained with --precision fp16, this run asks for --precision bf16"),
    ("fp16", ["fp32"], r"--precision fp16 --dtype float32, or"),
    ("fp16", ["fp32", "--dtype", "float32"], r"asks for --precision fp32: resume it with "
                                             r"--precision fp16, or"),
])
def test_a_checkpoint_resumes_only_in_its_own_precision(saved, asked, message, tmp_path):
    """Continuing the same master weights in another precision would be a third run, equal
    to neither uninterrupted one: refused, naming the --precision (and --dtype) to use."""
    folder = cli_checkpoint(tmp_path, "ck", saved)
    args = train.parse_args([*CLI, "--precision", *asked, "--resume", folder])
    with pytest.raises(ValueError, match="--resume: .*" + message):
        train.training_setup(args, precision.PRECISIONS)


@pytest.mark.parametrize("entry", [
    {"scale": -1.0, "good_steps": 0, "skipped_in_a_row": 0},
    {"scale": float("inf"), "good_steps": 0, "skipped_in_a_row": 0},
    {"scale": 1024.0, "good_steps": 1.5, "skipped_in_a_row": 0},
    {"scale": 1024.0, "good_steps": 0},
    {"scale": True, "good_steps": 0, "skipped_in_a_row": 0},
    [1024.0, 0, 0],
])
def test_a_damaged_loss_scale_is_refused_by_name(entry, tmp_path):
    folder = edit_manifest(cli_checkpoint(tmp_path, "ck", "fp16"), 2,
                           lambda m: m.update(loss_scale=entry))
    args = train.parse_args([*CLI, "--precision", "fp16", "--resume", folder])
    with pytest.raises(ValueError, match=r"--resume: .* has loss scale .* expected \{'scale'"):
        train.training_setup(args, precision.PRECISIONS)


def test_a_manifest_holds_a_loss_scale_exactly_in_fp16():
    corpus, config, settings = fp16_resume_case()
    with pytest.raises(ValueError, match="loss_scale: expected the loss-scale state with"):
        train.checkpoint_manifest(1, [3.0], config, settings, {}, [])
    with pytest.raises(ValueError, match="loss_scale: expected"):
        train.checkpoint_manifest(1, [3.0], dataclasses.replace(config, precision="bf16"),
                                  settings, {}, [], optim.loss_scale_init())


def test_programs_without_mixed_precision_refuse_it():
    args = train.parse_args(["--precision", "bf16"])
    with pytest.raises(ValueError, match="--precision: this program trains in fp32"):
        train.training_setup(args)


STEPS, BATCH = 6, 6


@pytest.fixture(scope="module")
def serial_mixed():
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS, batch_size=BATCH)
    return {p: train.train_lm(model.preset("tiny", corpus.vocab.size, dtype="float32",
                                           precision=p), corpus, settings,
                              progress="none")["losses"] for p in precision.PRECISIONS}


@pytest.mark.mpi
@pytest.mark.parametrize("p", ["bf16", "fp16"])
@pytest.mark.parametrize("n_ranks", [1, 2, 3])
def test_data_parallel_mixed_precision_matches_serial(p, n_ranks, serial_mixed):
    result = run_mpi("tfcourse.parallel.data_parallel",
                     ["--steps", str(STEPS), "--batch-size", str(BATCH), "--precision", p],
                     n_ranks=n_ranks, timeout=120).result
    losses, serial = np.array(result["losses"]), np.array(serial_mixed[p])
    if n_ranks == 1:
        np.testing.assert_array_equal(losses, serial)
    else:  # each rank rounds its own partial gradient sums to 16 bits before they are added
        gap = np.max(np.abs(losses - serial))
        assert 0 < gap < 1e-3
    assert result["memory_bytes"][0] == result["predicted_memory_bytes"]
    state = result["memory_bytes"][0]  # 12 bytes of optimizer state per 2 of weights
    assert state["optimizer (master, m, v)"] == 6 * state["parameters"] == 6 * state["gradients"]


@pytest.mark.mpi
def test_data_parallel_refuses_mixed_precision_with_zero_before_any_collective():
    with pytest.raises(MPIJobError, match="--zero: mixed precision runs with ZeRO-0"):
        run_mpi("tfcourse.parallel.data_parallel",
                ["--steps", "1", "--precision", "bf16", "--zero", "1"], n_ranks=2, timeout=60)
