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

Sends are non-blocking (`Isend`, completed at the end of the step), receives blocking
(`Recv`). With blocking `Send`s 1F1B deadlocks as soon as a message is too large for MPI's
eager buffer (MPICH on one machine sends only messages of under about 16 KB eagerly; the tiny
model's 2-row activations are 16 KB): in the steady state stage s sends F(k) forward while
stage s + 1 sends B(j) back, and each waits for the other to post its receive.
tests/test_pipeline_parallel.py simulates both kinds of send.

A stage runs the serial model's own forward and backward walks over the part it holds
(`forward_pass(..., layers=..., embed=first, head=last)` and `backward_pass`); the schedule
is a list of operations from tfcourse.parallel.plans.pipeline, the same list the simulator
and the Gantt plots read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import SERIAL, SublayerOps, backward_pass, forward_pass
from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.pipeline import (
    SCHEDULES,
    MicrobatchChooser,
    busy_seconds,
    message_tag,
    microbatch_rows,
    parse_microbatches,
    parse_slowdown,
    parse_stage_layers,
    schedule,
    stage_bubbles,
    stage_layers,
    stage_param_names,
)
from tfcourse.parallel.plans.tensor import squares_counted_once
from tfcourse.parallel.program import State, program_parser, result_record, run_program, train
from tfcourse.perf.costmodel import pipeline_bubble_fraction, pipeline_peak_microbatches
from tfcourse.train import TrainingSetup, TrainSettings, optimizer_update, training_setup

# --------------------------------------------------------------------------- a stage


@dataclasses.dataclass(frozen=True)
class Stage:
    """Which part of the model this rank runs (its parameters are in the State)."""

    index: int
    world_size: int
    layers: tuple[int, int]  # blocks [lo, hi)
    slowdown: float = 1.0  # > 1 simulates a slower device: compute is stretched by sleeping

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world_size - 1


def start(config, comm, layer_counts: list[int] | None = None, slowdown: float = 1.0
          ) -> tuple[Stage, placement.Placement]:
    """This rank's stage and where its parameters sit among the serial model's (a contiguous
    part of them; `layer_counts`: blocks per stage, default as even as possible)."""
    names = stage_param_names(config, comm.size, comm.rank, layer_counts)
    layers = stage_layers(config.n_layers, comm.size, layer_counts)[comm.rank]
    return Stage(comm.rank, comm.size, layers, slowdown), placement.stage(names)


@contextlib.contextmanager
def slower_device(stage: Stage):
    """Make the compute in the `with` body last `stage.slowdown` times as long, by sleeping -
    a device 1/slowdown as fast, without burning a shared core."""
    started = time.perf_counter()
    yield
    if stage.slowdown > 1.0:
        time.sleep((stage.slowdown - 1.0) * (time.perf_counter() - started))


def stage_forward(stage: Stage, params: dict, x, config, tokens, targets, weight: float,
                  ops: SublayerOps = SERIAL):
    """This stage's part of the forward pass; returns (output or weighted loss, cache).
    ops: the sublayers' operators (tensor parallelism's f and g when the stage is split)."""
    out, caches = forward_pass(params, tokens if stage.first else x, config, ops=ops,
                               layers=stage.layers, embed=stage.first, head=stage.last)
    if not stage.last:
        return np.ascontiguousarray(out), caches
    loss, loss_cache = cross_entropy_forward(out, targets)
    return loss * weight, (caches, loss_cache, weight)


def stage_backward(stage: Stage, dy, cache, grads: dict):
    """This stage's part of the backward pass: adds into `grads`, returns the input gradient
    to send to the previous stage (None on stage 0)."""
    if stage.last:
        cache, loss_cache, weight = cache
        dy = cross_entropy_backward(loss_cache, weight)
    dx, piece_grads = backward_pass(dy, cache)
    for name, g in piece_grads.items():
        grads[name] += g
    return None if stage.first else np.ascontiguousarray(dx)


# --------------------------------------------------------------------------- the executor


def receive(shape, dtype, source: int, tag: int, microbatch: int, comm, log):
    """Receive one activation (or gradient) array. The time until the message is there
    (Probe) is logged as "wait" - the pipeline bubble as this rank sees it - and the copy
    itself as "recv"."""
    with log.span("wait", microbatch):
        comm.Probe(source=source, tag=tag)
    buf = np.empty(shape, dtype=dtype)
    with log.span("recv", microbatch):
        comm.Recv(buf, source=source, tag=tag)
    return buf


def run_schedule(stage: Stage, params: dict, ops, tokens, targets, config, comm, log,
                 sublayer_ops: SublayerOps = SERIAL):
    """Run one step's forwards and backwards in the order `ops`; returns (weighted loss of
    this stage's micro-batches (0.0 except on the last stage), gradients, peak in flight).
    comm: the stages' communicator (its rank is the stage); sublayer_ops: see stage_forward."""
    rows = microbatch_rows(len(tokens), sum(kind == "F" for kind, _ in ops))
    dtype = np.dtype(config.dtype)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    caches, pending, loss, peak = {}, [], 0.0, 0

    def send(buf, dest: int, kind: str, mb: int) -> None:  # completed at the end of the step
        with log.span("send", mb):
            pending.append((comm.Isend(buf, dest=dest, tag=message_tag(kind, mb)), buf))

    for kind, mb in ops:
        # forget sends that have completed (this also lets MPI progress the others)
        pending[:] = [(request, buf) for request, buf in pending if not request.Test()]
        lo, hi = rows[mb]
        shape = (hi - lo, tokens.shape[1], config.d_model)
        if kind == "F":
            x = None if stage.first else receive(shape, dtype, stage.index - 1,
                                                 message_tag("F", mb), mb, comm, log)
            with log.span("forward", mb), slower_device(stage):
                out, caches[mb] = stage_forward(stage, params, x, config, tokens[lo:hi],
                                                targets[lo:hi], (hi - lo) / len(tokens),
                                                sublayer_ops)
            peak = max(peak, len(caches))
            if stage.last:
                loss += out
            else:
                send(out, stage.index + 1, "F", mb)
        else:
            dy = None if stage.last else receive(shape, dtype, stage.index + 1,
                                                 message_tag("B", mb), mb, comm, log)
            with log.span("backward", mb), slower_device(stage):
                dx = stage_backward(stage, dy, caches.pop(mb), grads)
            if not stage.first:
                send(dx, stage.index - 1, "B", mb)
    if pending:  # the buffers must stay alive until MPI has sent them
        with log.span("send"):  # microbatch None: waiting for all outstanding sends
            MPI.Request.Waitall([request for request, _ in pending])
    return loss, grads, peak


def finish_step(state: State, loss: float, grads: dict, step: int, settings: TrainSettings,
                comm, log, tp_rank: int = 0) -> tuple[State, float]:
    """After the schedule: the global gradient norm (every stage holds different parameters,
    so their squares add up), the optimiser update of this stage's parameters, and the loss
    (known on the last stage) sent to every rank; returns (new state, loss). comm: all the
    ranks of the model - with tensor-parallel stages (3D), every stage's group, ordered stage
    by stage, and tp_rank this rank's place in its group."""
    with log.span("sync"):
        comm.Barrier()  # the other stages are still draining the pipeline
    with log.span("allreduce"):
        norm = math.sqrt(comm.allreduce(squares_counted_once(grads, tp_rank), op=MPI.SUM))
        loss = comm.bcast(loss, root=comm.size - 1)
    params, opt_state, _ = optimizer_update(state.params, grads, state.opt_state, settings,
                                            step, norm)
    return State(params, opt_state), loss


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What every step of this run shares."""

    stage: Stage
    config: object
    settings: TrainSettings
    comm: object
    schedule: str
    chooser: MicrobatchChooser


def train_step(state: State, tokens, targets, step: int, log, pp: Pipeline):
    """One pipeline step on the global batch; returns (new state, loss on every rank, grads)."""
    m = pp.chooser.for_step(step)
    ops = schedule(pp.schedule, pp.comm.size, pp.comm.rank, m)
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
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings, p = setup.config, setup.settings, comm.size
    stage, part = start(config, comm, args.stage_layers,
                        args.slowdown[comm.rank] if args.slowdown else 1.0)
    state, saving = start_training(comm, args, setup, part, {
        "program": "pipeline_parallel", "stage_layers": args.stage_layers})
    chooser = MicrobatchChooser(settings.batch_size, args.microbatches)
    pp = Pipeline(stage, config, settings, comm, args.schedule, chooser)
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
    m = used[-1]
    return {
        **record,
        "schedule": args.schedule,
        "microbatches": m,
        "microbatches_per_step": used,
        "microbatch_trials": {str(k): v[0] for k, v in chooser.measured.items()},
        "stage_layers": [list(bounds) for bounds in stage_layers(config.n_layers, p,
                                                                 args.stage_layers)],
        "slowdown": args.slowdown or [1.0] * p,
        "last_step_seconds": [r["step"] for r in per_rank],
        "pipeline_seconds": pipeline_seconds,
        "events": events,
        "busy_seconds": [busy_seconds(e) for e in events],
        "bubble_measured_per_rank": bubbles,
        "bubble_measured": float(np.mean(bubbles)),
        "bubble_formula": pipeline_bubble_fraction(p, m),
        "peak_inflight": [r["peak"] for r in per_rank],
        "peak_inflight_predicted": [pipeline_peak_microbatches(args.schedule, p, s, m)
                                    for s in range(p)],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.pipeline_parallel", __doc__)
    parser.add_argument("--microbatches", default="4",
                        help="micro-batches per step, or 'auto': try 1, 2, 4, ... and keep "
                             "the fastest")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
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
