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
Stage 3 shards the parameters too (tfcourse.parallel.zero3: gathered piece by piece).

--allreduce overlap (PyTorch DDP's idea, Li et al. 2020): the model's backward pass calls back
after each layer, and that layer's gradients start a non-blocking all-reduce at once.

--precision bf16|fp16 (mixed precision, Micikevicius et al. 2018; ZeRO-0): every rank runs the
model on the 16-bit copy of its float32 master weights; the ranks' gradients (at the loss
scale) are summed in float32 - MPI has no 16-bit sum, so 4 bytes a value travel where a GPU
sends 2 - and `train.mixed_precision_update` takes the same step on every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

import numpy as np
from mpi4py import MPI

from tfcourse.nn.model import loss_and_grads, param_shapes
from tfcourse.nn.optim import state_nbytes, sum_of_squares
from tfcourse.nn.precision import PRECISIONS, state_bytes
from tfcourse.nn.validate import require_positive_int, require_real
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.comm import ALLREDUCES
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import (
    batch_rows,
    flatten,
    make_buckets,
    partition_params,
    unflatten,
)
from tfcourse.parallel.program import (
    State,
    add_split_waiting_argument,
    bytes_sent,
    program_parser,
    result_record,
    run_program,
    train,
)
from tfcourse.parallel.zero3 import zero3_step
from tfcourse.perf.costmodel import (
    allgather_bytes,
    allreduce_bytes,
    reduce_scatter_bytes,
    zero_bytes_sent_per_step,
    zero_state_bytes_per_rank,
)
from tfcourse.train import (
    TrainingSetup,
    TrainSettings,
    half_weights,
    mixed_precision_update,
    optimizer_update,
    training_setup,
)

# --------------------------------------------------------------------------- communication


def weighted_flat(grads: dict, names: list[str], weight: float):
    """One contiguous copy of weight * grads[names] (what a collective sends)."""
    flat = flatten(grads, names)
    flat *= flat.dtype.type(weight)
    return flat


def average_gradients(grads: dict, weight: float, buckets: list[list[str]], comm, algorithm: str,
                      log) -> dict:
    """Sum weight * grads over all ranks, one all-reduce per bucket (weights add up to 1)."""
    averaged = {}
    for bucket in buckets:
        flat = weighted_flat(grads, bucket, weight)
        log.collective(f"allreduce:{algorithm}", ALLREDUCES[algorithm], flat, comm)
        averaged.update(unflatten(flat, grads, bucket))
    return averaged


def reduce_gradients_to_owners(grads: dict, weight: float, owners: dict, comm, log) -> dict:
    """ZeRO-2: sum weight * grads over ranks, each tensor delivered only to its owner."""
    mine = {}
    for owner in range(comm.size):
        names = [n for n in grads if owners[n] == owner]
        if names:
            flat = weighted_flat(grads, names, weight)
            total = np.empty_like(flat) if comm.rank == owner else None
            log.collective("reduce", lambda buf, c, total=total, owner=owner:
                           c.Reduce(buf, total, op=MPI.SUM, root=owner), flat, comm)
            if comm.rank == owner:
                mine.update(unflatten(total, grads, names))
    return mine


def broadcast_from_owners(params: dict, owners: dict, comm, log) -> dict:
    """Every owner sends its updated tensors to all ranks (ZeRO's parameter all-gather)."""
    params = dict(params)
    for owner in range(comm.size):
        names = [n for n in params if owners[n] == owner]
        if names:
            flat = flatten(params, names)
            log.collective("bcast", lambda buf, c, owner=owner: c.Bcast(buf, root=owner),
                           flat, comm)
            params.update(unflatten(flat, params, names))
    return params


def owner_update(params: dict, grads: dict, opt_state: dict, settings: TrainSettings, step: int,
                 norm: float, owners: dict, comm, log) -> tuple[dict, dict, float]:
    """ZeRO's update (stages 1 and 2): each rank takes the AdamW step of the tensors it owns -
    the only ones it keeps AdamW state for - clipped with the norm of the whole gradient, and
    the owners broadcast the new values. Same arguments and result as train.optimizer_update,
    plus the owners and their communicator, so a layout can pass it as its update."""
    mine = {name: g for name, g in grads.items() if owners[name] == comm.rank}
    new, opt_state, norm = optimizer_update({name: params[name] for name in mine}, mine,
                                            opt_state, settings, step, norm)
    return broadcast_from_owners({**params, **new}, owners, comm, log), opt_state, norm


def overlapped_loss_and_grads(params: dict, x, y, weight: float, config, comm,
                              log, loss_scale: float = 1.0) -> tuple[float, dict]:
    """The serial model's loss and the all-ranks sum of weight * gradients, with each piece's
    gradients sent (non-blocking Iallreduce) from the model's backward-pass callback as soon
    as they exist, so communication of layer i overlaps the backward pass of layer i - 1.

    MPI progresses a non-blocking collective only inside MPI calls unless the library runs a
    progress thread, so how much really overlaps depends on the MPI library."""
    in_flight = []

    def send(piece_grads: dict) -> None:
        names = list(piece_grads)
        flat = weighted_flat(piece_grads, names, weight)
        in_flight.append((comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM), flat, names,
                          piece_grads))

    local_loss, _ = loss_and_grads(params, x, y, config, on_grads=send, check=False,
                                   loss_scale=loss_scale)
    with log.span("iallreduce wait", nbytes=sum(int(f.nbytes) for _, f, _, _ in in_flight)):
        MPI.Request.Waitall([request for request, *_ in in_flight])
    averaged = {}
    for _, flat, names, like in in_flight:
        averaged.update(unflatten(flat, like, names))
    return local_loss, {name: averaged[name] for name in params}


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """What every step of this run shares."""

    config: object
    settings: TrainSettings
    comm: object
    algorithm: str  # "mpi" | "ring" | "naive" | "overlap"
    zero: int
    buckets: list
    owners: dict | None  # ZeRO only: parameter name -> owner rank


def train_step(state: State, x, y, step: int, log, dp: DataParallel):
    """One data-parallel step on the global batch (x, y); returns (new state, global loss,
    the gradients this rank keeps)."""
    if dp.zero == 3:  # the parameters sharded too: gathered piece by piece
        return zero3_step(state, x, y, step, log, dp)
    comm, precision = dp.comm, dp.config.precision
    lo, hi = batch_rows(len(x), comm.rank, comm.size)
    weight = (hi - lo) / len(x)
    params = state.params if precision == "fp32" else half_weights(state.params, precision)[1]
    scale = state.loss_scale["scale"] if state.loss_scale else 1.0  # fp16 only
    if dp.algorithm == "overlap":  # zero == 0 (checked in prepare)
        local_loss, grads = overlapped_loss_and_grads(params, x[lo:hi], y[lo:hi], weight,
                                                      dp.config, comm, log, scale)
    else:
        local_loss, grads = loss_and_grads(params, x[lo:hi], y[lo:hi], dp.config,
                                           check=False, loss_scale=scale)
    loss = comm.allreduce(local_loss * weight, op=MPI.SUM)
    noise = precision == "fp32" and dp.algorithm != "overlap"  # unscaled, not yet summed
    local_sq = sum_of_squares(grads) if noise else None  # |G| of this rank's rows
    if dp.zero == 0:
        if dp.algorithm != "overlap":
            grads = average_gradients(grads, weight, dp.buckets, comm, dp.algorithm, log)
            log.info["grad_sq_norms"] = (local_sq, sum_of_squares(grads)) if noise else None
        if precision != "fp32":  # every rank has the same sum: the same step, or skip
            params, opt_state, loss_scale, grads16, _ = mixed_precision_update(
                state.params, grads, state.opt_state, state.loss_scale, dp.settings, step,
                precision)
            return State(params, opt_state, loss_scale), loss, grads16
        params, opt_state, _ = optimizer_update(state.params, grads, state.opt_state,
                                                dp.settings, step)
        return State(params, opt_state), loss, grads
    if dp.zero == 1:  # every rank receives the whole averaged gradient, but updates its share
        kept = average_gradients(grads, weight, dp.buckets, comm, dp.algorithm, log)
        grads = {n: g for n, g in kept.items() if dp.owners[n] == comm.rank}
    else:  # zero == 2: each gradient is reduced to its owner only
        kept = grads = reduce_gradients_to_owners(grads, weight, dp.owners, comm, log)
    norm = math.sqrt(comm.allreduce(sum_of_squares(grads), op=MPI.SUM))  # of owned shares
    log.info["grad_sq_norms"] = (local_sq, norm**2) if noise else None
    params, opt_state, _ = owner_update(state.params, grads, state.opt_state, dp.settings, step,
                                        norm, dp.owners, comm, log)
    return State(params, opt_state), loss, kept


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    require_real("--bucket-mb", args.bucket_mb, positive=True)
    if args.allreduce == "overlap" and args.zero:
        raise ValueError(f"--allreduce: 'overlap' averages whole gradients (ZeRO-0); "
                         f"got --zero {args.zero}")
    if args.precision != "fp32" and args.zero:
        raise ValueError(f"--zero: mixed precision runs with ZeRO-0 here (ZeRO would shard "
                         f"the float32 master weights too), expected 0 with --precision "
                         f"{args.precision}, got {args.zero}")
    if args.zero == 3 and args.allreduce != "mpi":
        raise ValueError(f"--allreduce: ZeRO-3 all-reduces nothing (it reduces each gradient "
                         f"to its owner); expected the default 'mpi', got {args.allreduce!r}")
    setup = training_setup(args, PRECISIONS)
    batch_rows(setup.settings.batch_size, 0, world_size)  # every rank needs at least one row
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings = setup.config, setup.settings
    sizes = {n: math.prod(shape) for n, shape in param_shapes(config).items()}
    owners = partition_params(sizes, comm.size)  # ZeRO's owners; they also write checkpoints
    where = (placement.owned(comm.rank, owners) if args.zero == 3 else
             placement.replicated(comm.rank, owners, owners if args.zero else None))
    start, saving = start_training(comm, args, setup, where, {"program": "data_parallel",
                                                              "zero": args.zero})
    dp = DataParallel(config, settings, comm, args.allreduce, args.zero,
                      make_buckets(list(sizes), sizes, int(args.bucket_mb * 2**20 // 8)),
                      owners if args.zero else None)
    result = train(comm, setup, start, functools.partial(train_step, dp=dp), args.split_waiting,
                   saving, args.trace_memory)
    itemsize, mixed = np.dtype(config.dtype).itemsize, config.precision != "fp32"
    final = result.state
    if mixed:  # the 16-bit weights and gradients, the float32 master weights, m and v
        memory = state_bytes(final.params, final.opt_state,
                             half_weights(final.params, config.precision)[0], result.grads)
        itemsize = 2
    else:
        memory = state_nbytes(final.params, result.grads, final.opt_state)
    return result_record(
        result, setup, comm, memory, allreduce=args.allreduce, zero=args.zero,
        precision=config.precision,
        **({"loss_scale": final.loss_scale} if final.loss_scale else {}),  # fp16's, at the end
        predicted_memory_bytes=zero_state_bytes_per_rank(
            sum(sizes.values()), comm.size, args.zero, itemsize, mixed),
        bytes_sent_per_step=bytes_sent(result.logs, comm.size, SENDS) / settings.steps,
        grad_sq_norms_per_rank=comm.gather([log.info.get("grad_sq_norms")
                                            for log in result.logs], root=0),
        predicted_bytes_sent_per_step=zero_bytes_sent_per_step(
            sum(sizes.values()), comm.size, args.zero, itemsize))


SENDS = {**{f"allreduce:{name}": allreduce_bytes for name in ALLREDUCES},  # per n-byte call
         "iallreduce wait": allreduce_bytes, "reduce": reduce_scatter_bytes,
         "bcast": allgather_bytes, "gather": allgather_bytes}  # ring-equivalent costs


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.data_parallel", __doc__)
    parser.add_argument("--allreduce", default="mpi", choices=sorted([*ALLREDUCES, "overlap"]),
                        help="overlap: per-layer Iallreduce during the backward pass")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket size")
    add_split_waiting_argument(parser)
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
