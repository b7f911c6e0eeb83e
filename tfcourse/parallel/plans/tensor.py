"""Chapter 7: how tensor parallelism (Megatron-LM) cuts the parameter dict - which axis of each
matrix is split across ranks - and glues the shards back. MPI-free."""

from __future__ import annotations

import numpy as np

from tfcourse.nn.optim import sum_of_squares

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


def unshard_params(shards: list[dict]) -> dict:
    """Inverse of `shard_params`: the full arrays from every rank's shard, in rank order
    (replicated parameters are taken from rank 0)."""
    full = {}
    for name, value in shards[0].items():
        axis = shard_axis(name)
        full[name] = value if axis is None else np.concatenate([s[name] for s in shards],
                                                               axis=axis)
    return full


def squares_counted_once(grads: dict, tp_rank: int) -> float:
    """This rank's share of the squared global gradient norm under tensor parallelism: the
    squares of its slices of the split matrices, plus - on tensor-parallel rank 0 only - those
    of the replicated tensors, which every rank of the group holds alike. Summed over the
    group (and over pipeline stages, which hold different parameters) it is the norm^2 of the
    serial model's gradient."""
    sliced = sum_of_squares({n: g for n, g in grads.items() if shard_axis(n) is not None})
    whole = sum_of_squares({n: g for n, g in grads.items() if shard_axis(n) is None})
    return sliced + (whole if tp_rank == 0 else 0.0)
