"""Chapter 13's planner against hand-computed memory, step times and rankings, and its exact
stage balancing against brute force."""

import dataclasses
import itertools

import numpy as np
import pytest

from tfcourse.nn import model
from tfcourse.parallel.plans.pipeline import choose_fastest, stage_layers
from tfcourse.perf import costmodel as cm
from tfcourse.perf import planner
from tfcourse.perf.planner import Cluster, ModelSpec, Plan

# vocab 10, d 8, 2 heads, 2 layers, d_ff 16, 4 tokens, 2 sequences per step, 4-byte values.
TINY = ModelSpec(vocab_size=10, d_model=8, n_heads=2, n_layers=2, d_ff=16, seq_len=4,
                 global_batch=2, bytes_per_value=4, mixed_precision=False)
# Parameters by hand: block = attention 4*8*8 + 4*8 = 288, FFN 2*8*16 + 16 + 8 = 280,
# LayerNorms 4*8 = 32 -> 600; embeddings 10*8 + 4*8 = 112; final LayerNorm 16; head 80 + 10.
TINY_N = 112 + 2 * 600 + 16 + 80 + 10
# Activations of one layer, one row (1 x 4 tokens): 4 * (8*8 + 3*16 + 2) + 2 heads * 4 * 4.
TINY_ACT_LAYER_ROW = (4 * (8 * 8 + 3 * 16 + 2) + 2 * 4 * 4) * 4


def cluster(n, per_node, memory=1e12, flops=1e9, intra_bw=1e30, inter_bw=1e30, **kw):
    return Cluster(n_devices=n, devices_per_node=per_node, memory_bytes=memory,
                   flops_per_s=flops, intra_alpha=0.0, intra_bandwidth=intra_bw,
                   inter_alpha=0.0, inter_bandwidth=inter_bw, efficiency=1.0, **kw)


# --------------------------------------------------------------------------- memory


def test_hand_counted_parameters_agree_with_the_cost_model():
    assert TINY_N == 1418 == TINY.n_params


def test_zero0_does_not_fit_but_zero1_does():
    acts = TINY_ACT_LAYER_ROW * 2  # 1 row per micro-batch, 2 layers, 1 micro-batch alive
    zero0 = 4 * TINY_N * 4 + acts  # 4 copies of N 4-byte values, all replicated: 26592
    zero1 = 2 * TINY_N * 4 + 2 * TINY_N * 4 / 2 + acts  # m and v halved over dp = 2: 20920
    assert (zero0, zero1) == (26592, 20920)
    small = cluster(2, 2, memory=24000)
    e0 = planner.estimate(TINY, small, Plan(2, 1, 1, 1, 0))
    e1 = planner.estimate(TINY, small, Plan(2, 1, 1, 1, 1))
    assert e0.memory_bytes == zero0 and not e0.fits and "more than" in e0.reason
    assert e1.memory_bytes == zero1 and e1.fits and e1.reason == ""
    assert e1.memory == {"parameters": TINY_N * 4, "gradients": TINY_N * 4,
                         "optimizer": TINY_N * 4, "activations": acts}
    fitting, rejected = planner.rank_plans(TINY, small)
    assert Plan(2, 1, 1, 1, 0) in [e.plan for e in rejected]
    assert Plan(2, 1, 1, 1, 1) in [e.plan for e in fitting]


@pytest.mark.parametrize("zero, sharded_bytes", [(0, 0), (1, 12), (2, 14), (3, 16)])
def test_mixed_precision_zero_stages_shard_12_14_and_16_of_16_bytes(zero, sharded_bytes):
    mixed = dataclasses.replace(TINY, bytes_per_value=2, mixed_precision=True, global_batch=4)
    e = planner.estimate(mixed, cluster(4, 4), Plan(4, 1, 1, 1, zero))
    state = e.memory_bytes - e.memory["activations"]
    # per parameter: the unsharded bytes plus a quarter of the sharded ones (dp = 4)
    assert state == pytest.approx(TINY_N * ((16 - sharded_bytes) + sharded_bytes / 4))


def test_tensor_parallel_keeps_the_layernorm_activations_replicated():
    # TINY with 2 heads split over tp = 2: per row and layer, the 4 LayerNorm (4, 8) arrays and
    # 2 (4,) 1/std vectors stay whole; q, k, v, merged heads (4 x (4, 8)), the FFN's 3 (4, 16)
    # and the (2, 4, 4) attention weights are halved.
    whole = 4 * (4 * 8 + 2) * 4
    halved = (4 * (4 * 8 + 3 * 16) + 2 * 4 * 4) * 4 // 2
    assert whole + 2 * halved == TINY_ACT_LAYER_ROW
    e = planner.estimate(TINY, cluster(2, 2), Plan(1, 2, 1, 1, 0))
    assert e.memory["activations"] == (whole + halved) * 2 * 2  # 2 layers, 2 rows


def test_recomputation_trades_a_third_more_block_flops_for_the_layer_inputs_only():
    two = cluster(2, 2)
    plain = planner.estimate(TINY, two, Plan(2, 1, 1, 1, 0))
    again = planner.estimate(dataclasses.replace(TINY, recompute="full"), two, Plan(2, 1, 1, 1, 0))
    # FLOPs per token by hand (d 8, d_ff 16, 2 layers, T 4, V 10): blocks 2 (4*64 + 2*128) = 1024
    # matmul weights, head 80; attention 12 L d T = 768; recomputation adds 2*1024 + 4 L d T
    model_flops, extra = 6 * (1024 + 80) + 768, 2 * 1024 + 4 * 2 * 8 * 4
    assert again.compute_s == pytest.approx(plain.compute_s * (model_flops + extra) / model_flops)
    assert again.mfu == pytest.approx(plain.mfu * plain.step_s / again.step_s)  # model FLOPs
    assert again.hfu == pytest.approx(again.mfu * (model_flops + extra) / model_flops)
    assert plain.hfu == plain.mfu
    tp2 = planner.estimate(TINY, cluster(2, 2, intra_bw=1e9), Plan(1, 2, 1, 1, 0))
    tp2_again = planner.estimate(dataclasses.replace(TINY, recompute="full"),
                                 cluster(2, 2, intra_bw=1e9), Plan(1, 2, 1, 1, 0))
    assert tp2_again.tp_comm_s == pytest.approx(tp2.tp_comm_s * 6 / 4)  # 2 more all-reduces
    # kept: each layer's (1 row x 4 tokens x 8) input, plus one layer's full activations
    assert again.memory["activations"] == 2 * 4 * 8 * 4 + TINY_ACT_LAYER_ROW
    assert plain.memory["activations"] == 2 * TINY_ACT_LAYER_ROW


def test_selective_recomputation_keeps_all_but_the_attention_weights():
    two = cluster(2, 2)
    plain = planner.estimate(TINY, two, Plan(2, 1, 1, 1, 0))
    some = planner.estimate(dataclasses.replace(TINY, recompute="selective"), two,
                            Plan(2, 1, 1, 1, 0))
    # per layer: the (1 row, 2 heads, 4 x 4) float32 weights out, the 4 x 4 bool mask in
    assert plain.memory["activations"] - some.memory["activations"] == 2 * (2 * 16 * 4 - 16)
    # and only the scores QK^T run again: 2 d T = 64 FLOPs per token and layer
    assert some.hfu == pytest.approx(some.mfu * (6 * (1024 + 80) + 768 + 2 * 64) / (
        6 * (1024 + 80) + 768))
    with pytest.raises(ValueError, match="recompute: expected one of"):
        dataclasses.replace(TINY, recompute=True)


def test_sequence_parallelism_slices_the_layernorm_activations():
    plain = planner.estimate(TINY, cluster(2, 2), Plan(1, 2, 1, 1, 0))
    sp_model = dataclasses.replace(TINY, sequence_parallel=True)
    sp = planner.estimate(sp_model, cluster(2, 2), Plan(1, 2, 1, 1, 0))
    # 2 rows x 4 tokens: x_hat and 1/std (8 x (2 x 8 + 2) values) over tp = 2, but each
    # sublayer's gathered input (8 x 2 x 8) whole, against 8 x (4 x 8 + 2) replicated; 2 layers
    assert plain.memory["activations"] - sp.memory["activations"] == 2 * 4 * (
        8 * 34 - (8 * 18 // 2 + 8 * 16))
    assert sp.tp_comm_s == plain.tp_comm_s  # all-gather + reduce-scatter = the all-reduce
    one = planner.estimate(sp_model, cluster(2, 2), Plan(2, 1, 1, 1, 0))
    assert one.memory == planner.estimate(TINY, cluster(2, 2), Plan(2, 1, 1, 1, 0)).memory
    three_tokens = dataclasses.replace(sp_model, seq_len=3)
    assert "sequence parallelism splits seq_len=3 over tp" in planner.plan_problem(
        three_tokens, cluster(2, 2), Plan(1, 2, 1, 1, 0))


def test_pipeline_memory_is_the_first_stage_with_its_warm_up_microbatches_alive():
    four_rows = dataclasses.replace(TINY, global_batch=4)
    e = planner.estimate(four_rows, cluster(2, 2), Plan(1, 1, 2, 4, 0))
    # stage 0: half the parameters, 1 layer, and 1F1B keeps min(pp - 0, m) = 2 of the 4
    # one-row micro-batches alive (GPipe would keep all 4); stage 1 keeps 1.
    assert e.memory_bytes == 16 * TINY_N / 2 + TINY_ACT_LAYER_ROW * 1 * 2
    assert e.memory["activations"] == 2 * TINY_ACT_LAYER_ROW


def test_data_parallel_comm_is_a_ring_allreduce_and_zero3_adds_half():
    two = cluster(2, 2, intra_bw=1e9)
    e0 = planner.estimate(TINY, two, Plan(2, 1, 1, 1, 0))
    e3 = planner.estimate(TINY, two, Plan(2, 1, 1, 1, 3))
    ring = 2 * (2 - 1) / 2 * TINY_N * 4 / 1e9  # 2 (p - 1)/p x gradient bytes / bandwidth
    assert e0.dp_comm_s == pytest.approx(ring)
    assert e3.dp_comm_s == pytest.approx(1.5 * ring)


def test_a_group_that_straddles_two_nodes_uses_the_network():
    # 12 devices in nodes of 4, rank = (stage x dp + replica): replicas 0-2 of stage 0 sit in
    # node 0, but stage 1's are ranks 3-5, across nodes 0 and 1 - so the ring uses the network.
    spec = dataclasses.replace(SMALL, global_batch=12)
    e = planner.estimate(spec, cluster(12, 4, inter_bw=1e3), Plan(3, 1, 4, 1))
    grads = spec.n_params / 4 * 4  # one of 4 layers' share, 4 bytes each
    assert e.dp_comm_s == pytest.approx(2 * (3 - 1) / 3 * grads / 1e3)


# --------------------------------------------------------------------------- ranking


SMALL = ModelSpec(vocab_size=10, d_model=8, n_heads=4, n_layers=4, d_ff=16, seq_len=4,
                  global_batch=8, bytes_per_value=4, mixed_precision=False)


def _ideal_compute_s(spec, n_devices, flops):
    per_token = cm.training_flops_per_token(spec.vocab_size, spec.d_model, spec.n_layers,
                                            spec.d_ff, spec.seq_len)
    return per_token * spec.global_batch * spec.seq_len / (n_devices * flops)


def test_slow_network_ranking_matches_hand_arithmetic():
    # 4 devices, 2 per node; links inside a node are free, the network moves 1024 B/s.
    # Compute C = 1 s per step. A micro-batch message is b x 4 x 8 x 4 bytes; with replicas
    # of B/dp rows, a stage sends 2 m b = 2 B/dp rows per step: 1 s at dp = 2, 2 s at dp = 1.
    flops = _ideal_compute_s(SMALL, 4, 1.0)  # makes C = 1 s
    slow = cluster(4, 2, flops=flops, inter_bw=1024.0)
    best = planner.plan(SMALL, slow, top=3, zero_stages=(0,))
    # dp=2 x pp=2 (dp group of 2 inside a node, free all-reduce): (1 + 1) x (1 + 1/m), m <= 4
    # dp=1 x tp=2 x pp=2, m <= 8: (1 + 2) x (1 + 1/8) = 3.375; dp x tp: 1 + 10.2 s of
    # gradients on the network; pure dp: 1 + 30.7 s; pp=4: (1 + 2) x (1 + 3/8) = 4.125.
    assert [e.plan for e in best] == [Plan(2, 1, 2, 4), Plan(2, 1, 2, 2), Plan(1, 2, 2, 8)]
    assert [e.step_s for e in best] == pytest.approx([2.5, 3.0, 3.375])
    dp_tp = planner.estimate(SMALL, slow, Plan(2, 2, 1, 1))
    assert dp_tp.step_s == pytest.approx(1 + 2 * (1 / 2) * SMALL.n_params / 2 * 4 / 1024)
    assert all(e.plan.tp <= 2 for e in planner.rank_plans(SMALL, slow)[0])  # tp=4 spans nodes


def test_more_microbatches_shrink_the_bubble():
    free = cluster(2, 2, flops=_ideal_compute_s(SMALL, 2, 1.0))  # C = 1 s, no comm cost
    one, four = (planner.estimate(SMALL, free, Plan(1, 1, 2, m)) for m in (1, 4))
    assert one.bubble_s == pytest.approx(1.0) and one.step_s == pytest.approx(2.0)
    assert four.bubble_s == pytest.approx(0.25) and four.step_s == pytest.approx(1.25)
    assert planner.plan(SMALL, free, pp=2)[0].plan.microbatches == 8


def test_uneven_device_speeds_move_layers_to_the_fast_stage():
    spec = dataclasses.replace(SMALL, n_layers=6)
    flops = _ideal_compute_s(spec, 2, 1.0) / 6 * 2  # one layer of one stage: 1 s
    even = planner.estimate(spec, cluster(2, 2, flops=flops), Plan(1, 1, 2, 1))
    mixed = planner.estimate(spec, cluster(2, 2, flops=flops, device_speeds=(1.0, 0.5)),
                             Plan(1, 1, 2, 1))
    assert even.compute_s == pytest.approx(3.0)  # 3 layers per stage
    # 4 layers at speed 1 and 2 at speed 0.5 take 4 s each (3 + 3 would take 6 s)
    assert mixed.stage_bounds == ((0, 4), (4, 6))
    assert mixed.compute_s == pytest.approx(4.0)
    # 7 layers, the slow device first: 2 + 5 layers take 4 s and 5 s (3 + 4: 6 s and 4 s);
    # the pace is set by the slower stage, here the second.
    spec = dataclasses.replace(SMALL, n_layers=7)
    flops = _ideal_compute_s(spec, 2, 1.0) / 7 * 2
    slow_first = planner.estimate(spec, cluster(2, 2, flops=flops, device_speeds=(0.5, 1.0)),
                                  Plan(1, 1, 2, 1))
    assert slow_first.stage_bounds == ((0, 2), (2, 7))
    assert slow_first.compute_s == pytest.approx(5.0)


# --------------------------------------------------------------------------- GPT-3


def test_gpt3_on_1024_a100s():
    gpt3, a100 = planner.GPT3_175B, planner.A100_CLUSTER
    assert gpt3.n_params == pytest.approx(175e9, rel=0.01)
    # pure data parallelism (512 replicas: 1536 sequences split evenly): 16 bytes/parameter
    pure = planner.estimate(gpt3, dataclasses.replace(a100, n_devices=512), Plan(512, 1, 1, 1))
    assert pure.memory_bytes > 16 * 175e9 * 0.99 and not pure.fits
    fitting, rejected = planner.rank_plans(gpt3, a100)
    assert len(rejected) > 0 and len(fitting) > 0
    best = fitting[0]
    assert best.fits and best.memory_bytes <= 80e9
    assert 8 % best.plan.tp == 0 and best.plan.dp * best.plan.tp * best.plan.pp == 1024
    d, L, T, V = 12288, 96, 2048, 50257
    flops_per_token = 6 * (L * 12 * d * d + d * V) + 12 * L * d * T
    ideal = flops_per_token * 1536 * T / (1024 * 312e12 * 0.5)
    assert best.compute_s == pytest.approx(ideal)
    assert best.step_s > ideal > 0
    assert planner.plan(gpt3, a100, top=3) == fitting[:3]
    assert planner.plan(gpt3, a100, top=1) == fitting[:1]


# --------------------------------------------------------------------------- enumeration


def test_enumerated_plans_are_exactly_the_valid_ones():
    spec = ModelSpec(vocab_size=10, d_model=12, n_heads=6, n_layers=3, d_ff=12, seq_len=4,
                     global_batch=48)
    sixteen = cluster(16, 4)
    expected = set()
    for dp, tp, pp in itertools.product(range(1, 17), repeat=3):
        if (dp * tp * pp == 16 and 6 % tp == 0 and 12 % tp == 0 and 4 % tp == 0
                and pp <= 3 and 48 % dp == 0):
            for m, zero in itertools.product(range(1, 5), range(4)):
                if (48 // dp) % m == 0 and (zero == 0 or dp > 1):
                    expected.add(Plan(dp, tp, pp, m, zero))
    plans = planner.enumerate_plans(spec, sixteen, max_microbatches=4)
    assert len(plans) == len(set(plans)) and set(plans) == expected
    assert {p.tp for p in plans} == {1, 2}  # tp = 3 or 6 would leave a node


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, name", [
    (lambda: cluster(0, 1), "n_devices"),
    (lambda: cluster(2, 2, memory=-1.0), "memory_bytes"),
    (lambda: cluster(4, 2, device_speeds=(1.0, 1.0, 1.0)), "device_speeds"),
    (lambda: dataclasses.replace(TINY, n_heads=3), "n_heads"),
    (lambda: planner.balance_stages(2, [1.0, 1.0, 2.0]), "n_layers"),
    (lambda: planner.stage_times([(0, 1)], [1.0, 2.0]), "stage_speeds"),
    (lambda: planner.estimate(TINY, cluster(2, 2), Plan(1, 1, 1, 1)), "plan"),
    (lambda: planner.estimate(SMALL, cluster(4, 2), Plan(1, 4, 1, 1)), "plan.tp"),
    (lambda: choose_fastest({}), "measured"),
    (lambda: choose_fastest({1: [0.1], 2: []}), "measured"),
])
def test_bad_input_names_the_argument(make, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        make()


# --------------------------------------------------------------------------- stages


def _brute_force_best(n_layers, speeds):
    p = len(speeds)
    best = np.inf
    for cuts in itertools.combinations(range(1, n_layers), p - 1):
        edges = (0, *cuts, n_layers)
        best = min(best, max((edges[s + 1] - edges[s]) / speeds[s] for s in range(p)))
    return best


def test_balance_stages_is_optimal():
    rng = np.random.default_rng(0)
    speed_sets = [(1.0,), (1.0, 0.5), (0.5, 1.0, 1.0), (1.0, 1.0, 1.0, 0.25), (2.0, 2.0, 2.0)]
    speed_sets += [tuple(rng.uniform(0.2, 2.0, p)) for p in (2, 3, 4) for _ in range(4)]
    for speeds in speed_sets:
        for n in range(len(speeds), 9):
            bounds = planner.balance_stages(n, speeds)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(lo < hi for lo, hi in bounds)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            times = planner.stage_times(bounds, speeds)
            assert max(times) == pytest.approx(_brute_force_best(n, speeds))


def test_equal_speeds_give_the_even_split():
    assert planner.balance_stages(12, [1.0] * 4) == stage_layers(12, 4) == [
        (0, 3), (3, 6), (6, 9), (9, 12)]
    assert planner.stage_times([(0, 3), (3, 4)], [1.5, 0.5]) == [2.0, 2.0]


# --------------------------------------------------------------------------- run-time choice


def test_choose_fastest_takes_the_lowest_median():
    # means: 3.67, 35.3, 4.0; minima: 1, 3, 4; medians: 5, 3, 4
    assert choose_fastest({1: [5.0, 1.0, 5.0], 2: [3.0, 3.0, 100.0], 4: [4.0]}) == 2


def test_validate_against_gives_relative_errors():
    assert planner.validate_against({2: 2.0, 4: 1.0}, {2: 2.5, 4: 0.9, 8: 7.0}) == \
        pytest.approx({2: 0.25, 4: -0.1})


def test_spec_from_a_model_config():
    config = model.TransformerConfig(vocab_size=13, d_model=16, n_heads=4, n_layers=2,
                                     d_ff=24, max_len=12, dtype="float32")
    spec = ModelSpec.from_config(config, global_batch=6)
    assert (spec.seq_len, spec.bytes_per_value, spec.mixed_precision) == (12, 4, False)
    assert spec.n_params == model.count_params(model.init_params(config, 0))
