"""Chapter 12's study harness: every layout, run under real mpiexec, trains the serial model.

The reference is the serial trainer (tfcourse.train.train_lm) run in this process, not any
MPI run; memory per rank is checked against parameter counts taken from init_params.
"""

import numpy as np
import pytest

from tfcourse.nn.model import init_params
from tfcourse.parallel.plans.tensor import shard_axis
from tfcourse.parallel.study import (
    Layout,
    baseline_seconds,
    calibrated_efficiency,
    compare_with_planner,
    default_layouts,
    format_comparison,
    format_table,
    measure_links,
    model_spec,
    predict,
    run_study,
    summarise,
    this_machine,
)
from tfcourse.train import TRAIN_PRESETS, load_corpus, preset, train_lm

pytestmark = pytest.mark.mpi

STEPS, LAYERS, BATCH, MICROBATCHES = 4, 4, 16, 4
TRAINING_ARGS = ["--config", "tiny", "--layers", str(LAYERS), "--steps", str(STEPS),
                 "--batch-size", str(BATCH)]


@pytest.fixture(scope="module")
def serial():
    corpus = load_corpus()
    config = preset("tiny", corpus.vocab.size, n_layers=LAYERS, dtype="float64")
    settings = TRAIN_PRESETS["tiny"]
    settings = type(settings)(**{**settings.__dict__, "steps": STEPS, "batch_size": BATCH})
    losses = train_lm(config, corpus, settings, progress="none")["losses"]
    return config, np.array(losses)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"max{n}ranks")
def study(request):
    layouts = default_layouts(request.param, n_heads=4)
    if request.param != 4:  # 2 and 3 ranks: the layouts a 4-rank study does not cover
        layouts = [layout for layout in layouts if layout.ranks in (1, request.param)]
    return run_study(layouts, TRAINING_ARGS, MICROBATCHES, timeout=120)


def test_every_layout_trains_the_serial_model(study, serial):
    _, reference = serial
    assert study, "no layout ran"
    for name, result in study.items():
        np.testing.assert_allclose(result["losses"], reference, rtol=1e-10, atol=0,
                                   err_msg=f"layout {name} changed the loss curve")


def test_training_state_per_rank_matches_the_parameter_counts(study, serial):
    config, _ = serial
    params = init_params(config, 0)
    total = sum(p.nbytes for p in params.values())
    replicated = sum(p.nbytes for n, p in params.items() if shard_axis(n) is None)
    for name, result in study.items():
        layout = Layout(**result["layout"])
        memory = result["memory_bytes"]
        assert len(memory) == layout.ranks, name
        per_rank = [m["parameters"] for m in memory]
        for m in memory:  # one gradient and two AdamW moments per parameter value
            assert m["gradients"] == m["parameters"] and m["optimizer (m, v)"] == 2 * m[
                "parameters"], name
        # each replica holds the model once, cut into pp stages or tp shards
        replica = per_rank[: layout.pp * layout.tp]
        expected = total + (layout.tp - 1) * replicated  # TP copies the unsplit tensors
        assert sum(replica) == expected, name
        assert per_rank == replica * layout.dp, name


def test_step_time_parts_are_measured_on_every_rank(study):
    for name, result in study.items():
        parts = result["seconds_per_step_per_rank"]
        assert len(parts) == result["world_size"], name
        for p in parts:
            assert p["compute"] > 0 and p["communication"] >= 0 and p["waiting"] >= 0, name
        if result["world_size"] > 1:  # every parallel layout talks and waits
            assert all(p["communication"] + p["waiting"] > 0 for p in parts), name


def test_summary_of_a_real_study(study):
    rows = summarise(study)
    assert [r["layout"] for r in rows] == list(study)
    for row in rows:
        assert row["max_loss_rel_diff"] < 1e-10
        assert 0 <= row["comm_share"] < 1
    assert "layout" in format_table(rows).splitlines()[0]
    first = next(iter(study.values()))  # the baseline ran again at the end
    assert len(first["repeat_step_seconds"]) == len(first["step_seconds"])


# --------------------------------------------------------------------------- pure parts


def fake_result(step_seconds, losses, world_size, parts=None, memory=None):
    return {"step_seconds": step_seconds, "losses": losses, "world_size": world_size,
            "settings": {"batch_size": 4, "seq_len": 8},
            "seconds_per_step_per_rank": parts or [{"compute": 0.75, "communication": 0.2,
                                                    "waiting": 0.05}] * world_size,
            "memory_bytes": memory or [{"parameters": 10, "gradients": 10,
                                        "optimizer (m, v)": 20}] * world_size}


def test_summarise_by_hand():
    results = {"1 rank": fake_result([9.0, 2.0, 2.0, 2.0], [3.0, 2.0], 1),
               "DP 2": fake_result([9.0, 1.0, 1.25, 1.0], [3.0, 2.2], 2,
                                   memory=[{"parameters": 10, "gradients": 10,
                                            "optimizer (m, v)": 20},
                                           {"parameters": 12, "gradients": 0,
                                            "optimizer (m, v)": 0}])}
    base, dp = summarise(results)
    assert base["speedup"] == 1.0 and base["step_seconds"] == 2.0  # the 9 s warm-up is left out
    assert dp["step_seconds"] == 1.0
    assert dp["speedup"] == 2.0 and dp["efficiency"] == 1.0
    assert dp["tokens_per_s"] == 32.0  # 4 sequences x 8 tokens in 1 s
    assert dp["comm_share"] == pytest.approx(0.25)
    assert dp["max_state_bytes"] == 40
    assert dp["max_loss_rel_diff"] == pytest.approx(0.1)
    table = format_table([base, dp], cores=1).splitlines()
    assert not table[1].endswith("*") and table[2].endswith("*")
    assert table[3].startswith("* oversubscribed: more ranks than this machine's 1 cores")
    assert format_table([base, dp], cores=2).count("*") == 0


def test_a_repeated_baseline_takes_the_faster_run():
    # a busy moment during the first baseline run (3 s/step) would make DP 2 look 3x faster
    # on 2 ranks; the repeat at the study's end (2 s/step) is the one divided by
    slow_first = fake_result([9.0, 3.0, 3.0, 3.0], [3.0, 2.0], 1)
    results = {"1 rank": {**slow_first, "repeat_step_seconds": [9.0, 2.0, 2.0, 2.0]},
               "DP 2": fake_result([9.0, 1.0, 1.0, 1.0], [3.0, 2.0], 2)}
    base, dp = summarise(results)
    assert base["step_seconds"] == 2.0 and dp["speedup"] == 2.0
    assert baseline_seconds(results["1 rank"]) == 2.0
    assert baseline_seconds(results["DP 2"]) == 1.0  # no repeat: its own median


def test_summarise_rejects_a_missing_baseline_and_unequal_curves():
    with pytest.raises(ValueError, match=r"baseline: expected one of \['DP 2'\], got '1 rank'"):
        summarise({"DP 2": fake_result([1.0], [1.0], 2)})
    with pytest.raises(ValueError, match=r"results\['DP 2'\]: expected 2 losses"):
        summarise({"1 rank": fake_result([1.0], [1.0, 2.0], 1),
                   "DP 2": fake_result([1.0], [1.0], 2)})


def test_layouts_and_their_programs():
    names = [layout.name for layout in default_layouts(4, n_heads=4)]
    assert names == ["1 rank", "DP 2", "TP 2", "PP 2 GPIPE", "PP 2 1F1B", "DP 4", "TP 4",
                     "PP 4 GPIPE", "PP 4 1F1B", "DP 2 x PP 2 1F1B", "DP 2 x TP 2"]
    assert "TP 3" not in [layout.name for layout in default_layouts(3, n_heads=4)]
    assert Layout(pp=2, schedule="gpipe").command(4) == (
        "tfcourse.parallel.pipeline_parallel", ["--microbatches", "4", "--schedule", "gpipe"])
    assert Layout(dp=2, tp=2).command(4) == (
        "tfcourse.parallel.hybrid", ["--dp", "2", "--tp", "2", "--pp", "1"])
    assert Layout(dp=3).command(4)[0] == "tfcourse.parallel.data_parallel"
    with pytest.raises(ValueError, match="max_ranks: expected a positive integer, got 0"):
        default_layouts(0)


# --------------------------------------------------------------------------- prediction

def tiny_spec():
    corpus = load_corpus()
    config = preset("tiny", corpus.vocab.size)  # 2 blocks
    result = {"config": config.to_dict(), "settings": {"seq_len": 32, "batch_size": 16}}
    return model_spec(result)


def test_predictions_by_hand():
    spec = tiny_spec()
    peak = 1e9
    u = calibrated_efficiency(spec, 0.1, peak)  # the 1-rank run took 0.1 s
    assert u == pytest.approx(spec.flops_per_step / 1e8)

    def step(layout, cores, alpha=0.0, beta=1e-30):
        cluster = this_machine(layout.ranks, cores, peak, u, alpha, beta, 1e9)
        return predict(layout, spec, cluster, microbatches=4).step_s

    assert step(Layout(), 2) == pytest.approx(0.1)
    assert step(Layout(dp=2), 2) == pytest.approx(0.05)  # half the rows each, free network
    assert step(Layout(dp=2), 1) == pytest.approx(0.1)  # two ranks share one core
    assert step(Layout(dp=4), 2) == pytest.approx(0.05)
    # TP 2: half the FLOPs each + 4 all-reduces per block (2 blocks), each 2 (p - 1) = 2
    # messages of 1 ms latency: 0.05 + 4 * 2 * 0.002 = 0.066
    assert step(Layout(tp=2), 2, alpha=1e-3) == pytest.approx(0.066)
    # PP 2, 4 micro-batches: one block per stage (0.05 s) + bubble (p - 1) / m of it
    assert step(Layout(pp=2, schedule="1f1b"), 2) == pytest.approx(0.05 + 0.05 / 4)
    with pytest.raises(ValueError, match="one_rank_step_seconds: expected a positive"):
        calibrated_efficiency(spec, 0.0, peak)


def test_measured_links_are_plausible_for_shared_memory():
    alpha, beta = measure_links(max_bytes=2**20)
    assert 0.0 <= alpha < 1e-3  # under a millisecond per message
    assert 1e8 < 1 / beta < 1e12  # between 0.1 and 1000 GB/s


def test_comparison_is_calibrated_on_the_one_rank_run():
    spec_result = {"config": preset("tiny", load_corpus().vocab.size).to_dict(),
                   "settings": {"seq_len": 32, "batch_size": 16}}
    results = {"1 rank": {**spec_result, "layout": {"dp": 1, "tp": 1, "pp": 1, "schedule": None},
                          "step_seconds": [1.0, 0.10, 0.10]},
               "DP 2": {**spec_result, "layout": {"dp": 2, "tp": 1, "pp": 1, "schedule": None},
                        "step_seconds": [1.0, 0.06, 0.06]}}
    rows = compare_with_planner(results, 1e9, 0.0, 1e-30, cores=1, memory_bytes=1e9)
    assert rows[0]["predicted"] == pytest.approx(0.10)  # the calibration point
    assert rows[1]["predicted"] == pytest.approx(0.10)  # 2 ranks on 1 core: no faster
    assert rows[1]["predicted_ignoring_cores"] == pytest.approx(0.05)
    lines = format_comparison(rows, mark="~").splitlines()
    assert lines[2].split() == ["DP", "2", "~60.0", "~100.0", "~67%", "~50.0"]
    marked = format_comparison(rows, mark="~", cores=1).splitlines()
    assert marked[1].split()[-1] != "*" and marked[2].split()[-1] == "*"  # 2 ranks on 1 core
    assert "oversubscribed" in marked[-1]
    assert "oversubscribed" not in format_comparison(rows, cores=2)


@pytest.mark.parametrize("argv, match", [
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["--steps", "0"], "--steps"),
    (["--microbatches", "-1"], "--microbatches"),
    (["--config", "huge"], "--config"),
    (["--json", "/no/such/folder/study.json"], "--json"),
])
def test_study_refuses_bad_options_before_its_first_job(monkeypatch, capsys, argv, match):
    from tfcourse.parallel import study as study_module

    def no_jobs(*args, **kwargs):
        raise AssertionError("a job ran before the options were checked")

    monkeypatch.setattr(study_module, "run_study", no_jobs)
    assert study_module.main(argv) == 2
    assert match in capsys.readouterr().err
