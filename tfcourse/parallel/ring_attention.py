"""Ring attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise
Transformers"): causal attention of a rank's slice of the sequence over the whole of it, the
key/value blocks passed round a ring of ranks with the online softmax (forward) and with their
gradient accumulators (backward, FlashAttention-2 style). Chapter 8's kernel demo
(tfcourse.parallel.sequence_parallel) runs it on random q, k, v; context-parallel training
(tfcourse.parallel.context_parallel --method ring) plugs it into the model as its attention
kernel. The pure maths (online softmax, block gradients) is in tfcourse.nn.attention, which
blocks a rank computes in tfcourse.parallel.plans.sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from tfcourse.nn.attention import (
    block_attention_grads,
    block_scores,
    empty_partial,
    finish_partial,
    merge_partials,
    partial_softmax,
)
from tfcourse.parallel.plans.sequence import chunk_positions, ring_block_owner, score_blocks


@dataclasses.dataclass
class RingCounters:
    """What one rank measured: bytes it sent, the largest score block it materialised, and
    how many score blocks and (query, key) entries it computed."""

    bytes_sent: int = 0
    peak_score_block_bytes: int = 0
    score_blocks: int = 0
    score_entries: int = 0
    log: object = dataclasses.field(default=None, repr=False, compare=False)

    def span(self, kind: str, nbytes: int):
        """Count `nbytes` sent; time the send in `log` too (a program's event log), if any."""
        self.bytes_sent += nbytes
        return self.log.span(kind, nbytes=nbytes) if self.log else contextlib.nullcontext()

    def saw_scores(self, scores: np.ndarray) -> None:
        self.peak_score_block_bytes = max(self.peak_score_block_bytes, scores.nbytes)


def pass_right(block: np.ndarray, incoming_rows: int, comm, counters: RingCounters
               ) -> np.ndarray:
    """Send `block` (k, B, H, T, d), stacked arrays of one sequence block, to rank + 1 and
    return the one rank - 1 sends, which has `incoming_rows` rows (every rank knows every
    chunk's length, so no shapes need to be sent)."""
    shape = block.shape[:-2] + (incoming_rows, block.shape[-1])
    incoming = np.empty(shape, dtype=block.dtype)
    with counters.span("sendrecv:ring", block.nbytes):
        comm.Sendrecv(block, dest=(comm.rank + 1) % comm.size, recvbuf=incoming,
                      source=(comm.rank - 1) % comm.size)
    return incoming


def ring_attention_forward(q, k, v, chunks, comm, counters: RingCounters):
    """Causal attention of this rank's queries over the whole sequence.

    q, k, v: (B, H, T_local, d) for the positions chunks[comm.rank] (concatenated);
    chunks: every rank's global ranges, from `sequence_chunks`. Returns out (B, H, T_local, d)
    and lse (B, H, T_local, 1), the log-sum-exp of every query's scores.
    """
    p, rank = comm.size, comm.rank
    partial = empty_partial(q.shape, v.shape[-1], q.dtype)
    kv = np.stack([k, v])  # one contiguous message per step
    for step in range(p):
        owner = ring_block_owner(rank, step, p)
        for block in score_blocks(chunks[rank], chunks[owner]):
            if block.kind == "skip":
                continue
            scores = block_scores(q[..., block.q_rows, :], kv[0][..., block.k_rows, :],
                                  block.q_range, block.k_range)
            counters.saw_scores(scores)
            counters.score_blocks += 1
            counters.score_entries += scores.shape[-2] * scores.shape[-1]
            rows = block.q_rows
            merged = merge_partials(tuple(a[..., rows, :] for a in partial),
                                    partial_softmax(scores, kv[1][..., block.k_rows, :]))
            for running, new in zip(partial, merged, strict=True):
                running[..., rows, :] = new
        if step < p - 1:
            incoming = ring_block_owner(rank, step + 1, p)
            kv = pass_right(kv, len(chunk_positions(chunks[incoming])), comm, counters)
    return finish_partial(partial)


def ring_attention_backward(dout, q, k, v, out, lse, chunks, comm, counters: RingCounters):
    """Gradients (dq, dk, dv), each (B, H, T_local, d), of this rank's share of causal
    attention, given dout (B, H, T_local, d) and the forward's out and lse.

    K and V go round the ring once more, stacked with their dK and dV accumulators; each
    rank adds its queries' contribution, and after p steps the block's gradients come home.
    """
    p, rank = comm.size, comm.rank
    delta = np.sum(dout * out, axis=-1, keepdims=True)  # rowsum(dP * P), per query
    dq = np.zeros_like(q)
    travelling = np.stack([k, v, np.zeros_like(k), np.zeros_like(v)])  # K, V, dK, dV
    for step in range(p):
        owner = ring_block_owner(rank, step, p)
        for block in score_blocks(chunks[rank], chunks[owner]):
            if block.kind == "skip":
                continue
            qr, kr = block.q_rows, block.k_rows
            scores = block_scores(q[..., qr, :], travelling[0][..., kr, :], block.q_range,
                                  block.k_range)
            counters.saw_scores(scores)
            dq_block, dk_block, dv_block = block_attention_grads(
                scores, q[..., qr, :], travelling[0][..., kr, :], travelling[1][..., kr, :],
                dout[..., qr, :], lse[..., qr, :], delta[..., qr, :])
            dq[..., qr, :] += dq_block
            travelling[2][..., kr, :] += dk_block
            travelling[3][..., kr, :] += dv_block
        if step < p - 1:
            incoming = ring_block_owner(rank, step + 1, p)
            travelling = pass_right(travelling, len(chunk_positions(chunks[incoming])), comm,
                                    counters)
    # Now this rank holds block (rank + 1) mod p with every rank's contribution: send it home.
    grads = travelling[2:]
    if p > 1:
        grads = pass_right(np.ascontiguousarray(grads), q.shape[-2], comm, counters)
    return dq, grads[0], grads[1]
