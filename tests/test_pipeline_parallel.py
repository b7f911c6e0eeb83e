"""Pipeline parallelism: the schedules as pure op lists (every (micro-batch, chunk) forwarded,
backwarded and - zero-bubble - weight-graded once, some spelled out by hand), peak in flight,
deadlock-freedom by simulating every stage's messages at once, the bubble formulas against hand
values and against two simulators, and real mpiexec runs on 1-4 ranks whose loss curve equals
serial training's."""

import dataclasses
import time
from collections import Counter
from functools import cache

import numpy as np
import pytest

from tfcourse import train
from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.nn.model import param_shapes, preset
from tfcourse.parallel import pipeline_stage
from tfcourse.parallel.plans.pipeline import (
    AUTO_MICROBATCHES,
    MAX_MICROBATCHES,
    MAX_VIRTUAL_STAGES,
    SCHEDULES,
    bubble_fraction,
    busy_seconds,
    chunk_layers,
    message_tag,
    microbatch_rows,
    peak_inflight,
    schedule,
    simulate_pipeline,
    stage_layers,
    stage_param_names,
)
from tfcourse.perf import costmodel

STEPS, BATCH, LAYERS = 3, 8, 4
MODULE = "tfcourse.parallel.pipeline_parallel"
GRID = [(p, s, m) for p in range(1, 6) for s in range(p) for m in range(1, 10)]
FLAT = ("gpipe", "1f1b", "zb-h1")  # the schedules with one model chunk per stage (v = 1)


def schedule_grid(name, max_m=12):
    """(p, stage, m, v) to check `name` on: p 1..5, every stage; interleaved with v 2 and 3
    and m a multiple of p (Megatron-LM's rule), the others with v = 1 and m 1..9."""
    if name == "interleaved":
        return [(p, s, m, v) for p in range(1, 6) for s in range(p) for v in (2, 3)
                for m in range(p, max_m + 1, p)]
    return [(p, s, m, 1) for p, s, m in GRID]


def full(op):
    """(kind, micro-batch, chunk) of any op."""
    return (op[0], op[1], op[2] if len(op) > 2 else 0)


def spelled(text):
    """"F0 B1 W0" -> [("F", 0), ("B", 1), ("W", 0)]; "F0.1" -> ("F", 0, 1) (micro-batch.chunk)."""
    ops = []
    for word in text.split():
        mb, _, chunk = word[1:].partition(".")
        ops.append((word[0], int(mb), int(chunk)) if chunk else (word[0], int(mb)))
    return ops


# --------------------------------------------------------------------------- two tiny simulators


class Deadlock(Exception):
    pass


def stage_messages(p, v, stage, ops):
    """Each op as its point-to-point steps: ("recv"|"send", peer rank, (kind, micro-batch,
    virtual stage of the receiver)). Chunk c of stage s is virtual stage c p + s: a forward
    comes from the virtual stage before and goes to the one after (the last rank's chunk c
    feeds rank 0's chunk c + 1), a backward the other way; W sends nothing."""
    last, steps = p * v - 1, []
    for op in ops:
        kind, mb, chunk = full(op)
        if kind == "W":
            continue
        here = chunk * p + stage
        before, after = (here - 1, here + 1) if kind == "F" else (here + 1, here - 1)
        if 0 <= before <= last:
            steps.append(("recv", before % p, (kind, mb, here)))
        if 0 <= after <= last:
            steps.append(("send", after % p, (kind, mb, after)))
    return steps


def simulate_messages(name, p, m, blocking_sends, v=1):
    """Run all stages' message steps together. Non-blocking sends complete at once (the
    message waits in the receiver's mailbox); blocking (rendezvous) sends complete only when
    the receiver is at the matching receive. Raises Deadlock if no stage can move; returns
    the number of messages."""
    return run_messages([schedule(name, p, s, m, v) for s in range(p)], v, blocking_sends)


def run_messages(ops_per_stage, v, blocking_sends):
    p = len(ops_per_stage)
    steps = [stage_messages(p, v, s, ops) for s, ops in enumerate(ops_per_stage)]
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
            raise Deadlock(f"stuck at {stuck}")
    assert not mailbox
    return sum(len(s) for s in steps) // 2  # messages sent (each is one send and one recv)


def simulate_times(name, p, m, v=1, t_f=1.0, t_b=2.0, t_w=None):
    """Each stage's finishing time, communication free; a stage's whole forward takes t_f
    and whole backward t_b (of which W takes t_w when the schedule has W ops, default half),
    each chunk a v-th. An op starts when its stage is free and its inputs are done: F on the
    previous virtual stage's F, B on its own F and the next virtual stage's B, W on its B."""
    return run_times([schedule(name, p, s, m, v) for s in range(p)], v, t_f, t_b, t_w)


def run_times(ops, v=1, t_f=1.0, t_b=2.0, t_w=None):
    p = len(ops)
    split = any(op[0] == "W" for stage in ops for op in stage)
    t_w = t_b / 2 if t_w is None else t_w
    cost = {"F": t_f / v, "B": (t_b - t_w) / v if split else t_b / v, "W": t_w / v}
    end, at, clock = {}, [0] * p, [0.0] * p
    while any(at[s] < len(ops[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if at[s] == len(ops[s]):
                continue
            kind, mb, chunk = full(ops[s][at[s]])
            here = chunk * p + s
            deps = {"F": [("F", here - 1, mb)] if here > 0 else [],
                    "B": [("F", here, mb)] + ([("B", here + 1, mb)] if here < p * v - 1 else []),
                    "W": [("B", here, mb)]}[kind]
            if any(dep not in end for dep in deps):
                continue
            start = max([clock[s]] + [end[dep] for dep in deps])
            clock[s] = end[(kind, here, mb)] = start + cost[kind]
            at[s] += 1
            moved = True
        if not moved:
            raise Deadlock(f"stuck at {[ops[s][at[s]:at[s] + 1] for s in range(p)]}")
    return clock


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_microbatch_chunk_is_forwarded_backwarded_and_weighted_once_in_order(name):
    for p, s, m, v in schedule_grid(name):
        ops = schedule(name, p, s, m, v)
        assert {len(op) for op in ops} == {3 if name == "interleaved" else 2}, (p, s, m, v)
        kinds = "FBW" if name == "zb-h1" else "FB"
        pairs = [(mb, c) for mb in range(m) for c in range(v)]
        assert Counter(full(op) for op in ops) == Counter(
            (k, mb, c) for k in kinds for mb, c in pairs), (p, s, m, v)
        where = {full(op): i for i, op in enumerate(ops)}
        for mb, c in pairs:  # F before B before W
            assert where["F", mb, c] < where["B", mb, c], (p, s, m, v, mb, c)
            if name == "zb-h1":
                assert where["B", mb, c] < where["W", mb, c], (p, s, m, v, mb, c)
        for c in range(v):  # activations of a chunk arrive in micro-batch order
            forwards = [mb for kind, mb, chunk in map(full, ops) if kind == "F" and chunk == c]
            assert forwards == list(range(m)), (p, s, m, v, c)


def test_zb_h1_runs_1f1bs_forwards_and_backwards_in_1f1bs_order():
    for p, s, m in GRID:
        without_w = [op for op in schedule("zb-h1", p, s, m) if op[0] != "W"]
        assert without_w == schedule("1f1b", p, s, m), (p, s, m)


def test_schedules_spelled_out():
    assert schedule("gpipe", 4, 0, 3) == [("F", 0), ("F", 1), ("F", 2),
                                          ("B", 2), ("B", 1), ("B", 0)]
    # 3 warm-up F, 3 F-B pairs, 3 B
    assert schedule("1f1b", 4, 0, 6) == spelled("F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5")
    assert schedule("1f1b", 4, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert schedule("1f1b", 4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_zb_h1_spelled_out():
    """1F1B's order of F and B; on stage s, W(i) right after B(i + s), the rest at the end
    (Qi et al. 2024, figure 3: the later stages postpone their W's into the ramp-down)."""
    assert schedule("zb-h1", 4, 1, 8) == spelled(
        "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 B6 W5 B7 W6 W7")
    assert schedule("zb-h1", 4, 0, 8) == spelled(  # stage 0: every W right after its B
        "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7")
    assert schedule("zb-h1", 4, 3, 8) == spelled(  # the last stage: three W's late
        "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7")
    assert schedule("zb-h1", 3, 2, 2) == spelled("F0 B0 F1 B1 W0 W1")


def test_interleaved_spelled_out_by_megatrons_rule():
    """Megatron-LM (schedules.forward_backward_pipelining_with_interleaving): a rank's k-th
    forward runs model chunk (k mod p v) // p, its k-th backward chunk v - 1 - that; within a
    chunk the micro-batches come in order. Rank r warms up with (p - r - 1) 2 + (v - 1) p
    forwards (all m v when m = p), then alternates one forward and one backward, then drains.

    p = 2, v = 2, m = 4 ("F2.1": forward of micro-batch 2 through chunk 1; chunk 1 of rank r is
    virtual stage 2 + r). Forward k = 0..7 runs (mb.chunk) 0.0 1.0 0.1 1.1 2.0 3.0 2.1 3.1,
    backward k = 0..7 runs 0.1 1.1 0.0 1.0 2.1 3.1 2.0 3.0.
    Rank 0: 2 + 2 = 4 warm-up forwards, 4 F-B pairs, 4 backwards.
    Rank 1: 0 + 2 = 2 warm-up forwards, 6 F-B pairs, 2 backwards."""
    assert schedule("interleaved", 2, 0, 4, 2) == spelled(
        "F0.0 F1.0 F0.1 F1.1 "
        "F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 "
        "B2.1 B3.1 B2.0 B3.0")
    assert schedule("interleaved", 2, 1, 4, 2) == spelled(
        "F0.0 F1.0 "
        "F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 "
        "B2.0 B3.0")
    for stage in (0, 1):  # m = p: every forward first (Megatron's special case)
        assert schedule("interleaved", 2, stage, 2, 2) == spelled(
            "F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0")
    assert schedule("interleaved", 2, 0, 2, 3) == spelled(
        "F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 B0.2 B1.2 B0.1 B1.1 B0.0 B1.0")


def test_interleaved_chunks_are_virtual_stages():
    # 8 blocks, 2 stages x 2 chunks of 2: virtual stage c p + s = chunk c of stage s
    assert chunk_layers(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert chunk_layers(6, 3, 2) == [[(0, 1), (3, 4)], [(1, 2), (4, 5)], [(2, 3), (5, 6)]]
    assert chunk_layers(6, 2, 3) == [[(0, 1), (2, 3), (4, 5)], [(1, 2), (3, 4), (5, 6)]]
    config = preset("tiny", 30, n_layers=8)
    names = stage_param_names(config, 2, 1, v=2)
    assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == {"2", "3", "6", "7"}
    assert "head.w" in names and "tok_emb" not in names
    everyone = [n for s in range(2) for n in stage_param_names(config, 2, s, v=2)]
    assert sorted(everyone) == sorted(param_shapes(config))


def test_peak_inflight_gpipe_m_and_1f1b_at_most_p_minus_stage():
    for p, s, m in GRID:
        assert peak_inflight(schedule("gpipe", p, s, m)) == m
        one_f_one_b = peak_inflight(schedule("1f1b", p, s, m))
        assert one_f_one_b <= p - s
        assert one_f_one_b == min(p - s, m)
        # zero bubble H1: 1F1B's stage-0 peak on every stage (activations kept until W)
        assert peak_inflight(schedule("zb-h1", p, s, m)) == min(p, m)


def test_peak_inflight_equals_the_cost_model_for_every_schedule():
    for name in SCHEDULES:
        for p, s, m, v in schedule_grid(name):
            assert peak_inflight(schedule(name, p, s, m, v)) == \
                costmodel.pipeline_peak_microbatches(name, p, s, m, v), (name, p, s, m, v)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_are_deadlock_free_with_nonblocking_sends(name):
    for p, s, m, v in schedule_grid(name, max_m=11):
        if s:  # one run covers every stage
            continue
        messages = simulate_messages(name, p, m, blocking_sends=False, v=v)
        # every (micro-batch, chunk) crosses p v - 1 boundaries forward and as many back
        assert messages == 2 * m * (p * v - 1), (name, p, m, v)
        simulate_times(name, p, m, v)


def test_1f1b_needs_nonblocking_sends_and_gpipe_does_not():
    for p in range(1, 6):
        for m in range(1, 9):
            simulate_messages("gpipe", p, m, blocking_sends=True)
            if p >= 2 and m >= 2:  # steady state: F(k) forward and B(j) back, both blocked
                with pytest.raises(Deadlock):
                    simulate_messages("1f1b", p, m, blocking_sends=True)
            else:
                simulate_messages("1f1b", p, m, blocking_sends=True)


def test_a_bad_order_deadlocks_in_all_three_simulations():
    """The simulations can fail: stage 0 without 1F1B's warm-up forward waits for B(0) while
    stage 1 (GPipe's order) waits for F(1) - a cycle no mailbox breaks."""
    bad = [[("F", 0), ("B", 0), ("F", 1), ("B", 1)], schedule("gpipe", 2, 1, 2)]
    with pytest.raises(Deadlock):
        run_messages(bad, 1, blocking_sends=False)
    with pytest.raises(Deadlock):
        run_times(bad)
    with pytest.raises(ValueError, match="deadlocks"):
        simulate_pipeline(bad)


# --------------------------------------------------------------------------- bubble formulas


def test_bubble_formulas_by_hand():
    bubble = costmodel.pipeline_bubble_fraction
    # GPipe and 1F1B: p - 1 idle slots of m + p - 1, whatever the costs
    assert bubble(4, 8, "gpipe") == pytest.approx(3 / 11)
    assert bubble(4, 8, "gpipe", t_forward=1.0, t_backward=3.0) == pytest.approx(3 / 11)
    assert bubble(4, 13, "1f1b") == pytest.approx(3 / 16)
    assert bubble(3, 2, "1f1b") == pytest.approx(2 / 4)
    assert bubble(1, 5, "1f1b") == 0.0
    # interleaved: slots a v-th as long, (p - 1) / (v m + p - 1)
    assert bubble(4, 8, "interleaved", v=2) == pytest.approx(3 / 19)
    assert bubble(2, 4, "interleaved", v=3) == pytest.approx(1 / 13)
    assert bubble(4, 4, "interleaved", v=2) == pytest.approx(3 / 11)
    # ZB-H1, p = 4, m = 8, T_F = T_B = T_W = 1 (t_backward = B + W = 2): the paper's
    # (p - 1)(T_F + T_B - T_W) = 3 idle per stage, busy m (T_F + T_B + T_W) = 24: 3 / 27
    assert bubble(4, 8, "zb-h1", 1, 1.0, 2.0, 1.0) == pytest.approx(3 / 27)
    assert bubble(4, 8, "zb-h1") == pytest.approx(3 / 27)  # W defaults to half the backward
    # ZB-H1 p = 2, m = 2, F = B = W = 1, timelines by hand:
    #   stage 1: F0 1-2, B0 2-3, F1 3-4, B1 4-5, W0 5-6, W1 6-7
    #   stage 0: F0 0-1, F1 1-2, B0 3-4, W0 4-5, B1 5-6, W1 6-7
    # makespan 7, each stage busy 6: 1/7 (1F1B: 1/3)
    assert bubble(2, 2, "zb-h1", 1, 1.0, 2.0, 1.0) == pytest.approx(1 / 7)
    # the same with W = 2, B = 1 (t_backward 3): stage 1 F0 1-2 B0 2-3 F1 3-4 B1 4-5 W0 5-7
    # W1 7-9; stage 0 F0 0-1 F1 1-2 B0 3-4 W0 4-6 B1 6-7 W1 7-9: makespan 9, busy 8: 1/9
    assert bubble(2, 2, "zb-h1", 1, 1.0, 3.0, 2.0) == pytest.approx(1 / 9)
    # m = 1 leaves no W to fill with: stage 1 F 1-2 B 2-3 W 3-4, stage 0 F 0-1 B 3-4 W 4-5:
    # makespan 5, busy 3: 2/5
    assert bubble(2, 1, "zb-h1", 1, 1.0, 2.0, 1.0) == pytest.approx(2 / 5)
    # p = 3, m = 2 (fewer micro-batches than stages), F = B = W = 1:
    #   stage 2: F0 2-3 B0 3-4 F1 4-5 B1 5-6 W0 6-7 W1 7-8
    #   stage 1: F0 1-2 F1 2-3 B0 4-5 B1 6-7 W0 7-8 W1 8-9
    #   stage 0: F0 0-1 F1 1-2 B0 5-6 W0 6-7 B1 7-8 W1 8-9: makespan 9, busy 6: 3/9
    assert bubble(3, 2, "zb-h1", 1, 1.0, 2.0, 1.0) == pytest.approx(3 / 9)


def test_bubble_hand_timelines_are_the_simulators():
    """The hand timelines above, event by event, from the library's simulator."""
    events = simulate_pipeline([schedule("zb-h1", 3, s, 2) for s in range(3)], 1.0, 2.0, 1.0)
    got = [[(e["kind"][0].upper(), e["microbatch"], e["start"], e["end"]) for e in stage]
           for stage in events]
    assert got[2] == [("F", 0, 2, 3), ("B", 0, 3, 4), ("F", 1, 4, 5), ("B", 1, 5, 6),
                      ("W", 0, 6, 7), ("W", 1, 7, 8)]
    assert got[1] == [("F", 0, 1, 2), ("F", 1, 2, 3), ("B", 0, 4, 5), ("B", 1, 6, 7),
                      ("W", 0, 7, 8), ("W", 1, 8, 9)]
    assert got[0] == [("F", 0, 0, 1), ("F", 1, 1, 2), ("B", 0, 5, 6), ("W", 0, 6, 7),
                      ("B", 1, 7, 8), ("W", 1, 8, 9)]
    assert bubble_fraction(events) == pytest.approx(3 / 9)


COST_MIXES = [  # (t_forward, t_backward = B + W, t_weight)
    (1.0, 2.0, None),  # B = W = F: the default
    (1.0, 3.0, 2.0),  # W longer than B
    (1.0, 3.0, 0.5),  # W much shorter than B
    (2.0, 1.0, 0.25),  # a backward cheaper than the forward
]


@pytest.mark.parametrize("name", SCHEDULES)
def test_simulated_bubble_equals_the_formula(name):
    """Two independent implementations: the library's simulator (and this file's) against
    costmodel's closed forms, p 1..5, m 1..12, v 2 and 3, four cost mixes."""
    for p, s, m, v in schedule_grid(name):
        if s:
            continue
        ops = [schedule(name, p, stage, m, v) for stage in range(p)]
        for t_f, t_b, t_w in COST_MIXES:
            events = simulate_pipeline(ops, t_f, t_b, t_w, v)
            formula = costmodel.pipeline_bubble_fraction(p, m, name, v, t_f, t_b, t_w)
            assert bubble_fraction(events) == pytest.approx(formula, rel=1e-12, abs=1e-12), \
                (name, p, m, v, t_f, t_b, t_w)
            makespan = max(simulate_times(name, p, m, v, t_f, t_b, t_w))
            assert makespan == pytest.approx(max(e["end"] for e in sum(events, [])))
            assert 1 - m * (t_f + t_b) / makespan == pytest.approx(formula, rel=1e-12, abs=1e-12)
            if name in ("gpipe", "1f1b"):  # m + p - 1 slots of F + B
                assert makespan == pytest.approx((m + p - 1) * (t_f + t_b))
            if name == "interleaved":  # v m + p - 1 slots of a chunk's F + B
                assert makespan == pytest.approx((v * m + p - 1) * (t_f + t_b) / v)


def test_zero_bubble_h1_beats_1f1b_and_interleaving_beats_1f1b():
    for p in range(2, 6):
        for m in range(p, 13, p):
            one_f_one_b = costmodel.pipeline_bubble_fraction(p, m, "1f1b")
            assert costmodel.pipeline_bubble_fraction(p, m, "zb-h1") < one_f_one_b
            assert costmodel.pipeline_bubble_fraction(p, m, "interleaved", 2) < one_f_one_b


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        schedule("zigzag", 2, 0, 2)
    for p, s, m in [(0, 0, 1), (2, 2, 1), (2, -1, 1), (2, 0, 0)]:
        with pytest.raises(ValueError, match="expected p >= 1"):
            schedule("gpipe", p, s, m)
    with pytest.raises(ValueError, match="virtual_stages: expected 2 to 16 .*got 1"):
        schedule("interleaved", 2, 0, 2)
    with pytest.raises(ValueError, match="virtual_stages: expected 2 to 16 .*got 17"):
        schedule("interleaved", 2, 0, 2, 17)  # its message tags would pass 32767
    for name in FLAT:
        with pytest.raises(ValueError, match=f"virtual_stages: .*got 2 for '{name}'"):
            schedule(name, 2, 0, 2, 2)
    with pytest.raises(ValueError, match="microbatches: .*multiple of 2, got 3"):
        schedule("interleaved", 2, 0, 3, 2)
    with pytest.raises(ValueError, match="n_layers: .*expected a multiple of 4, got 6"):
        chunk_layers(6, 2, 2)


def test_pipeline_peak_microbatches_cost_model():
    peak = costmodel.pipeline_peak_microbatches
    assert peak("gpipe", 4, 0, 8) == 8
    assert peak("gpipe", 4, 3, 8) == 8
    assert [peak("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [peak("1f1b", 4, s, 2) for s in range(4)] == [2, 2, 2, 1]
    # ZB-H1 keeps a micro-batch until its W: stage 1 of p = 4 (spelled out above) holds
    # F0 F1 F2 | B0 F3 -> 4 | B1 W0 -> 3 | F4 -> 4 ...: 4, like every stage
    assert [peak("zb-h1", 4, s, 8) for s in range(4)] == [4, 4, 4, 4]
    assert [peak("zb-h1", 4, s, 2) for s in range(4)] == [2, 2, 2, 2]
    # interleaved p = 2, v = 2, m = 4 (spelled out above): rank 0 warms up with 4 forwards
    # and runs a fifth before its first backward, rank 1 2 + 1; (micro-batch, chunk) pairs
    assert [peak("interleaved", 2, s, 4, 2) for s in range(2)] == [5, 3]
    assert [peak("interleaved", 2, s, 2, 2) for s in range(2)] == [4, 4]  # m = p: all
    # p = 4, v = 2, m = 8: (3 - s) 2 + 4 warm-up forwards, plus one
    assert [peak("interleaved", 4, s, 8, 2) for s in range(4)] == [11, 9, 7, 5]
    with pytest.raises(ValueError, match="schedule"):
        peak("zigzag", 4, 0, 8)
    with pytest.raises(ValueError, match="0 <= stage < p"):
        peak("gpipe", 4, 4, 8)


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
    tags = [message_tag(kind, mb, c) for kind in "FB" for mb in range(MAX_MICROBATCHES)
            for c in range(MAX_VIRTUAL_STAGES)]
    assert len(set(tags)) == len(tags) and min(tags) == 0
    assert max(tags) <= 32767  # the largest tag the MPI standard guarantees
    assert message_tag("F", 0, 0) == message_tag("F", 0) and message_tag("B", 0, 1) != 1


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


CASES = [(n, name, m) for n in (1, 2, 3, 4) for m in (1, 4, 8) for name in FLAT]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, name, m", CASES)
def test_pp_loss_curve_equals_serial(n_ranks, name, m):
    result = run_pp(n_ranks, name, m)
    assert (result["world_size"], result["schedule"], result["microbatches"]) == \
        (n_ranks, name, m)
    np.testing.assert_allclose(result["losses"], serial_losses(LAYERS), rtol=1e-10, atol=0)
    assert result["peak_inflight"] == result["peak_inflight_predicted"]


INTERLEAVED = [  # (ranks, virtual stages, micro-batches, layers): p v chunks of equal size
    (2, 2, 4, 4), (2, 2, 2, 4), (3, 2, 6, 6), (3, 2, 3, 6), (4, 2, 8, 8), (4, 2, 4, 8),
    (2, 3, 4, 6),
]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, v, m, layers", INTERLEAVED,
                         ids=[f"p{c[0]}-v{c[1]}-m{c[2]}-L{c[3]}" for c in INTERLEAVED])
def test_interleaved_loss_curve_equals_serial(n_ranks, v, m, layers):
    result = run_pp(n_ranks, "interleaved", m, "--virtual-stages", str(v), layers=layers)
    assert (result["schedule"], result["virtual_stages"], result["microbatches"]) == \
        ("interleaved", v, m)
    size = layers // (n_ranks * v)  # chunk c of rank r: blocks of virtual stage c p + r
    assert result["stage_layers"] == [[[(c * n_ranks + r) * size, (c * n_ranks + r + 1) * size]
                                       for c in range(v)] for r in range(n_ranks)]
    np.testing.assert_allclose(result["losses"], serial_losses(layers), rtol=1e-10, atol=0)
    assert result["peak_inflight"] == result["peak_inflight_predicted"]


UNEVEN = [  # (ranks, schedule, blocks per stage): 5 blocks cut unevenly
    (2, "zb-h1", "4,1"), (3, "zb-h1", "1,3,1"), (4, "zb-h1", "1,1,1,2"),
    (4, "gpipe", "2,1,1,1"), (4, "1f1b", "1,2,1,1"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks, name, counts", UNEVEN)
def test_uneven_stage_layers_equal_serial(n_ranks, name, counts):
    result = run_pp(n_ranks, name, 4, "--stage-layers", counts, layers=5)
    assert [hi - lo for lo, hi in result["stage_layers"]] == [int(c) for c in counts.split(",")]
    np.testing.assert_allclose(result["losses"], serial_losses(5), rtol=1e-10, atol=0)
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


REPORTS = [("gpipe", 5, 1, LAYERS), ("1f1b", 5, 1, LAYERS), ("zb-h1", 5, 1, LAYERS),
           ("interleaved", 6, 2, 6)]  # (schedule, micro-batches, virtual stages, layers)


@pytest.mark.mpi
@pytest.mark.parametrize("name, m, v, layers", REPORTS, ids=[c[0] for c in REPORTS])
def test_report_events_peaks_and_bubble_fields(name, m, v, layers):
    p = 3
    result = run_pp(p, name, m, "--virtual-stages", str(v), layers=layers)
    one_f_one_b = (p - 1) / (m + p - 1)
    if name == "interleaved":
        assert result["bubble_formula"] == pytest.approx((p - 1) / (v * m + p - 1))
    elif name == "zb-h1":  # at the measured F, B and W costs: below 1F1B's whatever they are
        assert result["op_seconds"]["weight"] > 0
        assert 0 < result["bubble_formula"] < one_f_one_b
    else:
        assert result["bubble_formula"] == pytest.approx(one_f_one_b)
    for key in ("step_seconds", "pipeline_seconds", "busy_seconds", "bubble_measured",
                "bubble_measured_per_rank", "last_step_seconds", "config", "settings"):
        assert key in result
    assert len(result["step_seconds"]) == STEPS
    assert len(result["busy_seconds"]) == len(result["events"]) == p
    assert 0.0 <= result["bubble_measured"] <= 1.0
    assert result["peak_inflight"] == [costmodel.pipeline_peak_microbatches(name, p, s, m, v)
                                       for s in range(p)]
    for stage, events in enumerate(result["events"]):
        compute = [(e["kind"][0].upper(), e["microbatch"]) for e in events
                   if e["kind"] in ("forward", "backward", "weight")]
        # ran in the schedule's order (the events do not record the chunk)
        assert compute == [op[:2] for op in schedule(name, p, stage, m, v)]
        assert all(0.0 <= e["start"] <= e["end"] for e in events)
        assert all(a["end"] <= b["start"] for a, b in zip(events, events[1:], strict=False))
        # messages: each chunk (virtual stage c p + stage) receives m activations unless it
        # is the first virtual stage and m gradients unless it is the last; sends as many
        virtual = [c * p + stage for c in range(v)]
        expected = sum((here > 0) * m + (here < p * v - 1) * m for here in virtual)
        recvs = sum(e["kind"] == "recv" for e in events)
        sends = sum(e["kind"] == "send" and e["microbatch"] is not None for e in events)
        assert recvs == sends == expected


@pytest.mark.mpi
def test_too_few_layers_for_the_world_size_is_rejected_clearly():
    with pytest.raises(MPIJobError, match="world_size=3.*n_layers=2"):
        run_pp(3, "1f1b", 4, layers=2)


@pytest.mark.mpi
def test_batch_smaller_than_microbatches_is_rejected_clearly():
    with pytest.raises(MPIJobError, match="batch_size: expected at least microbatches=16"):
        run_pp(2, "gpipe", 16)


# --------------------------------------------------------------------------- chapter 13 options


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
