"""Chapter 12: data, pipeline and tensor parallelism at once ("3D", Narayanan et al. 2021).

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.hybrid --dp 2 --pp 2 --config tiny \\
        --layers 4 --microbatches 2 --schedule 1f1b --steps 20
    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.hybrid --dp 2 --tp 2 --config tiny
    mpiexec -n 8 python -m mpi4py -m tfcourse.parallel.hybrid --dp 2 --pp 2 --tp 2 --layers 4

The world's dp * pp * tp ranks form a grid: rank = (replica * pp + stage) * tp + t.
`comm.Split` makes the sub-communicators:

- a *model* communicator per replica (the ranks with the same `replica`): one whole model,
  cut into pp pipeline stages, each stage cut among tp ranks by tensor parallelism, exactly as
  in chapter 7; inside it a *pipe* communicator per t (one rank of every stage, its rank the
  stage: the pipeline's messages) and a *tensor* communicator per stage (f and g);
- a *data* communicator per part (the ranks with the same place in their replica): the ranks
  holding the same piece of the model in different replicas, which all-reduce that piece's
  gradients as in chapter 6.

Replica r trains on rows batch_rows(B, r, dp) of every global batch. Its gradients are
weighted by its share of the batch, so the data all-reduce gives the full-batch gradient of
the serial model, and the loss curve equals serial training's to rounding. Nothing here is a
new layer: the step is chapter 7's step functions - the pipeline's schedule, run with tensor
parallelism's f and g as its stages' operators - with chapter 6's all-reduce in the middle.
With more ranks than cores (8 on this 2-core machine) a run checks correctness, not speed.
--sequence-parallel (with --tp): each stage of each replica runs Megatron sequence
parallelism (chapter 9) - tensor rank t holds slice t of every sequence between sublayers, and
with --pp it sends only that slice to the next stage (pipe communicator t links rank t of
every stage), a tp-th of the pipeline's bytes.
--zero 1 (ZeRO-1 across the replicas, Megatron's "distributed optimizer"): each rank keeps
AdamW's state for a 1/dp share of the parameters it holds, steps only those, and broadcasts
them to the other replicas (data_parallel.owner_update over the data communicator).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

from mpi4py import MPI

from tfcourse.nn.model import SERIAL, param_shapes
from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel import pipeline_stage as pipeline
from tfcourse.parallel import tensor_parallel as tensor
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.data_parallel import average_gradients, owner_update
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import batch_rows, partition_params
from tfcourse.parallel.plans.pipeline import (
    SCHEDULES,
    microbatch_rows,
    schedule,
    stage_layers,
    stage_param_names,
)
from tfcourse.parallel.plans.tensor import check_world_size
from tfcourse.parallel.program import State, program_parser, result_record, run_program, train
from tfcourse.train import TrainingSetup, optimizer_update, training_setup

# --------------------------------------------------------------------------- the grid


def grid_shape(world_size: int, dp: int, pp: int, tp: int) -> tuple[int, int]:
    """(replicas, ranks per replica) of a dp x pp x tp grid; ValueError naming the flag if
    the product is not the world size."""
    for flag, value in (("--dp", dp), ("--pp", pp), ("--tp", tp)):
        require_positive_int(flag, value)
    if dp * pp * tp != world_size:
        raise ValueError(f"--dp/--pp/--tp: expected dp * pp * tp = the {world_size} MPI "
                         f"rank(s), got {dp} * {pp} * {tp} = {dp * pp * tp}")
    return dp, pp * tp


def split(comm, ranks_per_replica: int, tp: int = 1):
    """(replica index, model, data, pipe, tensor communicators) for this rank."""
    replica, part = divmod(comm.rank, ranks_per_replica)
    model = comm.Split(color=replica, key=part)
    data = comm.Split(color=part, key=replica)
    stage, t = divmod(part, tp)
    pipe = model.Split(color=t, key=stage)
    tensor_group = model.Split(color=stage, key=t)
    return replica, model, data, pipe, tensor_group


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class Hybrid:
    """What every step of this run shares: the grid, both communicators, the inner split."""

    config: object
    settings: object
    dp: int
    replica: int
    model: object  # this replica's ranks: its pipeline stages' tensor-parallel groups
    data: object  # the ranks holding the same part of the model in every replica
    pipe: object  # one rank of every stage of this replica (rank = stage)
    tensor: object  # this stage's tensor-parallel group
    stage: pipeline.Stage | None  # with --pp
    ops: list | None  # this stage's schedule, with --pp
    sequence_parallel: bool = False  # with --tp
    owners: dict | None = None  # --zero 1: parameter name -> the replica that updates it


def replica_grads(state: State, x, y, log, hy: Hybrid):
    """This replica's loss and gradients on its rows, by chapter 7's pipeline or tensor-
    parallel model, then summed over replicas (each weighted by its share of the batch) by
    chapter 6's all-reduce; returns (loss, grads)."""
    lo, hi = batch_rows(len(x), hy.replica, hy.dp)
    weight = (hi - lo) / len(x)
    if hy.stage is not None:
        f_and_g = (tensor.sequence_ops(hy.tensor, log) if hy.sequence_parallel else
                   tensor.megatron_ops(hy.tensor, log) if hy.tensor.size > 1 else SERIAL)
        loss, grads, _ = pipeline.run_schedule(hy.stage, state.params, hy.ops, x[lo:hi],
                                               y[lo:hi], hy.config, hy.pipe, log, f_and_g)
        if hy.sequence_parallel:  # each tensor rank's slice of the loss and of the gradients
            loss, grads = hy.tensor.allreduce(loss), tensor.sum_sequence_split(grads, hy.tensor,
                                                                               log)
    else:
        step = tensor.sp_loss_and_grads if hy.sequence_parallel else tensor.tp_loss_and_grads
        loss, grads = step(state.params, x[lo:hi], y[lo:hi], hy.config, hy.tensor, log)
    grads = average_gradients(grads, weight, [list(grads)], hy.data, "mpi", log)
    return hy.data.allreduce(loss * weight, op=MPI.SUM), grads  # PP: 0.0 but on last stages


def train_step(state: State, x, y, step: int, log, hy: Hybrid):
    """One step of the grid; the update is the inner split's own (with --zero 1, each rank
    steps its share and the replicas exchange the results)."""
    loss, grads = replica_grads(state, x, y, log, hy)
    update = optimizer_update if hy.owners is None else functools.partial(
        owner_update, owners=hy.owners, comm=hy.data, log=log)
    if hy.stage is not None:
        state, loss = pipeline.finish_step(state, loss, grads, step, hy.settings, hy.model, log,
                                           hy.tensor.rank, update)
        return state, loss, grads
    return tensor.tp_update(state, grads, step, hy.settings, hy.tensor, update), loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    require_positive_int("--microbatches", args.microbatches)
    dp, _ = grid_shape(world_size, args.dp, args.pp, args.tp)
    setup = training_setup(args)
    batch = setup.settings.batch_size
    batch_rows(batch, 0, dp)  # every replica needs at least one row
    if args.pp > 1:
        stage_layers(setup.config.n_layers, args.pp)
        microbatch_rows(batch // dp, args.microbatches)  # the smallest replica's rows
    check_world_size(setup.config, args.tp)
    if args.sequence_parallel and args.tp == 1:
        raise ValueError(f"--sequence-parallel: splits the sequence inside a tensor-parallel "
                         f"group, so it needs --tp > 1; got --tp {args.tp}")
    if args.sequence_parallel and setup.settings.seq_len % args.tp:
        raise ValueError(f"--sequence-parallel: --seq-len must split evenly over --tp "
                         f"{args.tp}, got {setup.settings.seq_len}")
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings = setup.config, setup.settings
    dp, per_replica = grid_shape(comm.size, args.dp, args.pp, args.tp)
    replica, model, data, pipe, group = split(comm, per_replica, args.tp)
    names = list(param_shapes(config))  # the parameters this rank holds (a part of them)
    if args.pp > 1:
        stage, part = pipeline.start(config, pipe)
        names = stage_param_names(config, args.pp, pipe.rank)
        if args.tp > 1:  # 3D: the stage's parameters, cut among its tensor-parallel group
            part = placement.tensor_stage(stage_param_names(config, args.pp, pipe.rank),
                                          group.rank, args.tp)
        if args.sequence_parallel:  # this tensor rank's slice of every sequence
            stage = dataclasses.replace(stage, slices=group.size, slice=group.rank)
        ops = schedule(args.schedule, args.pp, pipe.rank, args.microbatches)
    else:
        stage, ops, part = None, None, placement.tensor(group.rank, group.size)
    sizes = {n: math.prod(shape) for n, shape in param_shapes(config).items() if n in names}
    owners = partition_params(sizes, dp) if args.zero else None  # the same on every replica
    state, saving = start_training(comm, args, setup, placement.in_replica(part, replica, owners),
                                   {"program": "hybrid", "dp": args.dp, "pp": args.pp,
                                    "tp": args.tp, "zero": args.zero})
    hy = Hybrid(config, settings, dp, replica, model, data, pipe, group, stage, ops,
                args.sequence_parallel, owners)
    result = train(comm, setup, state, functools.partial(train_step, hy=hy),
                   split_waiting=True,  # this rank's collectives, in both communicators
                   saving=saving, trace_memory=args.trace_memory)
    record = result_record(result, setup, comm, state_nbytes(
        result.state.params, result.grads, result.state.opt_state),
        dp=args.dp, pp=args.pp, tp=args.tp,
        microbatches=args.microbatches if args.pp > 1 else None,
        schedule=args.schedule if args.pp > 1 else None,
        pipeline_bytes_sent=comm.gather(sum(e["bytes"] for log in result.logs
                                            for e in log.events if e["kind"] == "send")))
    for sub in (pipe, group, model, data):
        sub.Free()
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.hybrid", __doc__)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches (with --pp)")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1],
                        help="1: ZeRO-1 across the replicas (AdamW state sharded over --dp)")
    parser.add_argument("--schedule", default="1f1b",  # interleaving: pipeline_parallel only
                        choices=[name for name in SCHEDULES if name != "interleaved"])
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="with --tp: Megatron sequence parallelism in each replica")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        inner = " x ".join([f"pipeline {args.pp} stages"] * (args.pp > 1)
                           + [f"tensor parallel {args.tp}"] * (args.tp > 1 or args.pp == 1))
        return (f"hybrid: {args.dp} data-parallel replica(s) x {inner}: final loss "
                f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
