"""Check a learner's MPI function under real mpiexec, at 1 to 4 ranks (odd sizes included).

    python -m tfcourse.check ring_reduce_scatter my_ring.py

FILE defines a function with the library function's name and signature:
ring_reduce_scatter(buf, comm) and ring_all_gather(buf, comm) as in tfcourse.parallel.comm;
broadcast_from_owners(params, owners, comm), ZeRO's update: every rank gets each tensor's
owner's values, in a new dict (tfcourse.parallel.data_parallel's, without its log);
megatron_ops(comm) returning the SublayerOps (enter = f, exit = g) of tensor parallelism
(tfcourse.parallel.tensor_parallel's, without its log); schedule_1f1b(p, stage, m) returning
the list of ("F" | "B", micro-batch) that plans.pipeline.schedule("1f1b", ...) returns;
schedule_zb_h1(p, stage, m), the zero-bubble ZB-H1's list of ("F" | "B" | "W", micro-batch)
(B the input gradient, W the weight gradients) that plans.pipeline.schedule("zb-h1", ...)
returns - a list that differs is measured: micro-batches held at once, simulated bubble;
merge_partials(a, b) as in tfcourse.nn.attention; master(tasks, comm, t0), the master of
dynamic scheduling in tfcourse.parallel.task_parallel (its workers are the library's);
zero3_hooks(gather) returning ZeRO-3's (forward_hook, backward_hook), the order in which
tfcourse.parallel.zero3 drops, fills and prefetches each piece (using gather.order, gather.fill
and gather.drop only; what the rank holds and has posted is watched at every fill and hook);
ulysses_attention(comm) returning DeepSpeed-Ulysses' AttentionKernel(forward, backward) of
chapter 10 (tfcourse.parallel.context_parallel's, without its log): forward(q, k, v, mask,
keep_weights, precision) -> (out, cache) and backward(dout, cache) -> (dq, dk, dv) on this
rank's slice of the positions (B, H, T/p, d_head), equal to the serial attention over the
whole sequence on that slice.
Exit status 0 with one line when it equals the library at every rank count and the program
that uses it (data-parallel, ZeRO, tensor-parallel, pipeline or context-parallel training,
ring attention, the task graph) still equals its serial reference; 1 with what differs (ranks,
rank, case, expected and got) otherwise; 2 for bad arguments. From a notebook,
`check_under_mpi(name, function)` saves the function's source to a file and does the same.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import textwrap
from pathlib import Path

from tfcourse.course.launch import MPIJobError, MPITimeoutError, run_mpi

NAMES = ("ring_reduce_scatter", "ring_all_gather", "broadcast_from_owners", "megatron_ops",
         "schedule_1f1b", "schedule_zb_h1", "merge_partials", "master", "zero3_hooks",
         "ulysses_attention")
RANKS = (1, 2, 3, 4)
CONTEXT = {"ring_reduce_scatter": "data-parallel training with it equals serial training",
           "ring_all_gather": "data-parallel training with it equals serial training",
           "broadcast_from_owners": "ZeRO-1 training with it equals serial training",
           "merge_partials": "ring attention with it equals full attention",
           "schedule_1f1b": "pipeline training with it equals serial training",
           "schedule_zb_h1": "pipeline training with it (B and W apart) equals serial training",
           "megatron_ops": "tensor-parallel training with it equals serial training (at 1, 2 "
                           "and 4 ranks: the tiny model's 4 heads do not split over 3)",
           "master": "the chapter's task graph run by it equals a serial run",
           "zero3_hooks": "each rank holds one gathered piece while the next one's broadcasts "
                          "travel, and ZeRO-3 training with it equals serial training",
           "ulysses_attention": "context-parallel training with it equals serial training "
                                "(at 1, 2 and 4 ranks: the tiny model's 4 heads do not split "
                                "over 3)"}
HINTS = {"master": "Did the master send STOP to every worker once every task had its outcome, "
                   "and can it run the tasks itself when there is no worker (one rank)?",
         "megatron_ops": "Every rank must call the same collectives in the same order.",
         "schedule_zb_h1": "Every stage must run the same micro-batches' F and B as its "
                           "neighbours expect them: B(i) needs F(i) and the next stage's "
                           "B(i), W(i) its own B(i).",
         "zero3_hooks": "Each hook must fill its own piece (fill waits for the broadcasts it "
                        "or an earlier `then` posted), the same way on every rank.",
         "ulysses_attention": "Every rank must call Alltoall the same number of times, with "
                              "arrays of the same shape: block s of the heads goes to rank s, "
                              "and the slices come back in rank order."}
HEADER = ("import numpy as np\nfrom mpi4py import MPI\n\n"
          "from tfcourse.parallel.plans.batches import chunk_bounds\n")
IMPORTS = {  # what a function written in a notebook may use besides numpy and MPI
    "megatron_ops": "from tfcourse.nn.model import Operator, SublayerOps\n",
    "master": ("from tfcourse.parallel.plans.tasks import (\n    dependency_inputs, ready_tasks, "
               "run_serial, skipped)\nfrom tfcourse.parallel.task_parallel import RESULT, "
               "STOP, WORK, wait_for_message\n"),
    "ulysses_attention": ("from tfcourse.nn.attention import (\n    AttentionKernel, "
                          "local_attention_backward, local_attention_forward)\n"),
}


def header(name: str) -> str:
    """The imports a learner's function of this name is saved with."""
    return HEADER + IMPORTS.get(name, "") + "\n\n"


def run_check(name: str, path: str | Path, ranks=RANKS, timeout: float = 60.0) -> str:
    """Run the learner's `name` from `path` at each number of ranks; returns the success line,
    raises AssertionError with what differs (or ValueError for bad arguments)."""
    if name not in NAMES:
        raise ValueError(f"NAME: expected one of {list(NAMES)}, got {name!r}")
    if not Path(path).is_file():
        raise ValueError(f"FILE: no file at {str(path)!r}")
    for n in ranks:
        try:
            result = run_mpi("tfcourse.parallel.learner", [name, str(path)], n_ranks=n,
                             timeout=timeout).result
        except MPITimeoutError:
            raise AssertionError(
                f"{name} under mpiexec -n {n}: no answer within {timeout:.0f} s - a deadlock? "
                + HINTS.get(name, "Every rank must send and receive in every step (Sendrecv "
                                  "does both)")
            ) from None
        except MPIJobError as err:
            raise AssertionError(f"{name} under mpiexec -n {n} failed: {err}") from None
        if not result["ok"]:
            raise AssertionError(f"{name} under mpiexec -n {n}, {result['problem']}")
    return (f"✓ {name}: equals the library under mpiexec with {', '.join(map(str, ranks))} "
            f"ranks, and {CONTEXT[name]}")


def check_under_mpi(name: str, function, ranks=RANKS, timeout: float = 60.0) -> None:
    """For notebooks: save `function`'s source (with numpy, MPI, chunk_bounds and what
    IMPORTS lists for `name` imported) to a temporary file, under the name `name` too if it
    has another, and run_check it; prints the success line (AssertionError otherwise)."""
    if not inspect.isfunction(function):
        raise ValueError(f"function: expected a function, got {function!r}")
    alias = "" if function.__name__ == name else f"\n\n{name} = {function.__name__}\n"
    with tempfile.TemporaryDirectory(prefix="tfcourse-learner-") as folder:
        path = Path(folder) / f"{name}.py"
        path.write_text(header(name) + textwrap.dedent(inspect.getsource(function)) + alias)
        print(run_check(name, path, ranks, timeout))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help=f"one of {', '.join(NAMES)}")
    parser.add_argument("file", metavar="FILE")
    args = parser.parse_args(argv)
    try:
        print(run_check(args.name, args.file))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:
        print(f"✗ {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
