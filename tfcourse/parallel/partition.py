"""How the parallel chapters cut things up: batches, layers, tensors, parameter owners and
sequences.

Pure functions with no MPI, so notebooks and exercises can use them in the kernel; the MPI
programs in tfcourse.parallel import them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcourse.nn.model import param_shapes

# --------------------------------------------------------------------------- batches (chapter 6)


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


# --------------------------------------------------------------------------- tensors (chapter 7)

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


# --------------------------------------------------------------------------- pipelines (chapter 7)


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
    """Names of the parameters stage `stage` holds, in `param_shapes` order."""
    lo, hi = stage_layers(config.n_layers, world_size, layer_counts)[stage]
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


# --------------------------------------------------------------- sequence parallelism (chapter 8)
#
# Ring attention: the sequence is cut into chunks, one (or two, zig-zag) per rank. A rank keeps
# its queries and passes key/value blocks around the ring; these helpers are the pure parts.

SCORE_BLOCK_KINDS = ("skip", "full", "masked")


def sequence_chunks(seq_len: int, world_size: int, zigzag: bool = False) -> list[list[tuple]]:
    """Global position ranges [lo, hi) every rank holds, as chunks[rank] = [(lo, hi), ...].

    Contiguous: rank r holds chunk r of chunk_bounds(seq_len, p), one range. Zig-zag: the
    sequence is cut into 2p chunks and rank r holds chunks r and 2p - 1 - r, so every rank has
    one early and one late chunk and the causal work is balanced.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size}")
    n_chunks = 2 * world_size if zigzag else world_size
    if seq_len < n_chunks:
        need = f"2 * world_size={n_chunks} positions (zig-zag cuts it into 2p chunks)" \
            if zigzag else f"world_size={world_size} positions so every rank gets one"
        raise ValueError(f"seq_len: expected at least {need}, got seq_len={seq_len}")
    bounds = chunk_bounds(seq_len, n_chunks)
    if not zigzag:
        return [[b] for b in bounds]
    return [[bounds[r], bounds[n_chunks - 1 - r]] for r in range(world_size)]


def chunk_positions(chunks: list[tuple[int, int]]) -> np.ndarray:
    """The global positions of a rank's chunks, concatenated in order: (T_local,) ints."""
    return np.concatenate([np.arange(lo, hi) for lo, hi in chunks])


def ring_block_owner(rank: int, step: int, world_size: int) -> int:
    """Whose key/value block `rank` holds at ring step `step`: every step each rank passes its
    block to rank + 1, so at step s rank r holds the block of rank (r - s) mod p."""
    return (rank - step) % world_size


def ring_schedule(world_size: int) -> list[list[int]]:
    """schedule[step][rank] = owner of the block `rank` holds at `step`, for steps 0..p-1."""
    return [[ring_block_owner(r, s, world_size) for r in range(world_size)]
            for s in range(world_size)]


def causal_block_kind(q_range: tuple[int, int], k_range: tuple[int, int]) -> str:
    """How causal attention treats queries at positions [q_lo, q_hi) against keys [k_lo, k_hi):
    "skip" (every key is in every query's future: no compute), "full" (every key is at or
    before every query: no mask needed) or "masked" (the block crosses the diagonal)."""
    (q_lo, q_hi), (k_lo, k_hi) = q_range, k_range
    if k_lo > q_hi - 1:
        return "skip"
    if k_hi - 1 <= q_lo:
        return "full"
    return "masked"


def causal_block_mask(q_range: tuple[int, int], k_range: tuple[int, int]) -> np.ndarray:
    """Bool (n_q, n_k) causal mask between two position ranges: True where k <= q (global
    positions, so a block away from the diagonal is all True or all False)."""
    return np.arange(*k_range)[None, :] <= np.arange(*q_range)[:, None]


@dataclasses.dataclass(frozen=True)
class ScoreBlock:
    """One (query chunk, key chunk) pair: local rows of each, global ranges and its kind."""

    q_rows: slice
    k_rows: slice
    q_range: tuple[int, int]
    k_range: tuple[int, int]
    kind: str


def score_blocks(q_chunks: list[tuple[int, int]], k_chunks: list[tuple[int, int]]
                 ) -> list[ScoreBlock]:
    """Every pair of a query chunk and a key chunk, with the rows of each in the arrays that
    hold those chunks concatenated (as `chunk_positions` orders them)."""
    def with_rows(chunks):
        rows, start = [], 0
        for lo, hi in chunks:
            rows.append((slice(start, start + hi - lo), (lo, hi)))
            start += hi - lo
        return rows

    return [ScoreBlock(q_rows, k_rows, q_range, k_range, causal_block_kind(q_range, k_range))
            for q_rows, q_range in with_rows(q_chunks) for k_rows, k_range in with_rows(k_chunks)]


def rank_score_blocks(seq_len: int, world_size: int, rank: int, zigzag: bool = False
                      ) -> list[ScoreBlock]:
    """The score blocks `rank` computes over one ring pass (skipped ones left out), in order."""
    chunks = sequence_chunks(seq_len, world_size, zigzag)
    return [block for step in range(world_size)
            for block in score_blocks(chunks[rank],
                                      chunks[ring_block_owner(rank, step, world_size)])
            if block.kind != "skip"]


def score_block_counts(seq_len: int, world_size: int, zigzag: bool = False) -> list[int]:
    """Number of score blocks each rank computes: rank r of a contiguous layout computes r + 1
    (the later a chunk, the more of the past it attends to); zig-zag gives every rank 2p + 1."""
    return [len(rank_score_blocks(seq_len, world_size, r, zigzag)) for r in range(world_size)]


# Online softmax. A partial result over some of the keys is (m, l, acc): per query the largest
# score m, l = sum_j exp(s_j - m) and acc = sum_j exp(s_j - m) v_j (un-normalised). Partials
# over disjoint key sets merge exactly, so attention can be computed one key block at a time.


def block_scores(q: np.ndarray, k: np.ndarray, q_range: tuple[int, int] | None = None,
                 k_range: tuple[int, int] | None = None) -> np.ndarray:
    """Scaled scores (q / sqrt(d)) k^T of one block, (..., n_q, n_k), with -inf where the
    causal mask (from the global ranges, if given) forbids attending.

    q: (..., n_q, d), k: (..., n_k, d)."""
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    scores = (q * scale) @ np.swapaxes(k, -1, -2)
    if q_range is not None and causal_block_kind(q_range, k_range) != "full":
        np.copyto(scores, -np.inf, where=~causal_block_mask(q_range, k_range))
    return scores


def partial_softmax(scores: np.ndarray, v: np.ndarray) -> tuple:
    """The partial result (m, l, acc) of one key block: m, l (..., n_q, 1), acc (..., n_q, d_v).

    scores: (..., n_q, n_k), -inf where masked; v: (..., n_k, d_v). A query whose scores are
    all -inf gets m = -inf, l = 0 and acc = 0 (it contributes nothing when merged)."""
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(m), m, 0))
    return m, np.sum(e, axis=-1, keepdims=True), e @ v


def empty_partial(q_shape: tuple, d_v: int, dtype) -> tuple:
    """The partial result over no keys at all (the identity of `merge_partials`), for queries
    of shape q_shape = (..., n_q, d_k)."""
    rows = tuple(q_shape[:-1]) + (1,)
    return (np.full(rows, -np.inf, dtype=dtype), np.zeros(rows, dtype=dtype),
            np.zeros(tuple(q_shape[:-1]) + (d_v,), dtype=dtype))


def merge_partials(a: tuple, b: tuple) -> tuple:
    """Merge two partial results (m, l, acc) over disjoint key sets into the one over their
    union: rescale both to the larger max, m = max(m_a, m_b), by exp(m_a - m) and exp(m_b - m)."""
    (m_a, l_a, acc_a), (m_b, l_b, acc_b) = a, b
    m = np.maximum(m_a, m_b)
    shift = np.where(np.isfinite(m), m, 0)  # both -inf: no keys yet, keep the weights at 0
    w_a, w_b = np.exp(m_a - shift), np.exp(m_b - shift)
    return m, l_a * w_a + l_b * w_b, acc_a * w_a + acc_b * w_b


def finish_partial(partial: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Attention output and log-sum-exp from a partial over all keys: out = acc / l
    (..., n_q, d_v) and lse = m + log l (..., n_q, 1); a query with no keys gets out 0 and
    lse -inf."""
    m, total, acc = partial
    has_keys = total > 0
    out = np.divide(acc, total, out=np.zeros_like(acc), where=has_keys)
    lse = np.full_like(m, -np.inf)
    np.add(m, np.log(total, out=np.zeros_like(total), where=has_keys), out=lse, where=has_keys)
    return out, lse


def block_attention_grads(scores, q, k, v, dout, lse, delta) -> tuple:
    """One block's share of the attention gradients (dq, dk, dv), FlashAttention-2 style.

    scores: (..., n_q, n_k) from `block_scores`; q (..., n_q, d), k, v (..., n_k, d),
    dout (..., n_q, d_v); lse (..., n_q, 1) over ALL keys (from the forward pass) and
    delta = rowsum(dout * out) (..., n_q, 1). The probabilities are recomputed exactly as
    P = exp(S - lse), and the softmax backward P * (dP - rowsum(dP * P)) uses
    rowsum(dP * P) = rowsum(dout * out) = delta, which needs no other key block.
    """
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    probs = np.exp(scores - np.where(np.isfinite(lse), lse, np.inf))
    dv = np.swapaxes(probs, -1, -2) @ dout
    dscores = dout @ np.swapaxes(v, -1, -2)
    dscores -= delta
    dscores *= probs
    dq = dscores @ k
    dq *= scale
    dk = np.swapaxes(dscores, -1, -2) @ q
    dk *= scale
    return dq, dk, dv
