"""Pipeline parallelism: the schedules as pure op lists (every micro-batch forwarded and
backwarded once, peak in flight, deadlock-freedom and bubble by simulating all stages at once),
and real mpiexec runs on 1-4 ranks whose loss curve equals serial training's."""

import dataclasses
import time
from functools import cache

import numpy as np
import pytest

from tfcourse import train
from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn.model import param_shapes, preset
from tfcourse.parallel import pipeline_stage
from tfcourse.parallel.plans.pipeline import (
    AUTO_MICROBATCHES,
    SCHEDULES,
    busy_seconds,
    message_tag,
    microbatch_rows,
    peak_inflight,
    schedule,
    stage_layers,
    stage_param_names,
)
from tfcourse.perf import costmodel

STEPS, BATCH, LAYERS = 3, 8, 4
MODULE = "tfcourse.parallel.pipeline_parallel"
GRID = [(p, s, m) for p in range(1, 6) for s in range(p) for m in range(1, 10)]

# --------------------------------------------------------------------------- a tiny simulator


class Deadlock(Exception):
    pass


def stage_messages(p, stage, ops):
    """Each op as its point-to-point steps: ("recv"|"send", peer, (kind, micro-batch))."""
    steps = []
    for kind, mb in ops:
        before, after = (stage - 1, stage + 1) if kind == "F" else (stage + 1, stage - 1)
        if 0 <= before < p:
            steps.append(("recv", before, (kind, mb)))
        if 0 <= after < p:
            steps.append(("send", after, (kind, mb)))
    return steps


def simulate_messages(name, p, m, blocking_sends):
    """Run all stages' message steps together. Non-blocking sends complete at once (the
    message waits in the receiver's mailbox); blocking (rendezvous) sends complete only when
    the receiver is at the matching receive. Raises Deadlock if no stage can move."""
    steps = [stage_messages(p, s, schedule(name, p, s, m)) for s in range(p)]
    at, mailbox = [0] * p, set()
    while any(at[s] < len(steps[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if at[s] == len(steps[s]):
                continue
            op, peer, msg = steps[s][at[s]]
            if op == "send" and not blocking_sends:
                mailbox.add((s, peer, msg))
                at[s] += 1
                moved = True
            elif op == "recv" and (peer, s, msg) in mailbox:
                mailbox.remove((peer, s, msg))
                at[s] += 1
                moved = True
            elif op == "send" and at[peer] < len(steps[peer]) \
                    and steps[peer][at[peer]] == ("recv", s, msg):
                at[s] += 1
                at[peer] += 1
                moved = True
        if not moved:
            stuck = [steps[s][at[s]:at[s] + 1] for s in range(p)]
            raise Deadlock(f"{name} p={p} m={m}: stuck at {stuck}")
    assert not mailbox


def simulate_times(name, p, m, t_f=1.0, t_b=1.0):
    """Start and end time of every op, communication free: an op starts when its stage is
    free and its input has arrived (F(k) done on stage - 1, B(k) done on stage + 1)."""
    ops = [schedule(name, p, s, m) for s in range(p)]
    end, at, clock = {}, [0] * p, [0.0] * p
    while any(at[s] < len(ops[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if at[s] == len(ops[s]):
                continue
            kind, mb = ops[s][at[s]]
            dep = (s - 1, "F", mb) if kind == "F" else (s + 1, "B", mb)
            if 0 <= dep[0] < p and dep not in end:
                continue
            start = max(clock[s], end.get(dep, 0.0))
            clock[s] = end[(s, kind, mb)] = start + (t_f if kind == "F" else t_b)
            at[s] += 1
            moved = True
        if not moved:
            raise Deadlock(f"{name} p={p} m={m}")
    return clock


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_microbatch_is_forwarded_once_then_backwarded_once(name):
    for p, s, m in GRID:
        ops = schedule(name, p, s, m)
        assert sorted(ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        for i in range(m):
            assert ops.index(("F", i)) < ops.index(("B", i)), (p, s, m, i)
        forwards = [mb for kind, mb in ops if kind == "F"]
        assert forwards == sorted(forwards)  # activations arrive in order


def test_schedules_spelled_out():
    assert schedule("gpipe", 4, 0, 3) == [("F", 0), ("F", 1), ("F", 2),
                                          ("B", 2), ("B", 1), ("B", 0)]
    ops = "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5".split()  # 3 warm-up F, 3 F-B pairs, 3 B
    assert schedule("1f1b", 4, 0, 6) == [(op[0], int(op[1])) for op in ops]
    assert schedule("1f1b", 4, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert schedule("1f1b", 4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_peak_inflight_gpipe_m_and_1f1b_at_most_p_minus_stage():
    for p, s, m in GRID:
        assert peak_inflight(schedule("gpipe", p, s, m)) == m
        one_f_one_b = peak_inflight(schedule("1f1b", p, s, m))
        assert one_f_one_b <= p - s
        assert one_f_one_b == min(p - s, m)
        for name in SCHEDULES:
            assert peak_inflight(schedule(name, p, s, m)) == \
                costmodel.pipeline_peak_microbatches(name, p, s, m)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_are_deadlock_free_with_nonblocking_sends(name):
    for p in range(1, 7):
        for m in range(1, 12):
            simulate_messages(name, p, m, blocking_sends=False)
            simulate_times(name, p, m)


def test_1f1b_needs_nonblocking_sends_and_gpipe_does_not():
    for p in range(1, 6):
        for m in range(1, 9):
            simulate_messages("gpipe", p, m, blocking_sends=True)
            if p >= 2 and m >= 2:  # steady state: F(k) forward and B(j) back, both blocked
                with pytest.raises(Deadlock):
                    simulate_messages("1f1b", p, m, blocking_sends=True)
            else:
                simulate_messages("1f1b", p, m, blocking_sends=True)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t_b", [1.0, 2.0])
def test_simulated_bubble_equals_the_formula(name, t_b):
    for p in range(1, 6):
        for m in range(1, 10):
            makespan = max(simulate_times(name, p, m, 1.0, t_b))
            busy = m * (1.0 + t_b)
            assert makespan == pytest.approx((m + p - 1) * (1.0 + t_b))
            assert 1 - busy / makespan == pytest.approx(costmodel.pipeline_bubble_fraction(p, m))


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        schedule("zigzag", 2, 0, 2)
    for p, s, m in [(0, 0, 1), (2, 2, 1), (2, -1, 1), (2, 0, 0)]:
        with pytest.raises(ValueError, match="expected p >= 1"):
            schedule("gpipe", p, s, m)


def test_pipeline_peak_microbatches_cost_model():
    assert costmodel.pipeline_peak_microbatches("gpipe", 4, 0, 8) == 8
    assert costmodel.pipeline_peak_microbatches("gpipe", 4, 3, 8) == 8
    assert [costmodel.pipeline_peak_microbatches("1f1b", 4, s, 8) for s in range(4)] == \
        [4, 3, 2, 1]
    assert [costmodel.pipeline_peak_microbatches("1f1b", 4, s, 2) for s in range(4)] == \
        [2, 2, 2, 1]
    with pytest.raises(ValueError, match="schedule"):
        costmodel.pipeline_peak_microbatches("zigzag", 4, 0, 8)
    with pytest.raises(ValueError, match="0 <= stage < p"):
        costmodel.pipeline_peak_microbatches("gpipe", 4, 4, 8)


# --------------------------------------------------------------------------- partitioning


def test_stages_partition_layers_and_parameters():
    config = preset("tiny", 30, n_layers=5)
    for p in range(1, 6):
        layers = stage_layers(5, p)
        assert layers[0][0] == 0 and layers[-1][1] == 5
        assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(layers, layers[1:], strict=False))
        names = [stage_param_names(config, p, s) for s in range(p)]
        assert sorted(n for stage in names for n in stage) == sorted(param_shapes(config))
        assert "tok_emb" in names[0] and "pos_emb" in names[0]
        assert "head.w" in names[-1] and "ln_f.gamma" in names[-1]
    assert stage_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert stage_param_names(config, 3, 1)[0] == "blocks.2.ln1.gamma"


def test_partition_errors_name_the_sizes():
    with pytest.raises(ValueError, match="world_size=4.*n_layers=2"):
        stage_layers(2, 4)
    with pytest.raises(ValueError, match="batch_size: expected at least microbatches=8"):
        microbatch_rows(6, 8)
    assert microbatch_rows(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_message_tags_are_distinct():
    tags = [message_tag(kind, mb) for kind in "FB" for mb in range(50)]
    assert len(set(tags)) == len(tags)


def test_busy_seconds_counts_compute_only():
    events = [{"kind": "recv", "start": 0.0, "end": 1.0},
              {"kind": "forward", "start": 1.0, "end": 1.5},
              {"kind": "send", "start": 1.5, "end": 1.6},
              {"kind": "backward", "start": 2.0, "end": 3.0}]
    assert busy_seconds(events) == pytest.approx(1.5)


# --------------------------------------------------------------------------- real MPI runs


@cache
def serial_losses(n_layers, dtype="float64"):
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS, batch_size=BATCH)
    config = preset("tiny", corpus.vocab.size, n_layers=n_layers, dtype=dtype)
    return tuple(train.train_lm(config, corpus, settings, progress="none")["losses"])


def run_pp(n_ranks, name, m, *args, layers=LAYERS):
    return run_mpi(MODULE, ["--steps", str(STEPS), "--batch-size", str(BATCH),
                            "--layers", str(layers), "--schedule", name,
                            "--microbatches", str(m), *args],
                   n_ranks=n_ranks, timeout=60).result


CASES = [(n, name, m) for n in (1, 2, 3, 4) for m in (1, 4, 8) for name in SCHEDULES]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, name, m", CASES)
def test_pp_loss_curve_equals_serial(n_ranks, name, m):
    result = run_pp(n_ranks, name, m)
    assert (result["world_size"], result["schedule"], result["microbatches"]) == \
        (n_ranks, name, m)
    np.testing.assert_allclose(result["losses"], serial_losses(LAYERS), rtol=1e-10, atol=0)
    assert result["peak_inflight"] == result["peak_inflight_predicted"]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, name", [(2, "gpipe"), (3, "1f1b")])
def test_uneven_stages_match_serial(n_ranks, name):
    result = run_pp(n_ranks, name, 3, layers=5)
    assert result["stage_layers"] == [list(b) for b in stage_layers(5, n_ranks)]
    np.testing.assert_allclose(result["losses"], serial_losses(5), rtol=1e-10, atol=0)


@pytest.mark.mpi
def test_float32_curve_equals_serial_float32():
    result = run_pp(2, "1f1b", 4, "--dtype", "float32")
    np.testing.assert_allclose(result["losses"], serial_losses(LAYERS, "float32"), rtol=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("name", SCHEDULES)
def test_report_events_peaks_and_bubble_fields(name):
    p, m = 3, 5
    result = run_pp(p, name, m)
    assert result["bubble_formula"] == pytest.approx((p - 1) / (m + p - 1))
    for key in ("step_seconds", "pipeline_seconds", "busy_seconds", "bubble_measured",
                "bubble_measured_per_rank", "last_step_seconds", "config", "settings"):
        assert key in result
    assert len(result["step_seconds"]) == STEPS
    assert len(result["busy_seconds"]) == len(result["events"]) == p
    assert 0.0 <= result["bubble_measured"] <= 1.0
    assert result["peak_inflight"] == [costmodel.pipeline_peak_microbatches(name, p, s, m)
                                       for s in range(p)]
    for stage, events in enumerate(result["events"]):
        compute = [("F" if e["kind"] == "forward" else "B", e["microbatch"])
                   for e in events if e["kind"] in ("forward", "backward")]
        assert compute == schedule(name, p, stage, m)  # ran in the schedule's order
        assert all(0.0 <= e["start"] <= e["end"] for e in events)
        assert all(a["end"] <= b["start"] for a, b in zip(events, events[1:], strict=False))
        recvs = sum(e["kind"] == "recv" for e in events)
        assert recvs == (stage > 0) * m + (stage < p - 1) * m


@pytest.mark.mpi
def test_too_few_layers_for_the_world_size_is_rejected_clearly():
    with pytest.raises(MPIJobError, match="world_size=3.*n_layers=2"):
        run_pp(3, "1f1b", 4, layers=2)


@pytest.mark.mpi
def test_batch_smaller_than_microbatches_is_rejected_clearly():
    with pytest.raises(MPIJobError, match="batch_size: expected at least microbatches=16"):
        run_pp(2, "gpipe", 16)


# --------------------------------------------------------------------------- chapter 11 options


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4])
def test_auto_microbatches_tries_each_then_keeps_the_fastest_and_equals_serial(n_ranks):
    steps = 8
    result = run_mpi(MODULE, ["--steps", str(steps), "--batch-size", str(BATCH),
                              "--layers", str(LAYERS), "--microbatches", "auto"],
                     n_ranks=n_ranks, timeout=60).result
    candidates = [m for m in AUTO_MICROBATCHES if m <= BATCH]
    trials = {int(m): t for m, t in result["microbatch_trials"].items()}
    assert sorted(trials) == candidates
    fastest = min(trials, key=trials.get)  # one trial each: the median is the value
    used = result["microbatches_per_step"]
    assert used[1:1 + len(candidates)] == candidates  # step 0 warms up, then one step each
    assert set(used[1 + len(candidates):]) == {fastest} and result["microbatches"] == fastest
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=steps, batch_size=BATCH)
    config = preset("tiny", corpus.vocab.size, n_layers=LAYERS)
    serial = train.train_lm(config, corpus, settings, progress="none")["losses"]
    np.testing.assert_allclose(result["losses"], serial, rtol=1e-10, atol=0)


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, counts", [(2, "3,1"), (3, "1,1,2")])
def test_chosen_stage_sizes_and_a_slow_rank_still_train_the_serial_model(n_ranks, counts):
    slowdown = ",".join(["1"] * (n_ranks - 1) + ["3"])
    result = run_pp(n_ranks, "1f1b", 4, "--stage-layers", counts, "--slowdown", slowdown)
    sizes = [int(c) for c in counts.split(",")]
    assert [hi - lo for lo, hi in result["stage_layers"]] == sizes
    assert result["slowdown"] == [float(s) for s in slowdown.split(",")]
    np.testing.assert_allclose(result["losses"], serial_losses(LAYERS), rtol=1e-10, atol=0)


def test_a_slower_device_takes_slowdown_times_as_long():
    stage = pipeline_stage.Stage(0, 1, (0, 1), slowdown=3.0)
    started = time.perf_counter()
    with pipeline_stage.slower_device(stage):
        time.sleep(0.02)  # "compute"
    assert time.perf_counter() - started >= 3 * 0.02
