"""Issue 21: context-parallel training of the whole model - every rank holds a slice of every
sequence, and only attention communicates: ring attention (Liu, Zaharia and Abbeel 2023) or
DeepSpeed-Ulysses (Jacobs et al. 2023).

    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.sequence_parallel --train \\
        --method ring|ulysses --steps 20 --json out.json

Rank r of p holds a slice of all B sequences of the global batch and a replica of every
parameter. It runs the serial model's `loss_and_grads` on its slice: the embedding (with its
slice's positions), LayerNorms, MLPs, the head and the loss are per token and need nothing
from the other slices. Attention does: every query meets every earlier key. The model's
SublayerOps.attention is the kernel between attention's projections; each method passes one.

ring: rank r holds chunks r and 2p - 1 - r of 2p (zig-zag, so the causal work is balanced: p
must divide 2p chunks, T a multiple of 2p) and keeps its queries; the kernel is
tfcourse.parallel.ring_attention - K/V blocks passed round the ring with the online softmax,
and in the backward K, V with their dK, dV accumulators. A rank sends about 6 (p - 1)/p of the
whole sequence's K/V rows per layer (costmodel.ring_attention_bytes_sent), whatever p; any
number of heads.

ulysses: rank r holds positions [r T/p, (r + 1) T/p), and the kernel is:

  forward   all-to-all q, k, v from the sequence split (B, H, T/p, d_head) to the head split
            (B, H/p, T, d_head): rank r sends heads [s H/p, (s + 1) H/p) of its slice to rank
            s, and receives its own heads of every slice, in position order. Then the serial
            causal sdpa over the whole sequence for its H/p heads, and the reverse all-to-all
            of the heads' output back to the sequence split before the output projection.
  backward  the transpose: the output's gradient all-to-all to the head split, the serial
            sdpa backward, dq, dk and dv all-to-all back to the sequence split.

So p must divide the heads and the sequence (refused before any collective otherwise), and a
rank sends 8 (p - 1)/p of its slice's d_model-wide activations per layer per step
(costmodel.ulysses_alltoall_bytes) - less as p grows, where the ring passes K and V p - 1
times. With either method each rank seeds its backward with its share of the positions
(loss_scale = 1/p), so its gradients are its slice's share of the batch's, and they are
summed over ranks (data_parallel.average_gradients with weight 1). The loss curve equals
serial training.
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np
from mpi4py import MPI

from tfcourse.nn.attention import (
    AttentionKernel,
    local_attention_backward,
    local_attention_forward,
)
from tfcourse.nn.model import SublayerOps, loss_and_grads, param_shapes
from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.data_parallel import average_gradients
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import make_buckets
from tfcourse.parallel.plans.sequence import chunk_positions, sequence_chunks
from tfcourse.parallel.program import (
    State,
    add_split_waiting_argument,
    program_parser,
    result_record,
    run_program,
    train,
)
from tfcourse.parallel.ring_attention import (
    RingCounters,
    ring_attention_backward,
    ring_attention_forward,
)
from tfcourse.perf.costmodel import ring_attention_bytes_sent, ulysses_alltoall_bytes
from tfcourse.train import TrainingSetup, optimizer_update, training_setup

METHODS = ("ring", "ulysses")
TRAFFIC = {"ring": "sendrecv:ring", "ulysses": "alltoall:ulysses"}  # the event log's kinds

# --------------------------------------------------------------------------- the all-to-alls


def alltoall(comm, log, send: np.ndarray) -> np.ndarray:
    """send[s] to rank s, returning recv with recv[s] from rank s; logs the bytes that leave
    this rank (send[rank] stays: a local copy)."""
    recv = np.empty_like(send)
    with log.span("alltoall:ulysses", nbytes=send.nbytes // comm.size * (comm.size - 1)):
        comm.Alltoall(send, recv)
    return recv


def sequence_to_heads(comm, log, *xs) -> tuple:
    """Each x (B, H, T/p, d_head), this rank's slice of all heads -> (B, H/p, T, d_head), all
    positions of this rank's heads [rank H/p, (rank + 1) H/p). One all-to-all for all xs."""
    p, (batch, heads, rows, d_head) = comm.size, xs[0].shape
    send = np.stack(xs).reshape(len(xs), batch, p, heads // p, rows, d_head)
    recv = alltoall(comm, log, np.ascontiguousarray(send.transpose(2, 0, 1, 3, 4, 5)))
    # recv[s]: rank s's slice (positions s T/p ...) of my heads; slices in position order
    return tuple(recv.transpose(1, 2, 3, 0, 4, 5).reshape(
        len(xs), batch, heads // p, p * rows, d_head))


def heads_to_sequence(comm, log, *ys) -> tuple:
    """The inverse of sequence_to_heads: each y (B, H/p, T, d_head) -> (B, H, T/p, d_head)."""
    p, (batch, heads, length, d_head) = comm.size, ys[0].shape
    send = np.stack(ys).reshape(len(ys), batch, heads, p, length // p, d_head)
    recv = alltoall(comm, log, np.ascontiguousarray(send.transpose(3, 0, 1, 2, 4, 5)))
    # recv[s]: rank s's heads of my slice; heads in rank order
    return tuple(recv.transpose(1, 2, 0, 3, 4, 5).reshape(
        len(ys), batch, p * heads, length // p, d_head))


def ulysses_attention(comm, log) -> AttentionKernel:
    """The model's attention kernel for one step: the serial sdpa over the whole sequence
    for this rank's heads, between two all-to-alls (forward and, transposed, backward)."""

    def forward(q, k, v, mask=None, keep_weights: bool = True, precision: str = "fp32"):
        if mask is not None and not isinstance(mask, str):
            raise ValueError("mask: Ulysses attends over the whole sequence, expected "
                             "'causal' or None, got an array of the local slice")
        q, k, v = sequence_to_heads(comm, log, q, k, v)
        out, cache = local_attention_forward(q, k, v, mask, keep_weights, precision)
        return heads_to_sequence(comm, log, out)[0], cache

    def backward(dout, cache):
        dq, dk, dv = local_attention_backward(sequence_to_heads(comm, log, dout)[0], cache)
        return heads_to_sequence(comm, log, dq, dk, dv)

    return AttentionKernel(forward, backward)


def ring_attention(comm, log, chunks) -> AttentionKernel:
    """The model's attention kernel for one step: this rank's queries (its `chunks` of the
    sequence) attend over the whole sequence, K/V passed round the ring (causal only)."""
    counters = RingCounters(log=log)

    def forward(q, k, v, mask=None, keep_weights: bool = True, precision: str = "fp32"):
        if not (isinstance(mask, str) and mask == "causal"):
            raise ValueError(f"mask: the ring skips and masks blocks by their global "
                             f"positions, expected 'causal', got {mask!r}")
        q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
        out, lse = ring_attention_forward(q, k, v, chunks, comm, counters)
        return out, (q, k, v, out, lse)  # never the scores: the backward recomputes them

    def backward(dout, cache):
        return ring_attention_backward(np.ascontiguousarray(dout), *cache, chunks, comm,
                                       counters)

    return AttentionKernel(forward, backward)


# --------------------------------------------------------------------------- one step


def train_step(state: State, x, y, step: int, log, config, settings, comm, buckets, method,
               chunks):
    """One step on the global batch; returns (new state, global loss, the summed grads).
    chunks: every rank's ranges of the sequence (plans.sequence.sequence_chunks: zig-zag for
    the ring, contiguous for Ulysses); this rank's positions are chunk_positions of its own."""
    positions = chunk_positions(chunks[comm.rank])
    kernel = (ring_attention(comm, log, chunks) if method == "ring"
              else ulysses_attention(comm, log))
    share = 1 / comm.size  # every rank holds as many positions (prepare)
    local_loss, grads = loss_and_grads(state.params, x[:, positions], y[:, positions], config,
                                       ops=SublayerOps(attention=kernel), check=False,
                                       loss_scale=share, positions=positions)
    loss = comm.allreduce(local_loss * share, op=MPI.SUM)
    grads = average_gradients(grads, 1.0, buckets, comm, "mpi", log)  # shares: summed
    params, opt_state, _ = optimizer_update(state.params, grads, state.opt_state, settings,
                                            step)
    return State(params, opt_state), loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size`, no communication (program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    setup = training_setup(args)
    heads, seq_len = setup.config.n_heads, setup.settings.seq_len
    if args.method == "ring":
        if seq_len % (2 * world_size):
            raise ValueError(f"--seq-len: --method ring cuts every sequence into 2 x "
                             f"{world_size} equal zig-zag chunks, expected a multiple of "
                             f"{2 * world_size}, got {seq_len}")
        return setup
    if heads % world_size:
        raise ValueError(f"--method {args.method}: splits the heads over the ranks, expected a "
                         f"number of ranks dividing n_heads={heads}, got {world_size}")
    if seq_len % world_size:
        raise ValueError(f"--seq-len: --method {args.method} splits every sequence evenly over "
                         f"the {world_size} rank(s), expected a multiple of {world_size}, "
                         f"got {seq_len}")
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings = setup.config, setup.settings
    sizes = {n: int(np.prod(shape)) for n, shape in param_shapes(config).items()}
    start, saving = start_training(comm, args, setup,
                                   placement.replicated(comm.rank, dict.fromkeys(sizes, 0)),
                                   {"program": "context_parallel", "method": args.method})
    chunks = sequence_chunks(settings.seq_len, comm.size, zigzag=args.method == "ring")
    step = functools.partial(train_step, config=config, settings=settings, comm=comm,
                             buckets=make_buckets(list(sizes), sizes, 2**20 // 8),
                             method=args.method, chunks=chunks)
    result = train(comm, setup, start, step, args.split_waiting, saving, args.trace_memory)
    sent = [sum(e["bytes"] for e in log.events if e["kind"] == TRAFFIC[args.method])
            for log in result.logs]
    final = result.state
    return result_record(
        result, setup, comm, state_nbytes(final.params, result.grads, final.opt_state),
        method=args.method, positions_per_rank=settings.seq_len // comm.size,
        chunks=[[list(c) for c in rank_chunks] for rank_chunks in chunks],
        attention_bytes_sent_per_step_per_rank=comm.gather(sent, root=0),
        predicted_attention_bytes_sent_per_step_per_rank=predicted_bytes(args.method, setup,
                                                                         comm.size))


def predicted_bytes(method: str, setup: TrainingSetup, p: int) -> list[float]:
    """Bytes every rank sends per training step in attention's communication (costmodel)."""
    config, settings = setup.config, setup.settings
    common = dict(n_layers=config.n_layers, bytes_per_value=np.dtype(config.dtype).itemsize,
                  full_recompute=config.recompute == "full")
    if method == "ring":
        return ring_attention_bytes_sent(settings.seq_len, p, settings.batch_size,
                                         config.n_heads, config.d_model // config.n_heads,
                                         zigzag=True, **common)
    return [ulysses_alltoall_bytes(settings.batch_size, settings.seq_len, config.d_model, p,
                                   **common)] * p


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.sequence_parallel --train", __doc__)
    parser.add_argument("--train", action="store_true", required=True,
                        help="train the model context-parallel (else: the ring attention demo)")
    parser.add_argument("--method", default="ulysses", choices=METHODS,
                        help="how attention reaches the other slices of the sequence")
    add_split_waiting_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        sent = np.mean(result["attention_bytes_sent_per_step_per_rank"], axis=1)
        return (f"context parallel ({args.method}) on {result['world_size']} rank(s), "
                f"{result['positions_per_rank']} positions of every sequence each: final loss "
                f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps; attention "
                f"bytes sent per step per rank {sent.round().tolist()}, predicted "
                f"{np.round(result['predicted_attention_bytes_sent_per_step_per_rank']).tolist()}")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
