"""How the parallel chapters cut things up: batches, layers, tensors and parameter owners.

Pure functions with no MPI, so notebooks and exercises can use them in the kernel; the MPI
programs in tfcourse.parallel import them.
"""

from __future__ import annotations

import numpy as np


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


