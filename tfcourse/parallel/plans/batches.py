"""Chapter 6: how data parallelism cuts a batch across ranks, groups gradients into
all-reduce buckets, and (ZeRO) gives every parameter an owner rank. MPI-free."""

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
