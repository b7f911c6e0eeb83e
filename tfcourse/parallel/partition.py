"""How the parallel chapters cut things up: batches, layers, tensors and parameter owners.

Pure functions with no MPI, so notebooks and exercises can use them in the kernel; the MPI
programs in tfcourse.parallel import them.
"""

from __future__ import annotations

import numpy as np

from tfcourse.model import param_shapes


def chunk_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """Split range(n) into p contiguous chunks whose sizes differ by at most one."""
    sizes = [n // p + (1 if i < n % p else 0) for i in range(p)]
    starts = np.cumsum([0] + sizes)
    return [(int(starts[i]), int(starts[i + 1])) for i in range(p)]


def batch_rows(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of the global batch that `rank` trains on; sizes differ by at most 1."""
    if batch_size < world_size:
        raise ValueError(f"batch_size: expected at least world_size={world_size} rows so every "
                         f"rank gets data, got {batch_size}")
    return chunk_bounds(batch_size, world_size)[rank]


def partition_params(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of every parameter for ZeRO: largest tensors first, each to the least loaded
    rank (ties to the lowest rank), so owners hold about 1/p of the values each."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return {name: owners[name] for name in sizes}


def make_buckets(names: list[str], sizes: dict[str, int], bucket_values: int) -> list[list[str]]:
    """Group parameter names, in backward order (last layer first), into buckets of at most
    `bucket_values` values (a tensor larger than that gets a bucket of its own)."""
    buckets, current, filled = [], [], 0
    for name in reversed(names):
        if current and filled + sizes[name] > bucket_values:
            buckets.append(current)
            current, filled = [], 0
        current.append(name)
        filled += sizes[name]
    return buckets + ([current] if current else [])


def flatten(arrays: dict, names: list[str]) -> np.ndarray:
    """One contiguous 1-D copy of the named arrays, in order."""
    return np.concatenate([arrays[name].ravel() for name in names])


def unflatten(flat: np.ndarray, like: dict, names: list[str]) -> dict:
    """Inverse of `flatten`: arrays shaped like like[name], copied out of `flat`."""
    out, offset = {}, 0
    for name in names:
        size = like[name].size
        out[name] = flat[offset:offset + size].reshape(like[name].shape).copy()
        offset += size
    return out


# Which axis of each block parameter is split across ranks (None: replicated).
SHARD_AXIS = {
    "attn.w_q": 1, "attn.w_k": 1, "attn.w_v": 1, "attn.b_q": 0, "attn.b_k": 0, "attn.b_v": 0,
    "attn.w_o": 0, "ffn.w1": 1, "ffn.b1": 0, "ffn.w2": 0,
}  # fmt: skip


def shard_axis(name: str) -> int | None:
    """The split axis of parameter `name` ("blocks.0.attn.w_q" -> 1), None if replicated."""
    if not name.startswith("blocks."):
        return None
    return SHARD_AXIS.get(name.split(".", 2)[2])


def check_world_size(config, world_size: int) -> None:
    """Heads and FFN columns must split evenly across ranks."""
    for name, size in (("n_heads", config.n_heads), ("d_ff", config.d_ff)):
        if size % world_size:
            raise ValueError(f"world_size: {world_size} ranks cannot split {name}={size} evenly; "
                             f"use a number of ranks that divides {name}")


def shard_params(params: dict, rank: int, world_size: int) -> dict:
    """This rank's slice of every split parameter (a copy); replicated ones are shared."""
    local = {}
    for name, value in params.items():
        axis = shard_axis(name)
        if axis is None:
            local[name] = value
        else:
            local[name] = np.array_split(value, world_size, axis=axis)[rank].copy()
    return local




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


def bubble_fraction(events_per_stage: list[list[dict]]) -> float:
    """1 - busy time / (stages x makespan): the idle share of a pipeline timeline."""
    makespan = max(e["end"] for events in events_per_stage for e in events)
    busy = sum(e["end"] - e["start"] for events in events_per_stage for e in events
               if e["kind"] in ("forward", "backward"))
    return 1.0 - busy / (len(events_per_stage) * makespan)


# --------------------------------------------------------------------------- pipelines (chapter 7)

SCHEDULES = ("gpipe", "1f1b")

def stage_layers(n_layers: int, world_size: int) -> list[tuple[int, int]]:
    """Blocks [lo, hi) of every stage; stage sizes differ by at most one block."""
    if n_layers < world_size:
        raise ValueError(f"n_layers: expected at least world_size={world_size} blocks so every "
                         f"stage gets one, got n_layers={n_layers}")
    return chunk_bounds(n_layers, world_size)


def microbatch_rows(batch_size: int, microbatches: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the global batch in each micro-batch; sizes differ by at most one."""
    if microbatches < 1:
        raise ValueError(f"microbatches: expected a positive integer, got {microbatches}")
    if batch_size < microbatches:
        raise ValueError(f"batch_size: expected at least microbatches={microbatches} rows so "
                         f"every micro-batch gets data, got {batch_size}")
    return chunk_bounds(batch_size, microbatches)


def stage_param_names(config, world_size: int, stage: int) -> list[str]:
    """Names of the parameters stage `stage` holds, in `param_shapes` order."""
    lo, hi = stage_layers(config.n_layers, world_size)[stage]
    names = []
    for name in param_shapes(config):
        if name.startswith("blocks."):
            keep = lo <= int(name.split(".")[1]) < hi
        elif name in ("tok_emb", "pos_emb"):
            keep = stage == 0
        else:  # ln_f.*, head.*
            keep = stage == world_size - 1
        if keep:
            names.append(name)
    return names


def schedule(name: str, p: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The ops stage `stage` of `p` runs in one step, as ("F" | "B", micro-batch) pairs."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
    if p < 1 or not 0 <= stage < p or m < 1:
        raise ValueError(f"expected p >= 1, 0 <= stage < p and m >= 1, got p={p}, "
                         f"stage={stage}, m={m}")
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


def busy_seconds(events: list[dict]) -> float:
    """Time spent computing (forward + backward events)."""
    return sum(e["end"] - e["start"] for e in events if e["kind"] in ("forward", "backward"))


# --------------------------------------------------------------------------- one stage
