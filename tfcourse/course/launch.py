"""Run `mpiexec -n N python -m <module>` from a notebook or a test, safely.

Notebook kernels never import MPI themselves: they start a real MPI job as a subprocess,
wait for it with a timeout, and read back the JSON result that rank 0 wrote.

    run = run_mpi("tfcourse.hello", n_ranks=4)
    print(run.stdout)        # what rank 0 printed
    run.result               # the parsed JSON the module wrote with --json

Every module is started as `python -m mpi4py -m <module>`: mpi4py's runner calls
MPI_Abort when a rank dies from an uncaught exception, so one failing rank ends the whole
job instead of leaving the others waiting forever in a collective.

Nothing is lost and nothing is left running: every process of a job carries the job's tag in
its environment (TFCOURSE_MPI_JOB), so the launcher finds and stops the ranks even where they
are no longer below mpiexec; mpiexec dies with the launcher, whatever ends it (see run_mpi).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

from tfcourse.nn.validate import require_positive_int

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
    supervised: bool = False,
) -> list[str]:
    """The argv of `mpiexec -n N [-f hostfile] python -m mpi4py -m module args...`.

    `supervised` (run_mpi): MPICH's hydra is told not to kill the other ranks when one dies
    (-disable-auto-cleanup), so that the launcher can still see which rank is gone; the
    launcher then ends the job itself."""
    n_ranks = require_positive_int("n_ranks", n_ranks)
    args = _checked_args(args)
    module = _checked_module(module)
    mpiexec = find_mpiexec(python)
    flavour = mpi_flavour(mpiexec)
    flags = launcher_flags(flavour, is_root=os.geteuid() == 0) + hostfile_flags(flavour, hostfile)
    if supervised and flavour == "mpich":
        flags.append("-disable-auto-cleanup")
    return [mpiexec, "-n", str(n_ranks), *flags, python, "-m", "mpi4py", "-m", module, *args]


def _checked_module(module) -> str:
    """`module` if it is a dotted module name (no spaces, no shell syntax)."""
    if not isinstance(module, str) or not module or not all(
            part.isidentifier() for part in module.split(".")):
        raise ValueError(
            f"module: expected a dotted module name like 'tfcourse.hello', got {module!r}"
        )
    return module


# exit status 3: no such module (a missing parent package included)
FIND_MODULE = """import importlib.util, sys
try:
    found = importlib.util.find_spec(sys.argv[1]) is not None
except ImportError:
    found = False
sys.exit(0 if found else 3)
"""


def _check_importable(module: str, python: str, env: dict[str, str]) -> None:
    """ValueError naming `module` if the ranks' Python cannot import it - a misspelt name
    would otherwise start mpiexec and end in every rank's ImportError.

    The module is looked up, never imported (importing a program initialises MPI): with
    importlib.util.find_spec in this process first; if this process does not find it (the
    ranks may have another PYTHONPATH, or another Python), `python` is asked in a subprocess
    with the ranks' environment and current folder. If neither can tell, the job runs."""
    try:
        if python == sys.executable and importlib.util.find_spec(module) is not None:
            return
    except Exception:  # noqa: BLE001 - a missing or broken parent package: ask the ranks' Python
        pass
    try:
        answer = subprocess.run([python, "-c", FIND_MODULE, module], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return  # cannot ask: the job's own error will tell
    if answer.returncode == 3:
        raise ValueError(
            f"module: expected a module that {python} can import, got {module!r}: there is no "
            f"such module (check the spelling; a module of your own must be in the current "
            f"folder {os.getcwd()!r} or on PYTHONPATH)")


def _checked_args(args) -> list[str]:
    """`args` as a list of strings; a single string (which would be split into characters)
    or a non-string item raise a ValueError naming `args`."""
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise ValueError(f"args: expected a list of strings such as ['--steps', '10'], got "
                         f"{type(args).__name__} {args!r}")
    for item in args:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"args: expected a list of strings such as ['--steps', '10'], "
                             f"got the {type(item).__name__} {item!r} in {list(args)!r} "
                             f"(write str({item!r}))")
    return [os.fspath(item) for item in args]


def _checked_timeout(timeout) -> float:
    """`timeout` as a float if it is a positive, finite number of seconds (NaN would never
    time out; a string or a bool is not a number)."""
    if (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
            or not math.isfinite(timeout) or timeout <= 0):
        kind = "" if isinstance(timeout, numbers.Real) else f"the {type(timeout).__name__} "
        raise ValueError(f"timeout: expected a positive number of seconds, got {kind}"
                         f"{timeout!r}")
    return float(timeout)


def rank_environment(threads_per_rank: int = 1, python: str = sys.executable) -> dict[str, str]:
    """Environment for the ranks: BLAS threads capped so ranks do not fight over cores."""
    threads_per_rank = require_positive_int("threads_per_rank", threads_per_rank)
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


def failed_ranks_note(stdout: str, stderr: str, dead: list[int] | None = None,
                      stopped: bool = False, together: list[int] | None = None) -> str:
    """One line saying which rank brought a failed job down and how, or '' if unknown.

    Bad arguments: the programs print "error: ..." and exit (see agree_on_arguments in
    tfcourse.parallel.comm); that line is repeated here. A rank that raised calls
    MPI_Abort, and the MPI library names it in stderr. A rank killed by a signal (SIGKILL
    from outside, or the kernel's out-of-memory killer) cannot say anything: Open MPI names
    it; MPICH's hydra reports "BAD TERMINATION ... EXIT CODE: 9" with a PID only - run_mpi
    then looks which ranks are gone while the others still run (`dead`). Without that, the
    PID may be any rank hydra stopped while cleaning up. `stopped`: the launcher ended the
    job because the other ranks were still waiting for the dead one. `together`: ranks
    that had all exited when the launcher first looked (one of them first).

    A rank that raised without calling MPI_Abort (e.g. mpi4py's runner not finding the
    module: the rank exits with status 1) leaves its Python traceback in stderr: its last
    line ("ImportError: ...") is given instead of a guess at a signal. mpi4py.MPI.Exception
    is not: it is a rank's reaction to a partner that died.
    """
    # the programs' own message ("error: ..."), or argparse's ("prog: error: argument ...")
    rejected = re.search(r"(?:^|: )error: (.*)$", stderr, re.MULTILINE)
    if rejected:
        return f"the program stopped on bad input: {rejected.group(1)}"
    aborted = sorted({int(m) for pattern in ABORT_PATTERNS for m in re.findall(pattern, stderr)})
    # An MPI call that failed (mpi4py.MPI.Exception) means its rank lost a partner: if some
    # rank died first, the abort was the reaction. Otherwise the aborting rank is the cause
    # (and the ranks hydra then stopped may well have exited before it).
    if aborted and dead and set(dead) - set(aborted) and "mpi4py.MPI.Exception" in stderr:
        return (f"{_ranks(dead)} died while the others were running; "
                f"{_ranks(aborted)} then called MPI_Abort (see stderr below)")
    if aborted:
        return f"{_ranks(aborted)} called MPI_Abort (an uncaught error: see stderr below)"
    openmpi = re.search(r"process rank (\d+) with PID (\d+) .*?exited on signal (\d+)", stdout
                        + stderr)
    if openmpi:
        rank, pid, sig = (int(g) for g in openmpi.groups())
        return f"rank {rank} (PID {pid}) was {_signal_description(sig)}"
    raised = _first_exception(stderr)
    if raised and dead:
        it = "it" if len(dead) == 1 else "one of them"
        waited = (f"; the others were still waiting for it {GRACE_SECONDS:g} s later, so the "
                  f"launcher stopped the job" if stopped else "")
        return (f"{_ranks(dead)} died while the others were running: {it} raised {raised}"
                f"{waited} (see stderr below)")
    if raised:
        who = f"one of {_ranks(together)}" if together else "a rank"
        return f"{who} raised {raised} (see stderr below)"
    hydra = re.search(r"BAD TERMINATION.*?EXIT CODE: (\d+)", stdout, re.DOTALL)
    # without auto-cleanup, hydra only says how the job ended
    killed = re.search(r"EXIT STRING: .*\(signal (\d+)\)", stdout)
    silent = ("it ended without an error message (killed by a signal, e.g. SIGKILL from "
              "outside or the out-of-memory killer, or crashed)")
    how = _signal_description(int((hydra or killed).group(1))) if hydra or killed else silent
    if dead and stopped:
        return (f"{_ranks(dead)} died while the others were running: {silent}; the others "
                f"were still waiting for it {GRACE_SECONDS:g} s later, so the launcher "
                f"stopped the job")
    if dead:
        return f"{_ranks(dead)} died while the others were running: {how}"
    if together:
        return (f"one of {_ranks(together)} died first ({how}) and the others then stopped; "
                f"they had all exited when the launcher looked (a busy machine?)")
    if hydra:
        return (f"a rank was {how}; MPICH names it only by a PID (in its report below), "
                f"which may be a rank it stopped afterwards")
    return ""


TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*(\S.*)$",
                       re.MULTILINE)


def _first_exception(stderr: str) -> str | None:
    """The exception line ("ImportError: No module named x") ending the first Python
    traceback in `stderr` that is not mpi4py.MPI.Exception, or None."""
    for line in TRACEBACK.findall(stderr):
        if not line.startswith("mpi4py.MPI.Exception"):
            return line.strip()[:500]
    return None


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


def _parent_pids() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process: from /proc where there is one (fast enough to
    poll), else from `ps`."""
    if Path("/proc/self/stat").is_file():
        pairs = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:  # "pid (command) state ppid ...": the command may contain spaces
                    stat = Path(entry.path, "stat").read_text()
                    pairs.append((int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])))
                except (OSError, IndexError, ValueError):
                    continue  # exited meanwhile
        return pairs
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True,
                               text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [tuple(int(field) for field in line.split()) for line in table.splitlines()]


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (mpiexec's proxies and ranks)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_pids():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


RANK_VARIABLES = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")
POLL_SECONDS = 0.02
# A rank gone while others still run for this long died: MPI_Finalize holds finished ranks
# until every rank has finalised, so ranks of a healthy job exit within moments of each other.
GRACE_SECONDS = 1.5


def rank_pids(pid: int) -> dict[int, int]:
    """{rank: PID} of the ranks below process `pid` (an mpiexec): the rank is read from the
    PMI_RANK (MPICH) or OMPI_COMM_WORLD_RANK (Open MPI) variable mpiexec put in each rank's
    environment."""
    ranks = {}
    for child in _descendants(pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for variable in environ:
            if variable.startswith(RANK_VARIABLES):
                ranks[int(variable.split(b"=", 1)[1])] = child
    return ranks


class _Output:
    """A child's stdout or stderr, read on a thread while the launcher watches the job."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self.lines.extend, args=(stream,), daemon=True)
        self.thread.start()

    def text(self) -> str:
        self.thread.join()
        return "".join(self.lines)


class _RankWatch:
    """Which ranks died first. Holds a pidfd (Linux) for every rank as soon as its process
    appears; a pidfd becomes readable the moment its process has exited. At the first exit,
    `first_dead` gets the exited ranks if some other rank was still running - they died
    first, not in the general shutdown; if none was (the launcher looked too late, e.g. on a
    busy machine), `together` gets them instead. Elsewhere it learns nothing."""

    def __init__(self, mpiexec_pid: int, n_ranks: int):
        self.mpiexec_pid, self.n_ranks = mpiexec_pid, n_ranks
        self.pidfds: dict[int, int] = {}  # rank -> pidfd
        self.first_dead: list[int] = []
        self.together: list[int] = []
        self.since: float | None = None
        self.enabled = hasattr(os, "pidfd_open") and Path("/proc/self/environ").is_file()

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking as soon as a watched rank exits."""
        if not self.enabled or self.since is not None:
            time.sleep(seconds)
            return
        if len(self.pidfds) < self.n_ranks:
            self._discover()
        if not self.pidfds:
            time.sleep(seconds)
            return
        exited, _, _ = select.select(list(self.pidfds.values()), [], [], seconds)
        if exited:
            self._record([r for r, fd in self.pidfds.items() if fd in exited])

    def _discover(self) -> None:
        for rank, pid in rank_pids(self.mpiexec_pid).items():
            if rank not in self.pidfds:
                try:
                    self.pidfds[rank] = os.pidfd_open(pid)
                except OSError:  # exited between the scan and now
                    continue

    def _record(self, exited: list[int]) -> None:
        self.since = time.monotonic()
        if len(exited) < len(self.pidfds):
            self.first_dead = sorted(exited)
        else:
            self.together = sorted(exited)

    def overdue(self) -> bool:
        """True if a rank died more than GRACE_SECONDS ago and the job still runs."""
        return bool(self.first_dead) and time.monotonic() - self.since > GRACE_SECONDS

    def close(self) -> None:
        for fd in self.pidfds.values():
            os.close(fd)


def _supervise(process: subprocess.Popen, n_ranks: int, timeout: float
               ) -> tuple[list[int], list[int], bool]:
    """Wait for the job; returns (the ranks that died while others still ran, [] if none;
    the ranks found exited together at the first look; whether the launcher stopped the
    job). If the others still run GRACE_SECONDS after a rank died (waiting for it in some
    collective), the job is ended here. Raises subprocess.TimeoutExpired after `timeout`."""
    deadline = time.monotonic() + timeout
    watch = _RankWatch(process.pid, n_ranks)
    stopped = False
    try:
        while process.poll() is None:
            if watch.overdue():
                _kill_job(process)
                stopped = True
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(process.args, timeout)
            watch.wait(POLL_SECONDS)
    finally:
        watch.close()
    return watch.first_dead, watch.together, stopped


# ------------------------------------------------------------- nothing left running, ever

JOB_VARIABLE = "TFCOURSE_MPI_JOB"  # in the environment of mpiexec, its proxies and every rank
TEMP_PREFIX = "tfcourse-mpi-"  # + the launcher's PID + "-": its job's temporary folder
KILL_SECONDS = 5.0  # how long _kill_tagged waits for killed processes to vanish
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _job_tag() -> str:
    """A new job's tag: the launcher's PID (to tell later whether the launcher still lives)
    and a random part (two jobs of one launcher differ)."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def _launcher_pid(tag: str) -> int | None:
    """The launcher PID at the start of a job tag or a folder's name suffix, None if absent."""
    head = tag.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _tagged_processes() -> dict[str, list[int]]:
    """{job tag: PIDs} of every process (but this one) whose environment carries a job tag,
    from /proc/PID/environ (Linux; elsewhere {} - there the process group does the work)."""
    if not Path("/proc/self/environ").is_file():
        return {}
    key = JOB_VARIABLE.encode() + b"="
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        for variable in environ.split(b"\0"):
            if variable.startswith(key):
                tag = variable[len(key):].decode(errors="replace")
                found.setdefault(tag, []).append(int(entry.name))
    return found


def _kill_tagged(tag: str, seconds: float = KILL_SECONDS) -> list[int]:
    """SIGKILL every process of job `tag`, wherever it is in the process tree (a rank whose
    hydra_pmi_proxy died belongs to PID 1 now), until none is left or `seconds` have
    passed; returns the PIDs still there then ([] as it should be)."""
    deadline = time.monotonic() + seconds
    while pids := _tagged_processes().get(tag, []):
        if time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    return []


def clean_up_after_dead_launchers(folder: str | os.PathLike | None = None) -> None:
    """Remove what launchers killed by SIGKILL (or crashed) left behind: their jobs'
    temporary folders `tfcourse-mpi-PID-*` in `folder` (default: the system's temporary
    folder) and any process of their jobs still running. run_mpi calls it first.

    A killed launcher's mpiexec dies with it (PR_SET_PDEATHSIG), and hydra's proxy then
    stops the ranks (measured: all gone within 2 s); a launcher killed by SIGKILL cannot
    remove its folder, so the next run_mpi does. The processes are a safety net (e.g. the
    proxy had been killed first): they carry the tag of a job whose launcher is gone.
    """
    for tag in _tagged_processes():
        launcher = _launcher_pid(tag)
        if launcher is not None and not _alive(launcher):
            _kill_tagged(tag)
    for stale in Path(folder or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        launcher = _launcher_pid(stale.name[len(TEMP_PREFIX):])
        if launcher is not None and not _alive(launcher) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@lru_cache(maxsize=1)
def _prctl():
    """libc's prctl (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only here: ranks that never need it do not pay for the import

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_launcher():
    """A preexec_fn for mpiexec: the kernel sends it SIGKILL when the launcher dies (by any
    signal, SIGKILL included); if the launcher is already gone, exit at once. None where
    there is no prctl (the launcher's own cleanup still runs, but not on SIGKILL).

    PR_SET_PDEATHSIG fires when the *thread* that started the child ends: run_mpi's thread
    waits for the job, so that is never before the job ends."""
    prctl, launcher, kill = _prctl(), os.getpid(), int(signal.SIGKILL)
    if prctl is None:
        return None

    def preexec() -> None:  # in the child, between fork and exec: nothing that imports
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != launcher:
            os._exit(1)
    return preexec


def die_with_parent() -> bool:
    """Under run_mpi, ask the kernel to SIGKILL this process when its parent dies; returns
    whether it did. For the ranks, at start-up: their parent is hydra's proxy (or Open
    MPI's daemon), and a rank whose proxy was killed would otherwise keep running (and
    busy-polling) under PID 1. Does nothing outside run_mpi's jobs or without prctl."""
    prctl = _prctl() if os.environ.get(JOB_VARIABLE) else None
    if prctl is None:
        return False
    parent = os.getppid()
    if parent != 1 and prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if parent == 1 or os.getppid() != parent:  # orphaned before or while asking: job gone
        os.kill(os.getpid(), signal.SIGKILL)
    return True


class _LauncherTerminated(BaseException):
    """SIGTERM or SIGHUP reached the launcher while a job ran (raised by _Guard)."""


class _Guard:
    """The life of one job's launcher: its temporary folder, and SIGTERM/SIGHUP.

    Without it, SIGTERM or SIGHUP (a kernel restart, a closed terminal) end the Python
    process at once: no `finally` runs, the job and the folder stay. While a job runs, the
    guard turns the first such signal into an exception (in the main thread, where Python
    runs signal handlers; only signals whose handler was the default, so nohup's SIG_IGN
    and a program's own handlers are respected): run_mpi stops the job, the folder is
    removed, the previous handlers are restored and the signal is raised again - the
    process then dies of it as it would have. A signal that comes during a cleanup (stopping
    the job, removing the folder) is acted on right after it, never in the middle.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                    if hasattr(signal, name))

    def __init__(self):
        self.received: list[int] = []
        self.raising = True
        self.previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        if self.raising:
            self.raising = False
            raise _LauncherTerminated(signum)

    @contextlib.contextmanager
    def uninterrupted(self):
        """A cleanup no SIGTERM/SIGHUP may cut short (they are acted on afterwards)."""
        raising, self.raising = self.raising, False
        try:
            yield
        finally:
            self.raising = raising
        if raising and self.received:  # one came meanwhile: act on it now
            self.raising = False
            raise _LauncherTerminated(self.received[0])

    @contextlib.contextmanager
    def folder(self):
        """Install the handlers, yield a new `tfcourse-mpi-PID-*` folder; on the way out,
        remove it, restore the handlers and re-raise a signal that came meanwhile."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self.previous[sig] = signal.signal(sig, self._handler)
        path = None
        try:
            try:
                with self.uninterrupted():
                    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
                yield path
            finally:
                if path is not None:
                    with self.uninterrupted():
                        shutil.rmtree(path, ignore_errors=True)
        except _LauncherTerminated:
            pass  # the job is stopped and the folder removed: now die of the signal
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            if self.received:  # the default action of SIGTERM and SIGHUP: the process ends
                signal.raise_signal(self.received[0])
        if self.received:  # not reached unless the signal could not end the process
            raise SystemExit(128 + self.received[0])


def _kill_job(process: subprocess.Popen, tag: str | None = None) -> None:
    """Terminate mpiexec and every process of its job.

    SIGTERM to mpiexec's process group first (MPICH's hydra and Open MPI then stop their
    ranks); whatever still runs 2 s later is killed - the group, the processes that were
    below mpiexec (hydra puts every rank in a session of its own, out of reach of the
    group's signal), and every process carrying the job's `tag` (ranks whose proxy died
    are below PID 1 now, in no one's group).
    """
    below = _descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=2.0)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):  # already gone, as it should be
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # ranks may outlive mpiexec: the group
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if tag is not None:
        _kill_tagged(tag)


def _tail(text: str, chars: int = STDERR_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _failure_message(returncode: int, command: list[str], stdout: str, stderr: str,
                     watched: dict | None = None) -> str:
    """MPIJobError's text: exit code, which rank failed if known, stderr, hydra's report.
    `watched`: what run_mpi saw of the ranks (failed_ranks_note's keyword arguments)."""
    culprits = failed_ranks_note(stdout, stderr, **(watched or {}))
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
    the job fails. Bad arguments raise a ValueError naming them before anything starts, a
    module that the ranks' Python cannot find included.

    Nothing outlives the call: mpiexec runs in a session of its own, with the job's tag in
    every process's environment (TFCOURSE_MPI_JOB); a timeout, Ctrl-C, SIGTERM or SIGHUP
    (a Jupyter kernel restarted mid-run) stop every tagged process wherever it is and remove
    the job's temporary folder (the signal then ends the process as usual). If the launcher
    is killed by SIGKILL, the kernel kills mpiexec (PR_SET_PDEATHSIG, Linux) and hydra's
    proxy then stops the ranks; the folder is removed by the next run_mpi call (see
    clean_up_after_dead_launchers).
    """
    args = _checked_args(args)
    n_ranks = require_positive_int("n_ranks", n_ranks)
    timeout = _checked_timeout(timeout)
    env = rank_environment(threads_per_rank, python)
    _check_importable(_checked_module(module), python, env)
    clean_up_after_dead_launchers()
    guard = _Guard()
    with guard.folder() as tmp:
        json_path = tmp / "result.json"
        full_args = [*args, "--json", str(json_path)] if json_result else args
        command = build_command(module, full_args, n_ranks, python, hostfile, supervised=True)
        env[JOB_VARIABLE] = tag = _job_tag()
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # own process group: a timeout can kill every rank
            preexec_fn=_die_with_launcher(),  # mpiexec dies with the launcher, even SIGKILLed
        )
        try:
            outputs = [_Output(process.stdout), _Output(process.stderr)]
            dead, together, stopped = _supervise(process, n_ranks, timeout)
            stdout, stderr = (out.text() for out in outputs)
        except subprocess.TimeoutExpired:
            with guard.uninterrupted():
                _kill_job(process, tag)
            stdout, stderr = (out.text() for out in outputs)
            raise MPITimeoutError(
                f"MPI job timed out after {timeout:g} s and was killed: {' '.join(command)}\n"
                "A rank probably waits in a collective or a receive that another rank never "
                f"reaches (a deadlock).\n--- ranks' stderr ---\n{_tail(stderr)}",
                None,
                stdout,
                stderr,
            ) from None
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: never leave ranks running
            with guard.uninterrupted():
                _kill_job(process, tag)
            raise
        finally:  # mpiexec has exited; a rank it lost track of may not have
            with guard.uninterrupted():
                _kill_tagged(tag)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise MPIJobError(
                _failure_message(process.returncode, command, stdout, stderr,
                                 {"dead": dead, "together": together, "stopped": stopped}),
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
