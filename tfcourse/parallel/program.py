"""The one skeleton of the course's MPI programs (chapters 6-12): a command line checked on every
rank before any collective, one training loop, one timing log, one result record.

    run_program(args, prepare, run, summary)    # check args on all ranks, run, print, --json
    run = train(comm, setup, state, step)       # the loop every training program shares

A training program supplies only its algorithm: `step(state, x, y, step_index, log) ->
(state, loss, grads)` on the global batch (x, y), returning the new explicit state (nothing is
mutated in place); every collective or message it runs is timed into `log`.
Only programs started by `mpiexec` import this module (it initialises MPI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from tfcourse.allocator import keep_freed_memory
from tfcourse.course.launch import die_with_parent
from tfcourse.data import lm_batch
from tfcourse.files import check_writable, write_json_atomic
from tfcourse.nn.model import param_shapes
from tfcourse.parallel.plans.placement import assemble_params, param_pieces
from tfcourse.perf.memory import traced
from tfcourse.train import (
    TrainingSetup,
    add_training_arguments,
    checkpoint_now,
    evaluate_now,
    held_out_loss,
    held_out_text,
)

T = TypeVar("T")

# A rank of a run_mpi job dies with its MPI proxy (never left busy-polling under PID 1);
# outside run_mpi this does nothing. At import: every MPI program imports this module.
die_with_parent()

# --------------------------------------------------------------------------- command line


def program_parser(module: str, description: str, training: bool = True
                   ) -> argparse.ArgumentParser:
    """The command line of `python -m <module>`: its docstring as help, `--json PATH`, and
    (`training`) the options every training program shares, with --threads."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if training:
        add_training_arguments(parser, threads=True)
        parser.add_argument("--trace-memory", action="store_true",
                            help="measure the first step's peak memory on every rank "
                                 "(tracemalloc; that step runs several times slower)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the result as JSON (rank 0 only)")
    return parser


def add_split_waiting_argument(parser: argparse.ArgumentParser) -> None:
    """`--split-waiting`: time waiting for other ranks apart from communication (EventLog)."""
    parser.add_argument("--split-waiting", action="store_true",
                        help="enter a Barrier before each collective and time it as waiting")


def agree_on_arguments(comm: MPI.Comm, prepare: Callable[[], T],
                       json_path: str | None = None) -> T:
    """Run `prepare()` - which checks the command line and raises ValueError on bad input -
    on every rank, BEFORE any training collective; returns what `prepare()` returns.

    Rank 0 also checks that the --json file can be written, so a typo in its folder fails in
    a second, not after the whole run. The ranks then exchange their verdicts (one
    allgather that every rank reaches), so all fail the same way even if only one rank saw
    the problem (a file missing on one node): the lowest failing rank prints "error: ..."
    to stderr, every rank waits for that line, and all exit with status 2 - under
    `python -m mpi4py` that is an MPI_Abort, which ends the job at once. Nothing is written.
    """
    result, error = None, None
    try:
        result = prepare()
        if comm.rank == 0 and json_path:
            check_writable("--json", json_path)
    except ValueError as err:
        error = str(err)
    stop_together(comm, error)
    return result


def stop_together(comm: MPI.Comm, error: str | None) -> None:
    """If any rank has an error, the lowest such rank prints it, and every rank exits with
    status 2 (after a Barrier, so the message is out first). Every rank must call it."""
    errors = comm.allgather(error)
    failed = [rank for rank, message in enumerate(errors) if message is not None]
    if not failed:
        return
    if comm.rank == failed[0]:
        print(f"error: {errors[failed[0]]}", file=sys.stderr, flush=True)
    comm.Barrier()  # no rank may abort the job before the message is out
    sys.exit(2)


def run_program(args: argparse.Namespace, prepare, run, summary) -> int:
    """The shape of every program: check the arguments on all ranks (`prepare(args,
    world_size)`, see agree_on_arguments), keep freed memory (tfcourse.allocator), cap BLAS
    threads, `run(args, setup, comm) -> result`, then on rank 0 print `summary(result)` (+ the
    held-out loss) and write --json atomically."""
    comm = MPI.COMM_WORLD
    setup = agree_on_arguments(comm, lambda: prepare(args, comm.size), args.json)
    keep_freed_memory()
    with limit_blas_threads(args.threads):
        result = run(args, setup, comm)
    if comm.rank == 0:
        print(summary(result) + held_out_text(result), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return 0


def limit_blas_threads(threads: int = 1):
    """Cap this rank's BLAS threads (ranks sharing cores must not oversubscribe them).

    Returns the threadpoolctl limit: use it as a context manager (`with`), or keep a
    reference for the life of the program."""
    return threadpool_limits(limits=threads, user_api="blas")


def print_in_rank_order(comm: MPI.Comm, line: str) -> list[str] | None:
    """Gather one line per rank to rank 0 and print them there, ordered by rank.

    MPICH interleaves ranks' direct prints mid-line; printing only on rank 0 keeps the
    output deterministic. Returns the lines on rank 0, None elsewhere.
    """
    lines = comm.gather(line, root=0)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    return lines


# --------------------------------------------------------------------------- timing

COMPUTE = ("forward", "backward", "weight")
WAITING = ("wait", "sync", "waiting")


class EventLog:
    """What one rank did in one step, as timestamped events {"kind", "microbatch", "start",
    "end", "bytes"} in seconds since `t0` - the one timing record of every program.

    Kinds: "forward"/"backward" are compute; "wait", "sync" and "waiting" are time blocked
    until other ranks arrive (a Probe before a receive, a Barrier - load imbalance and
    pipeline bubbles); every other kind names a communication call ("send", "recv",
    "allreduce:ring", "g forward", ...). `info` holds per-step facts a program reports.
    With `split_waiting`, `collective` first enters a Barrier and logs it as "waiting", so the
    collective's own event is the transfer alone (one extra latency per collective).
    """

    def __init__(self, t0: float | None = None, split_waiting: bool = False):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.split_waiting, self.events, self.info = split_waiting, [], {}

    def record(self, kind: str, started: float, microbatch=None, nbytes: int = 0) -> None:
        self.events.append({"kind": kind, "microbatch": microbatch, "start": started - self.t0,
                            "end": time.perf_counter() - self.t0, "bytes": int(nbytes)})

    @contextlib.contextmanager
    def span(self, kind: str, microbatch=None, nbytes: int = 0):
        """Time the body of a `with` block as one event."""
        started = time.perf_counter()
        yield
        self.record(kind, started, microbatch, nbytes)

    def collective(self, name: str, fn, buf: np.ndarray, comm, nbytes: int | None = None):
        """fn(buf, comm), timed (after a Barrier timed as waiting, with split_waiting) and
        recorded as moving `nbytes` (default: buf's; an all-gather records its result's)."""
        if self.split_waiting:
            with self.span("waiting"):
                comm.Barrier()
        with self.span(name, nbytes=buf.nbytes if nbytes is None else nbytes):
            return fn(buf, comm)

    def communication_events(self) -> list[dict]:
        return [e for e in self.events if e["kind"] not in COMPUTE + WAITING]

    def communication_and_waiting(self) -> tuple[float, float]:
        """(seconds moving data, seconds waiting for other ranks)."""
        return (duration(self.communication_events()),
                duration(e for e in self.events if e["kind"] in WAITING))


def duration(events) -> float:
    """Seconds the events took, added up."""
    return sum(e["end"] - e["start"] for e in events)


@dataclasses.dataclass
class StepTimes:
    """One rank's seconds per training step, split three ways (chapter 12's stacked bars):
    waiting (for other ranks), communication (inside MPI calls once the peers are there) and
    compute (everything else in the step: the model's functions, the optimiser, Python)."""

    rows: list = dataclasses.field(default_factory=list)

    def add(self, step_seconds: float, communication: float, waiting: float) -> None:
        self.rows.append((step_seconds, communication, waiting))

    def _split(self, values) -> dict[str, float]:
        step, communication, waiting = values.tolist()
        return {"compute": step - communication - waiting, "communication": communication,
                "waiting": waiting}

    def total(self) -> dict[str, float]:
        """Seconds of each part, summed over every step."""
        if not self.rows:
            raise ValueError("StepTimes.total: no steps were recorded")
        return self._split(np.sum(np.array(self.rows), axis=0))

    def mean(self, skip_first: bool = True) -> dict[str, float]:
        """Mean seconds per step of each part; the first step (warm-up: page faults, BLAS
        buffers) is left out when there are others."""
        rows = self.rows[1:] if skip_first and len(self.rows) > 1 else self.rows
        if not rows:
            raise ValueError("StepTimes.mean: no steps were recorded")
        return self._split(np.mean(np.array(rows), axis=0))


# --------------------------------------------------------------------------- the training loop


class State(NamedTuple):
    """What a rank holds between steps: its parameters (all, or its shard or stage of them)
    and its optimiser state."""

    params: dict
    opt_state: dict
    loss_scale: dict | None = None  # fp16 mixed precision: optim.loss_scale_init's state


class Start(NamedTuple):
    """Where a run starts: this rank's state, the first step to run, the losses so far."""

    state: State
    step: int = 0
    losses: tuple = ()
    placement: object = None  # plans.placement: where this rank's arrays sit in the global ones


@dataclasses.dataclass
class Run:
    """A finished run as one rank saw it."""

    state: State
    grads: dict  # the last step's gradients this rank kept (for memory accounting)
    losses: list
    step_seconds: list
    times: StepTimes
    logs: list  # every step's EventLog
    step_peak_bytes: int | None = None  # --trace-memory: the first step's peak, traced
    held_out: list = dataclasses.field(default_factory=list)  # [[step, loss]] on rank 0


def train(comm, setup: TrainingSetup, start: State | Start, step, split_waiting: bool = False,
          saving=None, trace_memory: bool = False) -> Run:
    """The training loop of every MPI training program. At each step all ranks draw the same
    global batch (seeded by (seed, step), as serial training does), start together (Barrier),
    and run `step(state, x, y, step_index, log) -> (state, loss, grads)`. `start`: a fresh
    State, or a Start (resumed); `saving`: a parallel.checkpointing.Checkpointing (when:
    train.checkpoint_now). trace_memory: measure the first step's peak with tracemalloc
    (NumPy reports its buffers to it): the bytes allocated at the highest point of the step
    above what was there before it - activations, gathered parameters, gradients. Tracing
    makes that step several times slower."""
    settings = setup.settings
    start = start if isinstance(start, Start) else Start(start)
    run = Run(start.state, {}, list(start.losses), [], StepTimes(), [])
    for index in range(start.step, settings.steps):
        x, y = lm_batch(setup.corpus.ids, settings.batch_size, settings.seq_len, settings.seed,
                        index)
        comm.Barrier()  # time each step from a common start
        log = EventLog(split_waiting=split_waiting)
        with traced(trace_memory and index == start.step) as peak:
            run.state, loss, run.grads = step(run.state, x, y, index, log)
        run.step_peak_bytes = peak.get("peak", run.step_peak_bytes)
        run.step_seconds.append(time.perf_counter() - log.t0)
        if not math.isfinite(loss):  # the same loss on every rank: all stop together
            stop_together(comm, f"loss: expected a finite value, got {loss} at step {index} "
                                f"(training diverged: lower --lr, now {settings.lr})")
        run.times.add(run.step_seconds[-1], *log.communication_and_waiting())
        run.losses.append(loss)
        run.logs.append(log)
        if saving and checkpoint_now(index + 1, settings.steps, saving.every):
            saving.save(comm, setup, run.state, index + 1, run.losses)
        if evaluate_now(index + 1, settings.steps, setup.eval_every):
            shapes = param_shapes(setup.config)  # the serial model's, gathered on rank 0:
            every = comm.gather(param_pieces(start.placement, run.state.params, shapes), root=0)
            if comm.rank == 0:  # its held-out loss, whatever the layout
                run.held_out.append([index + 1, held_out_loss(assemble_params(every, shapes),
                                     setup.held_out, setup.config, settings.seq_len)])
    return run


def bytes_sent(logs, p: int, costs: dict) -> float:
    """Bytes this rank sent, from its logged collectives: costs[kind](n, p) for each event of
    a kind in `costs` (costmodel's allreduce_bytes, allgather_bytes, ... of its n bytes)."""
    return sum(costs[e["kind"]](e["bytes"], p) for log in logs
               for e in log.communication_events() if e["kind"] in costs)


def result_record(run: Run, setup: TrainingSetup, comm, memory: dict, **extra) -> dict:
    """The JSON result every training program writes (complete on rank 0): losses, timings,
    per-rank training-state bytes and compute/communication/waiting seconds, with
    --eval-every the held-out losses ([[step, loss], ...], train.held_out_loss of the
    gathered parameters), plus `extra`."""
    settings = setup.settings
    comm_events = [e for log in run.logs for e in log.communication_events()]
    return {
        "losses": run.losses,
        "world_size": comm.size,
        "config": setup.config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "step_seconds": run.step_seconds,
        "tokens_per_s": settings.batch_size * settings.seq_len
        / float(np.median(run.step_seconds)),
        "compute_seconds": run.times.total()["compute"],
        "comm_seconds": duration(comm_events),
        "comm_bytes": sum(e["bytes"] for e in comm_events),
        "comm_calls": len(comm_events),
        "memory_bytes": comm.gather(memory, root=0),
        "step_peak_bytes": comm.gather(run.step_peak_bytes, root=0),
        "seconds_per_step_per_rank": comm.gather(run.times.mean(), root=0),
        **({"held_out_losses": run.held_out} if setup.eval_every else {}),
        **extra,
    }
