"""Chapter 7: how pipeline parallelism cuts the model into stages and a batch into
micro-batches; schedules as data, one simulator and the measures of a timeline. The MPI
program executes these lists. MPI-free.

An operation is (kind, micro-batch) or, for interleaved schedules, (kind, micro-batch, chunk):
"F" a forward; "B" a backward - the whole of it, or with a zero-bubble schedule only its input
gradient (the model's backward_input_pass); "W" the weight gradients that B left
(weight_pass). `chunk` is which of the rank's v model chunks runs (0 when absent)."""

from __future__ import annotations

import statistics

import numpy as np

from tfcourse.nn.model import piece_params
from tfcourse.nn.validate import parse_list, require_positive_int, require_real
from tfcourse.parallel.plans.batches import chunk_bounds

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
# message tags are 2 * (chunk * MAX_MICROBATCHES + micro-batch) + kind: at most 32767, the
# largest tag every MPI library must accept
MAX_MICROBATCHES, MAX_VIRTUAL_STAGES = 1024, 16


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
                      layer_counts: list[int] | None = None, v: int = 1) -> list[str]:
    """Names of the parameters stage `stage` holds, in `param_shapes` order: the model's
    pieces it runs (the embedding on the first stage, its blocks, the head on the last).
    v > 1: the blocks of its v interleaved chunks (chunk_layers)."""
    if v > 1:
        blocks = [i for lo, hi in chunk_layers(config.n_layers, world_size, v)[stage]
                  for i in range(lo, hi)]
    else:
        lo, hi = stage_layers(config.n_layers, world_size, layer_counts)[stage]
        blocks = list(range(lo, hi))
    pieces = piece_params(config)
    runs = (["embed"] * (stage == 0) + [f"blocks.{i}" for i in blocks]
            + ["head"] * (stage == world_size - 1))
    return [name for piece in runs for name in pieces[piece]]


def chunk_layers(n_layers: int, world_size: int, v: int) -> list[list[tuple[int, int]]]:
    """The interleaved schedule's layout: the blocks cut into p v equal chunks, virtual stage
    c p + s being chunk c of stage s - so each stage holds v non-contiguous chunks. Returns,
    per stage, its chunks' blocks [lo, hi). n_layers must be a multiple of p v."""
    if n_layers % (world_size * v):
        raise ValueError(f"n_layers: the interleaved schedule cuts the blocks into "
                         f"{world_size} stages x {v} virtual stages = {world_size * v} equal "
                         f"chunks, expected a multiple of {world_size * v}, got {n_layers}")
    size = n_layers // (world_size * v)
    return [[((c * world_size + s) * size, (c * world_size + s + 1) * size) for c in range(v)]
            for s in range(world_size)]


def check_schedule_args(name: str, p: int, stage: int, m: int, v: int = 1,
                        sent: bool = True) -> None:
    """A known schedule, p >= 1 stages, 0 <= stage < p, m >= 1 micro-batches and v model
    chunks per stage: v > 1 only, and always, for "interleaved", whose m must be a multiple
    of p (Megatron-LM's rule: the micro-batches go round the stages in groups of p). sent:
    the schedule runs as MPI messages, whose tags allow m <= MAX_MICROBATCHES and v <=
    MAX_VIRTUAL_STAGES (a formula's schedule, sent=False, has no such bound)."""
    m_max, v_max = (MAX_MICROBATCHES, MAX_VIRTUAL_STAGES) if sent else (m, max(v, 2))
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
    if p < 1 or not 0 <= stage < p or not 1 <= m <= m_max:
        raise ValueError(f"expected p >= 1, 0 <= stage < p and 1 <= m <= {MAX_MICROBATCHES}, "
                         f"got p={p}, stage={stage}, m={m}")
    if (name == "interleaved") != (v > 1) or not 1 <= v <= v_max:
        raise ValueError(f"virtual_stages: expected 2 to {MAX_VIRTUAL_STAGES} for 'interleaved' "
                         f"and 1 for the other schedules, got {v} for {name!r}")
    if name == "interleaved" and m % p:
        raise ValueError(f"microbatches: the interleaved schedule sends micro-batches round the "
                         f"{p} stages in groups of {p}, expected a multiple of {p}, got {m}")


def schedule(name: str, p: int, stage: int, m: int, v: int = 1) -> list[tuple]:
    """The ops stage `stage` of `p` runs in one step (see the module docstring).

    gpipe: every forward, then every backward. 1f1b: p - stage - 1 warm-up forwards, then one
    forward and one backward in turn. interleaved (Narayanan et al. 2021): the rank holds v
    chunks of layers - chunk c is virtual stage c p + stage - and runs 1F1B over the m v
    (micro-batch, chunk) pairs, p micro-batches at a time per chunk. zb-h1 (Qi et al. 2024):
    1F1B's order of forwards and input-gradient backwards, with each W run s backwards late on
    stage s, so the waits of 1F1B's ramp-down are filled with weight gradients while no stage
    holds more micro-batches than stage 0 does under 1F1B (min(p, m))."""
    check_schedule_args(name, p, stage, m, v)
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]
    if name == "interleaved":
        return _interleaved(p, stage, m, v)
    warmup = min(p - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(m - warmup, m)]
    if name == "1f1b":
        return ops
    with_w, done = [], 0  # zb-h1: W(i) right after B(i + stage), the rest at the end
    for op in ops:
        with_w.append(op)
        if op[0] == "B" and op[1] >= stage:
            with_w.append(("W", op[1] - stage))
            done += 1
    return with_w + [("W", i) for i in range(done, m)]


def _interleaved(p: int, stage: int, m: int, v: int) -> list[tuple]:
    """Megatron-LM's interleaved 1F1B: the k-th forward of a rank runs chunk (k // p) % v of
    micro-batch (k // (p v)) p + k % p; backwards go through the chunks in reverse."""
    total = m * v

    def op(kind: str, k: int) -> tuple:
        chunk = (k % (p * v)) // p
        return (kind, (k // (p * v)) * p + k % p, chunk if kind == "F" else v - 1 - chunk)

    warmup = total if m == p else min((p - stage - 1) * 2 + (v - 1) * p, total)
    ops = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [op("F", warmup + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warmup, total)]


def op_chunk(op: tuple) -> int:
    """The model chunk an operation runs (0 unless the schedule is interleaved)."""
    return op[2] if len(op) > 2 else 0


def peak_inflight(ops: list[tuple]) -> int:
    """Most (micro-batch, chunk) pairs whose activations are kept at any point of `ops`: from
    the forward to the backward, or to W when the schedule has W operations (B leaves W's
    work alive - less than the whole activations: costmodel.weight_work_bytes_per_layer)."""
    release = "W" if any(op[0] == "W" for op in ops) else "B"
    alive = peak = 0
    for op in ops:
        alive += 1 if op[0] == "F" else -1 if op[0] == release else 0
        peak = max(peak, alive)
    return peak


def message_tag(kind: str, microbatch: int, chunk: int = 0) -> int:
    """MPI tag of (micro-batch, chunk)'s activations ("F") or activation gradients ("B")."""
    return 2 * (chunk * MAX_MICROBATCHES + microbatch) + (0 if kind == "F" else 1)


def simulate_pipeline(ops_per_stage: list[list[tuple]], t_forward: float = 1.0,
                      t_backward: float = 2.0, t_weight: float | None = None,
                      v: int = 1) -> list[list[dict]]:
    """Timeline of a pipeline schedule on ideal hardware (no communication cost).

    ops_per_stage[s] is stage s's ordered list of operations (see the module docstring); a
    stage's layers take t_forward and t_backward (the whole backward), each of its v chunks
    a v-th of that. Where the schedule has W operations, B takes t_backward - t_weight and W
    t_weight (default: half the backward each). Chunk c of stage s is virtual stage
    c p + s: its forward waits for the forward of virtual stage c p + s - 1, its backward for
    its own forward and the backward of c p + s + 1, W for its B. Returns, per stage, events
    {"kind": "forward" | "backward" | "weight", "microbatch", "chunk", "start", "end"} like
    the MPI program's. Raises ValueError if the schedule deadlocks."""
    p, last = len(ops_per_stage), len(ops_per_stage) * v - 1
    split = any(op[0] == "W" for ops in ops_per_stage for op in ops)
    t_weight = t_backward / 2 if t_weight is None else t_weight
    cost = {"F": t_forward / v, "B": (t_backward - (t_weight if split else 0.0)) / v,
            "W": t_weight / v}
    names = {"F": "forward", "B": "backward", "W": "weight"}
    done: dict[tuple[str, int, int], float] = {}
    clock, position = [0.0] * p, [0] * p
    events: list[list[dict]] = [[] for _ in range(p)]
    while any(position[s] < len(ops_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(ops_per_stage[s]):
                continue
            op = ops_per_stage[s][position[s]]
            kind, i, virtual = op[0], op[1], op_chunk(op) * p + s
            needs = {"F": [("F", virtual - 1, i)] if virtual > 0 else [],
                     "B": [("F", virtual, i)] + ([("B", virtual + 1, i)] if virtual < last
                                                  else []),
                     "W": [("B", virtual, i)]}[kind]
            if all(n in done for n in needs):
                start = max([clock[s]] + [done[n] for n in needs])
                end = start + cost[kind]
                done[(kind, virtual, i)], clock[s] = end, end
                events[s].append({"kind": names[kind], "microbatch": i, "chunk": op_chunk(op),
                                  "start": start, "end": end})
                position[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("ops_per_stage: the schedule deadlocks (every stage waits)")
    return events


SCHEDULE_KINDS = ("forward", "backward", "weight", "send", "wait", "recv")  # the schedule's


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
    """Time spent computing (forward, backward and weight-gradient events)."""
    return sum(e["end"] - e["start"] for e in events
               if e["kind"] in ("forward", "backward", "weight"))


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
