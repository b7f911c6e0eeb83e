"""The MPI launcher and hello world, under real mpiexec with 1-4 ranks."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tfcourse.course import launch
from tfcourse.course.launch import MPIJobError, MPINotFoundError, MPITimeoutError, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4])
def test_hello_prints_one_ordered_line_per_rank(n_ranks):
    run = run_mpi("tfcourse.hello", n_ranks=n_ranks, timeout=60)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == n_ranks
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank} of {n_ranks} on host ")
        assert "MPICH" in line or "Open MPI" in line
    assert run.result["world_size"] == n_ranks
    assert [r["rank"] for r in run.result["ranks"]] == list(range(n_ranks))
    assert {r["size"] for r in run.result["ranks"]} == {n_ranks}


def test_a_rank_that_raises_fails_the_job_fast_with_its_error():
    start = time.perf_counter()
    with pytest.raises(MPIJobError) as info:
        run_mpi("tfcourse.hello", ["--raise-on-rank", "2"], n_ranks=4, timeout=60)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "rank 2 failed on purpose" in message  # the rank's own traceback text
    assert "RuntimeError" in message
    assert info.value.returncode != 0
    assert elapsed < 15, f"an uncaught exception should abort every rank, took {elapsed:.1f} s"


def _processes_running(pattern: str) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if pattern in line and "ps -eww" not in line]


def test_a_deadlock_becomes_a_timeout_error_and_no_rank_survives():
    marker = "--hang-on-rank"
    start = time.perf_counter()
    with pytest.raises(MPITimeoutError, match="timed out after 3 s"):
        run_mpi("tfcourse.hello", [marker, "1"], n_ranks=3, timeout=3)
    assert time.perf_counter() - start < 15
    time.sleep(0.5)
    survivors = [p for p in _processes_running("tfcourse.hello") if marker in p]
    assert survivors == [], f"orphaned ranks: {survivors}"


def test_without_json_result_only_stdout_comes_back():
    run = run_mpi("tfcourse.hello", n_ranks=1, json_result=False)
    assert run.result is None and "rank 0 of 1" in run.stdout


def test_missing_mpiexec_says_how_to_install(tmp_path, monkeypatch):
    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MPINotFoundError, match="pip install mpi4py mpich"):
        launch.find_mpiexec(str(fake_python))


def test_mpiexec_beside_the_interpreter_wins_over_path():
    found = launch.find_mpiexec(sys.executable)
    assert os.path.dirname(found) == os.path.dirname(sys.executable)


@pytest.mark.parametrize(
    "flavour, root, expected",
    [
        ("mpich", True, []),
        ("openmpi", False, ["--oversubscribe"]),
        ("openmpi", True, ["--oversubscribe", "--allow-run-as-root"]),
    ],
)
def test_launcher_flags_per_runtime(flavour, root, expected):
    assert launch.launcher_flags(flavour, root) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"module": "tfcourse.hello", "n_ranks": 0}, "n_ranks"),
        ({"module": "tfcourse.hello", "n_ranks": 2.0}, "n_ranks"),
        ({"module": "not a module; rm -rf", "n_ranks": 2}, "module"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch.build_command(**kwargs)


def test_bad_timeout_is_named():
    with pytest.raises(ValueError, match="timeout"):
        run_mpi("tfcourse.hello", n_ranks=1, timeout=0)


def test_ranks_get_one_blas_thread_by_default():
    env = launch.rank_environment()
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def test_make_demo_style_command_runs_by_hand():
    """The README's by-hand command: mpiexec -n 4 python -m tfcourse.hello."""
    mpiexec = launch.find_mpiexec()
    out = subprocess.run(
        [mpiexec, "-n", "4", sys.executable, "-m", "tfcourse.hello"],
        capture_output=True, text=True, timeout=60, env=launch.rank_environment(),
    )
    assert out.returncode == 0, out.stderr
    assert [line.split(" on ")[0] for line in out.stdout.splitlines()] == [
        f"rank {r} of 4" for r in range(4)
    ]


def test_a_hostfile_places_the_ranks(tmp_path):
    """The multi-machine command line, shown on one machine: a hostfile naming this host
    with 4 slots, in the runtime's own syntax, and `mpiexec -f` (or --hostfile) using it."""
    flavour = launch.mpi_flavour(launch.find_mpiexec())
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n".join(launch.hostfile_lines({"localhost": 4}, flavour)) + "\n")
    command = launch.build_command("tfcourse.hello", [], 4, hostfile=str(hostfile))
    assert str(hostfile) in command
    run = run_mpi("tfcourse.hello", n_ranks=4, json_result=False, timeout=60,
                  hostfile=str(hostfile))
    assert [line.split(" on host")[0] for line in run.stdout.splitlines()] == [
        f"rank {r} of 4" for r in range(4)]


def test_hostfile_syntax_per_runtime_and_bad_input(tmp_path):
    assert launch.hostfile_lines({"node1": 8, "node2": 8}, "mpich") == ["node1:8", "node2:8"]
    assert launch.hostfile_lines({"node1": 8}, "openmpi") == ["node1 slots=8"]
    assert launch.hostfile_flags("mpich", None) == []
    with pytest.raises(ValueError, match=r"hosts: expected \{hostname: positive number"):
        launch.hostfile_lines({"node1": 0}, "mpich")
    with pytest.raises(ValueError, match=r"hostfile: no file at '.*nowhere'"):
        launch.hostfile_flags("mpich", str(tmp_path / "nowhere"))


def test_failure_note_names_the_rank_that_died_first():
    hydra_end = "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)\n"
    note = launch.failed_ranks_note(hydra_end, "", dead=[2])
    assert note.startswith("rank 2 died while the others were running: killed by signal 9")
    stopped = launch.failed_ranks_note("", "", dead=[1], stopped=True)
    assert "rank 1 died" in stopped and "the launcher stopped the job" in stopped
    together = launch.failed_ranks_note("", "", together=[0, 2])
    assert together.startswith("one of ranks 0, 2 died first")
    silent = launch.failed_ranks_note("", "", dead=[3])
    assert silent.startswith("rank 3 died while the others were running: it ended without "
                             "an error message")
    # a rank that raised calls MPI_Abort; ranks hydra then stopped may exit before it
    abort = "Abort(1) on node 2 (rank 2 in comm 0): application called MPI_Abort\n"
    assert launch.failed_ranks_note("", abort, dead=[0, 1]).startswith("rank 2 called MPI_Abort")
    # ...but an abort after a failed MPI call is the reaction to a rank that died first
    reaction = "mpi4py.MPI.Exception: Other MPI error\n" + abort
    assert launch.failed_ranks_note("", reaction, dead=[0]).startswith(
        "rank 0 died while the others were running; rank 2 then called MPI_Abort")


# ------------------------------------------- bad arguments stop run_mpi before mpiexec starts


@pytest.fixture
def nothing_may_start(monkeypatch, tmp_path):
    """run_mpi must fail before it starts a process or makes its temporary folder."""
    def no_popen(*args, **kwargs):
        raise AssertionError(f"mpiexec was started: {args[0] if args else kwargs}")
    monkeypatch.setattr(launch.subprocess, "Popen", no_popen)
    monkeypatch.setattr(launch.tempfile, "tempdir", str(tmp_path))
    yield
    assert list(tmp_path.iterdir()) == []


SECONDS = "timeout: expected a positive number of seconds, got "
THREADS = "threads_per_rank: expected a positive integer, got "
LIST = r"args: expected a list of strings such as \['--steps', '10'\], got "


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"timeout": float("nan")}, SECONDS + "nan", id="timeout-nan"),
    pytest.param({"timeout": float("inf")}, SECONDS + "inf", id="timeout-inf"),
    pytest.param({"timeout": -1}, SECONDS + "-1", id="timeout-negative"),
    pytest.param({"timeout": "10"}, SECONDS + "the str '10'", id="timeout-str"),
    pytest.param({"timeout": True}, SECONDS + "True", id="timeout-bool"),
    pytest.param({"args": "--steps 10"}, LIST + "str '--steps 10'", id="args-one-string"),
    pytest.param({"args": ["--steps", 10]},
                 LIST + r"the int 10 in \['--steps', 10\] \(write str\(10\)\)",
                 id="args-int-item"),
    pytest.param({"threads_per_rank": 0}, THREADS + "0", id="threads-0"),
    pytest.param({"threads_per_rank": -3}, THREADS + "-3", id="threads-negative"),
    pytest.param({"threads_per_rank": 1.5}, THREADS + "1.5", id="threads-float"),
    pytest.param({"n_ranks": 2.0}, "n_ranks: expected a positive integer, got 2.0",
                 id="n_ranks-float"),
    pytest.param({"module": None}, "module: expected a dotted module name", id="module-none"),
])
def test_run_mpi_refuses_bad_arguments_before_starting(kwargs, match, nothing_may_start):
    call = {"module": "tfcourse.hello", "n_ranks": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_mpi(**call)


def test_study_refuses_a_nan_timeout_before_any_job(nothing_may_start, capsys):
    """`python -m tfcourse.parallel.study --timeout nan` inherited a timeout that never fires."""
    from tfcourse.parallel import study

    assert study.main(["--timeout", "nan", "--max-ranks", "1"]) == 2
    assert "--timeout: expected a positive finite number, got nan" in capsys.readouterr().err


def test_paths_in_args_become_strings():
    assert launch.build_command("tfcourse.hello", ["--json", launch.Path("/x/r.json")],
                                n_ranks=1)[-2:] == ["--json", "/x/r.json"]


# ------------------------------------------- a module that does not exist (issue 17)
# run_mpi("tfcourse.no_such_module") used to start mpiexec, and the error blamed a signal
# ("killed by a signal ... a busy machine?") while stderr held the ranks' ImportError.


@pytest.fixture
def mpiexec_may_not_start(monkeypatch, tmp_path):
    """Like nothing_may_start, but other processes (a Python asked where a module is, or
    `mpiexec --version`) may start: only a job may not."""
    real_popen = launch.subprocess.Popen

    def popen(command, *args, **kwargs):
        if Path(str(command[0])).name == "mpiexec" and "-n" in command:
            raise AssertionError(f"mpiexec was started: {command}")
        return real_popen(command, *args, **kwargs)
    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch.tempfile, "tempdir", str(tmp_path))
    yield
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ["tfcourse.no_such_module", "no_such_package.program"])
def test_run_mpi_refuses_a_module_that_does_not_exist(module, mpiexec_may_not_start):
    with pytest.raises(ValueError, match=rf"^module: expected a module that "
                                         rf"{re.escape(sys.executable)} can import, got "
                                         rf"'{re.escape(module)}'"):
        run_mpi(module, n_ranks=2, timeout=60)


def test_run_mpi_finds_a_module_that_only_the_ranks_path_holds(tmp_path, monkeypatch):
    """A module on the ranks' PYTHONPATH (set after this process started) is not refused."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "only_on_pythonpath.py").write_text(
        "import json, sys\n"
        "json.dump({'ok': True}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    assert run_mpi("only_on_pythonpath", n_ranks=1, timeout=60).result == {"ok": True}


IMPORT_FAILURE = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/mpi4py/run.py", line 48, in run_command_line
    run_module(sys.argv[0], run_name="__main__", alter_sys=True)
  File "<frozen runpy>", line 142, in _get_module_details
ImportError: No module named tfcourse.no_such_module
"""


def test_failure_note_prefers_the_ranks_traceback_over_a_signal_guess():
    raised = "raised ImportError: No module named tfcourse.no_such_module"
    stderr = IMPORT_FAILURE * 2  # both ranks
    hydra = "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n   EXIT CODE: 1\n"
    dead = launch.failed_ranks_note(hydra, stderr, dead=[0])
    assert dead == f"rank 0 died while the others were running: it {raised} (see stderr below)"
    together = launch.failed_ranks_note(hydra, stderr, together=[0, 1])
    assert together == f"one of ranks 0, 1 {raised} (see stderr below)"
    assert launch.failed_ranks_note(hydra, stderr) == f"a rank {raised} (see stderr below)"
    stopped = launch.failed_ranks_note("", stderr, dead=[1], stopped=True)
    assert stopped.startswith(f"rank 1 died while the others were running: it {raised}")
    assert "the launcher stopped the job" in stopped
    # a rank that lost its partner raises mpi4py.MPI.Exception: a consequence, not the cause
    lost = IMPORT_FAILURE.replace("ImportError: No module named tfcourse.no_such_module",
                                  "mpi4py.MPI.Exception: Other MPI error")
    assert "killed by signal 9" in launch.failed_ranks_note(
        "EXIT STRING: Killed (signal 9)\n", lost, dead=[2])
