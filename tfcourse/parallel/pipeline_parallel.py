"""Chapter 7: pipeline parallelism - the model's layers cut into p stages, one per process.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.pipeline_parallel --config tiny \\
        --layers 4 --steps 50 --microbatches 8 --schedule 1f1b --seed 0 --json out.json

Stage s of p holds the blocks chunk_bounds(n_layers, p)[s]; stage 0 also holds the embeddings,
the last stage the final LayerNorm, the head and the loss. Each rank keeps only its stage's
parameters (sliced from the serial `init_params` dict, so the same seed gives the same model)
and the AdamW state of those.

The global batch is split into m micro-batches. A micro-batch's activations travel forward
from stage to stage, its activation gradients travel back, as point-to-point messages tagged
with the micro-batch. Micro-batch i's loss is weighted by rows_i / B, so the gradients summed
over micro-batches are the serial full-batch gradients and the loss curve equals serial
training's to rounding.

Schedules - the order in which a stage runs its forwards F and backwards B:

- gpipe (Huang et al. 2019): all m forwards, then all m backwards in reverse order. At the
  peak every stage holds the activations of all m micro-batches.
- 1f1b (PipeDream, Narayanan et al. 2019, in the flushed form of Megatron-LM): stage s runs
  min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then the
  remaining backwards. Same bubble, (p - 1) / (m + p - 1), but at most min(p - s, m)
  micro-batches in flight on stage s.

The stage and the executor live in tfcourse.parallel.pipeline_stage. Sends are non-blocking
(`Isend`, completed at the end of the step), receives blocking (`Recv`). With blocking `Send`s
1F1B deadlocks as soon as a message is too large for MPI's eager buffer (MPICH on one machine
sends only messages of under about 16 KB eagerly; the tiny model's 2-row activations are 16
KB): in the steady state stage s sends F(k) forward while stage s + 1 sends B(j) back, and
each waits for the other to post its receive.
tests/test_pipeline_parallel.py simulates both kinds of send.

A stage runs the serial model's own forward and backward walks over the part it holds
(`forward_pass(..., layers=..., embed=first, head=last)` and `backward_pass`); the schedule
is a list of operations from tfcourse.parallel.plans.pipeline, the same list the simulator
and the Gantt plots read.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.pipeline_stage import Stage, finish_step, run_schedule, start
from tfcourse.parallel.plans.pipeline import (
    SCHEDULES,
    MicrobatchChooser,
    busy_seconds,
    check_schedule_args,
    chunk_layers,
    microbatch_rows,
    parse_microbatches,
    parse_slowdown,
    parse_stage_layers,
    schedule,
    stage_bubbles,
    stage_layers,
)
from tfcourse.parallel.program import State, program_parser, result_record, run_program, train
from tfcourse.perf.costmodel import pipeline_bubble_fraction, pipeline_peak_microbatches
from tfcourse.train import TrainingSetup, TrainSettings, training_setup


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What every step of this run shares."""

    stage: Stage
    config: object
    settings: TrainSettings
    comm: object
    schedule: str
    chooser: MicrobatchChooser
    virtual_stages: int = 1  # the interleaved schedule's chunks per rank


def train_step(state: State, tokens, targets, step: int, log, pp: Pipeline):
    """One pipeline step on the global batch; returns (new state, loss on every rank, grads)."""
    m = pp.chooser.for_step(step)
    ops = schedule(pp.schedule, pp.comm.size, pp.comm.rank, m, pp.virtual_stages)
    loss, grads, peak = run_schedule(pp.stage, state.params, ops, tokens, targets, pp.config,
                                     pp.comm, log)
    state, loss = finish_step(state, loss, grads, step, pp.settings, pp.comm, log)
    log.info.update(microbatches=m, peak=peak)
    if pp.chooser.fixed is None:  # the slowest rank's time, so every rank chooses the same
        pp.chooser.record(step, m, pp.comm.allreduce(time.perf_counter() - log.t0, op=MPI.MAX))
    return state, loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments). Converts the text
    flags in `args` to values: --microbatches to an int or "auto", --stage-layers and
    --slowdown to lists."""
    require_positive_int("--threads", args.threads)
    args.microbatches = parse_microbatches(str(args.microbatches))
    setup = training_setup(args)
    n_layers = setup.config.n_layers
    args.stage_layers = parse_stage_layers(args.stage_layers, world_size, n_layers)
    args.slowdown = parse_slowdown(args.slowdown, world_size)
    stage_layers(n_layers, world_size, args.stage_layers)  # every stage needs a block
    if args.microbatches != "auto":
        microbatch_rows(setup.settings.batch_size, args.microbatches)
    v = require_positive_int("--virtual-stages", args.virtual_stages)
    if args.schedule == "interleaved" and (args.microbatches == "auto" or args.stage_layers
                                           or args.slowdown):
        raise ValueError("--schedule interleaved: expected a number of --microbatches and "
                         "no --stage-layers or --slowdown (its chunks are equal)")
    m = 1 if args.microbatches == "auto" else args.microbatches
    try:  # the plan's checks, their message prefixed with the flags they are about
        check_schedule_args(args.schedule, world_size, 0, m, v)
    except ValueError as error:
        raise ValueError(f"--schedule {args.schedule} --virtual-stages {v} --microbatches "
                         f"{args.microbatches} on {world_size} stages: {error}") from None
    if v > 1:
        try:  # the blocks must cut into p v equal chunks
            chunk_layers(n_layers, world_size, v)
        except ValueError as error:
            raise ValueError(f"--layers {n_layers} with --virtual-stages {v}: {error}") from None
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings, p = setup.config, setup.settings, comm.size
    stage, part = start(config, comm, args.stage_layers,
                        args.slowdown[comm.rank] if args.slowdown else 1.0, args.virtual_stages)
    state, saving = start_training(comm, args, setup, part, {
        "program": "pipeline_parallel", "stage_layers": args.stage_layers})
    chooser = MicrobatchChooser(settings.batch_size, args.microbatches)
    pp = Pipeline(stage, config, settings, comm, args.schedule, chooser, args.virtual_stages)
    result = train(comm, setup, state, functools.partial(train_step, pp=pp), saving=saving,
                   trace_memory=args.trace_memory)
    last = result.logs[-1]  # the last step's timeline, every rank's
    per_rank = comm.gather({"events": last.events, "peak": last.info["peak"],
                            "step": result.step_seconds[-1]}, root=0)
    record = result_record(result, setup, comm, state_nbytes(
        result.state.params, result.grads, result.state.opt_state))
    if comm.rank != 0:
        return record
    events = [r["events"] for r in per_rank]
    pipeline_seconds, bubbles = stage_bubbles(events)
    used = [log.info["microbatches"] for log in result.logs]
    m, v = used[-1], args.virtual_stages
    seconds = {kind: [e["end"] - e["start"] for r in events for e in r if e["kind"] == kind]
               for kind in ("forward", "backward", "weight")}
    t = {kind: float(np.mean(d)) if d else 0.0 for kind, d in seconds.items()}  # per op
    return {
        **record,
        "schedule": args.schedule,
        "microbatches": m,
        "microbatches_per_step": used,
        "microbatch_trials": {str(k): trials[0] for k, trials in chooser.measured.items()},
        "virtual_stages": v,
        "stage_layers": ([[list(c) for c in chunks] for chunks in
                          chunk_layers(config.n_layers, p, v)] if v > 1 else
                         [list(bounds) for bounds in stage_layers(config.n_layers, p,
                                                                  args.stage_layers)]),
        "slowdown": args.slowdown or [1.0] * p,
        "last_step_seconds": [r["step"] for r in per_rank],
        "pipeline_seconds": pipeline_seconds,
        "events": events,
        "busy_seconds": [busy_seconds(e) for e in events],
        "bubble_measured_per_rank": bubbles,
        "bubble_measured": float(np.mean(bubbles)),
        "op_seconds": t,  # mean seconds of a forward, a backward (B) and a W, measured
        "bubble_formula": pipeline_bubble_fraction(  # at the measured costs
            p, m, args.schedule, v, t["forward"], t["backward"] + t["weight"], t["weight"]),
        "peak_inflight": [r["peak"] for r in per_rank],
        "peak_inflight_predicted": [pipeline_peak_microbatches(args.schedule, p, s, m, v)
                                    for s in range(p)],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.pipeline_parallel", __doc__)
    parser.add_argument("--microbatches", default="4",
                        help="micro-batches per step, or 'auto': try 1, 2, 4, ... and keep "
                             "the fastest")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                        help="with --schedule interleaved: model chunks per rank (V > 1)")
    parser.add_argument("--stage-layers", default=None, metavar="N,N,...",
                        help="blocks per stage (default: as even as possible)")
    parser.add_argument("--slowdown", default=None, metavar="F,F,...",
                        help="simulate slower devices: rank r's compute takes F_r times longer")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        chosen = " (auto)" if args.microbatches == "auto" else ""
        return (f"pipeline {args.schedule} on {result['world_size']} stage(s), "
                f"{result['microbatches']}{chosen} micro-batches: final loss "
                f"{result['losses'][-1]:.4f} "
                f"after {len(result['losses'])} steps, bubble {result['bubble_measured']:.2f} "
                f"measured vs {result['bubble_formula']:.2f} formula")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
