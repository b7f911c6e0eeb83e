"""tfcourse.course.show renders the real source of the package's functions."""

import inspect

import pytest

from tfcourse.course.show import source
from tfcourse.parallel.plans import batches


def test_the_shown_source_is_the_function_s_own():
    assert source(batches.chunk_bounds) == inspect.getsource(batches.chunk_bounds)
    assert "def chunk_bounds" in source(batches.chunk_bounds)


def test_an_mpi_program_s_function_is_read_without_importing_it():
    import subprocess
    import sys

    text = source("tfcourse.parallel.comm.ring_reduce_scatter")
    assert text.startswith("def ring_reduce_scatter(buf") and "comm.Sendrecv" in text
    code = ("import sys; from tfcourse.course.show import source; "
            "source('tfcourse.parallel.comm.ring_reduce_scatter'); "
            "print('tfcourse.parallel.comm' in sys.modules, 'mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split() == ["False", "False"]  # the kernel never starts MPI to show it
    method = source("tfcourse.parallel.learner_cases.CountingComm.__getattr__")
    assert method.startswith("def __getattr__(self, name):")


def test_a_part_of_a_function():
    part = source(batches.partition_params, start="load = ", end="return")
    assert part.lstrip().startswith("load = ") and part.rstrip().endswith(
        "return {name: owners[name] for name in sizes}")
    assert "def partition_params" not in part
    tail = source(batches.partition_params, start="for name in sorted")
    assert tail.rstrip().endswith("return {name: owners[name] for name in sizes}")


@pytest.mark.parametrize("call, match", [
    (lambda: source(42), "obj: expected a function"),
    (lambda: source(batches.chunk_bounds, start="no such line"), "start: 'no such line'"),
    (lambda: source(batches.chunk_bounds, start="def", end="no such line"), "end:"),
    (lambda: source("tfcourse.parallel.comm.no_such_function"), "defines no 'no_such"),
    (lambda: source("nothing.at.all"), "no module"),
])
def test_bad_requests_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
