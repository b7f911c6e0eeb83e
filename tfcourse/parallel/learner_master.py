"""The learner program's check of a learner's master for dynamic scheduling (chapter 8):
the library's workers on the other ranks, tasks of known duration, a task graph with a failing
branch, and a watch on the protocol (one task per worker at a time). See learner_cases."""

from __future__ import annotations

import time

from mpi4py import MPI


def sleep_task(task: dict, inputs: dict) -> dict:
    """A task of known duration that uses no CPU (so timing holds with more ranks than cores)
    and reports which dependencies' results it was given."""
    time.sleep(task["seconds"])
    return {"slept": task["seconds"], "inputs": sorted(inputs)}


def master_cases(comm) -> list[tuple[str, list[dict], bool]]:
    """(case, tasks, whether task 0 outlasts all the others): independent tasks, one far
    longer than the rest; a graph with a failing branch."""
    long_one = [{"id": 0, "kind": "sleep", "seconds": 1.0}]
    short = [{"id": i, "kind": "sleep", "seconds": 0.01} for i in range(1, 4 * comm.size)]
    graph = [{"id": 0, "kind": "sleep", "seconds": 0.05, "deps": []},
             {"id": 1, "kind": "sleep", "seconds": 0.02, "deps": [0]},
             {"id": 2, "kind": "sleep", "seconds": 0.01, "deps": [0]},
             {"id": 3, "kind": "sleep", "seconds": 0.01, "deps": [1, 2]},
             {"id": 4, "kind": "fail", "deps": []},
             {"id": 5, "kind": "sleep", "seconds": 0.01, "deps": [4]},
             {"id": 6, "kind": "sleep", "seconds": 0.01, "deps": [3]}]
    return [("independent tasks", long_one + short, True), ("a task graph", graph, False)]


def master_problem(tasks: list[dict], outcomes, balance: bool) -> str | None:
    """What is wrong with a master's outcomes, compared with a serial run."""
    from tfcourse.parallel.plans.tasks import run_serial

    if not isinstance(outcomes, dict) or sorted(outcomes) != [t["id"] for t in tasks]:
        got = sorted(outcomes) if isinstance(outcomes, dict) else type(outcomes).__name__
        return (f"returned outcomes for {got}, expected a dict with one outcome per task id "
                f"{[t['id'] for t in tasks]}")
    serial = run_serial(tasks)
    for task in tasks:
        i, got = task["id"], outcomes[task["id"]]
        if got.get("result") != serial[i].get("result") or ("error" in got) != (
                "error" in serial[i]):
            return (f"task {i}: outcome {got.get('result', got.get('error'))!r}, a serial run "
                    f"gives {serial[i].get('result', serial[i].get('error'))!r}: a task runs "
                    f"once all its inputs exist, and never after one of them failed")
        late = [d for d in task.get("deps", []) if got["start"] < outcomes[d]["end"]]
        if late and "error" not in got:
            return f"task {i} started before its dependency {late[0]} had finished"
    if balance:  # task 0 outlasts all the others together: its worker should do nothing else
        slow = outcomes[0]["worker"]
        more = [t["id"] for t in tasks[1:] if outcomes[t["id"]]["worker"] == slow]
        if more:
            return (f"worker {slow} spent 1 s on task 0 while the others took 0.01 s each, yet "
                    f"it was also given tasks {more}: the next task must go to whichever "
                    f"worker answers first")
    return None


class DispatchWatch:
    """The communicator a learner's master talks through: passes everything on, and notes the
    first WORK message sent to a worker whose previous task's RESULT has not come back."""

    def __init__(self, comm, work_tag: int):
        self._comm, self._work, self.busy, self.problem = comm, work_tag, {}, None

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def send(self, obj, dest, tag=0):
        if tag == self._work:
            task = obj[0]["id"] if isinstance(obj, tuple) and isinstance(obj[0], dict) else obj
            if dest in self.busy and self.problem is None:
                self.problem = (f"task {task} was sent to worker {dest} while it was still "
                                f"running task {self.busy[dest]}: a worker does one task at a "
                                f"time - wait for its result (two messages queued both ways "
                                f"deadlock once they outgrow MPI's eager buffer)")
            self.busy[dest] = task
        return self._comm.send(obj, dest=dest, tag=tag)

    def recv(self, buf=None, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=None):
        message = self._comm.recv(buf, source=source, tag=tag, status=status)
        if isinstance(message, dict) and "worker" in message:
            self.busy.pop(message["worker"], None)
        return message


def check_master(fn, comm):
    """The master of dynamic scheduling (chapter 8) on rank 0, the library's workers on the
    others: results equal to a serial run, dependencies respected, a failure reported and
    its dependants skipped, and no task queued behind a busy worker while another is free."""
    from tfcourse.parallel import task_parallel
    from tfcourse.parallel.plans import tasks as plans

    plans.TASK_KINDS.setdefault("sleep", sleep_task)
    for case, tasks, long_first in master_cases(comm):
        t0 = comm.bcast(time.time(), root=0)
        if comm.rank != 0:
            task_parallel.worker(comm, t0)
            comm.Barrier()  # this worker has stopped: nothing more is on its way from it
            yield None
            continue
        failure, watch = None, DispatchWatch(comm, task_parallel.WORK)
        try:
            outcomes = fn([dict(t) for t in tasks], watch, t0)
        except Exception as err:  # noqa: BLE001 - reported below, once the workers stopped
            failure = err
            for worker in range(1, comm.size):
                comm.send(None, dest=worker, tag=task_parallel.STOP)
        comm.Barrier()
        unread = drain(comm)
        if failure is not None:
            raise failure
        balance = long_first and comm.size > 2
        problem = watch.problem or master_problem(tasks, outcomes, balance) or (
            f"{unread} result(s) were never received: the master must wait for every task's "
            f"outcome" if unread else None)
        yield f"{case}: {problem}" if problem else None


def drain(comm) -> int:
    """Receive whatever was sent to this rank and never received (a job cannot end cleanly
    with messages in flight); how many there were."""
    count = 0
    while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        count += 1
    return count
