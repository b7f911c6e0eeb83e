"""How expert parallelism splits a mixture of experts (GShard, Lepikhin et al. 2020; Switch
Transformer, Fedus et al. 2021): rank r of p holds experts [r E/p, (r + 1) E/p) of every
mixture-of-experts block, and every rank holds everything else. MPI-free.

    owned = owned_experts(n_experts, world_size, rank)      # range of global expert indices
    shard = expert_shard(params, owned)                     # what rank r keeps of the dict
    params = glue_expert_shards([shard_0, ..., shard_p-1])  # and back
"""

from __future__ import annotations

import re

from tfcourse.parallel.plans.placement import Placement

EXPERT_NAME = re.compile(r"\.moe\.experts\.(\d+)\.")


def owned_experts(n_experts: int, world_size: int, rank: int) -> range:
    """The global indices of the experts rank `rank` holds; a ValueError naming --experts
    unless world_size divides n_experts (equal shares, the same count on every rank)."""
    if n_experts % world_size:
        raise ValueError(f"--experts: expert parallelism gives every rank the same number of "
                         f"experts, expected a multiple of the {world_size} ranks, got "
                         f"{n_experts}")
    per_rank = n_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def expert_index(name: str) -> int | None:
    """The expert a parameter belongs to ("blocks.1.moe.experts.3.w1" -> 3), else None."""
    match = EXPERT_NAME.search(name)
    return int(match.group(1)) if match else None


def expert_shard(params: dict, owned: range) -> dict:
    """Rank's part of the dict: every non-expert entry and the experts in `owned` (copies)."""
    return {name: value.copy() for name, value in params.items()
            if expert_index(name) is None or expert_index(name) in owned}


def glue_expert_shards(shards: list[dict]) -> dict:
    """The whole dict from every rank's shard (the replicated entries taken from rank 0's)."""
    params = {}
    for shard in shards:
        params.update({n: v for n, v in shard.items() if n not in params})
    return params


def expert_placement(n_experts: int, world_size: int, rank: int) -> Placement:
    """Checkpoints: rank 0 writes the replicated entries, each owner its experts."""
    owned = owned_experts(n_experts, world_size, rank)

    def writes(name: str) -> bool:
        index = expert_index(name)
        return rank == 0 if index is None else index in owned

    return Placement(take=lambda full: expert_shard(full, owned), where=lambda name, shape: None,
                     writes=writes)
