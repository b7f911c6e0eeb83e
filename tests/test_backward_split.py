"""The backward pass split into B (input gradient) and W (weight gradients), zero-bubble
pipelining's split (Qi et al. 2024): at every layer with weights B then W is the backward as it
was before the split, bit for bit, and W matches finite differences; for whole models the split
walk gives backward_pass's gradients exactly, whatever the recomputation, precision and
dropout, and W deferred over several micro-batches can run later in any order. What W keeps
alive is the cost model's formula, counted from the arrays."""

import dataclasses
import functools
import itertools

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from tfcourse.nn import attention, layers, model
from tfcourse.nn.precision import matmul
from tfcourse.perf import costmodel as cm

# ------------------------------------------------------- the backward before the split
# Copied from the code as it was before the split: the references B + W must equal bit for bit.


def old_linear_backward(dout, cache):
    x, w, has_bias, precision = cache
    dx = layers._matmul_2d(dout, w.T, precision)
    dout_2d = dout.reshape(-1, dout.shape[-1])
    dw = matmul(x.reshape(-1, x.shape[-1]).T, dout_2d, precision)
    db = dout_2d.sum(axis=0) if has_bias else None
    return dx, dw, db


def old_layernorm_backward(dout, cache):
    x_hat, rstd, gamma = cache
    d = x_hat.shape[-1]
    dgamma = (dout * x_hat).reshape(-1, d).sum(axis=0)
    dbeta = dout.reshape(-1, d).sum(axis=0)
    g = dout * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return dx, dgamma, dbeta


def old_ffn_backward(dout, cache):
    cache1, cache_act, cache2, activation = cache
    _, act_backward = layers.ACTIVATIONS[activation]
    dactivated, dw2, db2 = old_linear_backward(dout, cache2)
    dhidden = act_backward(dactivated, cache_act)
    dx, dw1, db1 = old_linear_backward(dhidden, cache1)
    grads = {"w1": dw1, "b1": db1, "w2": dw2}
    if db2 is not None:
        grads["b2"] = db2
    return dx, grads


def old_mha_backward(dout, cache):
    params, n_heads = cache["params"], cache["n_heads"]
    cache_q, cache_k, cache_v, cache_o = cache["linear"]
    grads = {}
    dconcat, grads["w_o"], grads["b_o"] = old_linear_backward(dout, cache_o)
    dq, dk, dv = attention.sdpa_backward(attention.split_heads(dconcat, n_heads), cache["attn"],
                                         check=False)
    dx_q, grads["w_q"], grads["b_q"] = old_linear_backward(attention.merge_heads(dq), cache_q)
    dx_k, grads["w_k"], grads["b_k"] = old_linear_backward(attention.merge_heads(dk), cache_k)
    dx_v, grads["w_v"], grads["b_v"] = old_linear_backward(attention.merge_heads(dv), cache_v)
    return dx_q, dx_k + dx_v, {n: grads[n] for n in attention.MHA_PARAM_NAMES if n in params}


def reachable_ids(obj) -> set[int]:
    """ids of the arrays inside nested tuples, lists and dicts."""
    if isinstance(obj, np.ndarray):
        return {id(obj)}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, tuple | list) else ()
    return set().union(*(reachable_ids(item) for item in items))


def assert_identical(a, b):
    """Same structure, same dict key order, same dtypes and bits."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_identical(u, v)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and np.array_equal(a, b)


RNG = np.random.default_rng(0)
PRECISIONS = [("float64", "fp32"), ("float32", "fp32"), ("float32", "bf16"), ("float32", "fp16")]


def arrays(*shapes, dtype="float64"):
    return [RNG.standard_normal(shape).astype(dtype) for shape in shapes]


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("dtype, precision", PRECISIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_b_then_w_is_the_old_backward(dtype, precision, bias):
    x, w, b = arrays((2, 5, 6), (6, 4), (4,), dtype=dtype)
    out, cache = layers.linear_forward(x, w, b if bias else None, precision)
    dout = arrays(out.shape, dtype=dtype)[0]
    dx = layers.linear_backward_input(dout, cache)
    dw, db = layers.linear_backward_weight(dout, cache)
    assert_identical((dx, dw, db), old_linear_backward(dout, cache))
    assert_identical(layers.linear_backward(dout, cache), (dx, dw, db))


def test_layernorm_b_then_w_is_the_old_backward():
    x, gamma, beta, dout = arrays((3, 4, 7), (7,), (7,), (3, 4, 7))
    _, cache = layers.layernorm_forward(x, gamma, beta)
    dx = layers.layernorm_backward_input(dout, cache)
    dgamma, dbeta = layers.layernorm_backward_weight(dout, cache)
    assert_identical((dx, dgamma, dbeta), old_layernorm_backward(dout, cache))
    assert_identical(layers.layernorm_backward(dout, cache), (dx, dgamma, dbeta))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype, precision", [("float64", "fp32"), ("float32", "bf16")])
def test_ffn_b_then_w_is_the_old_backward(activation, bias, dtype, precision):
    x, w1, b1, w2, b2 = arrays((2, 3, 6), (6, 10), (10,), (10, 6), (6,), dtype=dtype)
    out, cache = layers.ffn_forward(x, w1, b1, w2, b2 if bias else None, activation, precision)
    dout = arrays(out.shape, dtype=dtype)[0]
    dx, w_work = layers.ffn_backward_input(dout, cache)
    grads = layers.ffn_backward_weight(w_work)
    assert_identical((dx, grads), old_ffn_backward(dout, cache))
    assert_identical(layers.ffn_backward(dout, cache), (dx, grads))
    act_cache = cache[1] if activation == "gelu" else (cache[1],)
    assert not {id(a) for a in act_cache} & reachable_ids(w_work)  # W needs no activation cache


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("keep_weights", [True, False])
@pytest.mark.parametrize("output_bias", [True, False])
def test_mha_b_then_w_is_the_old_backward(cross, keep_weights, output_bias):
    params = attention.init_mha_params(8, 2, np.random.default_rng(3))
    if not output_bias:
        del params["b_o"]
    x_q, x_other = arrays((2, 5, 8), (2, 4, 8))
    x_kv = x_other if cross else x_q
    mask = attention.causal_mask(5)[:, : x_kv.shape[1]]
    out, cache = attention.mha_forward(x_q, x_kv, params, 2, mask, check=False,
                                       keep_weights=keep_weights)
    dout = arrays(out.shape)[0]
    dx_q, dx_kv, w_work = attention.mha_backward_input(dout, cache, check=False)
    grads = attention.mha_backward_weight(w_work)
    assert_identical((dx_q, dx_kv, grads), old_mha_backward(dout, cache))
    assert list(grads) == [n for n in attention.MHA_PARAM_NAMES if n in params]
    if output_bias:
        assert_identical(attention.mha_backward(dout, cache), (dx_q, dx_kv, grads))
    attn_cache = cache["attn"]
    assert not {id(attn_cache[n]) for n in ("weights", "q", "k", "v")} & reachable_ids(w_work)


def test_the_embedding_is_all_w():
    config = model.TransformerConfig(vocab_size=7, d_model=4, n_heads=2, max_len=5)
    params = model.init_params(config, 0)
    tokens = RNG.integers(0, 7, (2, 5))
    out, cache = model.embed_forward(params, tokens, config)
    dout = arrays(out.shape)[0]
    dids, w_work = model.embed_backward_input(dout, cache)
    assert dids is None
    assert_identical(model.embed_backward(dout, cache),
                     (None, model.embed_backward_weight(w_work)))


# ------------------------------------------------------------- W against finite differences


def weight_check(forward, weights: dict, weight_grads, names):
    """W's gradients of sum(G * forward(weights)) against central differences, float64."""
    out = forward(weights)[0]
    G = np.random.default_rng(5).standard_normal(out.shape)
    grads = weight_grads(G, forward(weights)[1])
    for name in names:
        def loss(value, name=name):
            return float(np.sum(G * forward({**weights, name: value})[0]))
        numeric = numerical_gradient(loss, weights[name])
        if np.abs(numeric).max() < 1e-8:  # attention's b_k: softmax ignores a shift of all keys
            assert np.abs(grads[name]).max() < 1e-12, name
        else:
            assert rel_error(grads[name], numeric) < 1e-7, name


def test_linear_w_matches_finite_differences():
    x, w, b = arrays((2, 3, 4), (4, 3), (3,))
    weight_check(lambda p: layers.linear_forward(x, p["w"], p["b"]), {"w": w, "b": b},
                 lambda G, c: dict(zip("wb", layers.linear_backward_weight(G, c), strict=True)),
                 "wb")


def test_layernorm_w_matches_finite_differences():
    x, gamma, beta = arrays((2, 3, 5), (5,), (5,))
    weight_check(lambda p: layers.layernorm_forward(x, p["gamma"], p["beta"]),
                 {"gamma": gamma, "beta": beta},
                 lambda G, c: dict(zip(("gamma", "beta"), layers.layernorm_backward_weight(G, c),
                                       strict=True)),
                 ("gamma", "beta"))


def test_ffn_w_matches_finite_differences():
    x, w1, b1, w2, b2 = arrays((2, 3, 4), (4, 6), (6,), (6, 4), (4,))
    weight_check(lambda p: layers.ffn_forward(x, p["w1"], p["b1"], p["w2"], p["b2"]),
                 {"w1": w1, "b1": b1, "w2": w2, "b2": b2},
                 lambda G, c: layers.ffn_backward_weight(layers.ffn_backward_input(G, c)[1]),
                 ("w1", "b1", "w2", "b2"))


def test_mha_w_matches_finite_differences():
    params = attention.init_mha_params(4, 2, np.random.default_rng(1))
    params = {k: v + 0.1 * RNG.standard_normal(v.shape) for k, v in params.items()}
    x_q, x_kv = arrays((2, 3, 4), (2, 4, 4))
    weight_check(lambda p: attention.mha_forward(x_q, x_kv, p, 2),
                 params,
                 lambda G, c: attention.mha_backward_weight(attention.mha_backward_input(G, c)[2]),
                 attention.MHA_PARAM_NAMES)


# --------------------------------------------------------------------------- the walk

CONFIGS = [model.preset("tiny", vocab_size=13, n_layers=3, max_len=8, dropout=dropout,
                        recompute=recompute, dtype=dtype, precision=precision)
           for recompute in model.RECOMPUTE for dropout in (0.0, 0.1)
           for dtype, precision in (("float64", "fp32"), ("float32", "bf16"))]


def walk(config, seed=0, rows=3, **part):
    """A forward walk of `config` (or part of it) on seeded inputs; returns (dout, caches)."""
    rng = np.random.default_rng(seed)
    params = model.init_params(config, 0)
    params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
              for k, v in params.items()}
    inputs = (rng.integers(0, config.vocab_size, (rows, config.max_len))
              if part.get("embed", True) else
              rng.standard_normal((rows, config.max_len, config.d_model)).astype(config.dtype))
    out, caches = model.forward_pass(params, inputs, config, rng=np.random.default_rng(seed + 1),
                                     **part)
    return rng.standard_normal(out.shape).astype(out.dtype), caches, params


def label(config):
    return f"{config.recompute}-dropout{config.dropout}-{config.precision}"


@pytest.mark.parametrize("config", CONFIGS, ids=label)
@pytest.mark.parametrize("part", [{}, {"layers": (1, 3), "embed": False}], ids=["all", "part"])
def test_the_split_walk_gives_backward_pass_s_gradients_exactly(config, part):
    dout, caches, _ = walk(config, **part)
    seen = []
    dx, grads = model.backward_pass(dout, caches, on_grads=seen.append)
    dout, caches, _ = walk(config, **part)  # the same again: the same dropout masks
    before, seen_split = [], []
    dx_split, deferred = model.backward_input_pass(dout, caches, before=before.append)
    assert [piece for *_, piece in deferred] == before == [p for *_, p in reversed(caches)]
    grads_split = model.weight_pass(deferred, on_grads=seen_split.append)
    assert_identical((dx_split, grads_split), (dx, grads))
    assert_identical(seen_split, seen)  # the same pieces, names in the same order
    assert model.weight_pass(deferred, keep=False) == {}


@pytest.mark.parametrize("recompute", model.RECOMPUTE)
def test_w_reads_no_parameter(recompute):
    """Between B and W the parameters may change (or be freed, as ZeRO-3 does): W reads
    activations and their gradients only."""
    config = model.preset("tiny", vocab_size=13, max_len=8, recompute=recompute)
    dout, caches, params = walk(config)
    _, expected = model.backward_pass(dout, caches)
    dout, caches, params = walk(config)
    _, deferred = model.backward_input_pass(dout, caches)
    for value in params.values():
        value.fill(np.nan)
    assert_identical(model.weight_pass(deferred), expected)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[-1]], ids=label)
def test_w_deferred_over_micro_batches_runs_in_any_order(config):
    """A zero-bubble stage: B of micro-batch 0, 1, 2 as they come, their W later, in any order
    and interleaved with the other B's. Each micro-batch's gradients are its backward_pass's
    bit for bit, so the sum in micro-batch order is too."""
    expected = [model.backward_pass(*walk(config, seed)[:2])[1] for seed in range(3)]
    total = {name: sum(g[name] for g in expected) for name in expected[0]}
    for order in itertools.permutations(range(3)):
        deferred, got = {}, [None] * 3
        for mb in range(3):  # B of every micro-batch, one W already between the B's
            deferred[mb] = model.backward_input_pass(*walk(config, mb)[:2])[1]
            if mb == 1:
                first = next(m for m in order if m in deferred)
                got[first] = model.weight_pass(deferred.pop(first))
        for mb in order:
            if mb in deferred:
                got[mb] = model.weight_pass(deferred.pop(mb))
        assert_identical(got, expected)
        summed = {name: sum(g[name] for g in got) for name in total}
        assert_identical(summed, total)


def test_two_stages_run_b_then_w_like_a_zero_bubble_pipeline():
    """Stage 1 (blocks 1-2 and the head) runs B and sends dx to stage 0 (embedding, block 0),
    which runs its B; both run their W afterwards: the serial model's gradients exactly."""
    config = CONFIGS[3]
    dout, caches, _ = walk(config)
    dx, serial = model.backward_pass(dout, caches)
    dout, caches, _ = walk(config)
    stage0, stage1 = caches[:2], caches[2:]
    dx1, w1 = model.backward_input_pass(dout, stage1)
    dx0, w0 = model.backward_input_pass(dx1, stage0)
    grads = {**model.weight_pass(w1), **model.weight_pass(w0)}
    assert dx0 is None is dx
    assert_identical({n: grads[n] for n in serial}, serial)


def test_a_callers_own_piece_runs_whole_in_b():
    """A backward the model does not know (pipeline_stage's gathering embedding) is not split:
    B runs it whole, W hands its gradients back - the same result, nothing deferred."""
    config = CONFIGS[0]
    dout, caches, _ = walk(config)
    expected = model.backward_pass(dout, caches)
    dout, caches, _ = walk(config)
    backward, cache, piece = caches[0]
    caches[0] = (functools.partial(model.embed_backward), cache, piece)
    dx, deferred = model.backward_input_pass(dout, caches)
    assert_identical((dx, model.weight_pass(deferred)), expected)
    assert model.backward_split(model.block_backward) == (model.block_backward_input,
                                                          model.block_backward_weight)


# --------------------------------------------------------------------------- memory


def kept_nbytes(obj, exclude_ids) -> int:
    """Bytes of the distinct float arrays reachable from obj (views counted once)."""
    seen = {}

    def visit(o):
        if isinstance(o, np.ndarray):
            base = o
            while base.base is not None:
                base = base.base
            if id(base) not in exclude_ids and base.dtype.kind == "f":
                seen[id(base)] = base.nbytes
        elif isinstance(o, tuple | list):
            for item in o:
                visit(item)
        elif isinstance(o, dict):
            for item in o.values():
                visit(item)

    visit(obj)
    return sum(seen.values())


@pytest.mark.parametrize("recompute", model.RECOMPUTE)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_what_w_keeps_alive_is_the_cost_model_s_formula(recompute, dropout, tp):
    from tfcourse.parallel.plans.tensor import shard_params

    config = model.TransformerConfig(vocab_size=13, d_model=16, n_heads=4, n_layers=2, d_ff=24,
                                     max_len=12, dtype="float32", dropout=dropout,
                                     recompute=recompute)
    B, T = 3, config.max_len
    params = model.init_params(config, 0)
    shard = shard_params(params, 0, tp) if tp > 1 else params  # one TP rank (f, g identity)
    x = RNG.standard_normal((B, T, config.d_model)).astype(np.float32)
    _, caches = model.forward_pass(shard, x, config, rng=np.random.default_rng(0),
                                   layers=(0, 1), embed=False, head=False)
    dy = np.ones_like(x)  # kept too: without dropout it is the FFN's output gradient
    _, [(_, w_work, _)] = model.backward_input_pass(dy, caches)
    measured = kept_nbytes(w_work, {id(v) for v in shard.values()})
    assert measured == cm.weight_work_bytes_per_layer(B, T, config.d_model, config.d_ff, 4,
                                                      tp=tp)
    with pytest.raises(ValueError, match="tp"):
        cm.weight_work_bytes_per_layer(B, T, 16, 24, tp=5)


def test_with_d_ff_4d_w_keeps_as_much_as_the_activations_without_the_attention_weights():
    B, T, d = 2, 16, 32
    without_weights = cm.activation_bytes_per_layer(B, T, d, 4, 4 * d, 4, recompute="selective")
    assert cm.weight_work_bytes_per_layer(B, T, d, 4 * d, 4) == without_weights - T * T  # mask


def test_the_split_leaves_the_model_config_alone():
    """No new config field: the split is a way to walk, not a mode."""
    fields = {f.name for f in dataclasses.fields(model.TransformerConfig)}
    assert not any("split" in f or "zero_bubble" in f for f in fields)
