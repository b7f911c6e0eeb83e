"""The mixture-of-experts layer (issue 21 item 3): its backward against central finite
differences, its routing, capacity and load-balancing loss on hand-computed cases, the model
with MoE blocks (gradients, the B/W split, recomputation, loss scaling) and the serial
trainer learning with it.

Routing is piecewise constant: a finite difference across a change of routing (two
probabilities swapping order, a token taking another's slot) measures a jump, not a
derivative. The gradient checks therefore use inputs whose k-th and (k+1)-th router
probabilities are at least MARGIN apart for every token - far more than an eps = 1e-6 nudge
can close - and assert it; capacity then cannot change either, since which choices are kept
depends only on the (unchanged) order of the choices.
"""

import argparse
import dataclasses
import math

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from tfcourse import train
from tfcourse.nn import layers, model
from tfcourse.perf import costmodel

MARGIN = 1e-3


def expert_params(d, f, n_experts, seed=0, router=None):
    rng = np.random.default_rng(seed)
    params = {"router.w": rng.standard_normal((d, n_experts)) if router is None else router}
    for e in range(n_experts):
        params.update({f"experts.{e}.w1": rng.standard_normal((d, f)),
                       f"experts.{e}.b1": rng.standard_normal(f),
                       f"experts.{e}.w2": rng.standard_normal((f, d)),
                       f"experts.{e}.b2": rng.standard_normal(d)})
    return params


def routing_margin(routing: layers.Routing) -> float:
    """The smallest gap, over tokens, between the k-th and the (k+1)-th router probability
    (and between the first and second: the load-balancing loss's f uses the first choice)."""
    ordered = -np.sort(-routing.probs, axis=1)
    k = routing.experts.shape[1]
    gaps = [ordered[:, k - 1] - ordered[:, k]] if k < ordered.shape[1] else []
    return float(np.min([*gaps, ordered[:, 0] - ordered[:, 1]]))


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_gradient_check_with_dropped_tokens(top_k):
    d, f, n_experts, n_tokens, daux = 4, 5, 3, 7, 0.3
    params = expert_params(d, f, n_experts)
    rng = np.random.default_rng(top_k)
    x = rng.standard_normal((1, n_tokens, d))
    dout = rng.standard_normal((1, n_tokens, d))

    def loss(x_, p_):
        y, aux, _ = layers.moe_forward(x_, p_, top_k, 0.8)
        return float((y * dout).sum() + daux * aux)

    _, _, cache = layers.moe_forward(x, params, top_k, 0.8)
    assert routing_margin(cache.routing) > MARGIN  # away from ties (module docstring)
    assert cache.routing.dropped > 0  # the capacity cut is exercised
    dx, grads = layers.moe_backward(dout, cache, daux)
    assert rel_error(dx, numerical_gradient(lambda v: loss(v, params), x)) < 1e-7
    assert list(grads) == list(params)
    for name, value in params.items():
        numeric = numerical_gradient(lambda v, n=name: loss(x, {**params, n: v}), value)
        assert rel_error(grads[name], numeric) < 1e-7, name


def test_moe_backward_is_b_then_w_bit_for_bit():
    params = expert_params(4, 6, 4, seed=3)
    x = np.random.default_rng(4).standard_normal((2, 5, 4))
    dout = np.random.default_rng(5).standard_normal((2, 5, 4))
    _, _, cache = layers.moe_forward(x, params, 2, 1.0)
    dx, grads = layers.moe_backward(dout, cache, 0.1)
    dx_b, w_work = layers.moe_backward_input(dout, cache, 0.1)
    assert np.array_equal(dx, dx_b)
    split = layers.moe_backward_weight(w_work)
    assert list(split) == list(grads)
    assert all(np.array_equal(split[n], grads[n]) for n in grads)


def hand_router_case():
    """Two experts, router = identity, so the logits are x itself: tokens 0, 1 and 3 prefer
    expert 0, token 2 expert 1. Capacity factor 1: ceil(1 * 4 * 1 / 2) = 2 slots."""
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.5, 0.0]])
    params = expert_params(2, 3, 2, router=np.eye(2))
    return x, params


def test_top1_routing_capacity_and_aux_loss_by_hand():
    x, params = hand_router_case()
    y, aux, cache = layers.moe_forward(x, params, 1, 1.0)
    r = cache.routing
    assert r.capacity == 2
    assert r.experts[:, 0].tolist() == [0, 0, 1, 0]
    assert r.kept[:, 0].tolist() == [True, True, True, False]  # token 3: expert 0 is full
    assert r.routed.tolist() == [3, 1] and r.tokens_per_expert.tolist() == [2, 1]
    assert r.dropped == 1
    # p0 of logits (a, b) is 1 / (1 + e^(b - a)); Switch's gate is the probability itself
    p0 = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2)), 1 / (1 + math.e),
          1 / (1 + math.exp(-1.5))]
    assert r.gates[:, 0] == pytest.approx([p0[0], p0[1], 1 - p0[2], p0[3]])
    # aux = E sum_e f_e P_e with f = (3/4, 1/4) and P_e the mean probability
    P0 = sum(p0) / 4
    assert aux == pytest.approx(2 * (0.75 * P0 + 0.25 * (1 - P0))) == r.aux_loss
    assert np.array_equal(y[3], np.zeros(2))  # dropped: zero output, the residual carries it
    ffn = [params[f"experts.0.{n}"] for n in ("w1", "b1", "w2", "b2")]
    assert y[0] == pytest.approx(p0[0] * layers.ffn_forward(x[:1], *ffn)[0][0])


def test_a_dropped_token_gets_no_expert_gradient():
    x, params = hand_router_case()
    _, _, cache = layers.moe_forward(x, params, 1, 1.0)
    dout = np.zeros_like(x)
    dout[3] = [1.0, -2.0]  # only the dropped token's output has a gradient
    dx, grads = layers.moe_backward(dout, cache)
    assert not dx.any()
    assert not any(g.any() for g in grads.values())


def test_ties_go_to_the_lower_expert_and_top2_gates_are_renormalised():
    # a zero router: every probability is 1/4, so every token's choices are experts 0 and 1
    params = expert_params(3, 2, 4, router=np.zeros((3, 4)))
    x = np.random.default_rng(0).standard_normal((4, 3))
    _, aux, cache = layers.moe_forward(x, params, 2, 1.0)
    r = cache.routing
    assert r.experts.tolist() == [[0, 1]] * 4
    assert np.array_equal(r.gates, np.full((4, 2), 0.5))  # 0.25 / (0.25 + 0.25)
    assert r.capacity == 2  # ceil(1 * 4 tokens * 2 / 4)
    assert r.kept.tolist() == [[True, True]] * 2 + [[False, False]] * 2
    assert r.dropped == 4 and r.tokens_per_expert.tolist() == [2, 2, 0, 0]
    assert aux == pytest.approx(1.0)  # 4 * (f = (1, 0, 0, 0)) . (P = 1/4 each)


def test_first_choices_claim_slots_before_second_choices():
    # token 0 prefers expert 1 then 0, token 1 expert 0 then 1; one slot each
    params = expert_params(2, 2, 2, router=np.eye(2))
    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    _, _, cache = layers.moe_forward(x, params, 2, 0.5)
    r = cache.routing
    assert r.capacity == 1
    assert r.experts.tolist() == [[1, 0], [0, 1]]
    assert r.kept.tolist() == [[True, False], [True, False]]  # token 0 comes first, yet its
    assert r.dropped == 2  # second choice (expert 0) lost to token 1's first


def test_capacity_formula():
    assert layers.moe_capacity(10, 1, 1, 1.1) == 11  # not 12 from 1.1 * 10 = 11.000000000000002
    assert layers.moe_capacity(512, 4, 2, 1.25) == 320
    assert layers.moe_capacity(7, 3, 1, 0.8) == 2  # ceil(1.866...)


# --------------------------------------------------------------------------- in the model

MOE_CONFIG = model.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2, d_ff=12,
                                     max_len=6, n_experts=3, top_k=2, capacity_factor=0.75,
                                     moe_every=1, aux_loss_weight=0.1)


def moe_case():
    rng = np.random.default_rng(1)
    params = {k: v + 0.3 * rng.standard_normal(v.shape)
              for k, v in model.init_params(MOE_CONFIG, 0).items()}
    return params, rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))


def test_model_with_moe_blocks_gradient_check():
    params, tokens, targets = moe_case()
    loss, grads, routing = model.loss_and_grads(params, tokens, targets, MOE_CONFIG,
                                                return_routing=True)
    assert list(routing) == ["blocks.0", "blocks.1"]
    assert all(routing_margin(r) > MARGIN for r in routing.values())
    assert all(r.dropped > 0 for r in routing.values())
    eps, rng = 1e-6, np.random.default_rng(0)
    for name, value in params.items():
        picks = rng.choice(value.size, size=min(4, value.size), replace=False)
        numeric, analytic = [], []
        for flat in picks:
            idx = np.unravel_index(flat, value.shape)
            bumped = []
            for sign in (1, -1):
                changed = value.copy()
                changed[idx] += sign * eps
                bumped.append(model.loss_and_grads({**params, name: changed}, tokens, targets,
                                                   MOE_CONFIG)[0])
            numeric.append((bumped[0] - bumped[1]) / (2 * eps))
            analytic.append(grads[name][idx])
        numeric, analytic = np.array(numeric), np.array(analytic)
        if max(np.abs(numeric).max(), np.abs(analytic).max()) < 1e-8:  # attn.b_k: exactly 0
            assert np.abs(numeric - analytic).max() < 1e-8, name
        else:
            assert rel_error(numeric, analytic) < 1e-5, name


def test_the_loss_adds_the_weighted_aux_loss():
    params, tokens, targets = moe_case()
    loss, _, routing = model.loss_and_grads(params, tokens, targets, MOE_CONFIG,
                                            return_routing=True)
    logits = model.forward(params, tokens, MOE_CONFIG)
    cross_entropy, _ = layers.cross_entropy_forward(logits, targets)
    aux = sum(r.aux_loss for r in routing.values())
    assert loss == pytest.approx(cross_entropy + 0.1 * aux, abs=1e-12)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_gives_the_same_bits_and_routing(recompute):
    params, tokens, targets = moe_case()
    loss, grads, routing = model.loss_and_grads(params, tokens, targets, MOE_CONFIG,
                                                return_routing=True)
    config = dataclasses.replace(MOE_CONFIG, recompute=recompute)
    loss2, grads2, routing2 = model.loss_and_grads(params, tokens, targets, config,
                                                   return_routing=True)
    assert loss2 == loss and all(np.array_equal(grads[n], grads2[n]) for n in grads)
    assert list(routing2) == list(routing)
    assert all(routing2[p].tokens_per_expert.tolist() == routing[p].tokens_per_expert.tolist()
               and routing2[p].aux_loss == routing[p].aux_loss for p in routing)


def test_split_walk_equals_backward_pass_and_loss_scale_scales_the_aux_gradient():
    params, tokens, targets = moe_case()
    logits, caches = model.forward_pass(params, tokens, MOE_CONFIG)
    dlogits = layers.cross_entropy_backward(layers.cross_entropy_forward(logits, targets)[1])
    _, whole = model.backward_pass(dlogits, caches)
    _, deferred = model.backward_input_pass(dlogits, caches)
    split = model.weight_pass(deferred)
    assert all(np.array_equal(whole[n], split[n]) for n in whole)
    _, grads = model.loss_and_grads(params, tokens, targets, MOE_CONFIG)
    _, scaled = model.loss_and_grads(params, tokens, targets, MOE_CONFIG, loss_scale=1024.0)
    assert all(np.array_equal(scaled[n] / 1024.0, grads[n]) for n in grads)


def test_params_names_pieces_and_the_cost_model_count():
    config = dataclasses.replace(MOE_CONFIG, n_layers=4, moe_every=2)
    shapes = model.param_shapes(config)
    assert "blocks.0.ffn.w1" in shapes and "blocks.1.ffn.w1" not in shapes
    assert shapes["blocks.1.moe.router.w"] == (8, 3)
    assert shapes["blocks.3.moe.experts.2.w2"] == (12, 8)
    assert model.piece_params(config)["blocks.1"][-1] == "blocks.1.moe.experts.2.b2"
    params = model.init_params(config, 0)
    assert costmodel.lm_params(11, 8, 4, 12, 6, n_experts=3, moe_every=2) == (
        model.count_params(params))
    # the experts' output projections are scaled for the residual stream like ffn.w2
    assert params["blocks.1.moe.experts.0.w2"].std() < 0.6 * params["blocks.1.moe.router.w"].std()
    dense = model.init_params(dataclasses.replace(config, **model.MOE_DEFAULTS), 0)
    assert costmodel.lm_params(11, 8, 4, 12, 6) == model.count_params(dense)


@pytest.mark.parametrize("fields, match", [
    (dict(n_experts=-1), "n_experts: expected a non-negative integer"),
    (dict(n_experts=2, top_k=3), r"top_k: expected an integer in 1..2 \(n_experts\), got 3"),
    (dict(n_experts=2, top_k=0), "top_k: expected a positive integer"),
    (dict(n_experts=2, capacity_factor=0.0), "capacity_factor: expected a positive"),
    (dict(n_experts=2, moe_every=3), "moe_every: expected at most n_layers=2"),
    (dict(n_experts=2, aux_loss_weight=-1.0), "aux_loss_weight: expected a non-negative"),
    (dict(top_k=2), "top_k: a dense model"),
])
def test_bad_moe_config_is_named(fields, match):
    with pytest.raises(ValueError, match=match):
        model.TransformerConfig(vocab_size=5, n_layers=2, **fields)


# --------------------------------------------------------------------------- training


def test_sixty_steps_of_a_four_expert_top2_model_learn():
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size, n_experts=4, top_k=2)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=60)
    result = train.train_lm(config, corpus, settings, progress="none")
    baseline = result["unigram_baseline"]
    assert np.mean(result["losses"][-5:]) < baseline - 0.7  # measured 2.11 vs 3.11
    assert model.count_params(result["params"]) == costmodel.lm_params(
        config.vocab_size, config.d_model, config.n_layers, config.d_ff, config.max_len,
        n_experts=4, moe_every=config.moe_every)
    assert len(result["routing"]) == 60 and list(result["routing"][-1]) == ["blocks.1"]
    last = result["routing"][-1]["blocks.1"]
    tokens = settings.batch_size * settings.seq_len
    assert last["capacity"] == layers.moe_capacity(tokens, 4, 2, config.capacity_factor)
    assert sum(last["routed"]) == 2 * tokens
    assert sum(last["tokens_per_expert"]) == 2 * tokens - last["dropped"]


def cli_args(*extra):
    return train.parse_args(["--steps", "2", "--progress", "none", *extra])


def test_the_cli_builds_the_moe_config_and_only_tfcourse_train_accepts_it():
    args = cli_args("--experts", "4", "--top-k", "2", "--capacity-factor", "1.5",
                    "--moe-every", "1", "--aux-loss-weight", "0.02")
    config = train.training_setup(args, moe_supported=True).config
    assert (config.n_experts, config.top_k, config.capacity_factor, config.moe_every,
            config.aux_loss_weight) == (4, 2, 1.5, 1, 0.02)
    assert train.training_setup(cli_args(), moe_supported=True).config.n_experts == 0
    with pytest.raises(ValueError, match="--experts: this program trains dense models only"):
        train.training_setup(args)  # the parallel programs' default: refused before MPI


@pytest.mark.parametrize("extra, match", [
    (["--experts", "0"], "--experts: expected a positive integer, got 0"),
    (["--experts", "4", "--top-k", "5"], "--top-k: expected an integer in 1..4 (--experts)"),
    (["--experts", "4", "--top-k", "0"], "--top-k: expected a positive integer"),
    (["--experts", "4", "--capacity-factor", "0"], "--capacity-factor: expected a positive"),
    (["--experts", "4", "--capacity-factor", "-1"], "--capacity-factor: expected a positive"),
    (["--experts", "4", "--moe-every", "3"], "--moe-every: expected at most the 2 layers"),
    (["--top-k", "2"], "--top-k: an option of the mixture of experts, expected with --experts"),
])
def test_bad_moe_options_are_named(extra, match, capsys):
    assert train.main(["--steps", "2", "--progress", "none", *extra]) == 2
    assert match in capsys.readouterr().err


def test_checkpoints_written_before_the_moe_fields_still_resume_as_dense():
    config = model.preset("tiny", 30)
    old = {k: v for k, v in config.to_dict().items() if k not in model.MOE_DEFAULTS}
    assert train._same_numbers(old) == train._same_numbers(config.to_dict())


def test_a_namespace_without_the_moe_options_is_dense():
    args = argparse.Namespace(**{k: v for k, v in vars(cli_args()).items()
                                 if k not in ("experts", *train.MOE_OPTIONS)})
    assert train.moe_arguments(args, False, 2) == {}


def test_a_dense_config_prints_as_before_and_an_moe_config_shows_its_experts():
    dense = repr(model.preset("tiny", 30))
    assert dense.endswith("recompute='none', precision='fp32')") and "experts" not in dense
    moe = repr(model.preset("tiny", 30, n_experts=4, top_k=2))
    assert moe.endswith("n_experts=4, top_k=2, capacity_factor=1.25, moe_every=2, "
                        "aux_loss_weight=0.01)")
