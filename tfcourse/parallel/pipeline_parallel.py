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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.costmodel import pipeline_bubble_fraction, pipeline_peak_microbatches
from tfcourse.data import lm_batch
from tfcourse.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.model import (
    block_backward,
    block_forward,
    embed_backward,
    embed_forward,
    head_backward,
    head_forward,
    init_params,
)
from tfcourse.optim import adamw_init, state_nbytes, sum_of_squares
from tfcourse.parallel.comm import StepTimes, add_json_argument, run_program
from tfcourse.parallel.partition import (
    SCHEDULES,
    busy_seconds,
    message_tag,
    microbatch_rows,
    schedule,
    stage_layers,
    stage_param_names,
)
from tfcourse.train import (
    TrainingSetup,
    TrainSettings,
    add_training_arguments,
    optimizer_update,
    training_setup,
)
from tfcourse.validate import require_positive_int

# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Stage:
    """What one rank holds between steps."""

    index: int
    world_size: int
    layers: tuple[int, int]
    params: dict
    opt_state: dict

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world_size - 1


def start(config, settings: TrainSettings, comm) -> Stage:
    """This rank's stage: its slice of the serial model's parameters and fresh AdamW state."""
    full = init_params(config, settings.seed)
    names = stage_param_names(config, comm.size, comm.rank)
    params = {name: full[name] for name in names}
    layers = stage_layers(config.n_layers, comm.size)[comm.rank]
    return Stage(comm.rank, comm.size, layers, params, adamw_init(params))


SCHEDULE_EVENTS = ("forward", "backward", "send", "wait", "recv")


def communication_and_waiting(events: list[dict]) -> tuple[float, float]:
    """(seconds moving data, seconds waiting for other stages) in one step's events."""
    def seconds(kinds) -> float:
        return sum(e["end"] - e["start"] for e in events if e["kind"] in kinds)

    return seconds(("send", "recv", "allreduce")), seconds(("wait", "sync"))


class EventLog:
    """Timestamped (kind, micro-batch, start, end) records, in seconds since `t0`."""

    def __init__(self, t0: float):
        self.t0, self.events = t0, []

    def record(self, kind: str, microbatch, started: float) -> None:
        now = time.perf_counter()
        self.events.append({"kind": kind, "microbatch": microbatch,
                            "start": started - self.t0, "end": now - self.t0})


def stage_forward(stage: Stage, x, config, tokens, targets, weight: float):
    """This stage's part of the forward pass; returns (output or weighted loss, cache)."""
    caches = []
    if stage.first:
        x, cache = embed_forward(stage.params, tokens, config)
        caches.append(cache)
    for i in range(*stage.layers):
        x, cache = block_forward(stage.params, i, x, config)
        caches.append(cache)
    if not stage.last:
        return np.ascontiguousarray(x), caches
    logits, head_cache = head_forward(stage.params, x)
    loss, loss_cache = cross_entropy_forward(logits, targets)
    return loss * weight, (caches, head_cache, loss_cache, weight)


def stage_backward(stage: Stage, dy, cache, grads: dict):
    """This stage's part of the backward pass: adds into `grads`, returns the input gradient
    to send to the previous stage (None on stage 0)."""
    if stage.last:
        caches, head_cache, loss_cache, weight = cache
        dy, head_grads = head_backward(cross_entropy_backward(loss_cache, weight), head_cache)
        _accumulate(grads, head_grads)
    else:
        caches = cache
    block_caches = caches[1:] if stage.first else caches
    for block_cache in reversed(block_caches):
        dy, block_grads = block_backward(dy, block_cache)
        _accumulate(grads, block_grads)
    if stage.first:
        _accumulate(grads, embed_backward(dy, caches[0]))
        return None
    return np.ascontiguousarray(dy)


def _accumulate(total: dict, grads: dict) -> None:
    for name, g in grads.items():
        total[name] += g


def receive(shape, dtype, source: int, tag: int, microbatch: int, comm, log: EventLog):
    """Receive one activation (or gradient) array. The time until the message is there
    (Probe) is logged as "wait" - the pipeline bubble as this rank sees it - and the copy
    itself as "recv"."""
    started = time.perf_counter()
    comm.Probe(source=source, tag=tag)
    log.record("wait", microbatch, started)
    started = time.perf_counter()
    buf = np.empty(shape, dtype=dtype)
    comm.Recv(buf, source=source, tag=tag)
    log.record("recv", microbatch, started)
    return buf


def run_schedule(stage: Stage, ops, tokens, targets, config, comm, log: EventLog):
    """Run one step's forwards and backwards in the order `ops`; returns (weighted loss of
    this stage's micro-batches (0.0 except on the last stage), gradients, peak in flight)."""
    rows = microbatch_rows(len(tokens), sum(kind == "F" for kind, _ in ops))
    dtype = np.dtype(config.dtype)
    grads = {name: np.zeros_like(p) for name, p in stage.params.items()}
    caches, pending, loss, peak = {}, [], 0.0, 0
    for kind, mb in ops:
        # forget sends that have completed (this also lets MPI progress the others)
        pending = [(request, buf) for request, buf in pending if not request.Test()]
        lo, hi = rows[mb]
        shape = (hi - lo, tokens.shape[1], config.d_model)
        if kind == "F":
            x = None
            if not stage.first:
                x = receive(shape, dtype, stage.index - 1, message_tag("F", mb), mb, comm, log)
            started = time.perf_counter()
            out, caches[mb] = stage_forward(stage, x, config, tokens[lo:hi], targets[lo:hi],
                                            (hi - lo) / len(tokens))
            log.record("forward", mb, started)
            peak = max(peak, len(caches))
            if stage.last:
                loss += out
            else:
                started = time.perf_counter()
                pending.append((comm.Isend(out, dest=stage.index + 1,
                                           tag=message_tag("F", mb)), out))
                log.record("send", mb, started)
        else:
            dy = None
            if not stage.last:
                dy = receive(shape, dtype, stage.index + 1, message_tag("B", mb), mb, comm, log)
            started = time.perf_counter()
            dx = stage_backward(stage, dy, caches.pop(mb), grads)
            log.record("backward", mb, started)
            if not stage.first:
                started = time.perf_counter()
                pending.append((comm.Isend(dx, dest=stage.index - 1,
                                           tag=message_tag("B", mb)), dx))
                log.record("send", mb, started)
    if pending:  # the buffers must stay alive until MPI has sent them
        started = time.perf_counter()
        MPI.Request.Waitall([request for request, _ in pending])
        log.record("send", None, started)  # None: waiting for all outstanding sends
    return loss, grads, peak


def finish_step(stage: Stage, loss: float, grads: dict, step: int, settings: TrainSettings,
                comm, log: EventLog) -> float:
    """After the schedule: the global gradient norm (every stage holds different parameters,
    so their squares add up), the optimiser update of this stage's parameters, and the loss
    (known on the last stage) sent to every rank; returns the loss."""
    started = time.perf_counter()
    comm.Barrier()  # the other stages are still draining the pipeline
    log.record("sync", None, started)
    started = time.perf_counter()
    norm = math.sqrt(comm.allreduce(sum_of_squares(grads), op=MPI.SUM))
    loss = comm.bcast(loss, root=comm.size - 1)
    log.record("allreduce", None, started)
    stage.params, stage.opt_state, _ = optimizer_update(stage.params, grads, stage.opt_state,
                                                        settings, step, norm)
    return loss


def train_step(stage: Stage, ops, tokens, targets, step: int, settings: TrainSettings, config,
               comm, log: EventLog) -> tuple[float, int]:
    """One pipeline step; returns (the global batch's loss, on every rank; peak in flight)."""
    loss, grads, peak = run_schedule(stage, ops, tokens, targets, config, comm, log)
    return finish_step(stage, loss, grads, step, settings, comm, log), peak


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see comm.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    require_positive_int("--microbatches", args.microbatches)
    setup = training_setup(args)
    stage_layers(setup.config.n_layers, world_size)  # every stage needs at least one block
    microbatch_rows(setup.settings.batch_size, args.microbatches)
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    corpus, config, settings = setup.corpus, setup.config, setup.settings
    p, m = comm.size, args.microbatches
    layers = stage_layers(config.n_layers, p)
    stage = start(config, settings, comm)
    ops = schedule(args.schedule, p, comm.rank, m)
    losses, step_seconds, peak, times = [], [], 0, StepTimes()
    for step in range(settings.steps):
        tokens, targets = lm_batch(corpus.ids, settings.batch_size, settings.seq_len,
                                   settings.seed, step)
        comm.Barrier()  # time each step from a common start
        t0 = time.perf_counter()
        log = EventLog(t0)
        loss, peak_step = train_step(stage, ops, tokens, targets, step, settings, config, comm,
                                     log)
        step_seconds.append(time.perf_counter() - t0)
        times.add(step_seconds[-1], *communication_and_waiting(log.events))
        losses.append(loss)
        peak = max(peak, peak_step)
    # the last step: the pipeline ends when the last rank's last op has ended
    pipeline_end = max((e["end"] for e in log.events if e["kind"] in SCHEDULE_EVENTS),
                       default=0.0)
    pipeline_seconds = comm.allreduce(pipeline_end, op=MPI.MAX)
    busy = busy_seconds(log.events)
    per_rank = comm.gather({"events": log.events, "busy": busy, "peak": peak,
                            "step": step_seconds[-1], "times": times.mean(),
                            # a gradient per parameter, of the same size
                            "memory": state_nbytes(stage.params, stage.params,
                                                   stage.opt_state)}, root=0)
    if comm.rank != 0:
        return {}
    bubbles = [1.0 - r["busy"] / pipeline_seconds if pipeline_seconds > 0 else 0.0
               for r in per_rank]
    return {
        "losses": losses,
        "world_size": p,
        "schedule": args.schedule,
        "microbatches": m,
        "stage_layers": [list(bounds) for bounds in layers],
        "step_seconds": step_seconds,
        "last_step_seconds": [r["step"] for r in per_rank],
        "pipeline_seconds": pipeline_seconds,
        "events": [r["events"] for r in per_rank],
        "busy_seconds": [r["busy"] for r in per_rank],
        "bubble_measured_per_rank": bubbles,
        "bubble_measured": float(np.mean(bubbles)),
        "bubble_formula": pipeline_bubble_fraction(p, m),
        "peak_inflight": [r["peak"] for r in per_rank],
        "memory_bytes": [r["memory"] for r in per_rank],
        "seconds_per_step_per_rank": [r["times"] for r in per_rank],
        "peak_inflight_predicted": [pipeline_peak_microbatches(args.schedule, p, s, m)
                                    for s in range(p)],
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.parallel.pipeline_parallel",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, threads=True)
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    add_json_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        return (f"pipeline {args.schedule} on {result['world_size']} stage(s), "
                f"{args.microbatches} micro-batches: final loss {result['losses'][-1]:.4f} "
                f"after {len(result['losses'])} steps, bubble {result['bubble_measured']:.2f} "
                f"measured vs {result['bubble_formula']:.2f} formula")

    return run_program(args, prepare, run, summary)

if __name__ == "__main__":
    sys.exit(main())
