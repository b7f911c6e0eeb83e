"""Faults under real mpiexec: a rank killed by SIGKILL (from inside and from outside), a rank
that raises, a rank that never reaches a collective. Each must end the whole job within a
bounded time, with an error that names the rank that failed, and leave no process behind.
A killed rank cannot say anything and MPICH's hydra reports only a PID; run_mpi names it by
watching every rank's process (tfcourse.course.launch._RankWatch) with hydra's automatic cleanup
turned off, so that the dead rank is the only one gone.
The longest time to a clean error is printed by `test_summary` (run with -s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tfcourse.course import launch
from tfcourse.course.launch import MPIJobError, MPITimeoutError, run_mpi

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
    """{rank: pid} of a running job's ranks: the ranks below the mpiexec whose command
    contains `marker` (launch.rank_pids reads each rank's PMI_RANK)."""
    for line in processes_matching(marker):
        pid, _, command = line.split(None, 2)
        if "mpiexec" in command.split()[0]:
            return launch.rank_pids(int(pid))
    return {}


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
    # MPICH usually adds how it ended ("killed by signal 9 (SIGKILL"); not always
    assert message.splitlines()[1].startswith("rank 2 died while the others were running: ")
    assert "rank 2: killing itself with SIGKILL" in message  # its last words, on stderr
    assert_no_survivors("tfcourse.hello --kill-on-rank 2")


@pytest.mark.parametrize("n_ranks, victim", [(2, 1), (3, 0), (4, 3)])
def test_run_mpi_names_the_rank_killed_from_outside(n_ranks, victim):
    """SIGKILL from outside to one rank of a long data-parallel run started by run_mpi (as
    the out-of-memory killer would): the error names that rank, whether the others notice
    and exit or keep waiting for it in the all-reduce (then the launcher stops them)."""
    marker = f"--seed {4300 + n_ranks * 10 + victim}"
    outcome = {}

    def job():
        start = time.perf_counter()
        try:
            run_mpi("tfcourse.parallel.data_parallel",
                    ["--steps", "100000", "--batch-size", "6", *marker.split()],
                    n_ranks=n_ranks, timeout=60)
        except MPIJobError as error:
            outcome["error"] = error
        outcome["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 20
    while len(ranks := rank_pids(marker)) < n_ranks and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(ranks) == list(range(n_ranks)), processes_matching(marker)
    time.sleep(1.0)  # let it train: now every rank is in the middle of some step
    killed = time.perf_counter()
    os.kill(ranks[victim], signal.SIGKILL)
    thread.join(timeout=BOUND)
    TIMINGS[f"run_mpi: data_parallel rank {victim} of {n_ranks} killed from outside"] = (
        time.perf_counter() - killed)
    assert not thread.is_alive(), "run_mpi did not return"
    line = str(outcome["error"]).splitlines()[1]
    assert line.startswith(f"rank {victim} died while the others were running"), line
    assert f"rank {victim} called" not in line, str(outcome["error"])
    assert_no_survivors(marker)


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
