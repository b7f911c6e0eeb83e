"""Faults under real mpiexec: a rank killed by SIGKILL (from inside and from outside), a rank
that raises, a rank that never reaches a collective. Each must end the whole job within a
bounded time, with an error that says which rank failed when the MPI library can know it,
and leave no process behind.

MPICH's hydra reports a rank killed by a signal only as "BAD TERMINATION ... PID p ...
EXIT CODE: 9" (on stdout), naming the first rank in rank order that did not exit cleanly -
often one it killed itself while cleaning up - so for a SIGKILL the rank is named by the
program's own last words (hello's --kill-on-rank) or by the test that killed it.
The longest time to a clean error is printed by `test_summary` (run with -s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tfcourse import launch
from tfcourse.launch import MPIJobError, MPITimeoutError, run_mpi

pytestmark = pytest.mark.mpi

TESTS_DIR = Path(__file__).resolve().parent
BOUND = 15.0  # seconds from start to the clean error, for every fault
TIMINGS: dict[str, float] = {}


def processes_matching(marker: str) -> list[str]:
    """`ps` lines (pid, ppid, command) of the processes whose command contains `marker`
    (-ww: full commands; without it ps cuts lines at 80 columns when run under pytest)."""
    ps = subprocess.run(["ps", "-eww", "-o", "pid,ppid,args"], capture_output=True,
                        text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eww" not in line]


def assert_no_survivors(marker: str, grace: float = 3.0) -> None:
    """Nothing whose command contains `marker` may outlive its job (polled for `grace` s)."""
    deadline = time.monotonic() + grace
    while processes_matching(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_matching(marker) == [], "orphaned processes"


def rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of a running job's ranks, found with `ps` (mpiexec's own line excluded);
    the rank is read from the PMI_RANK that MPICH's mpiexec put in each rank's environment."""
    ranks = {}
    for line in processes_matching(marker):
        pid, _, command = line.split(None, 2)
        if "mpiexec" in command.split()[0]:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for variable in environ:
            if variable.startswith((b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")):
                ranks[int(variable.split(b"=")[1])] = int(pid)
    return ranks


def timed_failure(case: str, expected: type[Exception], *args, **kwargs) -> Exception:
    """Run run_mpi(*args, **kwargs), which must raise `expected`; record the seconds taken."""
    start = time.perf_counter()
    with pytest.raises(expected) as info:
        run_mpi(*args, **kwargs)
    TIMINGS[case] = elapsed = time.perf_counter() - start
    assert elapsed < BOUND, f"{case}: took {elapsed:.1f} s"
    return info.value


@pytest.fixture
def fault(monkeypatch):
    """Make tests/mpi_fault_injection.py importable by the ranks and choose its fault."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def choose(kind: str, rank: int, step: int) -> None:
        monkeypatch.setenv("FAULT_KIND", kind)
        monkeypatch.setenv("FAULT_RANK", str(rank))
        monkeypatch.setenv("FAULT_STEP", str(step))
    return choose


# --------------------------------------------------------------------------- (a) SIGKILL


def test_rank_killed_by_sigkill_ends_the_job_and_is_named():
    error = timed_failure("hello --kill-on-rank 2", MPIJobError, "tfcourse.hello",
                          ["--kill-on-rank", "2"], n_ranks=4, timeout=30)
    message = str(error)
    assert error.returncode != 0 and not isinstance(error, MPITimeoutError)
    assert "rank 2: killing itself with SIGKILL" in message  # its last words, on stderr
    assert "killed by signal 9 (SIGKILL" in message  # the launcher's reading of MPICH's report
    assert "BAD TERMINATION" in message  # MPICH's report (printed on stdout) is included
    assert_no_survivors("tfcourse.hello --kill-on-rank 2")


def test_data_parallel_rank_killed_from_outside_ends_the_job():
    """SIGKILL to one rank of a long data-parallel run (as the out-of-memory killer would)."""
    marker = "--seed 4242"  # unique to this job, to find its processes with ps
    command = launch.build_command("tfcourse.parallel.data_parallel",
                                   ["--steps", "100000", "--batch-size", "6", *marker.split()],
                                   n_ranks=3)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=launch.rank_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(ranks := rank_pids(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(ranks) == [0, 1, 2], (job.poll(), processes_matching(marker))
        time.sleep(1.0)  # let it train: now every rank is in the middle of some step
        assert job.poll() is None, "the job should still be training"
        start = time.perf_counter()
        os.kill(ranks[1], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=BOUND)
        TIMINGS["data_parallel rank 1 killed from outside"] = time.perf_counter() - start
    finally:
        if job.poll() is None:  # only if the assertions above failed
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert f"PID {ranks[1]}" in stdout or "EXIT CODE: 9" in stdout, stdout + stderr
    note = launch.failed_ranks_note(stdout, stderr)
    assert "killed by signal 9 (SIGKILL" in note, note
    assert_no_survivors(marker)


# --------------------------------------------------------------------------- (b) a rank raises


def test_rank_that_raises_is_named_and_ends_the_job():
    error = timed_failure("hello --raise-on-rank 2", MPIJobError, "tfcourse.hello",
                          ["--raise-on-rank", "2"], n_ranks=4, timeout=30)
    message = str(error)
    assert "rank 2 called MPI_Abort" in message.splitlines()[1]  # the line after the command
    assert "RuntimeError: rank 2 failed on purpose" in message
    assert_no_survivors("tfcourse.hello --raise-on-rank 2")


def test_data_parallel_rank_that_raises_mid_training_ends_the_job(fault):
    fault("raise", rank=1, step=2)
    error = timed_failure("data_parallel rank 1 raises at step 2", MPIJobError,
                          "mpi_fault_injection", ["--steps", "50", "--seed", "4243"],
                          n_ranks=3, timeout=30)
    message = str(error)
    assert "rank 1 called MPI_Abort" in message.splitlines()[1]
    assert "FloatingPointError: rank 1: injected failure at step 2" in message
    assert_no_survivors("mpi_fault_injection --steps 50 --seed 4243")


# ------------------------------------------------------------------- (c) a rank never arrives


def test_rank_that_never_reaches_the_gather_times_out_cleanly():
    error = timed_failure("hello --hang-on-rank 3", MPITimeoutError, "tfcourse.hello",
                          ["--hang-on-rank", "3"], n_ranks=4, timeout=2)
    assert "timed out after 2 s" in str(error) and "deadlock" in str(error)
    assert_no_survivors("tfcourse.hello --hang-on-rank 3")


def test_data_parallel_rank_that_never_reaches_the_allreduce_times_out_cleanly(fault):
    """The other ranks spin inside MPI's all-reduce: the timeout must still kill them all."""
    fault("hang", rank=2, step=1)
    error = timed_failure("data_parallel rank 2 hangs at step 1", MPITimeoutError,
                          "mpi_fault_injection", ["--steps", "50", "--seed", "4244"],
                          n_ranks=3, timeout=3)
    assert "timed out after 3 s" in str(error)
    assert_no_survivors("mpi_fault_injection --steps 50 --seed 4244")


# --------------------------------------------------------------------------- summary


def test_summary():
    """Printed with `pytest -s`: the closing note's numbers."""
    if not TIMINGS:
        pytest.skip("run the whole file to get the summary")
    slowest = max(TIMINGS, key=TIMINGS.get)
    print(f"\n{len(TIMINGS)} faults injected; longest time to a clean error: "
          f"{TIMINGS[slowest]:.2f} s ({slowest}; a hang ends at the chosen timeout)",
          file=sys.stderr)
    for case, seconds in sorted(TIMINGS.items(), key=lambda item: item[1]):
        print(f"  {seconds:5.2f} s  {case}", file=sys.stderr)
    assert TIMINGS[slowest] < BOUND
