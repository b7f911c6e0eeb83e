"""Chapter 8: sequence (context) parallelism - one long sequence cut across p processes, with
ring attention.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.sequence_parallel --seq-len 1024 \\
        --seed 0 --json out.json [--batch 1 --heads 2 --d-head 16] [--zigzag]

Rank r holds the queries, keys and values of its own chunk of the sequence (chunk_bounds cuts
it; lengths not divisible by p give chunks that differ by one). Attention needs every query
to meet every earlier key, but no rank ever holds the whole sequence or an n x n score matrix.

Ring attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers"):
the key/value blocks travel around a ring of ranks. At step s rank r holds the block of rank
(r - s) mod p, computes its queries' scores against it, and passes it on to rank r + 1 with
`Sendrecv`; after p steps every query has met every block. Blocks entirely in a query chunk's
causal future are skipped; the diagonal block is masked with global positions.

Online softmax (Milakov and Gimelshein 2018; the heart of FlashAttention): the softmax over
all keys is accumulated one block at a time. Per query keep the running max m, the running
sum l = sum exp(s - m) and the un-normalised output acc = sum exp(s - m) v; a new block with
a larger max rescales the old l and acc by exp(m_old - m_new). At the end out = acc / l, and
the log-sum-exp lse = m + log l is kept for the backward pass.

Backward (FlashAttention-2 style): the blocks go round the ring again, each with dK and dV
accumulators that travel with it and come home after p steps. From lse the probabilities are
recomputed exactly, P = exp(S - lse); with D = rowsum(dout * out), dS = P * (dP - D), so no
rank needs another rank's queries. Each rank sends O(n) bytes while the scores stay local.

--zigzag cuts the sequence into 2p chunks and gives rank r chunks r and 2p - 1 - r: with the
contiguous layout the last rank attends to the whole past and does about p times the first
rank's work; zig-zag balances it. The pure parts (chunks, ring schedule, online softmax,
block gradients) are in tfcourse.nn.attention, the chunks in tfcourse.parallel.plans.sequence,
the predictions in tfcourse.perf.costmodel.

--train trains the whole model with every rank holding a slice of every sequence
(tfcourse.parallel.context_parallel: --method ulysses, DeepSpeed-Ulysses's all-to-alls):

    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.sequence_parallel --train \\
        --method ulysses --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from tfcourse.nn.attention import causal_mask, sdpa_backward, sdpa_forward
from tfcourse.nn.validate import require_nonnegative_int, require_positive_int
from tfcourse.parallel import context_parallel
from tfcourse.parallel.plans.sequence import chunk_positions, sequence_chunks
from tfcourse.parallel.program import program_parser, run_program
from tfcourse.parallel.ring_attention import (
    RingCounters,
    ring_attention_backward,
    ring_attention_forward,
)
from tfcourse.perf import costmodel

# --------------------------------------------------------------------------- program


def random_inputs(seed: int, batch: int, heads: int, seq_len: int, d_head: int, dtype):
    """q, k, v, dout of the whole sequence, (B, H, seq_len, d_head) each; every rank draws the
    same arrays from the seed and keeps its own positions."""
    rng = np.random.default_rng(seed)
    shape = (batch, heads, seq_len, d_head)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(4))


def full_attention_errors(q, k, v, dout, out, dq, dk, dv) -> tuple[float, float]:
    """Max abs differences from single-process causal attention on the whole sequence:
    (of out, of the worst of dq, dk and dv)."""
    ref_out, cache = sdpa_forward(q, k, v, causal_mask(q.shape[-2]))
    ref_grads = sdpa_backward(dout, cache)
    err_out = float(np.max(np.abs(out - ref_out)))
    err_grad = max(float(np.max(np.abs(a - b))) for a, b in zip((dq, dk, dv), ref_grads,
                                                                  strict=True))
    return err_out, err_grad


def prepare(args: argparse.Namespace, world_size: int) -> list[list[tuple]]:
    """Check every argument against `world_size` without any communication (ValueError
    naming the argument, see program.agree_on_arguments); returns every rank's chunks."""
    for flag in ("--seq-len", "--batch", "--heads", "--d-head", "--threads"):
        require_positive_int(flag, getattr(args, flag[2:].replace("-", "_")))
    require_nonnegative_int("--seed", args.seed)
    return sequence_chunks(args.seq_len, world_size, args.zigzag)  # seq_len >= p (or 2p)


def run(args: argparse.Namespace, chunks: list[list[tuple]], comm) -> dict:
    p, rank, n = comm.size, comm.rank, args.seq_len
    dtype = np.dtype(args.dtype)
    q, k, v, dout = random_inputs(args.seed, args.batch, args.heads, n, args.d_head, dtype)
    mine = chunk_positions(chunks[rank])
    q_local, k_local, v_local, dout_local = (np.ascontiguousarray(a[..., mine, :])
                                             for a in (q, k, v, dout))

    counters = RingCounters()
    comm.Barrier()
    t0 = time.perf_counter()
    out, lse = ring_attention_forward(q_local, k_local, v_local, chunks, comm, counters)
    t1 = time.perf_counter()
    dq, dk, dv = ring_attention_backward(dout_local, q_local, k_local, v_local, out, lse,
                                         chunks, comm, counters)
    t2 = time.perf_counter()

    gathered = comm.gather({"out": out, "dq": dq, "dk": dk, "dv": dv,
                            "counters": dataclasses.asdict(counters),
                            "seconds": (t1 - t0, t2 - t1)}, root=0)
    if rank != 0:
        return {}
    err_out = err_grad = None
    if not args.skip_reference:
        full = {name: np.empty_like(q) for name in ("out", "dq", "dk", "dv")}
        for r, part in enumerate(gathered):
            for name, value in full.items():
                value[..., chunk_positions(chunks[r]), :] = part[name]
        err_out, err_grad = full_attention_errors(q, k, v, dout, **full)
    problem = (n, p, args.batch, args.heads)
    bytes_per_value, d = dtype.itemsize, args.d_head
    measured = [part["counters"] for part in gathered]
    layouts = {"contiguous": False} | ({"zigzag": True} if n >= 2 * p else {})
    entries = {name: costmodel.ring_attention_score_entries(n, p, zigzag)
               for name, zigzag in layouts.items()}
    score_entries = [m["score_entries"] for m in measured]
    return {
        "world_size": p,
        "seq_len": n,
        "batch": args.batch,
        "heads": args.heads,
        "d_head": d,
        "dtype": dtype.name,
        "zigzag": args.zigzag,
        "chunks": [[list(c) for c in rank_chunks] for rank_chunks in chunks],
        "max_abs_err_out": err_out,
        "max_abs_err_grad": err_grad,
        "bytes_sent": [m["bytes_sent"] for m in measured],
        "bytes_sent_predicted": costmodel.ring_attention_bytes_sent(
            *problem, d, bytes_per_value, args.zigzag),
        "peak_score_block_bytes": [m["peak_score_block_bytes"] for m in measured],
        "peak_score_block_bytes_predicted": costmodel.ring_attention_peak_score_bytes(
            *problem, bytes_per_value, args.zigzag),
        "full_score_bytes": costmodel.full_attention_score_bytes(n, args.batch, args.heads,
                                                                 bytes_per_value),
        "score_blocks": [m["score_blocks"] for m in measured],
        "score_entries": score_entries,
        "score_entries_predicted": costmodel.ring_attention_score_entries(n, p, args.zigzag),
        "score_entries_by_layout": entries,
        "attention_flops_predicted": costmodel.ring_attention_flops(
            *problem, d, args.zigzag),
        "load_imbalance": max(score_entries) / float(np.mean(score_entries)),  # max / mean
        "forward_seconds": [part["seconds"][0] for part in gathered],
        "backward_seconds": [part["seconds"][1] for part in gathered],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.sequence_parallel", __doc__, training=False)
    parser.add_argument("--seq-len", type=int, required=True, help="length of the sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--d-head", type=int, default=16)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--zigzag", action="store_true",
                        help="hold chunks r and 2p-1-r of 2p chunks (balanced causal work)")
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not compare with full attention (its n x n scores are large)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    return parser.parse_args(argv)


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KiB"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--train" in argv:  # the whole model, context-parallel
        return context_parallel.main(argv)
    args = parse_args(argv)

    def summary(result: dict) -> str:
        errors = "not checked" if args.skip_reference else (
            f"max |error| out {result['max_abs_err_out']:.1e}, "
            f"grads {result['max_abs_err_grad']:.1e}")
        return (f"ring attention ({'zig-zag' if args.zigzag else 'contiguous'}) on "
                f"{result['world_size']} rank(s), seq_len {args.seq_len}: {errors}; peak score "
                f"block {_kib(max(result['peak_score_block_bytes']))} vs full "
                f"{_kib(result['full_score_bytes'])}; sent {_kib(max(result['bytes_sent']))} "
                f"per rank (max); work imbalance {result['load_imbalance']:.2f}")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
