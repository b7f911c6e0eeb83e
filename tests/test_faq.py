"""Chapter 14 (FAQ): the RNN, the sweeps and the counts, against hand computations."""

import math

import numpy as np
import pytest

from tfcourse.nn import model
from tfcourse.nn.attention import causal_mask, init_mha_params, mha_forward
from tfcourse.perf import costmodel, faq


def rnn_case(batch=2, length=5, d=4, seed=0):
    params = faq.rnn_init(d, seed, dtype=np.float64)
    x = np.random.default_rng(seed + 1).standard_normal((batch, length, d))
    return x, params


def test_rnn_init_shapes_dtype_and_seed():
    params = faq.rnn_init(6, 3)
    assert {k: v.shape for k, v in params.items()} == {"w_xh": (6, 6), "w_hh": (6, 6),
                                                       "b": (6,)}
    assert all(v.dtype == np.float32 for v in params.values())
    again = faq.rnn_init(6, 3)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["w_hh"], faq.rnn_init(6, 4)["w_hh"])


def test_rnn_forward_matches_two_steps_unrolled_by_hand():
    x, p = rnn_case(length=2)
    p["b"] = np.arange(4) / 10.0
    h0 = np.tanh(x[:, 0] @ p["w_xh"] + p["b"])  # h_{-1} = 0
    h1 = np.tanh(x[:, 1] @ p["w_xh"] + h0 @ p["w_hh"] + p["b"])
    h = faq.rnn_forward(x, **p)
    assert h.shape == (2, 2, 4)
    np.testing.assert_allclose(h[:, 0], h0, rtol=1e-12)
    np.testing.assert_allclose(h[:, 1], h1, rtol=1e-12)


def test_rnn_keeps_float32_and_allows_a_different_input_width():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    w_xh = rng.standard_normal((5, 2)).astype(np.float32)
    h = faq.rnn_forward(x, w_xh, np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    assert h.shape == (3, 4, 2) and h.dtype == np.float32


def test_rnn_is_sequential_information_flows_forward_only():
    x, p = rnn_case(length=8)
    h = faq.rnn_forward(x, **p)
    first = x.copy()
    first[:, 0] += 1.0
    assert not np.allclose(faq.rnn_forward(first, **p)[:, -1], h[:, -1])
    last = x.copy()
    last[:, -1] += 1.0
    changed = faq.rnn_forward(last, **p)
    np.testing.assert_array_equal(changed[:, :-1], h[:, :-1])


def test_causal_attention_output_at_position_0_ignores_the_last_position():
    rng = np.random.default_rng(0)
    params = init_mha_params(8, 2, rng)
    x = rng.standard_normal((2, 6, 8))
    out, _ = mha_forward(x, x, params, 2, causal_mask(6))
    x2 = x.copy()
    x2[:, -1] += 1.0
    out2, _ = mha_forward(x2, x2, params, 2, causal_mask(6))
    np.testing.assert_array_equal(out2[:, :-1], out[:, :-1])
    assert not np.allclose(out2[:, -1], out[:, -1])


@pytest.mark.parametrize("batch, length, d", [(1, 1, 1), (2, 5, 4), (3, 7, 8)])
def test_flop_formulas_equal_the_counted_matmuls(batch, length, d):
    x, p = rnn_case(batch, length, d)
    counted, _ = costmodel.count_matmul_flops(faq.rnn_forward, x, **p)
    assert counted == faq.rnn_flops(batch, length, d) == 4 * batch * length * d * d
    heads = 2 if d % 2 == 0 else 1
    params = init_mha_params(d, heads, np.random.default_rng(0))
    counted, _ = costmodel.count_matmul_flops(mha_forward, x, x, params, heads,
                                              causal_mask(length))
    assert counted == faq.attention_flops(batch, length, d)


def test_sequential_steps():
    assert [faq.sequential_steps("rnn", t) for t in (1, 16, 512)] == [2, 17, 513]
    assert [faq.sequential_steps("attention", t) for t in (1, 16, 512)] == [4, 4, 4]


def test_sequence_length_sweep_shapes_and_counts():
    r = faq.sequence_length_sweep([3, 8], d_model=8, batch=2, n_heads=2, repeats=1)
    assert r["T"] == [3, 8]
    for key in ("rnn_s", "attention_s"):
        assert len(r[key]) == 2 and all(t > 0 for t in r[key])
    assert r["rnn_steps"] == [4, 9] and r["attention_steps"] == [4, 4]
    assert r["rnn_flops"] == [4 * 2 * 3 * 64, 4 * 2 * 8 * 64]
    assert r["attention_flops"] == [8 * 2 * 3 * 64 + 4 * 2 * 9 * 8, 8 * 2 * 8 * 64 + 4 * 2 * 64 * 8]


def test_time_layer_returns_the_median_of_repeats():
    calls = []
    assert faq.time_layer(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_dependency_path_length_by_hand():
    assert faq.dependency_path_length("rnn", 512) == 511
    assert faq.dependency_path_length("attention", 512) == 1
    assert faq.dependency_path_length("attention", 1) == 0
    assert faq.dependency_path_length("conv", 512, kernel_size=3) == 256  # 511 / 2, rounded up
    assert faq.dependency_path_length("conv", 9, kernel_size=3) == 4  # receptive field 1+2*4
    assert faq.dependency_path_length("conv", 10, kernel_size=5) == 3  # ceil(9 / 4)
    assert faq.dependency_path_length("conv", 1, kernel_size=2) == 0


def test_generation_runs_one_forward_pass_per_new_token():
    config = model.preset("tiny", vocab_size=11)
    params = model.init_params(config, seed=0)
    assert faq.generation_forward_calls(params, [1, 2, 3], 5, config) == 5
    assert faq.generation_forward_calls(params, [1], 0, config) == 0


def test_model_size_table_uses_the_cost_model_and_gpt3_has_175_billion_parameters():
    rows = {r["name"]: r for r in faq.model_size_table()}
    gpt3 = rows["GPT-3 175B"]
    # counted as the paper does: the head tied to the token embedding (untied: 0.6B more)
    assert gpt3["params"] == costmodel.lm_params(50257, 12288, 96, 49152, 2048, tied_head=True)
    assert 174.5e9 < gpt3["params"] < 174.7e9
    assert gpt3["state_bytes"] == 16 * gpt3["params"]
    assert rows["course 'small'"]["params"] == costmodel.lm_params(48, 128, 4, 512, 128)
    small = faq.model_size_table({"m": (10, 8, 2, 2, 32, 4, False)}, batch=3)[0]
    assert small["flops_per_token"] == costmodel.training_flops_per_token(10, 8, 2, 32, 4)
    assert small["activation_bytes"] == 2 * costmodel.activation_bytes_per_layer(3, 4, 8, 2, 32)
    assert [r["params"] for r in rows.values()] == sorted(r["params"] for r in rows.values())


def test_attention_overtakes_the_mlp_at_t_equal_to_d_ff():
    assert faq.attention_mlp_flops(100, 64, 256) == (4 * 100 * 64, 4 * 64 * 256)
    for d in (64, 768):
        attn, mlp = faq.attention_mlp_flops(4 * d, d, 4 * d)
        assert attn == mlp
        attn, mlp = faq.attention_mlp_flops(4 * d - 1, d, 4 * d)
        assert attn < mlp


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batch_split_gradients_equal_the_full_batch(world_size):
    config = model.preset("tiny", vocab_size=13)
    params = model.init_params(config, seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 13, (2, 7, 6))  # batch 7 does not split evenly over 2 or 3
    loss, grads = model.loss_and_grads(params, x, y, config)
    split_loss, split = faq.data_parallel_grads(params, x, y, config, world_size)
    assert math.isclose(split_loss, loss, rel_tol=1e-12)
    for name in params:
        np.testing.assert_allclose(split[name], grads[name], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("call, name", [
    (lambda: faq.sequence_length_sweep([]), "lengths"),
    (lambda: faq.sequence_length_sweep([16, 0]), "lengths"),
    (lambda: faq.sequence_length_sweep([16, -4]), "lengths"),
    (lambda: faq.sequence_length_sweep([16], d_model=0), "d_model"),
    (lambda: faq.sequence_length_sweep([16], batch=2.0), "batch"),
    (lambda: faq.time_layer(lambda: None, repeats=0), "repeats"),
    (lambda: faq.rnn_init(0, 0), "d"),
    (lambda: faq.rnn_init(4, -1), "seed"),
    (lambda: faq.rnn_forward(np.zeros((2, 4)), *faq.rnn_init(4, 0).values()), "x"),
    (lambda: faq.rnn_forward(np.zeros((1, 2, 3)), *faq.rnn_init(4, 0).values()), "w_xh"),
    (lambda: faq.rnn_forward(np.zeros((1, 2, 4)), np.zeros((4, 4)), np.zeros((3, 3)),
                             np.zeros(4)), "w_hh"),
    (lambda: faq.rnn_forward(np.full((1, 2, 4), np.nan), *faq.rnn_init(4, 0).values()), "x"),
    (lambda: faq.sequential_steps("cnn", 4), "kind"),
    (lambda: faq.sequential_steps("rnn", 0), "seq_len"),
    (lambda: faq.dependency_path_length("lstm", 4), "kind"),
    (lambda: faq.dependency_path_length("rnn", 0), "seq_len"),
    (lambda: faq.dependency_path_length("conv", 8, kernel_size=1), "kernel_size"),
    (lambda: faq.model_size_table({}), "sizes"),
    (lambda: faq.model_size_table(batch=0), "batch"),
    (lambda: faq.data_parallel_grads({}, np.zeros((2, 3)), np.zeros((2, 3)), None, 0),
     "world_size"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()


def _layers_until_the_ends_connect(seq_len, kernel_size, dilated):
    """Brute force: stack causal conv layers (layer l taps positions p - j * dilation_l) and
    count them until position seq_len - 1 depends on position 0."""
    reach = [{p} for p in range(seq_len)]  # input positions each position depends on
    layers = 0
    while 0 not in reach[-1]:
        dilation = kernel_size ** layers if dilated else 1
        reach = [set().union(*(reach[p - j * dilation] for j in range(kernel_size)
                               if p - j * dilation >= 0)) for p in range(seq_len)]
        layers += 1
    return layers


@pytest.mark.parametrize("seq_len,kernel_size", [(512, 2), (512, 3), (100, 2), (28, 3), (2, 2),
                                                 (1, 2), (9, 3)])
def test_convolution_depths_match_a_brute_force_receptive_field(seq_len, kernel_size):
    for kind, dilated in (("conv", False), ("dilated conv", True)):
        assert faq.dependency_path_length(kind, seq_len, kernel_size) == (
            _layers_until_the_ends_connect(seq_len, kernel_size, dilated)), kind


def test_dilated_convolutions_connect_512_tokens_in_9_layers_not_256():
    """The Transformer paper's Table 1: O(log_k n) for dilated convolutions, O(n / k) plain."""
    assert faq.dependency_path_length("dilated conv", 512, kernel_size=2) == 9
    assert faq.dependency_path_length("conv", 512, kernel_size=3) == 256


@pytest.mark.parametrize("name,published", [("GPT-2 small", 124_439_808),
                                            ("GPT-2 XL", 1_557_611_200)])
def test_tied_parameter_counts_equal_the_published_gpt2_sizes(name, published):
    vocab, d, layers, _, d_ff, max_len, tied = faq.MODEL_SIZES[name]
    assert tied
    assert costmodel.lm_params(vocab, d, layers, d_ff, max_len, tied_head=True) == published
    untied = costmodel.lm_params(vocab, d, layers, d_ff, max_len)
    assert untied - published == d * vocab + vocab  # the course's own head and its bias


@pytest.mark.parametrize("name,digits,billions", [("GPT-3 6.7B", 1, 6.7), ("GPT-3 175B", 0, 175)])
def test_tied_parameter_counts_round_to_the_published_gpt3_names(name, digits, billions):
    """GPT-3's sizes are names rounded from the count (6.66B is "6.7B", 174.6B is "175B")."""
    vocab, d, layers, _, d_ff, max_len, tied = faq.MODEL_SIZES[name]
    assert tied
    n = costmodel.lm_params(vocab, d, layers, d_ff, max_len, tied_head=True)
    assert round(n / 1e9, digits) == billions
