"""Expert parallelism (issue 21 item 4): the MPI-free pieces - the expert split, the cost
model's all-to-all bytes, the layer's capacity cut over a batch split in parts equal to the
whole batch's - and, under real mpiexec at 1-4 ranks, the loss curve and the routing equal to
serial MoE training (top-1 and top-2, tokens dropped by capacity); at 2 ranks, --resume bit for
bit the uninterrupted run, checkpoints that serial MoE training resumes and vice versa, and
--recompute selective / full equal to serial training with the same recomputation (full
replays the dispatch and combine: 1.5x the all-to-all bytes, measured and predicted)."""

import dataclasses
import json

import numpy as np
import pytest

from tfcourse import checkpoint, train
from tfcourse.course.launch import run_mpi
from tfcourse.nn import layers, model
from tfcourse.parallel.plans import experts as plan
from tfcourse.parallel.plans.batches import batch_rows
from tfcourse.perf import costmodel

STEPS, BATCH = 4, 6  # 6 rows over 4 ranks: 2, 2, 1, 1


def test_owned_experts_split_evenly_and_refuse_an_uneven_count():
    assert [plan.owned_experts(6, 3, r) for r in range(3)] == [range(0, 2), range(2, 4),
                                                               range(4, 6)]
    with pytest.raises(ValueError, match=r"--experts: .*multiple of the 4 ranks, got 6"):
        plan.owned_experts(6, 4, 0)


def test_expert_shards_glue_back_to_the_dict():
    config = model.preset("tiny", 10, n_experts=4, moe_every=1)
    params = model.init_params(config, 0)
    shards = [plan.expert_shard(params, plan.owned_experts(4, 2, r)) for r in range(2)]
    assert "blocks.0.moe.experts.3.w1" in shards[1] and "blocks.0.moe.experts.3.w1" not in shards[0]
    assert "blocks.0.moe.router.w" in shards[0] and "blocks.0.moe.router.w" in shards[1]
    glued = plan.glue_expert_shards(shards)
    assert list(sorted(glued)) == sorted(params)
    assert all(np.array_equal(glued[n], params[n]) for n in params)
    assert plan.expert_index("blocks.1.moe.experts.12.b2") == 12
    assert plan.expert_index("blocks.1.moe.router.w") is None


def test_alltoall_bytes_by_hand():
    # 96 tokens, d 32, k 2, p 4, float64: each all-to-all sends 96 * 2 * 3/4 * 32 * 8 bytes
    per = 96 * 2 * 0.75 * 32 * 8
    assert costmodel.expert_alltoall_bytes(96, 32, 2, 4) == 4 * per
    assert costmodel.expert_alltoall_bytes(96, 32, 2, 4, n_moe_layers=2,
                                           full_recompute=True) == 12 * per
    assert costmodel.expert_alltoall_bytes(96, 32, 2, 1) == 0


@pytest.mark.parametrize("top_k, factor", [(1, 0.6), (2, 0.8), (2, 1.0)])
def test_a_batch_routed_in_parts_keeps_the_whole_batchs_choices(top_k, factor):
    """What expert parallelism's agree does, without MPI: each part starts the capacity cut
    where the rounds before and the parts before it left it - the whole batch's cut."""
    rng = np.random.default_rng(top_k)
    n_experts, parts = 4, [(0, 5), (5, 6), (6, 13)]
    probs = np.exp(layers.log_softmax(3 * rng.standard_normal((13, n_experts))))
    capacity = layers.moe_capacity(13, n_experts, top_k, factor)
    whole = layers.moe_route(probs, top_k, capacity)
    assert not whole[2].all()  # tokens dropped
    claims = [layers.moe_claims(layers.moe_choose(probs[lo:hi], top_k)[0], n_experts)
              for lo, hi in parts]
    total = sum(claims)
    kept = []
    for r, (lo, hi) in enumerate(parts):
        before = np.cumsum(total, axis=0) - total + sum(claims[:r], np.zeros_like(total))
        kept.append(layers.moe_route(probs[lo:hi], top_k, capacity, before)[2])
    np.testing.assert_array_equal(np.concatenate(kept), whole[2])


def serial(experts, top_k, factor, moe_every=2):
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size, n_experts=experts, top_k=top_k,
                          capacity_factor=factor, moe_every=moe_every)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS, batch_size=BATCH)
    return train.train_lm(config, corpus, settings, progress="none")


def counts(routing):
    return [{piece: (s["tokens_per_expert"], s["routed"], s["dropped"], s["capacity"])
             for piece, s in step.items()} for step in routing]


CASES = [  # (ranks, experts, top_k, capacity factor, moe_every)
    (1, 4, 1, 0.6, 1), (2, 4, 1, 0.6, 1), (4, 4, 1, 0.6, 1),  # top-1, tokens dropped
    (1, 4, 2, 1.25, 2), (2, 4, 2, 1.25, 2), (4, 4, 2, 1.25, 2),  # top-2 (drops too)
    (3, 6, 2, 1.0, 1), (3, 3, 1, 1.25, 2),
]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, experts, top_k, factor, moe_every", CASES)
def test_expert_parallel_equals_serial_moe_training(n_ranks, experts, top_k, factor,
                                                     moe_every):
    reference = serial(experts, top_k, factor, moe_every)
    result = run_mpi("tfcourse.parallel.expert_parallel",
                     ["--steps", str(STEPS), "--batch-size", str(BATCH), "--experts",
                      str(experts), "--top-k", str(top_k), "--capacity-factor", str(factor),
                      "--moe-every", str(moe_every)], n_ranks=n_ranks, timeout=120).result
    assert result["world_size"] == n_ranks and result["experts_per_rank"] == experts // n_ranks
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=0, atol=1e-10)
    assert counts(result["routing"]) == counts(reference["routing"])
    if factor < 1:  # the capacity cut is exercised
        assert sum(s["dropped"] for step in result["routing"] for s in step.values()) > 0
    sent = np.array(result["alltoall_bytes_sent_per_step_per_rank"])
    predicted = np.array(result["predicted_alltoall_bytes_sent_per_step_per_rank"])
    n_moe = sum(model.is_moe_block(i, experts, moe_every) for i in range(2))
    tokens = np.array([np.subtract(*batch_rows(BATCH, r, n_ranks)[::-1]) * 32
                       for r in range(n_ranks)])  # rows x seq_len 32 (tiny)
    np.testing.assert_allclose(predicted, costmodel.expert_alltoall_bytes(
        tokens, 32, top_k, n_ranks, n_moe))
    if n_ranks == 1:
        assert not sent.any() and not predicted.any()
    else:  # every rank sends; all ranks together at most every token's k hidden states,
        assert (sent > 0).all()  # out and back, forward and backward, per MoE layer
        assert (sent.sum(axis=0) <= 4 * n_moe * top_k * 32 * 8 * tokens.sum()).all()
    times = result["seconds_per_step_per_rank"][0]
    assert times["communication"] > 0 and times["compute"] > 0


# --------------------------------------------------------------------------- checkpoints and
# recomputation under expert parallelism (2 ranks, E = 4, top-2)

EP = "tfcourse.parallel.expert_parallel"
MOE = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--experts", "4", "--top-k", "2"]


def run_ep(flags: list[str]) -> dict:
    return run_mpi(EP, [*MOE, *flags], n_ranks=2, timeout=120).result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Expert parallelism at 2 ranks, no recomputation, a checkpoint every 2 steps."""
    folder = tmp_path_factory.mktemp("ep") / "ck"
    return run_ep(["--checkpoint", str(folder), "--checkpoint-every", "2", "--keep", "3"]), folder


@pytest.mark.mpi
def test_expert_parallel_resumed_is_bit_for_bit_the_uninterrupted_run(uninterrupted, tmp_path):
    whole, folder = uninterrupted
    again = tmp_path / "again"
    resumed = run_ep(["--resume", str(checkpoint.step_folder(folder, 2)),
                      "--checkpoint", str(again)])
    assert resumed["losses"] == whole["losses"]  # exactly
    assert resumed["routing"] == whole["routing"][2:]  # the steps this run trained
    manifest = checkpoint.read_manifest(checkpoint.step_folder(folder, STEPS))
    assert len(manifest["shards"]) == 2 and manifest["layout"]["program"] == "expert_parallel"
    (p1, o1, _), (p2, o2, _) = (checkpoint.read_distributed(f) for f in (folder, again))
    assert sorted(p1) == sorted(p2) and any(".moe.experts.3." in n for n in p1)
    for name in p1:
        np.testing.assert_array_equal(p2[name], p1[name])
    for name in o1:
        np.testing.assert_array_equal(o2[name], o1[name])


@pytest.mark.mpi
def test_serial_and_expert_parallel_checkpoints_resume_each_other(tmp_path):
    """Serial MoE training (tfcourse.train --experts 4 --top-k 2) checkpoints step 1, expert
    parallelism at 2 ranks resumes it and checkpoints step 2, serial training resumes that:
    every run continues the serial curve."""
    reference = serial(4, 2, 1.25)["losses"]
    first, second, third = (tmp_path / name for name in ("serial", "ep", "serial2"))
    saving = ["--checkpoint-every", "1", "--keep", str(STEPS)]
    out = tmp_path / "serial.json"
    assert train.main([*MOE, "--progress", "none", "--checkpoint", str(first), *saving,
                       "--json", str(out)]) == 0
    np.testing.assert_allclose(json.loads(out.read_text())["losses"], reference, rtol=0,
                               atol=1e-12)
    ep = run_ep(["--resume", str(checkpoint.step_folder(first, 1)), "--checkpoint",
                 str(second), *saving])
    np.testing.assert_allclose(ep["losses"], reference, rtol=0, atol=1e-10)
    manifest = checkpoint.read_manifest(checkpoint.step_folder(second, 2))
    assert manifest["layout"]["program"] == "expert_parallel" and len(manifest["shards"]) == 2
    assert train.main([*MOE, "--progress", "none", "--resume",
                       str(checkpoint.step_folder(second, 2)), "--json", str(out)]) == 0
    np.testing.assert_allclose(json.loads(out.read_text())["losses"], reference, rtol=0,
                               atol=1e-10)


@pytest.mark.mpi
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_expert_parallel_with_recomputation_equals_serial(recompute, uninterrupted):
    """The same losses and routing as serial MoE training with the same recomputation; full
    recomputation replays each MoE block's forward - its dispatch and combine - in the
    backward: six all-to-alls per MoE layer instead of four, measured and predicted
    (selective recomputes only attention weights: four)."""
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size, n_experts=4, top_k=2, recompute=recompute)
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS, batch_size=BATCH)
    reference = train.train_lm(config, corpus, settings, progress="none")
    result = run_ep(["--recompute", recompute])
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=0, atol=1e-10)
    assert counts(result["routing"]) == counts(reference["routing"])
    plain, _ = uninterrupted  # no recomputation: the same routing, so the same rows move
    assert counts(plain["routing"]) == counts(result["routing"])
    factor = 1.5 if recompute == "full" else 1.0
    sent = np.array(result["alltoall_bytes_sent_per_step_per_rank"])
    np.testing.assert_array_equal(
        sent, factor * np.array(plain["alltoall_bytes_sent_per_step_per_rank"]))
    n_moe = sum(model.is_moe_block(i, 4, config.moe_every) for i in range(config.n_layers))
    tokens = np.array([np.subtract(*batch_rows(BATCH, r, 2)[::-1]) * 32 for r in range(2)])
    predicted = np.array(result["predicted_alltoall_bytes_sent_per_step_per_rank"])
    np.testing.assert_allclose(predicted, factor * np.array(
        plain["predicted_alltoall_bytes_sent_per_step_per_rank"]))
    np.testing.assert_allclose(predicted, costmodel.expert_alltoall_bytes(
        tokens, 32, 2, 2, n_moe, 8, full_recompute=recompute == "full"))
