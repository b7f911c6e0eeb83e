"""Cost model against hand-derived numbers and against the FLOPs the NumPy model performs."""

import dataclasses

import numpy as np
import pytest

from tfcourse.nn import model
from tfcourse.perf import costmodel as cm

CONFIGS = [
    model.TransformerConfig(vocab_size=13, d_model=16, n_heads=4, n_layers=2, d_ff=24,
                            max_len=12, dtype="float32"),
    model.TransformerConfig(vocab_size=7, d_model=8, n_heads=2, n_layers=3, d_ff=8, max_len=5),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_param_count_matches_the_model(config):
    params = model.init_params(config, 0)
    d, f, V, L, T = config.d_model, config.d_ff, config.vocab_size, config.n_layers, config.max_len
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d  # attention, FFN, 2 LayerNorms
    by_hand = V * d + T * d + L * block + 2 * d + d * V + V
    assert model.count_params(params) == by_hand
    assert cm.lm_params(config.vocab_size, config.d_model, config.n_layers, config.d_ff,
                        config.max_len) == model.count_params(params)
    matrices = sum(v.size for k, v in params.items() if v.ndim == 2 and "emb" not in k)
    assert cm.matmul_params(config.vocab_size, config.d_model, config.n_layers,
                            config.d_ff) == matrices


def test_training_flops_is_6n_plus_attention_term():
    V, d, L, f, T = 50, 64, 3, 256, 40
    n = L * (4 * d * d + 2 * d * f) + d * V
    assert cm.training_flops_per_token(V, d, L, f, T) == 6 * n + 12 * L * d * T
    # full recomputation runs the blocks' forward (2 N_blocks + 4 L d T) once more, not the head's
    blocks = L * (4 * d * d + 2 * d * f)
    assert cm.training_flops_per_token(V, d, L, f, T, recompute="full") == (
        8 * blocks + 6 * d * V + 16 * L * d * T)
    # selective recomputation runs only the attention scores QK^T again: 2 d T per layer
    assert cm.training_flops_per_token(V, d, L, f, T, recompute="selective") == (
        6 * n + 12 * L * d * T + 2 * L * d * T)
    with pytest.raises(ValueError, match="recompute: expected one of"):
        cm.training_flops_per_token(V, d, L, f, T, recompute=True)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_recomputed_flops_are_the_ones_the_model_runs(recompute):
    config = dataclasses.replace(CONFIGS[0], recompute=recompute)
    B, T = 3, config.max_len
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T))
    params = model.init_params(config, 0)
    counted, _ = cm.count_matmul_flops(model.loss_and_grads, params, tokens, tokens, config)
    assert counted == B * T * cm.training_flops_per_token(
        config.vocab_size, config.d_model, config.n_layers, config.d_ff, T, recompute)


@pytest.mark.parametrize("config", CONFIGS)
def test_closed_form_equals_counted_matmuls_of_the_numpy_model(config):
    B, T = 3, config.max_len
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T))
    params = model.init_params(config, 0)
    args = (config.vocab_size, config.d_model, config.n_layers, config.d_ff, T)
    fwd, logits = cm.count_matmul_flops(model.forward, params, tokens, config)
    assert fwd == B * T * sum(cm.forward_flops_per_token(*args).values())
    total, (loss, _) = cm.count_matmul_flops(model.loss_and_grads, params, tokens, tokens, config)
    assert total == B * T * cm.training_flops_per_token(*args)
    # counting does not change the numbers
    np.testing.assert_array_equal(np.asarray(logits), model.forward(params, tokens, config))
    assert loss == model.loss_and_grads(params, tokens, tokens, config)[0]


def test_flop_counter_single_and_batched_matmul():
    a, b = np.ones((2, 3, 4)), np.ones((4, 5))
    flops, _ = cm.count_matmul_flops(lambda x, y: x @ y, a, b)
    assert flops == 2 * 3 * 5 * (2 * 4)  # two (3x4)@(4x5) products


def _cached_arrays_nbytes(cache, exclude_ids):
    seen = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            base = obj
            while base.base is not None:
                base = base.base
            if id(base) not in exclude_ids and base.dtype.kind == "f":
                seen[id(base)] = base.nbytes
        elif isinstance(obj, tuple | list):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    walk(cache)
    return sum(seen.values())


@pytest.mark.parametrize("config", CONFIGS)
def test_activation_memory_matches_what_a_block_stores(config):
    B, T = 3, config.max_len
    params = model.init_params(config, 0)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (B, T))
    x, _ = model.embed_forward(params, tokens, config)
    _, cache = model.block_forward(params, 0, x, config)
    measured = _cached_arrays_nbytes(cache, {id(v) for v in params.values()})
    itemsize = np.dtype(config.dtype).itemsize
    assert measured == cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads,
                                                     config.d_ff, itemsize)


def test_collective_bytes_by_hand():
    assert cm.allreduce_bytes(100, 4) == 150
    assert cm.allgather_bytes(100, 4) == 75 == cm.reduce_scatter_bytes(100, 4)
    assert cm.allreduce_bytes(100, 1) == 0


def test_ring_allreduce_time_model():
    assert cm.ring_allreduce_time(1e6, 1, 1e-5, 1e-9) == 0.0
    assert cm.ring_allreduce_time(1e6, 4, 1e-5, 1e-9) == pytest.approx(6e-5 + 1.5e6 * 1e-9)


def test_fit_alpha_beta_never_returns_a_negative_latency():
    sizes = np.array([1e3, 1e4, 1e5, 1e6])
    seconds = np.array([0.5e-6, 1e-5, 1e-4, 1e-3])  # a fitted line would cross below 0
    assert np.polyfit(sizes, seconds, 1, w=1 / seconds)[1] < 0
    alpha, beta = cm.fit_alpha_beta(sizes, seconds)
    assert alpha == 0.0
    # through the origin, beta minimises sum((1 - beta x / y)^2): check it is a minimum
    def loss(b):
        return float(np.sum((1 - b * sizes / seconds) ** 2))
    assert loss(beta) < min(loss(beta * 1.01), loss(beta * 0.99))


def test_fit_alpha_beta_finds_the_latency_under_large_message_noise():
    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    exact = 20e-6 + sizes / 5e9  # 20 us latency, 5 GB/s
    noisy = exact * np.array([1.0, 1.0, 1.0, 1.05, 0.95])  # 5% noise on the large messages
    alpha, beta = cm.fit_alpha_beta(sizes, noisy)
    assert alpha == pytest.approx(20e-6, rel=0.1)
    plain_alpha = np.polyfit(sizes, noisy, 1)[1]  # what a plain least-squares line makes of it
    assert abs(plain_alpha - 20e-6) > 0.2 * 20e-6


@pytest.mark.parametrize("p", [2, 3, 4])
def test_fit_ring_links_recovers_the_per_message_latency(p):
    sizes = np.array([2.0**k for k in range(10, 25)])
    alpha, beta = 15e-6, 1 / 5e9
    ring = 2 * (p - 1) * alpha + 2 * (p - 1) / p * sizes * beta  # the ring's alpha-beta model
    fitted = cm.fit_ring_links(sizes, ring, p)
    assert fitted == pytest.approx((alpha, beta), rel=1e-6)
    with pytest.raises(ValueError, match="p"):
        cm.fit_ring_links(sizes, ring, 1)


def test_fit_alpha_beta_recovers_known_line():
    sizes = np.array([1e3, 1e4, 1e5, 1e6])
    alpha, beta = cm.fit_alpha_beta(sizes, 2e-6 + 3e-10 * sizes)
    assert alpha == pytest.approx(2e-6, rel=1e-6) and beta == pytest.approx(3e-10, rel=1e-9)
    with pytest.raises(ValueError, match="message_bytes"):
        cm.fit_alpha_beta([1.0], [1.0])


def test_amdahl_and_gustafson():
    assert cm.amdahl_speedup(0.0, 8) == pytest.approx(8)
    assert cm.amdahl_speedup(1.0, 8) == pytest.approx(1)
    assert cm.amdahl_speedup(0.1, 10) == pytest.approx(1 / (0.1 + 0.09))
    assert cm.gustafson_speedup(0.1, 10) == pytest.approx(9.1)
    with pytest.raises(ValueError, match="serial_fraction"):
        cm.amdahl_speedup(1.5, 2)


def test_zero_memory_by_hand():
    n, p = 1000, 4  # fp32: 4 kB params, 4 kB grads, 8 kB Adam state
    totals = [sum(cm.zero_state_bytes_per_rank(n, p, s).values()) for s in range(4)]
    assert totals == [16000, 4000 + 4000 + 2000, 4000 + 1000 + 2000, 4000]
    with pytest.raises(ValueError, match="stage"):
        cm.zero_state_bytes_per_rank(n, p, 4)


def test_mixed_precision_zero_shards_12_14_and_16_of_16_bytes():
    # the ZeRO paper (Rajbhandari et al. 2020, section 5): 2 + 2 + K bytes per parameter with
    # K = 12 (fp32 master copy, m, v); per rank (2 + 2 + K/Nd), (2 + (2 + K)/Nd), (2 + 2 + K)/Nd
    n, p = 1000, 4
    full = cm.training_state_bytes(n, 2, mixed_precision=True)
    assert sum(full.values()) == 16 * n
    per_param = [sum(cm.zero_state_bytes_per_rank(n, p, s, 2, True).values()) / n
                 for s in range(4)]
    assert per_param == [16, 2 + 2 + 12 / p, 2 + 14 / p, 16 / p]
    # the paper's example: 7.5B parameters on 64 GPUs, 120 GB -> 31.4 / 16.6 / 1.9 GB
    gb = [sum(cm.zero_state_bytes_per_rank(7.5e9, 64, s, 2, True).values()) / 1e9
          for s in range(4)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]


def _tp_shard_cache_bytes(config, tp):
    from tfcourse.parallel.plans.tensor import shard_params

    B, T = 2, config.max_len
    params = model.init_params(config, 0)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (B, T))
    x, _ = model.embed_forward(params, tokens, config)
    shard = shard_params(params, 0, tp)
    _, cache = model.block_forward(shard, 0, x, config)  # one TP rank's block (f, g = identity)
    return B, T, _cached_arrays_nbytes(cache, {id(v) for v in shard.values()})


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_activation_memory_matches_a_shard_block(tp):
    config = CONFIGS[0]
    B, T, measured = _tp_shard_cache_bytes(config, tp)
    predicted = cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads, config.d_ff,
                                              4, tp=tp)
    assert measured == predicted
    # the LayerNorms' part does not shrink: 1/tp of the whole would underestimate it
    whole = cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads, config.d_ff, 4)
    assert predicted > whole / tp
    with pytest.raises(ValueError, match="tp"):
        cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads, config.d_ff, 4, tp=3)


def test_pipeline_bubble_and_tensor_parallel_traffic():
    assert cm.pipeline_bubble_fraction(4, 1) == pytest.approx(0.75)
    assert cm.pipeline_bubble_fraction(4, 13) == pytest.approx(3 / 16)
    assert cm.tensor_parallel_allreduce_bytes(2, 8, 16, 3, 4) == 4 * 3 * 2 * 8 * 16 * 4


def test_mfu_and_training_days():
    assert cm.mfu(1000.0, 6e6, 12e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        cm.mfu(1.0, 1.0, 0.0)
    # GPT-3: 175e9 params, 300e9 tokens, 1024 GPUs at 312 TFLOP/s and 50% -> about 23 days
    days = cm.training_days(175e9, 300e9, 1024, 312e12, 0.5)
    assert days == pytest.approx(6 * 175e9 * 300e9 / (1024 * 312e12 * 0.5) / 86400)
    assert 22 < days < 24
    # Narayanan et al. 2021, section 5.1: GPT-3 on 1024 A100s at 140 teraFLOP/s per GPU,
    # 8 T P / (n X) "approximately 34 days"
    megatron = cm.training_days(175e9, 300e9, 1024, 140e12, 1.0, flops_per_param=8)
    assert round(megatron) == 34


def _sp_shard_cache_bytes(config, tp, recompute="none"):
    """One sequence-parallel rank's block: its slice of the positions in, and stand-ins for
    the collectives that produce the shapes the real ones do (gather: all T positions;
    scatter: this rank's T/tp)."""
    from tfcourse.parallel.plans.tensor import shard_params

    B, T = 2, config.max_len
    config = dataclasses.replace(config, recompute=recompute)
    params = model.init_params(config, 0)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (B, T))
    x, _ = model.embed_forward(params, tokens, config)
    gather = model.Operator(forward=lambda a: np.concatenate([a] * tp, axis=1),
                            backward=lambda a: a[:, : T // tp].copy())
    scatter = model.Operator(forward=lambda a: a[:, : T // tp].copy(),
                             backward=lambda a: np.concatenate([a] * tp, axis=1))
    shard = shard_params(params, 0, tp)
    ops = model.SublayerOps(enter=gather, exit=scatter)
    caches = model.forward_pass(shard, x[:, : T // tp].copy(), config, ops=ops, embed=False,
                                head=False)[1]
    return B, T, _cached_arrays_nbytes(caches[0][1], {id(v) for v in shard.values()})


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_sequence_parallel_activation_memory_matches_a_shard_block(tp, recompute):
    config = dataclasses.replace(CONFIGS[0], max_len=8)
    B, T, measured = _sp_shard_cache_bytes(config, tp, recompute)
    predicted = cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads, config.d_ff,
                                              4, tp=tp, recompute=recompute,
                                              sequence_parallel=True)
    assert measured == predicted
    plain = cm.activation_bytes_per_layer(B, T, config.d_model, config.n_heads, config.d_ff, 4,
                                          tp=tp, recompute=recompute)
    assert predicted < plain
    with pytest.raises(ValueError, match="seq_len: expected a multiple of tp=4"):
        cm.activation_bytes_per_layer(2, 6, 16, 4, 24, 4, tp=4, sequence_parallel=True)


def test_tensor_parallel_bytes_sent_by_hand():
    n = 2 * 8 * 16 * 4  # one (B, T, d) float32 array
    # 3 layers x 4 all-reduces x 2 (p - 1)/p n, p = 4
    assert cm.tensor_parallel_bytes_sent(2, 8, 16, 3, 4) == 3 * 4 * 2 * 3 / 4 * n
    # sequence parallelism: the same, plus one all-gather of the embedding's gradient
    assert cm.tensor_parallel_bytes_sent(2, 8, 16, 3, 4, sequence_parallel=True) == (
        3 * 4 * 2 * 3 / 4 * n + 3 / 4 * n)
    assert cm.tensor_parallel_bytes_sent(2, 8, 16, 3, 1, sequence_parallel=True) == 0


def test_zero_bytes_sent_by_hand():
    n, p = 1000, 4  # 1000 float32 parameters on 4 ranks: a ring moves 3/4 of 4000 bytes a pass
    one_pass = 3 / 4 * 4000
    assert [cm.zero_bytes_sent_per_step(n, p, s) for s in range(4)] == [
        2 * one_pass, 3 * one_pass, 2 * one_pass, 3 * one_pass]
    assert cm.zero_bytes_sent_per_step(n, 1, 3) == 0
    with pytest.raises(ValueError, match="stage: expected 0, 1, 2 or 3"):
        cm.zero_bytes_sent_per_step(n, p, 4)
