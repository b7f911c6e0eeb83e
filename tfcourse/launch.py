"""Run `mpiexec -n N python -m <module>` from a notebook or a test, safely.

Notebook kernels never import MPI themselves: they start a real MPI job as a subprocess,
wait for it with a timeout, and read back the JSON result that rank 0 wrote.

    run = run_mpi("tfcourse.hello", n_ranks=4)
    print(run.stdout)        # what rank 0 printed
    run.result               # the parsed JSON the module wrote with --json

Every module is started as `python -m mpi4py -m <module>`: mpi4py's runner calls
MPI_Abort when a rank dies from an uncaught exception, so one failing rank ends the whole
job instead of leaving the others waiting forever in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = (
    "Install an MPI runtime into this Python environment with "
    "`python -m pip install mpi4py mpich` (or run `make test` / `make lab`, which set up "
    ".venv), or use conda: `conda install -c conda-forge mpi4py mpich`. "
    "To use a cluster's own MPI instead, see README.md, section 'Using your own MPI'."
)
STDERR_TAIL_CHARS = 6000
STDOUT_TAIL_CHARS = 2000


class MPIError(RuntimeError):
    """An MPI job could not be started, failed, or timed out."""


class MPINotFoundError(MPIError):
    """No `mpiexec` next to this Python or on PATH."""


class MPIJobError(MPIError):
    """The job exited with an error; the message contains the ranks' stderr."""

    def __init__(self, message: str, returncode: int | None, stdout: str, stderr: str):
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class MPITimeoutError(MPIJobError):
    """The job did not finish in time (typically a deadlock); it was killed."""


@dataclasses.dataclass(frozen=True)
class MPIRun:
    """What a finished job left behind."""

    command: list[str]
    stdout: str
    stderr: str
    seconds: float
    result: dict | None


def find_mpiexec(python: str = sys.executable) -> str:
    """Path of `mpiexec`: the one installed beside `python` first (a venv's own MPI), then PATH.

    Mixing runtimes fails (an MPICH-built mpi4py under Open MPI's mpiexec aborts), which is
    why the interpreter's own `bin/` wins over whatever PATH says.
    """
    beside_python = Path(python).parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("mpiexec")
    if on_path is None:
        raise MPINotFoundError(f"mpiexec was not found beside {python} nor on PATH. {INSTALL_HINT}")
    return on_path


@lru_cache(maxsize=8)
def mpi_flavour(mpiexec: str) -> str:
    """'mpich', 'openmpi' or 'unknown', from `mpiexec --version`."""
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "Open MPI" in out or "OpenRTE" in out or "prterun" in out:
        return "openmpi"
    if "HYDRA" in out or "MPICH" in out:
        return "mpich"
    return "unknown"


def launcher_flags(flavour: str, is_root: bool) -> list[str]:
    """Extra mpiexec flags a runtime needs to run more ranks than cores (and as root)."""
    if flavour != "openmpi":
        return []  # MPICH's hydra oversubscribes and runs as root without flags
    return ["--oversubscribe"] + (["--allow-run-as-root"] if is_root else [])


def hostfile_lines(hosts: dict[str, int], flavour: str) -> list[str]:
    """A hostfile's lines: how many ranks (slots) each machine takes, in the syntax of the
    MPI runtime: MPICH's hydra reads "host:n", Open MPI "host slots=n"."""
    if not hosts or any(not isinstance(n, int) or n < 1 for n in hosts.values()):
        raise ValueError(f"hosts: expected {{hostname: positive number of slots}}, got {hosts!r}")
    if flavour == "openmpi":
        return [f"{host} slots={n}" for host, n in hosts.items()]
    return [f"{host}:{n}" for host, n in hosts.items()]


def hostfile_flags(flavour: str, hostfile: str | None) -> list[str]:
    """mpiexec's flag naming a hostfile: `-f FILE` (MPICH), `--hostfile FILE` (Open MPI)."""
    if hostfile is None:
        return []
    if not Path(hostfile).is_file():
        raise ValueError(f"hostfile: no file at {hostfile!r}")
    return ["--hostfile", hostfile] if flavour == "openmpi" else ["-f", hostfile]


def build_command(
    module: str,
    args: list[str] | tuple[str, ...] = (),
    n_ranks: int = 4,
    python: str = sys.executable,
    hostfile: str | None = None,
) -> list[str]:
    """The argv of `mpiexec -n N [-f hostfile] python -m mpi4py -m module args...`."""
    if not isinstance(n_ranks, int) or isinstance(n_ranks, bool) or n_ranks < 1:
        raise ValueError(f"n_ranks: expected a positive integer, got {n_ranks!r}")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(
            f"module: expected a dotted module name like 'tfcourse.hello', got {module!r}"
        )
    mpiexec = find_mpiexec(python)
    flavour = mpi_flavour(mpiexec)
    flags = launcher_flags(flavour, is_root=os.geteuid() == 0) + hostfile_flags(flavour, hostfile)
    return [mpiexec, "-n", str(n_ranks), *flags, python, "-m", "mpi4py", "-m", module, *args]


def rank_environment(threads_per_rank: int = 1, python: str = sys.executable) -> dict[str, str]:
    """Environment for the ranks: BLAS threads capped so ranks do not fight over cores."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads_per_rank)
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- why it failed

ABORT_PATTERNS = (
    r"Abort\(\d+\) on node \d+ \(rank (\d+) in comm 0\)",  # MPICH
    r"MPI_ABORT was invoked on rank (\d+)",  # Open MPI
)


def failed_ranks_note(stdout: str, stderr: str) -> str:
    """One line saying which rank brought a failed job down and how, or '' if unknown.

    Bad arguments: the programs print "error: ..." and exit (see agree_on_arguments in
    tfcourse.parallel.comm); that line is repeated here. A rank that raised calls
    MPI_Abort, and the MPI library names it in stderr. A rank killed by a signal (SIGKILL
    from outside, or the kernel's out-of-memory killer) cannot say anything: MPICH's hydra
    then reports "BAD TERMINATION ... EXIT CODE: 9" on stdout with a PID that may be any
    rank it stopped while cleaning up; Open MPI names the rank.
    """
    # the programs' own message ("error: ..."), or argparse's ("prog: error: argument ...")
    rejected = re.search(r"(?:^|: )error: (.*)$", stderr, re.MULTILINE)
    if rejected:
        return f"the program stopped on bad input: {rejected.group(1)}"
    aborted = sorted({int(m) for pattern in ABORT_PATTERNS for m in re.findall(pattern, stderr)})
    if aborted:
        return f"{_ranks(aborted)} called MPI_Abort (an uncaught error: see stderr below)"
    openmpi = re.search(r"process rank (\d+) with PID (\d+) .*?exited on signal (\d+)", stdout
                        + stderr)
    if openmpi:
        rank, pid, sig = (int(g) for g in openmpi.groups())
        return f"rank {rank} (PID {pid}) was {_signal_description(sig)}"
    hydra = re.search(r"BAD TERMINATION.*?EXIT CODE: (\d+)", stdout, re.DOTALL)
    if hydra:
        return (f"a rank was {_signal_description(int(hydra.group(1)))}; MPICH names it only "
                f"by a PID (in its report below), which may be a rank it stopped afterwards")
    return ""


def _signal_description(code: int) -> str:
    """MPICH reports a rank killed by signal N as exit code N."""
    try:
        name = signal.Signals(code).name
    except ValueError:
        return f"ended with exit code {code}"
    hint = " - killed from outside, or by the kernel when out of memory" \
        if code == signal.SIGKILL else ""
    return f"killed by signal {code} ({name}{hint})"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (mpiexec's proxies and ranks), from `ps`."""
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = (int(field) for field in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_job(process: subprocess.Popen) -> None:
    """Terminate mpiexec and every rank it started.

    SIGTERM to mpiexec's process group first (MPICH's hydra and Open MPI then stop their
    ranks); whatever still runs 2 s later is killed - the group, and the processes that were
    below mpiexec, because hydra puts every rank in a session of its own, out of reach of
    the group's signal.
    """
    below = _descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone, as it should be
            pass
    try:  # ranks may outlive mpiexec: sweep the whole group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(text: str, chars: int = STDERR_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _failure_message(returncode: int, command: list[str], stdout: str, stderr: str) -> str:
    """MPIJobError's text: exit code, which rank failed if known, stderr, hydra's report."""
    culprits = failed_ranks_note(stdout, stderr)
    message = (f"MPI job failed with exit code {returncode}: {' '.join(command)}\n"
               + (f"{culprits}\n" if culprits else "")
               + f"--- ranks' stderr ---\n{_tail(stderr)}")
    if "BAD TERMINATION" in stdout:  # MPICH's hydra writes its report to stdout
        message += f"\n--- stdout (tail) ---\n{_tail(stdout, STDOUT_TAIL_CHARS)}"
    return message


def run_mpi(
    module: str,
    args: list[str] | tuple[str, ...] = (),
    n_ranks: int = 4,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    json_result: bool = True,
    python: str = sys.executable,
    hostfile: str | None = None,
) -> MPIRun:
    """Run `mpiexec -n n_ranks python -m mpi4py -m module args... [--json FILE]`.

    `hostfile` lists the machines to start ranks on (see hostfile_lines); without it every
    rank runs on this machine. With `json_result`, `--json FILE` is appended and the parsed
    FILE is returned as `MPIRun.result`. Raises MPITimeoutError after `timeout` seconds (the
    job is killed, no rank is left behind) and MPIJobError, containing the ranks' stderr, if
    the job fails.
    """
    if timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    with tempfile.TemporaryDirectory(prefix="tfcourse-mpi-") as tmp:
        json_path = Path(tmp) / "result.json"
        full_args = [*args, "--json", str(json_path)] if json_result else list(args)
        command = build_command(module, full_args, n_ranks, python, hostfile)
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=rank_environment(threads_per_rank, python),
            start_new_session=True,  # own process group: a timeout can kill every rank
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_job(process)
            stdout, stderr = process.communicate()
            raise MPITimeoutError(
                f"MPI job timed out after {timeout:g} s and was killed: {' '.join(command)}\n"
                "A rank probably waits in a collective or a receive that another rank never "
                f"reaches (a deadlock).\n--- ranks' stderr ---\n{_tail(stderr)}",
                None,
                stdout,
                stderr,
            ) from None
        except BaseException:  # KeyboardInterrupt in a notebook: never leave ranks running
            _kill_job(process)
            raise
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise MPIJobError(
                _failure_message(process.returncode, command, stdout, stderr),
                process.returncode,
                stdout,
                stderr,
            )
        result = None
        if json_result:
            if not json_path.is_file():
                raise MPIJobError(
                    f"{module} exited cleanly but wrote no JSON result to --json {json_path}",
                    process.returncode,
                    stdout,
                    stderr,
                )
            result = json.loads(json_path.read_text())
    return MPIRun(command=command, stdout=stdout, stderr=stderr, seconds=seconds, result=result)
