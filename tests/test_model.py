"""The decoder-only LM and the encoder-decoder model: whole-model gradient checks against
central finite differences, causality, determinism and input validation."""

import dataclasses

import numpy as np
import pytest
from gradcheck import rel_error

from tfcourse.nn import model, seq2seq

LM_CONFIG = model.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2, d_ff=12,
                                    max_len=6)
S2S_CONFIG = seq2seq.Seq2SeqConfig(vocab_size=9, d_model=8, n_heads=2, n_enc_layers=2,
                                   n_dec_layers=2, d_ff=12, max_len=8)


def jiggled(params, seed=1):
    """Init has zero biases and unit gains; perturb so every gradient path is exercised."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}


def finite_difference_check(loss_fn, params, grads, n_entries=4, eps=1e-5, seed=0):
    """Compare grads with central differences on `n_entries` random entries of every tensor.

    Returns {name: relative error over the sampled entries}. A gradient that is exactly zero
    (attention's key bias b_k: adding one vector to every key shifts each query's scores by a
    constant, which softmax ignores) is rounding noise on both sides and is compared in
    absolute terms."""
    rng = np.random.default_rng(seed)
    errors = {}
    for name, value in params.items():
        flat_idx = rng.choice(value.size, size=min(n_entries, value.size), replace=False)
        numeric, analytic = [], []
        for flat in flat_idx:
            idx = np.unravel_index(flat, value.shape)
            bumped = []
            for sign in (+1, -1):
                changed = value.copy()
                changed[idx] += sign * eps
                bumped.append(loss_fn({**params, name: changed}))
            numeric.append((bumped[0] - bumped[1]) / (2 * eps))
            analytic.append(grads[name][idx])
        numeric, analytic = np.array(numeric), np.array(analytic)
        if max(np.abs(numeric).max(), np.abs(analytic).max()) < 1e-8:
            errors[name] = float(np.abs(numeric - analytic).max())  # both are rounding noise
        else:
            errors[name] = rel_error(numeric, analytic)
    return errors


def test_lm_whole_model_gradient_check():
    rng = np.random.default_rng(2)
    params = jiggled(model.init_params(LM_CONFIG, 0))
    tokens = rng.integers(0, 11, (2, 5))
    targets = rng.integers(0, 11, (2, 5))
    targets[0, 1] = -1  # an ignored (padding) position

    def loss_fn(p):
        return model.loss_and_grads(p, tokens, targets, LM_CONFIG, ignore_index=-1)[0]

    _, grads = model.loss_and_grads(params, tokens, targets, LM_CONFIG, ignore_index=-1)
    assert list(grads) == list(params)
    errors = finite_difference_check(loss_fn, params, grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def test_seq2seq_whole_model_gradient_check():
    rng = np.random.default_rng(3)
    params = jiggled(seq2seq.init_params(S2S_CONFIG, 0))
    src = rng.integers(3, 9, (2, 5))
    src[1, 3:] = seq2seq.PAD_ID
    tgt_in = rng.integers(3, 9, (2, 4))
    tgt_in[:, 0] = seq2seq.BOS_ID
    tgt_out = rng.integers(3, 9, (2, 4))
    tgt_out[1, 2:] = seq2seq.PAD_ID

    def loss_fn(p):
        return seq2seq.loss_and_grads(p, src, tgt_in, tgt_out, S2S_CONFIG)[0]

    _, grads = seq2seq.loss_and_grads(params, src, tgt_in, tgt_out, S2S_CONFIG)
    assert list(grads) == list(params)
    errors = finite_difference_check(loss_fn, params, grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def test_seq2seq_ignores_padding_in_source():
    """Changing a padded source token must not change the decoder's output."""
    params = jiggled(seq2seq.init_params(S2S_CONFIG, 0))
    src = np.array([[4, 5, 6, 0, 0]])
    tgt_in = np.array([[1, 4, 5]])
    other = src.copy()
    other[0, 3] = 7  # a real token where there was padding...
    base = seq2seq.forward(params, src, tgt_in, S2S_CONFIG)
    masked_other = seq2seq.forward(params, np.where(src == 0, 0, other), tgt_in, S2S_CONFIG)
    np.testing.assert_array_equal(base, masked_other)
    assert not np.allclose(base, seq2seq.forward(params, other, tgt_in, S2S_CONFIG))


def test_lm_is_causal():
    """Logits at position t depend only on tokens 0..t."""
    params = jiggled(model.init_params(LM_CONFIG, 0))
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    changed = tokens.copy()
    changed[0, 4] = 9
    a, b = model.forward(params, tokens, LM_CONFIG), model.forward(params, changed, LM_CONFIG)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_loss_is_cross_entropy_of_forward_logits():
    params = model.init_params(LM_CONFIG, 0)
    rng = np.random.default_rng(4)
    tokens, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))
    logits = model.forward(params, tokens, LM_CONFIG)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, targets[..., None], -1))
    loss, _ = model.loss_and_grads(params, tokens, targets, LM_CONFIG)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert loss == pytest.approx(np.log(11), rel=0.05)  # small init: near-uniform predictions


def test_same_seed_same_params_different_seed_different_params():
    a, b, c = (model.init_params(LM_CONFIG, s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["tok_emb"], c["tok_emb"])


def test_param_names_and_count():
    params = model.init_params(LM_CONFIG, 0)
    assert "blocks.0.attn.w_q" in params and "blocks.1.ffn.w2" in params
    d, V, f, T, L = 8, 11, 12, 6, 2
    per_block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attn + ffn + two LayerNorms
    assert model.count_params(params) == V * d + T * d + L * per_block + 2 * d + d * V + V


def test_float32_model_runs_in_float32_and_agrees_with_float64():
    cfg32 = dataclasses.replace(LM_CONFIG, dtype="float32")
    p64 = model.init_params(LM_CONFIG, 0)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    tokens = np.array([[1, 2, 3, 4]])
    logits32 = model.forward(p32, tokens, cfg32)
    assert logits32.dtype == np.float32
    np.testing.assert_allclose(logits32, model.forward(p64, tokens, LM_CONFIG), atol=1e-5)
    _, grads = model.loss_and_grads(p32, tokens, tokens, cfg32)
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


def test_dropout_needs_rng_and_is_reproducible():
    cfg = dataclasses.replace(LM_CONFIG, dropout=0.3)
    params, tokens = model.init_params(cfg, 0), np.array([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="rng"):
        model.loss_and_grads(params, tokens, tokens, cfg)
    runs = [model.loss_and_grads(params, tokens, tokens, cfg, rng=np.random.default_rng(5))[0]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != model.loss_and_grads(params, tokens, tokens, LM_CONFIG)[0]


def test_generate_greedy_is_deterministic_and_sampling_is_seeded():
    params = jiggled(model.init_params(LM_CONFIG, 0))
    greedy = model.generate(params, [1, 2], 8, LM_CONFIG)
    assert len(greedy) == 10 and np.array_equal(greedy, model.generate(params, [1, 2], 8,
                                                                        LM_CONFIG))
    s1 = model.generate(params, [1], 8, LM_CONFIG, temperature=1.0, seed=3)
    s2 = model.generate(params, [1], 8, LM_CONFIG, temperature=1.0, seed=3)
    assert np.array_equal(s1, s2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=10, n_heads=4), "d_model"),
    (dict(n_layers=0), "n_layers"),
    (dict(dtype="float16"), "dtype"),
    (dict(activation="swish"), "activation"),
    (dict(dropout=1.0), "dropout"),
    (dict(max_len=2.5), "max_len"),
])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.TransformerConfig(vocab_size=11, **kwargs)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="config: expected one of"):
        model.preset("huge", vocab_size=10)


@pytest.mark.parametrize("tokens, match", [
    (np.array([[1, 11]]), r"tokens: expected ids in \[0, 11\)"),
    (np.array([[-1, 2]]), "tokens: expected ids"),
    (np.ones((1, 7), dtype=np.int64), "exceeds max_len=6"),
    (np.ones((1, 3)), "integer token ids"),
    (np.ones(3, dtype=np.int64), r"\(B, T\)"),
])
def test_bad_tokens_are_named(tokens, match):
    with pytest.raises(ValueError, match=match):
        model.forward(model.init_params(LM_CONFIG, 0), tokens, LM_CONFIG)


def test_params_of_wrong_dtype_or_shape_are_named():
    params = model.init_params(LM_CONFIG, 0)
    tokens = np.array([[1, 2]])
    with pytest.raises(ValueError, match=r"params\['head.w'\]: expected dtype float64"):
        model.forward({**params, "head.w": params["head.w"].astype(np.float32)}, tokens,
                      LM_CONFIG)
    with pytest.raises(ValueError, match=r"params\['tok_emb'\]: expected shape"):
        model.forward({**params, "tok_emb": params["tok_emb"][:5]}, tokens, LM_CONFIG)
    with pytest.raises(ValueError, match="missing"):
        model.forward({k: v for k, v in params.items() if k != "ln_f.beta"}, tokens, LM_CONFIG)


def test_targets_shape_must_match_tokens():
    with pytest.raises(ValueError, match="targets: expected shape"):
        model.loss_and_grads(model.init_params(LM_CONFIG, 0), np.ones((2, 3), np.int64),
                             np.ones((2, 4), np.int64), LM_CONFIG)
