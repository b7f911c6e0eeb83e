"""Chapter 6: data parallelism - p processes train one model, each on a slice of every batch.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.data_parallel --config tiny --steps 50 \\
        --seed 0 --json out.json [--allreduce mpi|ring|naive] [--zero 0|1|2]

Every rank holds the full model (the same `init_params` dict: same seed, same arrays). At each
step, all ranks draw the same global batch, rank r takes its rows, runs the serial model's
`loss_and_grads`, and the gradients are summed across ranks with one all-reduce per bucket.
Each rank's gradients are first weighted by its share of the batch, so the sum is exactly the
serial model's gradient on the whole batch; then every rank takes the same optimiser step and
the replicas stay identical. The loss curve equals serial training's to rounding.

ZeRO (Rajbhandari et al. 2020) removes the replication of the training state: each parameter
tensor gets an owner rank, which alone keeps its AdamW moments and updates it (stage 1); with
stage 2 its gradient is reduced only to the owner. Owners then broadcast the updated tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.data import lm_batch
from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import (
    block_backward,
    embed_backward,
    forward_with_caches,
    head_backward,
    init_params,
    loss_and_grads,
)
from tfcourse.nn.optim import adamw_init, state_nbytes, sum_of_squares
from tfcourse.nn.validate import require_positive_int, require_real
from tfcourse.parallel.comm import (
    ALLREDUCES,
    CommLog,
    StepTimes,
    add_json_argument,
    add_split_waiting_argument,
    program_parser,
    run_program,
)
from tfcourse.parallel.partition import (
    batch_rows,
    flatten,
    make_buckets,
    partition_params,
    unflatten,
)
from tfcourse.perf.costmodel import zero_state_bytes_per_rank
from tfcourse.train import (
    TrainingSetup,
    TrainSettings,
    optimizer_update,
    training_setup,
)

# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- one step


def average_gradients(grads: dict, weight: float, buckets: list[list[str]], comm, algorithm: str,
                      log: CommLog) -> dict:
    """Sum weight * grads over all ranks, one all-reduce per bucket (weights add up to 1)."""
    averaged = {}
    for bucket in buckets:
        flat = flatten(grads, bucket)
        flat *= flat.dtype.type(weight)
        log.timed(f"allreduce:{algorithm}", ALLREDUCES[algorithm], flat, comm)
        averaged.update(unflatten(flat, grads, bucket))
    return averaged


def reduce_gradients_to_owners(grads: dict, weight: float, owners: dict, comm,
                               log: CommLog) -> dict:
    """ZeRO-2: sum weight * grads over ranks, each tensor delivered only to its owner."""
    mine = {}
    for owner in range(comm.size):
        names = [n for n in grads if owners[n] == owner]
        if not names:
            continue
        flat = flatten(grads, names)
        flat *= flat.dtype.type(weight)
        result = np.empty_like(flat) if comm.rank == owner else None
        start = time.perf_counter()
        comm.Reduce(flat, result, op=MPI.SUM, root=owner)
        log.records.append(("reduce", int(flat.nbytes), time.perf_counter() - start))
        if comm.rank == owner:
            mine.update(unflatten(result, grads, names))
    return mine


def broadcast_from_owners(params: dict, owners: dict, comm, log: CommLog) -> dict:
    """Every owner sends its updated tensors to all ranks (ZeRO's parameter all-gather)."""
    params = dict(params)
    for owner in range(comm.size):
        names = [n for n in params if owners[n] == owner]
        if not names:
            continue
        flat = flatten(params, names)
        start = time.perf_counter()
        comm.Bcast(flat, root=owner)
        log.records.append(("bcast", int(flat.nbytes), time.perf_counter() - start))
        params.update(unflatten(flat, params, names))
    return params


@dataclasses.dataclass
class Replica:
    """What one rank holds between steps."""

    params: dict
    opt_state: dict
    owners: dict | None  # ZeRO only: parameter name -> owner rank


def start(config, settings: TrainSettings, comm, zero: int) -> Replica:
    params = init_params(config, settings.seed)
    if zero == 0:
        return Replica(params, adamw_init(params), None)
    owners = partition_params({n: p.size for n, p in params.items()}, comm.size)
    owned = {n: p for n, p in params.items() if owners[n] == comm.rank}
    return Replica(params, adamw_init(owned), owners)


def overlapped_loss_and_grads(params: dict, x, y, weight: float, config, comm,
                              log: CommLog) -> tuple[float, dict]:
    """The serial model's loss and the all-ranks sum of weight * gradients, with each layer's
    gradients sent (non-blocking Iallreduce) as soon as its backward pass has produced them,
    so communication of layer i overlaps the backward pass of layer i - 1.

    MPI progresses a non-blocking collective only inside MPI calls unless the library runs a
    progress thread, so how much really overlaps depends on the MPI library."""
    logits, (embed_cache, block_caches, head_cache) = forward_with_caches(params, x, config)
    local_loss, loss_cache = cross_entropy_forward(logits, y)
    in_flight = []

    def send(grads: dict) -> None:
        names = list(grads)
        flat = flatten(grads, names)
        flat *= flat.dtype.type(weight)
        in_flight.append((comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM), flat, names, grads))

    dx, head_grads = head_backward(cross_entropy_backward(loss_cache), head_cache)
    send(head_grads)
    for cache in reversed(block_caches):
        dx, block_grads = block_backward(dx, cache)
        send(block_grads)
    send(embed_backward(dx, embed_cache))
    started = time.perf_counter()
    MPI.Request.Waitall([request for request, *_ in in_flight])
    log.records.append(("iallreduce wait", sum(int(f.nbytes) for _, f, _, _ in in_flight),
                        time.perf_counter() - started))
    averaged = {}
    for _, flat, names, like in in_flight:
        averaged.update(unflatten(flat, like, names))
    return local_loss, {name: averaged[name] for name in params}


def train_step(replica: Replica, x, y, step: int, config, settings: TrainSettings, comm,
               algorithm: str, zero: int, buckets, log: CommLog) -> tuple[float, dict]:
    """One data-parallel step on the global batch (x, y); returns (global loss, kept grads)."""
    lo, hi = batch_rows(len(x), comm.rank, comm.size)
    weight = (hi - lo) / len(x)
    if algorithm == "overlap":  # zero == 0 (checked in prepare)
        local_loss, grads = overlapped_loss_and_grads(replica.params, x[lo:hi], y[lo:hi],
                                                      weight, config, comm, log)
        replica.params, replica.opt_state, _ = optimizer_update(
            replica.params, grads, replica.opt_state, settings, step)
        return comm.allreduce(local_loss * weight, op=MPI.SUM), grads
    local_loss, grads = loss_and_grads(replica.params, x[lo:hi], y[lo:hi], config)
    loss = comm.allreduce(local_loss * weight, op=MPI.SUM)
    if zero == 0:
        grads = average_gradients(grads, weight, buckets, comm, algorithm, log)
        replica.params, replica.opt_state, _ = optimizer_update(
            replica.params, grads, replica.opt_state, settings, step)
        return loss, grads
    if zero == 1:  # every rank receives the whole averaged gradient, but updates only its share
        kept = average_gradients(grads, weight, buckets, comm, algorithm, log)
        grads = {n: g for n, g in kept.items() if replica.owners[n] == comm.rank}
    else:  # zero == 2: each gradient is reduced to its owner only
        kept = grads = reduce_gradients_to_owners(grads, weight, replica.owners, comm, log)
    norm = math.sqrt(comm.allreduce(sum_of_squares(grads), op=MPI.SUM))
    owned = {n: replica.params[n] for n in grads}
    owned, replica.opt_state, _ = optimizer_update(owned, grads, replica.opt_state, settings,
                                                   step, norm)
    replica.params = broadcast_from_owners({**replica.params, **owned}, replica.owners, comm,
                                           log)
    return loss, kept


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see comm.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    require_real("--bucket-mb", args.bucket_mb, positive=True)
    if args.allreduce == "overlap" and args.zero:
        raise ValueError(f"--allreduce: 'overlap' averages whole gradients (ZeRO-0); "
                         f"got --zero {args.zero}")
    setup = training_setup(args)
    batch_rows(setup.settings.batch_size, 0, world_size)  # every rank needs at least one row
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    corpus, config, settings = setup.corpus, setup.config, setup.settings
    replica = start(config, settings, comm, args.zero)
    sizes = {n: p.size for n, p in replica.params.items()}
    buckets = make_buckets(list(replica.params), sizes, int(args.bucket_mb * 2**20 // 8))
    losses, step_seconds, kept_grads = [], [], {}
    log, times = CommLog(split_waiting=args.split_waiting), StepTimes()
    for step in range(settings.steps):
        x, y = lm_batch(corpus.ids, settings.batch_size, settings.seq_len, settings.seed, step)
        comm.Barrier()  # time each step from a common start
        started, first_record = time.perf_counter(), len(log.records)
        loss, kept_grads = train_step(replica, x, y, step, config, settings, comm,
                                      args.allreduce, args.zero, buckets, log)
        step_seconds.append(time.perf_counter() - started)
        times.add(step_seconds[-1], *log.communication_and_waiting(first_record))
        losses.append(loss)
    memory = state_nbytes(replica.params, kept_grads, replica.opt_state)
    n_params = sum(sizes.values())
    itemsize = np.dtype(config.dtype).itemsize
    return {
        "losses": losses,
        "world_size": comm.size,
        "allreduce": args.allreduce,
        "zero": args.zero,
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "step_seconds": step_seconds,
        "compute_seconds": times.total()["compute"],
        "comm_seconds": log.total_seconds(),
        "comm_bytes": log.total_bytes(),
        "memory_bytes": comm.gather(memory, root=0),
        "seconds_per_step_per_rank": comm.gather(times.mean(), root=0),
        "predicted_memory_bytes": zero_state_bytes_per_rank(n_params, comm.size, args.zero,
                                                            itemsize),
        "tokens_per_s": settings.batch_size * settings.seq_len / float(np.median(step_seconds)),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.data_parallel", __doc__)
    parser.add_argument("--allreduce", default="mpi", choices=sorted([*ALLREDUCES, "overlap"]),
                        help="overlap: per-layer Iallreduce during the backward pass")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket size")
    add_split_waiting_argument(parser)
    add_json_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        return (f"data parallel on {result['world_size']} rank(s), all-reduce {args.allreduce}, "
                f"ZeRO-{args.zero}: final loss {result['losses'][-1]:.4f} after "
                f"{len(result['losses'])} steps")

    return run_program(args, prepare, run, summary)

if __name__ == "__main__":
    sys.exit(main())
