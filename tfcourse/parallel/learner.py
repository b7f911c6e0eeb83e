"""Run a learner's version of one of the course's MPI functions for real, under mpiexec, and
compare it with the library's (issue 18: the learner writes the algorithms).

    mpiexec -n 3 python -m mpi4py -m tfcourse.parallel.learner ring_reduce_scatter my_ring.py

`my_ring.py` defines a function with the library function's name and signature. Every rank
runs it on the same inputs as the library function and compares, buffer for buffer; it also
counts the messages each rank sends (a ring of p ranks needs p - 1 steps), then trains the
model with data parallelism using the learner's function in the library's place and compares
the losses with serial training. Rank 0 prints one line and writes --json: {"ok", "problem"}.
Start it with `python -m tfcourse.check NAME FILE` (all rank counts, one command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from tfcourse.files import write_json_atomic
from tfcourse.parallel import comm as collectives
from tfcourse.parallel.plans.batches import chunk_bounds
from tfcourse.parallel.program import agree_on_arguments, program_parser

LENGTHS = (1, 2, 3, 7, 1001)


class CountingComm:
    """A communicator that counts the point-to-point messages this rank sends (and their
    bytes) and passes everything to the real one."""

    SENDS = ("Send", "Isend", "Sendrecv", "Ssend", "send", "isend", "sendrecv", "ssend")

    def __init__(self, comm):
        self._comm, self.messages, self.bytes = comm, 0, 0

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in self.SENDS:
            return attribute

        def counted(buf, *args, **kwargs):
            self.messages += 1
            self.bytes += int(getattr(buf, "nbytes", 0))
            return attribute(buf, *args, **kwargs)
        return counted


def _data(comm, n: int, dtype) -> np.ndarray:
    rng = np.random.default_rng([comm.rank, n])
    return (rng.standard_normal(n) * 100).astype(dtype)


def _differs(got: np.ndarray, want: np.ndarray) -> str | None:
    """Where `got` first differs from `want`, or None."""
    close = (got == want) if got.dtype.kind in "iu" else np.isclose(got, want, rtol=1e-12,
                                                                     atol=1e-9)
    if close.all():
        return None
    i = int(np.argmin(close))
    return f"element {i}: expected {want[i].item()!r}, got {got[i].item()!r}"


def _messages(counter: CountingComm, p: int) -> str | None:
    if counter.messages != p - 1:
        return (f"sent {counter.messages} messages, expected p - 1 = {p - 1} (one per ring "
                f"step): how many steps does a ring of p ranks need?")
    return None


def check_ring_reduce_scatter(fn, comm):
    """Yields, case by case, this rank's problem (None if the case passed)."""
    p, r = comm.size, comm.rank
    for n in LENGTHS:
        for dtype in (np.int64, np.float64):
            data = _data(comm, n, dtype)
            want = data.copy()
            want_bounds = collectives.ring_reduce_scatter(want, comm)
            got, counter = data.copy(), CountingComm(comm)
            got_bounds = fn(got, counter)
            owned = chunk_bounds(n, p)[(r + 1) % p]
            where = f"n={n} {np.dtype(dtype).name}"
            lo, hi = owned
            if tuple(got_bounds) != tuple(want_bounds):
                yield f"{where}: returned bounds {tuple(got_bounds)}, expected {owned}"
            elif problem := _differs(got[lo:hi], want[lo:hi]):
                yield f"{where}: the owned chunk {(r + 1) % p} ({lo}:{hi}) is wrong at {problem}"
            elif problem := _messages(counter, p):
                yield f"{where}: {problem}"
            elif problem := _differs(got, want):
                yield (f"{where}: a chunk this rank does not own differs from the library's "
                       f"ring ({problem}): every step must add exactly one received chunk")
            else:
                yield None


def check_ring_all_gather(fn, comm):
    """Yields, case by case, this rank's problem (None if the case passed)."""
    p, r = comm.size, comm.rank
    for n in LENGTHS:
        for dtype in (np.int64, np.float64):
            full = np.arange(n, dtype=dtype) * 3 + 1  # what every rank must end with
            lo, hi = chunk_bounds(n, p)[(r + 1) % p]
            got = np.full(n, -7, dtype=dtype)
            got[lo:hi] = full[lo:hi]  # each rank starts owning chunk (rank + 1) % p
            counter = CountingComm(comm)
            fn(got, counter)
            problem = _differs(got, full) or _messages(counter, p)
            yield f"n={n} {np.dtype(dtype).name}: {problem}" if problem else None


def check_merge_partials(fn, comm):
    """The online-softmax merge of ring attention (chapter 8): partial results (m, l, acc) of
    random score blocks - maxima far apart both ways (exp underflows unless rescaled to the
    larger one), and a side with no keys yet (m = -inf) - against the library's merge."""
    from tfcourse.nn.attention import merge_partials, partial_softmax

    rng = np.random.default_rng(comm.rank)
    for gap in (0.0, 5.0, -800.0, 800.0, None):
        q, k1, k2, v1, v2 = (rng.standard_normal((2, 3, 4, 5)) for _ in range(5))
        a = partial_softmax(q @ np.swapaxes(k1, -1, -2), v1)
        b = partial_softmax(q @ np.swapaxes(k2, -1, -2) + (gap or 0.0), v2)
        if gap is None:  # nothing seen yet on one side
            a = (np.full_like(a[0], -np.inf), np.zeros_like(a[1]), np.zeros_like(a[2]))
        want, got = merge_partials(a, b), fn(a, b)
        case = "one side empty" if gap is None else f"maxima {gap:+g} apart"
        problem = None
        for part, w, g in zip(("m", "l", "acc"), want, got, strict=True):
            if np.shape(g) != np.shape(w) or not np.allclose(g, w, rtol=1e-12, atol=0):
                first = float(np.ravel(g)[0]), float(np.ravel(w)[0])
                problem = (f"{case}: {part} differs from the exact merge (first value "
                           f"{first[0]!r} instead of {first[1]!r}): rescale both sides to the "
                           f"larger maximum")
                break
        yield problem


def check_schedule_1f1b(fn, comm):
    """1F1B's operations per stage against the library's, for 1-5 stages and 1-8
    micro-batches."""
    from tfcourse.parallel.plans.pipeline import schedule

    for p in range(1, 6):
        problem = None
        for stage in range(p):
            for m in range(1, 9):
                got, want = [tuple(op) for op in fn(p, stage, m)], schedule("1f1b", p, stage, m)
                if got != want:
                    problem = (f"p={p}, stage {stage}, m={m}: {got} instead of {want}: how many "
                               f"forwards does stage s run before its first backward?")
                    break
            if problem:
                break
        yield problem


def check_broadcast_from_owners(fn, comm):
    """ZeRO's parameter update: each owner's updated tensors reach every rank. Every rank
    starts with different values; afterwards every tensor must hold its owner's, and the
    caller's dict must be left as it was."""
    from tfcourse.parallel.plans.batches import partition_params

    shapes = {"w": (3, 4), "b": (4,), "emb": (5, 2), "ln": (2,)}
    for world_sized in (False, True):
        owners = partition_params({n: int(np.prod(s)) for n, s in shapes.items()}, comm.size)
        if world_sized:  # more tensors than ranks, and one rank owning nothing
            owners = {n: (i * 3) % comm.size for i, n in enumerate(shapes)}
        mine = {n: np.full(s, 10.0 * comm.rank + i) for i, (n, s) in enumerate(shapes.items())}
        before = {n: a.copy() for n, a in mine.items()}
        got = fn(mine, owners, comm)
        problem = None
        for i, name in enumerate(shapes):
            want = 10.0 * owners[name] + i
            if name not in got or not np.array_equal(got[name], np.full(shapes[name], want)):
                value = got[name].flat[0] if name in got else "nothing"
                problem = (f"{name!r} (owner rank {owners[name]}): expected the owner's value "
                           f"{want}, got {value}: did the owner send it to every rank?")
                break
            if not np.array_equal(mine[name], before[name]):
                problem = f"{name!r}: the caller's dict was changed in place; return a new dict"
                break
        yield problem


CHECKS = {"ring_reduce_scatter": check_ring_reduce_scatter,
          "broadcast_from_owners": check_broadcast_from_owners,
          "ring_all_gather": check_ring_all_gather,
          "merge_partials": check_merge_partials,
          "schedule_1f1b": check_schedule_1f1b}


def load_function(name: str, path: str):
    """The function `name` that the learner's file defines (ValueError naming the file)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"FILE: no file at {path!r}")
    namespace = {"__name__": "learner"}
    try:
        exec(compile(source.read_text(), str(source), "exec"), namespace)
    except Exception as err:  # noqa: BLE001 - any error in the learner's file is reported
        raise ValueError(f"FILE: {path!r} does not run: {type(err).__name__}: {err}") from None
    fn = namespace.get(name)
    if not callable(fn):
        raise ValueError(f"FILE: {path!r} defines no function {name!r}")
    return fn


def training_equals_serial(module: str, flags: list[str], comm) -> str | None:
    """Train `module` (3 steps of the tiny model) and compare its losses with serial training."""
    import importlib

    from tfcourse import train

    program = importlib.import_module(module)
    args = program.parse_args(["--config", "tiny", "--steps", "3", "--batch-size", "6", *flags])
    setup = program.prepare(args, comm.size)
    losses = program.run(args, setup, comm)["losses"]
    if comm.rank != 0:
        return None
    serial = train.train_lm(setup.config, setup.corpus, setup.settings, progress="none")["losses"]
    if not np.allclose(losses, serial, rtol=1e-10, atol=0):
        return (f"training with it gives losses {np.round(losses, 6).tolist()}, serial "
                f"training {np.round(serial, 6).tolist()}")
    return None


def attention_equals_full(comm) -> str | None:
    """Ring attention (forward and backward, causal, uneven chunks) against full attention."""
    from tfcourse.parallel import sequence_parallel

    args = sequence_parallel.parse_args(["--seq-len", str(4 * comm.size + 3)])
    result = sequence_parallel.run(args, sequence_parallel.prepare(args, comm.size), comm)
    if comm.rank == 0 and max(result["max_abs_err_out"], result["max_abs_err_grad"]) > 1e-10:
        return (f"ring attention with it differs from full attention by "
                f"{result['max_abs_err_out']:.3g} (output), {result['max_abs_err_grad']:.3g} "
                f"(gradients)")
    return None


def in_its_program(name: str, fn, comm) -> str | None:
    """Put the learner's function where the library's is looked up, then run the program
    that uses it against its serial reference."""
    from tfcourse.parallel import data_parallel, pipeline_parallel, sequence_parallel

    if name == "schedule_1f1b":
        library = pipeline_parallel.schedule
        pipeline_parallel.schedule = lambda kind, p, stage, m: (
            fn(p, stage, m) if kind == "1f1b" else library(kind, p, stage, m))
    elif name == "broadcast_from_owners":  # the library's also takes the EventLog
        data_parallel.broadcast_from_owners = lambda params, owners, c, log: fn(params, owners,
                                                                                 c)
    elif name == "merge_partials":
        sequence_parallel.merge_partials = fn
        return attention_equals_full(comm)
    else:  # the ring collectives: ring_allreduce looks its steps up in comm at each call
        setattr(collectives, name, fn)
    flags = {"schedule_1f1b": ["--schedule", "1f1b", "--microbatches", "3", "--layers", "4"],
             "broadcast_from_owners": ["--zero", "1"]}.get(name, ["--allreduce", "ring"])
    module = "pipeline_parallel" if name == "schedule_1f1b" else "data_parallel"
    return training_equals_serial(f"tfcourse.parallel.{module}", flags, comm)


def first_failure(comm, cases) -> list[tuple[int, str]]:
    """Run the cases in step on every rank (all ranks agree after each, so none goes on to the
    next collective alone); [(rank, problem), ...] of the first case that failed anywhere."""
    while True:
        try:
            problem = next(cases)
        except StopIteration:
            problem, done = None, True
        except Exception as err:  # noqa: BLE001 - the learner's code failed on this rank
            problem, done = f"raised {type(err).__name__}: {err}", True
        else:
            done = False
        problems = comm.allgather(problem)
        failed = [(rank, p) for rank, p in enumerate(problems) if p]
        if failed or all(comm.allgather(done)):
            return failed


def main(argv=None) -> int:
    parser = program_parser("tfcourse.parallel.learner", __doc__, training=False)
    parser.add_argument("name", choices=sorted(CHECKS))
    parser.add_argument("file")
    args: argparse.Namespace = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    fn = agree_on_arguments(comm, lambda: load_function(args.name, args.file), args.json)
    failed = first_failure(comm, CHECKS[args.name](fn, comm))
    if not failed:
        problems = comm.allgather(in_its_program(args.name, fn, comm))
        failed = [(rank, p) for rank, p in enumerate(problems) if p]
    if comm.rank == 0:
        result = {"ok": not failed, "world_size": comm.size,
                  "problem": f"rank {failed[0][0]}: {failed[0][1]}" if failed else None}
        print(f"{args.name} on {comm.size} rank(s): " + ("equals the library, and its "
              "program runs right with it" if not failed else result["problem"]), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
