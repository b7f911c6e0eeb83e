"""The learner's pipeline schedules (chapter 7), compared with plans.pipeline.schedule's lists
case by case, for the MPI checker (learner_cases.CHECKS). A list that differs is measured -
peak_inflight for memory, the simulator's bubble_fraction for time - so the message says what
the difference costs, and the classic wrong answers are named without giving the answer away.
"""

from __future__ import annotations

from tfcourse.parallel.plans.pipeline import (
    bubble_fraction,
    peak_inflight,
    schedule,
    simulate_pipeline,
)

STAGES = range(1, 5)       # p: 1 to 4 stages, as the checker's 1-4 ranks
MICROBATCHES = range(1, 9)  # m < p, m = p and m > p for every p
WORST = (4, 8)             # (p, m) where the wrong answers' costs are measured
COSTS = {"t_forward": 1.0, "t_backward": 2.0, "t_weight": 1.0}  # T_F = 1, T_B = T_W = 1
COSTS_TEXT = "simulate_pipeline, T_F = 1, T_B = T_W = 1"


def _ops(fn, p: int, stage: int, m: int) -> list[tuple]:
    return [tuple(op) for op in fn(p, stage, m)]


def check_schedule_1f1b(fn, comm):
    """1F1B's operations per stage against the library's, for 1-5 stages and 1-8
    micro-batches."""
    for p in range(1, 6):
        problem = None
        for stage in range(p):
            for m in range(1, 9):
                got, want = _ops(fn, p, stage, m), schedule("1f1b", p, stage, m)
                if got != want:
                    problem = (f"p={p}, stage {stage}, m={m}: {got} instead of {want}: how many "
                               f"forwards does stage s run before its first backward?")
                    break
            if problem:
                break
        yield problem


def _w_late(p: int, stage: int, m: int, late: int) -> list[tuple]:
    """1F1B's forwards and input-gradient backwards with W(i) right after B(i + late) and the
    W's left over at the end: the library's ZB-H1 is late = stage; the classic wrong answers
    are late = 0 (W after its own B), p - stage - 1 (the wrong direction) and m (all at the
    end)."""
    ops, placed = [], 0
    for op in schedule("1f1b", p, stage, m):
        ops.append(op)
        if op[0] == "B" and op[1] >= late:
            ops.append(("W", op[1] - late))
            placed += 1
    return ops + [("W", i) for i in range(placed, m)]


WRONG_ZB_H1 = {  # a wrong answer seen everywhere: its late(p, stage, m) (None: no W), what
    "own": (lambda p, stage, m: 0,
            "every W comes right after its own B, on every stage: 1F1B with the backward "
            "split - it trains right, but saves little of the bubble"),
    "reversed": (lambda p, stage, m: p - stage - 1,
                 "W(i) runs p - stage - 1 backwards late: the wrong direction"),
    "end": (lambda p, stage, m: m, "every W at the very end of the step"),
    "none": (None, "your lists have no W: their B's are whole backwards (that is 1F1B). ZB-H1 "
             "splits each backward into B, the input gradient the stage before waits for, and "
             "W, the weight gradients that can wait: a ('W', i) for every micro-batch"),
}


def _measure(fn, p: int, m: int) -> tuple[list[int], float | None]:
    """(peak in flight per stage, simulated bubble - None if the stages deadlock) of the
    learner's lists for p stages and m micro-batches."""
    per_stage = [_ops(fn, p, s, m) for s in range(p)]
    try:
        bubble = bubble_fraction(simulate_pipeline(per_stage, **COSTS))
    except ValueError:
        bubble = None
    return [peak_inflight(ops) for ops in per_stage], bubble


def _library_bubble(p: int, m: int) -> float:
    return bubble_fraction(simulate_pipeline([schedule("zb-h1", p, s, m) for s in range(p)],
                                             **COSTS))


def _peak_text(peaks: list[int], p: int, m: int) -> str:
    stage = max(range(p), key=lambda s: peaks[s])
    return (f"your stage {stage} holds {peaks[stage]} micro-batches at once; ZB-H1 holds at "
            f"most min(p, m) = {min(p, m)} (peak_inflight)")


def _everywhere(fn, late) -> bool:
    """Whether fn(p, stage, m) is _w_late(p, stage, m, late(p, stage, m)) in every case (1F1B's
    list if late is None)."""
    return all(_ops(fn, p, s, m) == (schedule("1f1b", p, s, m) if late is None
                                     else _w_late(p, s, m, late(p, s, m)))
               for p in STAGES for s in range(p) for m in MICROBATCHES)


def _pointer_everywhere(fn) -> str | None:
    """If the learner's function is one of the classic wrong answers for every (p, stage, m),
    what it costs at p = 4, m = 8 and a question that points at the fix."""
    for key, (late, what) in WRONG_ZB_H1.items():
        if not _everywhere(fn, late):
            continue
        if late is None:
            return what
        p, m = WORST
        peaks, bubble = _measure(fn, p, m)
        idle = (f"your stages idle {bubble:.1%} of the step at p={p}, m={m} ({COSTS_TEXT}), "
                f"ZB-H1's {_library_bubble(p, m):.1%}")
        if key == "own":
            whole = bubble_fraction(simulate_pipeline(
                [schedule("1f1b", p, s, m) for s in range(p)], **COSTS))
            return (f"{what}: {idle} (1F1B's, whole backwards: {whole:.1%}). Under 1F1B "
                    f"stage s holds only min(p - s, m) micro-batches and stage 0 min(p, m): "
                    f"what could a later stage keep a while longer, and run while it would "
                    f"otherwise wait?")
        if key == "reversed":
            return (f"{what}: at p={p}, m={m} {_peak_text(peaks, p, m)}. Under 1F1B which "
                    f"stage already holds the most micro-batches, and which have room to "
                    f"spare?")
        return (f"{what}: at p={p}, m={m} {_peak_text(peaks, p, m)} - and the step is no "
                f"shorter: {idle}, because the waits come before the end. Run each W as soon "
                f"as it fits within 1F1B's stage-0 memory")
    return None


def _pointer_here(fn, p: int, stage: int, m: int, got: list[tuple]) -> str:
    """What is wrong with the learner's list in this one case."""
    for i in range(m):
        ws = [k for k, op in enumerate(got) if op == ("W", i)]
        bs = [k for k, op in enumerate(got) if op == ("B", i)]
        if len(ws) != 1:
            return (f"W({i}) {'is missing' if not ws else f'runs {len(ws)} times'}: every "
                    f"micro-batch's weight gradients are computed exactly once")
        if bs and ws[0] < bs[0]:
            return f"W({i}) runs before B({i}): W needs the work its B leaves"
    if [op for op in got if op[0] != "W"] != schedule("1f1b", p, stage, m):
        return ("its F's and B's are not in 1F1B's order (ZB-H1 keeps that order and only adds "
                "the W's): how many forwards does stage s run before its first backward?")
    peaks, bubble = _measure(fn, p, m)
    if max(peaks) > min(p, m):
        return _peak_text(peaks, p, m)
    library = _library_bubble(p, m)
    if bubble is None:
        return f"the stages' lists deadlock together ({COSTS_TEXT})"
    if bubble > library + 1e-12:
        return (f"your stages idle {bubble:.1%} of the step ({COSTS_TEXT}), ZB-H1's "
                f"{library:.1%}: which waits could a W fill without holding more than "
                f"min(p, m) micro-batches?")
    return (f"the same peak ({max(peaks)}) and bubble ({bubble:.1%}) as ZB-H1 but another "
            f"order: the checker wants ZB-H1's")


def _pointer(fn, p: int, stage: int, m: int, got: list[tuple]) -> str:
    try:
        return " - " + (_pointer_everywhere(fn) or _pointer_here(fn, p, stage, m, got))
    except Exception:  # noqa: BLE001 - the learner's function fails on another case
        return ""


def _first_difference(got: list[tuple], want: list[tuple]) -> str:
    k = next((k for k, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
             min(len(got), len(want)))
    return (f"op {k} is {got[k] if k < len(got) else 'missing (your list ends)'} where ZB-H1 "
            f"runs {want[k] if k < len(want) else 'nothing (its list has ended)'}")


def check_schedule_zb_h1(fn, comm):
    """ZB-H1's operations per stage against the library's, for 1-4 stages and 1-8
    micro-batches; on a difference, the first op that differs and what it costs."""
    for p in STAGES:
        problem = None
        for stage in range(p):
            for m in MICROBATCHES:
                got, want = _ops(fn, p, stage, m), schedule("zb-h1", p, stage, m)
                if got != want:
                    problem = (f"p={p}, stage {stage}, m={m}: {_first_difference(got, want)}"
                               + _pointer(fn, p, stage, m, got))
                    break
            if problem:
                break
        yield problem
