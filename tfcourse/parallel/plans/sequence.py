"""Chapter 8: how sequence (context) parallelism cuts a sequence across ranks, and which score
blocks ring attention computes at each step. The attention maths itself (online softmax, block
gradients) is in tfcourse.nn.attention. MPI-free.

Ring attention: the sequence is cut into chunks, one (or two, zig-zag) per rank. A rank keeps
its queries and passes key/value blocks around the ring.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcourse.nn.attention import causal_block_kind
from tfcourse.parallel.plans.batches import chunk_bounds


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
