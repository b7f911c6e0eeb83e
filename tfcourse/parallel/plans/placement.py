"""Where a rank's arrays sit in the serial model's global arrays - the one description that
checkpoints use. MPI-free.

Every layout keeps, on each rank, some of the global parameters (all of them, a stage's, or a
tensor-parallel slice of each) and AdamW state for some of them (ZeRO: only for those it
owns). A `Placement` says which, and where each local array sits in the global one. Saving,
each rank writes its `pieces`; resuming, each rank assembles the global arrays from whatever
pieces were written (tfcourse.checkpoint) and `take`s its part. So a checkpoint written by
one layout resumes under any other: the layouts' own split functions do the resharding.

The global AdamW state is optim's {"step", "m.<name>", "v.<name>"}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tfcourse.checkpoint import index_from_text, index_text
from tfcourse.nn.optim import ADAMW_SLOTS
from tfcourse.parallel.plans.tensor import shard_axis, shard_params

Index = tuple  # of slices; None for the whole array


@dataclasses.dataclass(frozen=True)
class Placement:
    """take(global {name: array}) -> this rank's {name: array}; where(name, global shape) ->
    the block of the global array this rank's copy is (None: all of it); writes(name) -> True on
    exactly one rank per block (replicated arrays are written once); keeps_moments(name) ->
    whether this rank keeps AdamW's m and v of `name`."""

    take: Callable[[dict], dict]
    where: Callable[[str, tuple], Index | None]
    writes: Callable[[str], bool]
    keeps_moments: Callable[[str], bool] = lambda name: True


def replicated(rank: int, writer: dict[str, int], moment_owner: dict[str, int] | None = None
               ) -> Placement:
    """Every rank holds every parameter (data parallelism); `writer` names the rank that
    writes each one; with ZeRO, `moment_owner` the rank that keeps its AdamW state."""
    return Placement(
        take=lambda full: {name: value.copy() for name, value in full.items()},
        where=lambda name, shape: None,
        writes=lambda name: writer[name] == rank,
        keeps_moments=(lambda name: True) if moment_owner is None
        else (lambda name: moment_owner[name] == rank))


def owned(rank: int, owners: dict[str, int]) -> Placement:
    """ZeRO-3: each parameter, and its AdamW state, only on its owner rank."""
    return Placement(take=lambda full: {n: v.copy() for n, v in full.items() if owners[n] == rank},
                     where=lambda name, shape: None, writes=lambda name: owners[name] == rank,
                     keeps_moments=lambda name: owners[name] == rank)


def stage(names: list[str]) -> Placement:
    """A pipeline stage: these parameters, whole (no other rank holds them)."""
    kept = set(names)
    return Placement(take=lambda full: {n: full[n].copy() for n in full if n in kept},
                     where=lambda name, shape: None, writes=lambda name: name in kept)


def tensor(rank: int, world_size: int) -> Placement:
    """Megatron tensor parallelism: a slice of every split matrix (plans.tensor), the rest
    replicated (written by rank 0)."""
    def where(name: str, shape: tuple) -> Index | None:
        axis = shard_axis(name)
        if axis is None:
            return None
        bounds = np.cumsum([0] + [len(part) for part in
                                  np.array_split(np.arange(shape[axis]), world_size)])
        index = [slice(0, n) for n in shape]
        index[axis] = slice(int(bounds[rank]), int(bounds[rank + 1]))
        return tuple(index)

    return Placement(take=lambda full: shard_params(full, rank, world_size), where=where,
                     writes=lambda name: shard_axis(name) is not None or rank == 0)


def tensor_stage(names: list[str], rank: int, world_size: int) -> Placement:
    """3D parallelism: a pipeline stage's parameters, each cut as tensor parallelism cuts it
    among the stage's `world_size` ranks (rank `rank` of them)."""
    kept, inner = set(names), tensor(rank, world_size)
    return Placement(take=lambda full: inner.take({n: v for n, v in full.items() if n in kept}),
                     where=inner.where, writes=lambda name: name in kept and inner.writes(name))


def in_replica(inner: Placement, replica: int, moment_owner: dict[str, int] | None = None
               ) -> Placement:
    """`inner` inside data-parallel replica `replica`: only replica 0 writes. With ZeRO-1 over
    the replicas, `moment_owner` names the replica that keeps each parameter's AdamW state;
    it writes that parameter and its state."""
    if moment_owner is None:
        return dataclasses.replace(inner, writes=lambda name: replica == 0 and inner.writes(name))
    return dataclasses.replace(
        inner, writes=lambda name: moment_owner[name] == replica and inner.writes(name),
        keeps_moments=lambda name: moment_owner[name] == replica)


def local_state(placement: Placement, params: dict, opt_state: dict) -> tuple[dict, dict]:
    """This rank's (params, AdamW state) from the global ones."""
    local = placement.take(params)
    moments = {}
    for slot in ADAMW_SLOTS:
        mine = placement.take({n: opt_state[f"{slot}.{n}"] for n in params})
        moments.update({f"{slot}.{n}": mine[n] for n in local if placement.keeps_moments(n)})
    return local, {"step": np.array(opt_state["step"]), **moments}


def pieces(placement: Placement, params: dict, opt_state: dict, shapes: dict, rank: int
           ) -> dict:
    """What this rank writes: {("param" | "opt", global name, index text): array} for every
    local array it `writes` (checkpoint.index_text); the optimiser's step counter on rank 0."""
    out = {}
    for (name, index), value in param_pieces(placement, params, shapes).items():
        out["param", name, index] = value
        if placement.keeps_moments(name):
            for slot in ADAMW_SLOTS:
                out["opt", f"{slot}.{name}", index] = opt_state[f"{slot}.{name}"]
    if rank == 0:
        out["opt", "step", ""] = opt_state["step"]
    return out


def param_pieces(placement: Placement, params: dict, shapes: dict) -> dict:
    """This rank's pieces of the global parameters: {(name, index text): array} for every
    local array it `writes` - each element of the model is written by exactly one rank."""
    return {(name, index_text(placement.where(name, shapes[name]))): value
            for name, value in params.items() if placement.writes(name)}


def assemble_params(pieces_per_rank: list[dict], shapes: dict) -> dict:
    """The global parameters from every rank's `param_pieces` (gathered on one rank)."""
    out = {}
    for pieces_of_rank in pieces_per_rank:
        for (name, text), piece in pieces_of_rank.items():
            full = out.setdefault(name, np.empty(shapes[name], piece.dtype))
            full[index_from_text(text, full.shape)] = piece
    return out
