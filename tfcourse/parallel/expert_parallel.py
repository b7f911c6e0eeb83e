"""Issue 21: expert parallelism - the experts of every mixture-of-experts block are shared out
among the ranks, and tokens travel to them with all-to-all (GShard, Lepikhin et al. 2020).

    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.expert_parallel --experts 4 --top-k 2 \\
        --steps 20 --json out.json

Rank r of p holds experts [r E/p, (r + 1) E/p) of every MoE block and a replica of everything
else, trained data-parallel: each rank runs the serial model's `loss_and_grads` on its rows of
the global batch, and only the experts' FFNs are reached through `ExpertOps` (the model's
SublayerOps.experts; the serial one holds all experts):

  agree     the router runs locally (the serial router); one Allgather of each rank's (k, E)
            claim counts tells every rank the whole batch's. Serial training cuts the
            capacity ceil(C N k / E) over all N tokens of the batch, first choices before
            second, in token order - and rank r's tokens are rows lo..hi of that order. So
            rank r starts the cut of round j where the claims of rounds < j (all ranks) and
            of round j on ranks < r leave it: every choice is kept or dropped exactly as in
            serial training, and f (the load-balancing loss's first-choice fraction) is the
            batch's. (A capacity per rank would drop other tokens than serial training.)
  dispatch  Alltoall of the row counts, then Alltoallv of each kept (token, choice)'s hidden
            state to the rank owning its expert; each owner stacks an expert's rows from
            ranks 0..p-1 - the same rows, in the same order, as the serial expert sees.
  combine   the owners' outputs go back the reverse way; gates and sum stay local.
  backward  the gradients take the same two all-to-alls; router and gate gradients are local.

Each rank seeds its backward with its share of the batch (loss_scale = rows / batch), so the
experts' gradients - from every rank's tokens - are the batch's, and stay on their owner;
every other gradient is summed over ranks (data_parallel.average_gradients). The loss curve
equals serial MoE training (tfcourse.train --experts E --top-k K) to rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

import numpy as np
from mpi4py import MPI

from tfcourse.nn.layers import ExpertOps, ffn_backward_input, ffn_backward_weight, ffn_forward
from tfcourse.nn.model import SublayerOps, is_moe_block, loss_and_grads
from tfcourse.nn.optim import state_nbytes, sum_of_squares
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.data_parallel import average_gradients
from tfcourse.parallel.plans.batches import batch_rows, make_buckets
from tfcourse.parallel.plans.experts import expert_index, expert_placement, owned_experts
from tfcourse.parallel.program import (
    State,
    add_split_waiting_argument,
    program_parser,
    result_record,
    run_program,
    train,
)
from tfcourse.perf.costmodel import expert_alltoall_bytes
from tfcourse.train import TrainingSetup, TrainSettings, optimizer_update, training_setup

# --------------------------------------------------------------------------- the all-to-alls


def alltoallv_rows(comm, log, kind: str, send, send_rows, recv_rows):
    """Rows of `send` (n, d), the first send_rows[0] to rank 0, the next to rank 1, ...;
    returns the rows received, rank 0's first (recv_rows[s] from rank s). Logs the bytes
    that leave this rank (its rows for itself are a local copy)."""
    d = send.shape[1]
    recv = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)
    counts = [np.asarray(rows, dtype=np.int64) * d for rows in (send_rows, recv_rows)]
    displs = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in counts]
    nbytes = (int(send_rows.sum()) - int(send_rows[comm.rank])) * d * send.itemsize
    with log.span(kind, nbytes=nbytes):
        comm.Alltoallv([np.ascontiguousarray(send), (counts[0], displs[0])],
                       [recv, (counts[1], displs[1])])
    return recv


def source_major_order(table):
    """table[s, j]: rows from rank s for local expert j, received source-major. Returns the
    permutation that lists them expert-major (expert j's rows from rank 0, 1, ... - the
    serial token order), and each expert's row count."""
    start = np.concatenate([[0], np.cumsum(table.reshape(-1))[:-1]]).reshape(table.shape)
    order = [np.arange(start[s, j], start[s, j] + table[s, j])
             for j in range(table.shape[1]) for s in range(table.shape[0])]
    return np.concatenate(order).astype(np.int64), table.sum(axis=0)


def expert_ops(comm, log, owned: range) -> ExpertOps:
    """The model's experts hook for one step: `owned` experts here, the others elsewhere."""
    per_rank = len(owned)

    def agree(claims):
        every = np.empty((comm.size, *claims.shape), dtype=np.int64)
        with log.span("allgather:claims", nbytes=claims.size * 8 * (comm.size - 1)):
            comm.Allgather(np.ascontiguousarray(claims, dtype=np.int64), every)
        total = every.sum(axis=0)  # (k, E) the batch's claims
        return np.cumsum(total, axis=0) - total + every[:comm.rank].sum(axis=0), total

    def dispatch(rows_by_expert: list, table=None):
        """Each expert's rows to its owner: (rows by local expert, routing of this exchange)."""
        sent = np.array([len(rows) for rows in rows_by_expert]).reshape(comm.size, per_rank)
        if table is None:  # how many rows each rank sends to each of my experts
            table = np.empty_like(sent)
            with log.span("alltoall:counts", nbytes=sent.nbytes // comm.size * (comm.size - 1)):
                comm.Alltoall(sent, table)
        recv = alltoallv_rows(comm, log, "alltoallv", np.concatenate(rows_by_expert),
                              sent.sum(axis=1), table.sum(axis=1))
        order, sizes = source_major_order(table)
        return np.split(recv[order], np.cumsum(sizes)[:-1]), (sent, table, order)

    def combine(rows_by_local: list, route) -> list:
        """The reverse of dispatch: each row back to its token's rank, split by expert."""
        sent, table, order = route
        back = np.empty_like(np.concatenate(rows_by_local))
        back[order] = np.concatenate(rows_by_local)
        recv = alltoallv_rows(comm, log, "alltoallv", back, table.sum(axis=1), sent.sum(axis=1))
        return np.split(recv, np.cumsum(sent.reshape(-1))[:-1])

    def forward(params, inputs, activation, precision):
        local, route = dispatch(inputs)
        outs, caches = [], []
        for e, x_e in zip(owned, local, strict=True):
            w = [params[f"experts.{e}.{name}"] for name in ("w1", "b1", "w2", "b2")]
            out, cache = ffn_forward(x_e, *w, activation, precision)
            outs.append(out)
            caches.append(cache)
        return combine(outs, route), (route, caches)

    def backward_input(douts, cache):
        route, caches = cache
        local, _ = dispatch(douts, route[1])  # the forward's counts: no Alltoall
        dxs, works = [], []
        for dout, expert_cache in zip(local, caches, strict=True):
            dx, work = ffn_backward_input(dout, expert_cache)
            dxs.append(dx)
            works.append(work)
        return combine(dxs, route), works

    def backward_weight(works) -> dict:
        return {f"experts.{e}.{name}": g for e, work in zip(owned, works, strict=True)
                for name, g in ffn_backward_weight(work).items()}

    return ExpertOps(agree, forward, backward_input, backward_weight)


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    config: object
    settings: TrainSettings
    comm: object
    owned: range
    buckets: list  # of the replicated (non-expert) parameters


def train_step(state: State, x, y, step: int, log, ep: ExpertParallel):
    """One step on the global batch; returns (new state, global loss, this rank's grads)."""
    comm = ep.comm
    lo, hi = batch_rows(len(x), comm.rank, comm.size)
    weight = (hi - lo) / len(x)
    ops = SublayerOps(experts=expert_ops(comm, log, ep.owned))
    local_loss, grads, routing = loss_and_grads(state.params, x[lo:hi], y[lo:hi], ep.config,
                                                ops=ops, check=False, loss_scale=weight,
                                                return_routing=True)
    log.info["routing"] = {piece: {"tokens_per_expert": r.tokens_per_expert,
                                   "routed": r.routed, "dropped": r.dropped,
                                   "capacity": r.capacity} for piece, r in routing.items()}
    loss = comm.allreduce(local_loss * weight, op=MPI.SUM)
    experts = {n: g for n, g in grads.items() if expert_index(n) is not None}
    dense = average_gradients({n: g for n, g in grads.items() if n not in experts}, 1.0,
                              ep.buckets, comm, "mpi", log)  # already weighted: summed
    with log.span("allreduce:norm", nbytes=8):
        expert_squares = comm.allreduce(sum_of_squares(experts), op=MPI.SUM)
    norm = math.sqrt(sum_of_squares(dense) + expert_squares)
    grads = {**dense, **experts}
    params, opt_state, _ = optimizer_update(state.params, grads, state.opt_state, ep.settings,
                                            step, norm)
    return State(params, opt_state), loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size`, no communication (program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    setup = training_setup(args, moe_supported=True)  # --top-k, ... without --experts: refused
    if not setup.config.n_experts:
        raise ValueError("--experts: expert parallelism trains a mixture of experts, expected "
                         "--experts E (a multiple of the ranks), got none")
    owned_experts(setup.config.n_experts, world_size, 0)
    batch_rows(setup.settings.batch_size, 0, world_size)  # every rank needs at least one row
    return setup


def global_routing(logs, comm) -> list | None:
    """Every step's routing summed over ranks (rank 0; None elsewhere): the whole batch's
    tokens per expert, choices routed and dropped - what serial training reports."""
    every = comm.gather([log.info["routing"] for log in logs], root=0)
    if comm.rank != 0:
        return None
    steps = []
    for per_rank in zip(*every, strict=True):
        steps.append({piece: {
            "tokens_per_expert": sum(r[piece]["tokens_per_expert"] for r in per_rank).tolist(),
            "routed": sum(r[piece]["routed"] for r in per_rank).tolist(),
            "dropped": sum(r[piece]["dropped"] for r in per_rank),
            "capacity": per_rank[0][piece]["capacity"]} for piece in per_rank[0]})
    return steps


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings = setup.config, setup.settings
    owned = owned_experts(config.n_experts, comm.size, comm.rank)
    start, saving = start_training(comm, args, setup,
                                   expert_placement(config.n_experts, comm.size, comm.rank),
                                   {"program": "expert_parallel"})
    dense = {n: v.size for n, v in start.state.params.items() if expert_index(n) is None}
    ep = ExpertParallel(config, settings, comm, owned,
                        make_buckets(list(dense), dense, 2**20 // 8))
    result = train(comm, setup, start, functools.partial(train_step, ep=ep), args.split_waiting,
                   saving, args.trace_memory)
    lo, hi = batch_rows(settings.batch_size, comm.rank, comm.size)
    n_moe = sum(is_moe_block(i, config.n_experts, config.moe_every)
                for i in range(config.n_layers))
    sent = [sum(e["bytes"] for e in log.events if e["kind"] == "alltoallv")
            for log in result.logs]
    times = [log.communication_and_waiting()[0] for log in result.logs]
    alltoall_seconds = [sum(e["end"] - e["start"] for e in log.events
                            if e["kind"].startswith(("alltoall", "allgather:claims")))
                        for log in result.logs]
    final = result.state
    return result_record(
        result, setup, comm, state_nbytes(final.params, result.grads, final.opt_state),
        experts_per_rank=len(owned), routing=global_routing(result.logs, comm),
        alltoall_bytes_sent_per_step_per_rank=comm.gather(sent, root=0),
        predicted_alltoall_bytes_sent_per_step_per_rank=comm.gather(expert_alltoall_bytes(
            (hi - lo) * settings.seq_len, config.d_model, config.top_k, comm.size, n_moe,
            np.dtype(config.dtype).itemsize, config.recompute == "full"), root=0),
        alltoall_seconds_per_step_per_rank=comm.gather(alltoall_seconds, root=0),
        comm_seconds_per_step_per_rank=comm.gather(times, root=0))


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.expert_parallel", __doc__)
    add_split_waiting_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        last = result["routing"][-1]
        lines = [f"expert parallel on {result['world_size']} rank(s), "
                 f"{result['experts_per_rank']} expert(s) per MoE block on each: final loss "
                 f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps"]
        lines += [f"{piece}: tokens per expert {s['tokens_per_expert']} (capacity "
                  f"{s['capacity']}), {s['dropped']} dropped (last step)"
                  for piece, s in last.items()]
        sent = np.mean(result["alltoall_bytes_sent_per_step_per_rank"], axis=1)
        lines.append(f"all-to-all bytes sent per step per rank {sent.round().tolist()}, "
                     f"predicted (balanced) "
                     f"{np.round(result['predicted_alltoall_bytes_sent_per_step_per_rank'])}")
        return "\n".join(lines)

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
