"""Inference (issue 22): the KV cache gives the tokens that recomputing the context gives
(greedy and sampled, past max_len where the window slides), a batch of prompts of different
lengths gives each prompt's own generation, the FLOPs per new token counted from the real
matmuls are the cost model's O(T d) against O(T^2 d), and the cache holds 2 L d values per
token."""

import numpy as np
import pytest

from tfcourse.nn import model
from tfcourse.perf import costmodel

CONFIG = model.preset("tiny", 11, max_len=16)
PARAMS = model.init_params(CONFIG, 0)


def trained_like_params(seed=1, scale=0.5):
    """Larger weights than init: sharper logits, so greedy decoding does not repeat one token
    and the comparisons below cover many different tokens."""
    rng = np.random.default_rng(seed)
    return {n: v + scale * rng.standard_normal(v.shape) for n, v in PARAMS.items()}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prompt_len, n_new", [(1, 5), (5, 11), (3, 30), (20, 4)])
def test_cached_generation_equals_recomputing(temperature, prompt_len, n_new):
    """(3, 30) and (20, 4) pass max_len = 16: the window slides and the cache is refilled."""
    params = trained_like_params()
    prompt = np.arange(prompt_len) % 11
    cached = model.generate(params, prompt, n_new, CONFIG, temperature, seed=4)
    again = model.generate(params, prompt, n_new, CONFIG, temperature, seed=4, kv_cache=False)
    np.testing.assert_array_equal(cached, again)
    assert len(cached) == prompt_len + n_new
    assert temperature == 0 or len(set(cached[prompt_len:].tolist())) > 1  # not one token


def test_the_cache_is_what_recomputing_computes():
    """decode's logits for every position equal the full forward pass's."""
    params = trained_like_params()
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = model.forward(params, tokens, CONFIG)
    cache = model.empty_kv_cache(params, CONFIG, 1)
    prefill = model.decode(params, tokens[:, :5], cache, CONFIG)
    steps = [model.decode(params, tokens[:, t:t + 1], cache, CONFIG) for t in range(5, 8)]
    np.testing.assert_allclose(np.concatenate([prefill, *steps], axis=1), full, atol=1e-12)
    assert cache.lengths.tolist() == [8]
    with pytest.raises(ValueError, match=r"tokens: the cache holds 8 positions, expected at "
                                         r"most max_len=16 with the 9 new ones"):
        model.decode(params, np.zeros((1, 9), dtype=np.int64), cache, CONFIG)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_batch_of_prompts_of_different_lengths_equals_each_alone(temperature):
    params = trained_like_params()
    prompts = [np.array([1, 2, 3, 4, 5, 6]), np.array([7]), np.array([2, 9, 9])]
    batch = model.generate_batch(params, prompts, 7, CONFIG, temperature, seed=2)
    for prompt, got in zip(prompts, batch, strict=True):
        np.testing.assert_array_equal(
            got, model.generate(params, prompt, 7, CONFIG, temperature, seed=2))


def test_generate_batch_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"n_new: the longest prompt has 6 tokens, expected at "
                                         r"most max_len=16 - 6 = 10 new ones, got 11"):
        model.generate_batch(PARAMS, [np.arange(6), np.arange(2)], 11, CONFIG)
    with pytest.raises(ValueError, match=r"prompts: expected a non-empty list"):
        model.generate_batch(PARAMS, [], 1, CONFIG)
    with pytest.raises(ValueError, match=r"temperature: expected >= 0, got -1"):
        model.generate_batch(PARAMS, [np.arange(2)], 1, CONFIG, temperature=-1)


def test_flops_per_new_token_counted_from_the_matmuls():
    """A new token with the cache costs one position's matmuls against T cached keys; without
    it, the whole context again - the cost model's two formulas, checked against the
    FlopCounter's count of every matmul the model runs."""
    big = model.preset("tiny", 11, max_len=64)
    params = model.init_params(big, 0)
    shape = (big.vocab_size, big.d_model, big.n_layers, big.d_ff)
    for context in (8, 32, 64):
        cache = model.empty_kv_cache(params, big, 1)
        model.decode(params, np.zeros((1, context - 1), dtype=np.int64), cache, big)
        cached, _ = costmodel.count_matmul_flops(
            model.decode, params, np.zeros((1, 1), dtype=np.int64), cache, big)
        assert cached == costmodel.generation_flops_per_token(*shape, context)
        full, _ = costmodel.count_matmul_flops(model.forward, params,
                                               np.zeros((1, context), dtype=np.int64), big)
        assert full == costmodel.generation_flops_per_token(*shape, context, kv_cache=False)
    # by hand at T = 64: 2N = 2 (2 (4 d^2 + 2 d d_ff) + d V) and 4 L d T for attention
    n = 2 * (4 * 32 * 32 + 2 * 32 * 128) + 32 * 11
    assert costmodel.generation_flops_per_token(*shape, 64) == 2 * n + 4 * 2 * 32 * 64


def test_the_cache_holds_2_L_d_values_per_token():
    cache = model.empty_kv_cache(PARAMS, CONFIG, 3)
    model.decode(PARAMS, np.zeros((3, 5), dtype=np.int64), cache, CONFIG)
    model.decode(PARAMS, np.zeros((3, 1), dtype=np.int64), cache, CONFIG)
    assert cache.nbytes == costmodel.kv_cache_bytes(2, 32, 8, tokens=6, batch=3) \
        == 2 * 2 * 32 * 8 * 18
    assert cache.keys[0].shape == (3, 4, 16, 8)  # (B, heads, max_len, d_head)


def test_decode_arithmetic_intensity_and_the_memory_bound_batch_by_hand():
    assert costmodel.decode_arithmetic_intensity(1, 4) == 0.5
    assert costmodel.decode_arithmetic_intensity(16, 2) == 16.0
    # a ridge of 100 FLOPs per byte with 4-byte weights: 2 B / 4 = 100 at B = 200
    assert costmodel.memory_bound_batch(100e9, 1e9, 4) == 200.0
