"""Chapter 7: how pipeline parallelism cuts the model into stages and a batch into
micro-batches; schedules as data (lists of ("F" | "B", micro-batch) operations), one simulator
and the measures of a timeline. The MPI program executes these lists. MPI-free."""

from __future__ import annotations

import statistics

import numpy as np

from tfcourse.nn.model import piece_params
from tfcourse.nn.validate import parse_list, require_positive_int, require_real
from tfcourse.parallel.plans.batches import chunk_bounds

SCHEDULES = ("gpipe", "1f1b")


def stage_layers(n_layers: int, world_size: int,
                 layer_counts: list[int] | None = None) -> list[tuple[int, int]]:
    """Blocks [lo, hi) of every stage: sizes differing by at most one block, or
    `layer_counts[s]` blocks on stage s (uneven stages, e.g. for devices of different speed)."""
    if n_layers < world_size:
        raise ValueError(f"n_layers: expected at least world_size={world_size} blocks so every "
                         f"stage gets one, got n_layers={n_layers}")
    if layer_counts is None:
        return chunk_bounds(n_layers, world_size)
    counts = list(layer_counts)
    if (len(counts) != world_size or sum(counts) != n_layers
            or any(not isinstance(c, int) or c < 1 for c in counts)):
        raise ValueError(f"layer_counts: expected {world_size} positive integers (one per "
                         f"stage) adding up to n_layers={n_layers}, got {counts}")
    ends = np.cumsum(counts).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def microbatch_rows(batch_size: int, microbatches: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the global batch in each micro-batch; sizes differ by at most one."""
    if microbatches < 1:
        raise ValueError(f"microbatches: expected a positive integer, got {microbatches}")
    if batch_size < microbatches:
        raise ValueError(f"batch_size: expected at least microbatches={microbatches} rows so "
                         f"every micro-batch gets data, got {batch_size}")
    return chunk_bounds(batch_size, microbatches)


def stage_param_names(config, world_size: int, stage: int,
                      layer_counts: list[int] | None = None) -> list[str]:
    """Names of the parameters stage `stage` holds, in `param_shapes` order: the model's
    pieces it runs (the embedding on the first stage, its blocks, the head on the last)."""
    lo, hi = stage_layers(config.n_layers, world_size, layer_counts)[stage]
    pieces = piece_params(config)
    runs = (["embed"] * (stage == 0) + [f"blocks.{i}" for i in range(lo, hi)]
            + ["head"] * (stage == world_size - 1))
    return [name for piece in runs for name in pieces[piece]]


def check_schedule_args(name: str, p: int, stage: int, m: int) -> None:
    """A known schedule, p >= 1 stages, 0 <= stage < p and m >= 1 micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
    if p < 1 or not 0 <= stage < p or m < 1:
        raise ValueError(f"expected p >= 1, 0 <= stage < p and m >= 1, got p={p}, "
                         f"stage={stage}, m={m}")


def schedule(name: str, p: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The ops stage `stage` of `p` runs in one step, as ("F" | "B", micro-batch) pairs."""
    check_schedule_args(name, p, stage, m)
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]
    warmup = min(p - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]


def peak_inflight(ops: list[tuple[str, int]]) -> int:
    """Most micro-batches forwarded but not yet backwarded at any point of `ops`."""
    alive = peak = 0
    for kind, _ in ops:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


def message_tag(kind: str, microbatch: int) -> int:
    """MPI tag of micro-batch `microbatch`'s activations ("F") or activation gradients ("B")."""
    return 2 * microbatch + (0 if kind == "F" else 1)


def simulate_pipeline(ops_per_stage: list[list[tuple[str, int]]], t_forward: float = 1.0,
                      t_backward: float = 2.0) -> list[list[dict]]:
    """Timeline of a pipeline schedule on ideal hardware (no communication cost).

    ops_per_stage[s] is stage s's ordered list of ("F" | "B", micro-batch). A forward of
    micro-batch i on stage s waits for its forward on stage s - 1; a backward waits for the
    backward on stage s + 1 (and the stage's own forward). Returns, per stage, events
    {"kind": "forward" | "backward", "microbatch", "start", "end"} like the MPI program's.
    Raises ValueError if the schedule deadlocks.
    """
    p = len(ops_per_stage)
    done: dict[tuple[str, int, int], float] = {}
    clock, position = [0.0] * p, [0] * p
    events: list[list[dict]] = [[] for _ in range(p)]
    while any(position[s] < len(ops_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(ops_per_stage[s]):
                continue
            kind, i = ops_per_stage[s][position[s]]
            needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
            if kind == "B":
                needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
            if all(n in done for n in needs):
                start = max([clock[s]] + [done[n] for n in needs])
                end = start + (t_forward if kind == "F" else t_backward)
                done[(kind, s, i)], clock[s] = end, end
                events[s].append({"kind": "forward" if kind == "F" else "backward",
                                  "microbatch": i, "start": start, "end": end})
                position[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("ops_per_stage: the schedule deadlocks (every stage waits)")
    return events


SCHEDULE_KINDS = ("forward", "backward", "send", "wait", "recv")  # the schedule's own events


def stage_bubbles(events_per_stage: list[list[dict]]) -> tuple[float, list[float]]:
    """(makespan, each stage's idle share 1 - busy / makespan) of one pipeline timeline,
    simulated or measured: the pipeline ends when the last stage's last scheduled operation
    ends (the optimiser step and its collectives afterwards are not part of it)."""
    makespan = max((e["end"] for events in events_per_stage for e in events
                    if e["kind"] in SCHEDULE_KINDS), default=0.0)
    return makespan, [1.0 - busy_seconds(events) / makespan if makespan > 0 else 0.0
                      for events in events_per_stage]


def bubble_fraction(events_per_stage: list[list[dict]]) -> float:
    """1 - busy time / (stages x makespan): the idle share of a pipeline timeline."""
    return float(np.mean(stage_bubbles(events_per_stage)[1]))


def busy_seconds(events: list[dict]) -> float:
    """Time spent computing (forward + backward events)."""
    return sum(e["end"] - e["start"] for e in events if e["kind"] in ("forward", "backward"))


def choose_fastest(measured: dict) -> object:
    """The run-time selection rule (e.g. of the micro-batch count): the key whose measured
    step seconds have the lowest median (robust to one slow outlier); ties: first key.

    A NaN timing is refused (a bug upstream): it compares False with everything, so the
    choice would depend on the order of the keys."""
    if not measured or any(len(times) == 0 for times in measured.values()):
        raise ValueError(f"measured: expected a non-empty dict of non-empty lists of seconds, "
                         f"got {measured!r}")
    for key, times in measured.items():
        for i, seconds in enumerate(times):
            require_real(f"measured[{key!r}][{i}]", seconds)
    return min(measured, key=lambda key: statistics.median(measured[key]))


AUTO_MICROBATCHES = (1, 2, 4, 8, 16)


def parse_microbatches(text: str) -> int | str:
    """--microbatches: a positive integer, or "auto" (chosen at run time, MicrobatchChooser)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--microbatches: expected a positive integer or 'auto', "
                         f"got {text!r}") from None
    return require_positive_int("--microbatches", value)


def parse_stage_layers(text: str | None, world_size: int, n_layers: int) -> list[int] | None:
    """--stage-layers N,N,...: blocks per stage, one per stage, adding up to n_layers."""
    if text is None:
        return None
    counts = parse_list("--stage-layers", text, int, require_positive_int)
    if len(counts) != world_size or sum(counts) != n_layers:
        raise ValueError(f"--stage-layers: expected {world_size} block counts (one per "
                         f"stage) adding up to n_layers={n_layers}, got {counts}")
    return counts


def parse_slowdown(text: str | None, world_size: int) -> list[float] | None:
    """--slowdown F,F,...: one factor >= 1 per rank (rank r's compute takes F_r times longer)."""
    if text is None:
        return None
    factors = parse_list("--slowdown", text, float,
                         lambda flag, v: require_real(flag, v, positive=True))
    if len(factors) != world_size or min(factors) < 1.0:
        raise ValueError(f"--slowdown: expected {world_size} factors >= 1 (one per rank), "
                         f"got {factors}")
    return factors


class MicrobatchChooser:
    """--microbatches auto: adaptive parallelism at run time. Step 0 warms up; the next steps
    try each candidate micro-batch count once; every later step uses the one whose step was
    fastest (`choose_fastest`). The program records the slowest rank's time, so every rank
    sees the same numbers and makes the same choice. Micro-batching does not change the
    gradient, so the loss curve is the serial one whatever is chosen."""

    def __init__(self, batch_size: int, fixed: int | str):
        self.fixed = None if fixed == "auto" else fixed
        self.candidates = [m for m in AUTO_MICROBATCHES if m <= batch_size]
        self.measured: dict[int, list[float]] = {}
        self.chosen = self.fixed

    def for_step(self, step: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if 1 <= step <= len(self.candidates):
            return self.candidates[step - 1]
        return self.chosen or self.candidates[-1]

    def record(self, step: int, m: int, slowest_seconds: float) -> None:
        if self.fixed is None and 1 <= step <= len(self.candidates):
            self.measured.setdefault(m, []).append(slowest_seconds)
            self.chosen = choose_fastest(self.measured)
