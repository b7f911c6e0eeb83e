"""Nothing left running (issue 17): an MPI job dies with the launcher that started it,
whatever ends the launcher - SIGTERM, SIGHUP (a Jupyter kernel restarted mid-run, a closed
terminal) or SIGKILL - and no rank outlives a timeout, even one that is no longer below
mpiexec because its hydra_pmi_proxy was killed. Real mpiexec jobs, a few seconds each.

A job's processes are found by a marker variable in their environment: the launcher gets
it, and mpiexec hands its environment down to the proxy and every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from tfcourse.course import launch
from tfcourse.course.launch import MPIJobError, run_mpi

pytestmark = pytest.mark.mpi

MARKER = "TFCOURSE_TEST_LIFECYCLE"
GONE_WITHIN = 5.0  # seconds for every process of a job to vanish after its launcher died


def environments() -> dict[int, set[bytes]]:
    """{pid: its environment's entries} of every readable process but this one (zombies
    have none: they run no more)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                found[int(entry.name)] = set(Path(entry.path, "environ").read_bytes()
                                             .split(b"\0"))
            except OSError:
                continue
    return found


def job_processes(marker: str, ranks_only: bool = False) -> list[int]:
    """PIDs of the running processes whose environment carries `marker` (ranks only: those
    mpiexec gave a PMI_RANK)."""
    entry = f"{MARKER}={marker}".encode()
    return sorted(pid for pid, env in environments().items() if entry in env and (
        not ranks_only or any(item.startswith(b"PMI_RANK=") for item in env)))


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_leftovers(marker: str) -> None:
    """After a failed assertion: end what the test left, by PID (never by name)."""
    for pid in job_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def marker():
    value = uuid.uuid4().hex
    yield value
    kill_leftovers(value)


@pytest.fixture(autouse=True)
def linux_only():
    if not Path("/proc/self/environ").is_file():
        pytest.skip("finds processes through /proc (Linux)")


LAUNCHER = ("from tfcourse.course.launch import run_mpi; "
            "run_mpi('tfcourse.hello', ['--hang-on-rank', '1'], n_ranks=2, timeout=60)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda sig: sig.name)
def test_a_killed_launcher_takes_its_job_along(sig, marker, tmp_path):
    """A launcher running a job that would never end (rank 1 never reaches the gather and
    rank 0 busy-polls for it) is killed: within seconds no process of the job is left, and
    the launcher died of the signal, as it would have without a job."""
    env = dict(os.environ, **{MARKER: marker}, TMPDIR=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: len(job_processes(marker, ranks_only=True)) == 2, 30), (
            launcher.poll(), job_processes(marker))
        job = [pid for pid in job_processes(marker) if pid != launcher.pid]
        assert len(job) >= 3, job  # mpiexec, its proxy and the two ranks
        killed = time.monotonic()
        launcher.send_signal(sig)
        launcher.wait(timeout=10)
        assert wait_until(lambda: not job_processes(marker), GONE_WITHIN), (
            f"still running {GONE_WITHIN:g} s after the launcher died: "
            f"{job_processes(marker)} of {job}")
        print(f"{sig.name}: job gone {time.monotonic() - killed:.2f} s after the signal")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == -sig, launcher.stderr.read().decode()
    folders = list(tmp_path.glob(f"{launch.TEMP_PREFIX}*"))
    if sig != signal.SIGKILL:
        assert folders == []  # removed by the launcher itself before it died
        return
    # nothing runs in a process killed by SIGKILL: its folder goes at the next run_mpi
    assert [f.name.split("-")[2] for f in folders] == [str(launcher.pid)]
    tempfile.tempdir, before = str(tmp_path), tempfile.tempdir
    try:
        assert run_mpi("tfcourse.hello", n_ranks=1, timeout=30).result["world_size"] == 1
    finally:
        tempfile.tempdir = before
    assert list(tmp_path.glob(f"{launch.TEMP_PREFIX}*")) == []


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_ranks_whose_proxy_was_killed_do_not_outlive_the_job(n_ranks, marker, monkeypatch):
    """SIGKILL to hydra_pmi_proxy would leave its ranks below PID 1, out of mpiexec's tree and
    process group. Every program calls die_with_parent at start-up (tfcourse.parallel.program),
    so the kernel kills the ranks with their proxy: mpiexec sees them die and the job fails at
    once - not at its timeout - and nothing of it survives."""
    monkeypatch.setenv(MARKER, marker)  # run_mpi hands its environment to the job
    killed = {}

    def kill_the_proxy():
        if not wait_until(lambda: len(job_processes(marker, ranks_only=True)) == n_ranks, 30):
            return
        time.sleep(1.0)  # rank 0 now waits in the gather for rank 1 (--hang-on-rank 1)
        ranks = job_processes(marker, ranks_only=True)
        proxy = int(Path(f"/proc/{ranks[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        killed["proxy"] = Path(f"/proc/{proxy}/comm").read_text().strip()
        os.kill(proxy, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_proxy)
    killer.start()
    start = time.monotonic()
    with pytest.raises(MPIJobError) as info:
        run_mpi("tfcourse.hello", ["--hang-on-rank", "1"], n_ranks=n_ranks, timeout=3)
    killer.join()
    assert killed["proxy"] == "hydra_pmi_proxy", killed
    assert type(info.value) is MPIJobError, str(info.value)  # died, not timed out
    assert time.monotonic() - start < 15
    assert job_processes(marker) == [], "ranks outlived the job"


def test_die_with_parent_ties_a_process_to_its_parent(tmp_path):
    """The rank's side (for the programs' start-up): under run_mpi (the job variable set),
    a process that called die_with_parent is killed when its parent dies; elsewhere it does
    nothing."""
    assert launch.die_with_parent() is False  # not in a run_mpi job
    pid_file = tmp_path / "child.pid"
    child = (f"import os, time; from tfcourse.course import launch; "
             f"assert launch.die_with_parent(); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)")
    env = dict(os.environ, **{launch.JOB_VARIABLE: "0-test"})
    process = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        assert wait_until(lambda: pid_file.is_file() and pid_file.read_text(), 20)
        child_pid = int(pid_file.read_text())
        process.kill()
        process.wait()
        assert wait_until(lambda: not _running(child_pid), 2.0), "the child outlived its parent"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if pid_file.is_file() and pid_file.read_text() and _running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_guard_keeps_ignored_signals_ignored_and_restores_handlers():
    """SIGHUP ignored (nohup) stays ignored during a job; SIGTERM's default is replaced only
    while the job runs."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with launch._Guard().folder() as folder:
            assert folder.is_dir() and folder.name.startswith(f"tfcourse-mpi-{os.getpid()}-")
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            if term is signal.SIG_DFL:
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert not folder.exists()
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, before)
