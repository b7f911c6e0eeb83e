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

from tfcourse.data import lm_batch
from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import (
    block_backward,
    block_forward,
    embed_backward,
    embed_forward,
    head_backward,
    head_forward,
    init_params,
)
from tfcourse.nn.optim import adamw_init, state_nbytes, sum_of_squares
from tfcourse.nn.validate import parse_list, require_positive_int, require_real
from tfcourse.parallel.comm import StepTimes, add_json_argument, program_parser, run_program
from tfcourse.parallel.partition import (
    SCHEDULES,
    busy_seconds,
    message_tag,
    microbatch_rows,
    schedule,
    stage_layers,
    stage_param_names,
)
from tfcourse.perf.costmodel import pipeline_bubble_fraction, pipeline_peak_microbatches
from tfcourse.perf.planner import choose_fastest
from tfcourse.train import (
    TrainingSetup,
    TrainSettings,
    optimizer_update,
    training_setup,
)

# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Stage:
    """What one rank holds between steps."""

    index: int
    world_size: int
    layers: tuple[int, int]
    params: dict
    opt_state: dict
    slowdown: float = 1.0  # > 1 simulates a slower device: compute is stretched by sleeping

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world_size - 1


def start(config, settings: TrainSettings, comm, layer_counts: list[int] | None = None,
          slowdown: float = 1.0) -> Stage:
    """This rank's stage: its slice of the serial model's parameters and fresh AdamW state
    (`layer_counts`: blocks per stage, default as even as possible)."""
    full = init_params(config, settings.seed)
    names = stage_param_names(config, comm.size, comm.rank, layer_counts)
    params = {name: full[name] for name in names}
    layers = stage_layers(config.n_layers, comm.size, layer_counts)[comm.rank]
    return Stage(comm.rank, comm.size, layers, params, adamw_init(params), slowdown)


def simulate_slower_device(stage: Stage, started: float) -> None:
    """Make the compute that began at `started` last `stage.slowdown` times as long, by
    sleeping - a device 1/slowdown as fast, without burning a shared core."""
    if stage.slowdown > 1.0:
        time.sleep((stage.slowdown - 1.0) * (time.perf_counter() - started))


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
            simulate_slower_device(stage, started)
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
            simulate_slower_device(stage, started)
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


AUTO_MICROBATCHES = (1, 2, 4, 8, 16)


def parse_microbatches(text: str) -> int | str:
    """--microbatches: a positive integer, or "auto" (chosen at run time, see run)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--microbatches: expected a positive integer or 'auto', "
                         f"got {text!r}") from None
    return require_positive_int("--microbatches", value)


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see comm.agree_on_arguments). Converts the text flags
    in `args` to values: --microbatches to an int or "auto", --stage-layers and --slowdown
    to lists."""
    require_positive_int("--threads", args.threads)
    args.microbatches = parse_microbatches(str(args.microbatches))
    setup = training_setup(args)
    n_layers = setup.config.n_layers
    if args.stage_layers is not None:
        args.stage_layers = parse_list("--stage-layers", args.stage_layers, int,
                                       require_positive_int)
        if len(args.stage_layers) != world_size or sum(args.stage_layers) != n_layers:
            raise ValueError(f"--stage-layers: expected {world_size} block counts (one per "
                             f"stage) adding up to n_layers={n_layers}, got {args.stage_layers}")
    if args.slowdown is not None:
        args.slowdown = parse_list("--slowdown", args.slowdown, float,
                                   lambda flag, v: require_real(flag, v, positive=True))
        if len(args.slowdown) != world_size or min(args.slowdown) < 1.0:
            raise ValueError(f"--slowdown: expected {world_size} factors >= 1 (one per rank), "
                             f"got {args.slowdown}")
    stage_layers(n_layers, world_size, args.stage_layers)  # every stage needs a block
    if args.microbatches != "auto":
        microbatch_rows(setup.settings.batch_size, args.microbatches)
    return setup


class MicrobatchChooser:
    """--microbatches auto: adaptive parallelism at run time. Step 0 warms up; the next steps
    try each candidate micro-batch count once; every later step uses the one whose step was
    fastest. The times are the slowest rank's (an allreduce MAX), so every rank sees the same
    numbers and makes the same choice. Micro-batching does not change the gradient, so the
    loss curve is the serial one whatever is chosen."""

    def __init__(self, batch_size: int, fixed: int | str):
        self.fixed = None if fixed == "auto" else fixed
        self.candidates = [m for m in AUTO_MICROBATCHES if m <= batch_size]
        self.measured: dict[int, list[float]] = {}
        self.chosen = self.fixed

    def for_step(self, step: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if 1 <= step <= len(self.candidates):
            return self.candidates[step - 1]
        return self.chosen or self.candidates[-1]

    def record(self, step: int, m: int, slowest_seconds: float) -> None:
        if self.fixed is None and 1 <= step <= len(self.candidates):
            self.measured.setdefault(m, []).append(slowest_seconds)
            self.chosen = choose_fastest(self.measured)


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    corpus, config, settings = setup.corpus, setup.config, setup.settings
    p = comm.size
    layers = stage_layers(config.n_layers, p, args.stage_layers)
    slowdown = args.slowdown[comm.rank] if args.slowdown else 1.0
    stage = start(config, settings, comm, args.stage_layers, slowdown)
    chooser = MicrobatchChooser(settings.batch_size, args.microbatches)
    losses, step_seconds, used, times = [], [], [], StepTimes()
    for step in range(settings.steps):
        tokens, targets = lm_batch(corpus.ids, settings.batch_size, settings.seq_len,
                                   settings.seed, step)
        m = chooser.for_step(step)
        ops = schedule(args.schedule, p, comm.rank, m)
        comm.Barrier()  # time each step from a common start
        t0 = time.perf_counter()
        log = EventLog(t0)
        loss, peak = train_step(stage, ops, tokens, targets, step, settings, config, comm, log)
        step_seconds.append(time.perf_counter() - t0)
        if chooser.fixed is None:
            chooser.record(step, m, comm.allreduce(step_seconds[-1], op=MPI.MAX))
        times.add(step_seconds[-1], *communication_and_waiting(log.events))
        losses.append(loss)
        used.append(m)
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
    m = used[-1]
    return {
        "losses": losses,
        "world_size": p,
        "schedule": args.schedule,
        "microbatches": m,
        "microbatches_per_step": used,
        "microbatch_trials": {str(k): v[0] for k, v in chooser.measured.items()},
        "stage_layers": [list(bounds) for bounds in layers],
        "slowdown": args.slowdown or [1.0] * p,
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
    parser = program_parser("tfcourse.parallel.pipeline_parallel", __doc__)
    parser.add_argument("--microbatches", default="4",
                        help="micro-batches per step, or 'auto': try 1, 2, 4, ... and keep "
                             "the fastest")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--stage-layers", default=None, metavar="N,N,...",
                        help="blocks per stage (default: as even as possible)")
    parser.add_argument("--slowdown", default=None, metavar="F,F,...",
                        help="simulate slower devices: rank r's compute takes F_r times longer")
    add_json_argument(parser)
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
