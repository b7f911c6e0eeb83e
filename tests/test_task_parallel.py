"""Task parallelism under real mpiexec: results equal a serial run's whatever the scheduler
and the number of ranks; a failing task is reported and the others still come back."""

import pytest

from tfcourse.course.launch import MPIJobError, run_mpi
from tfcourse.parallel.plans import tasks as T

MODULE = "tfcourse.parallel.task_parallel"
SWEEP = ["--mode", "sweep", "--lrs", "0.003,0.03", "--seeds", "0,1", "--steps", "5"]


def results(outcomes):
    """Outcomes without timing and worker: what must not depend on the schedule."""
    return [{k: v for k, v in o.items() if k not in ("start", "end", "worker")}
            for o in outcomes]


@pytest.fixture(scope="module")
def serial_sweep():
    outcomes = T.run_serial(T.sweep_tasks([0.003, 0.03], [0, 1], 5))
    return results([outcomes[i] for i in sorted(outcomes)])


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("scheduler", ["dynamic", "static", "futures"])
def test_sweep_equals_serial(n_ranks, scheduler, serial_sweep):
    result = run_mpi(MODULE, [*SWEEP, "--scheduler", scheduler], n_ranks=n_ranks,
                     timeout=120).result
    assert results(result["outcomes"]) == serial_sweep
    assert result["errors"] == []
    workers = {o["worker"] for o in result["outcomes"]}
    if scheduler == "static":
        assert [o["worker"] for o in result["outcomes"]] == [i % n_ranks for i in range(4)]
    elif n_ranks > 1:  # rank 0 only coordinates
        assert workers <= set(range(1, n_ranks))


@pytest.mark.mpi
@pytest.mark.parametrize("n_ranks", [1, 2, 4])
@pytest.mark.parametrize("scheduler", ["dynamic", "futures", "static"])
def test_a_failing_task_is_reported_and_the_rest_return(n_ranks, scheduler, serial_sweep):
    result = run_mpi(MODULE, [*SWEEP, "--scheduler", scheduler, "--fail-task", "1"],
                     n_ranks=n_ranks, timeout=120).result
    assert [e["id"] for e in result["errors"]] == [1]
    assert "RuntimeError: task 1 failed on purpose" in result["errors"][0]["error"]
    got = results(result["outcomes"])
    assert [g for i, g in enumerate(got) if i != 1] == [s for i, s in enumerate(serial_sweep)
                                                        if i != 1]


@pytest.mark.mpi
@pytest.mark.parametrize("scheduler", ["dynamic", "futures"])
def test_task_graph_equals_serial_and_skips_after_a_failure(scheduler):
    graph = ["--mode", "graph", "--lrs", "0.01,0.03", "--steps", "4", "--scheduler", scheduler]
    serial = T.run_serial(T.graph_tasks([0.01, 0.03], 4))
    expected = results([serial[i] for i in sorted(serial)])
    for outcome in expected:  # weights are dropped from the report
        if "result" in outcome:
            outcome["result"].pop("params", None)
    assert results(run_mpi(MODULE, graph, n_ranks=3, timeout=120).result["outcomes"]) == expected
    failed = run_mpi(MODULE, [*graph, "--fail-task", "1"], n_ranks=3, timeout=120).result
    errors = {e["id"]: e["error"] for e in failed["errors"]}
    assert errors[1].startswith("RuntimeError") and errors[3] == "skipped: dependency 1 failed"
    assert errors[5] == "skipped: dependency 3 failed"  # select needs every evaluation
    assert "error" not in failed["outcomes"][4]  # the other branch still ran


@pytest.mark.mpi
def test_static_scheduling_refuses_a_task_graph():
    with pytest.raises(MPIJobError, match="static' cannot run a task graph"):
        run_mpi(MODULE, ["--mode", "graph", "--scheduler", "static"], n_ranks=2, timeout=60)


@pytest.mark.mpi
def test_imbalance_timeline_has_every_task_once():
    result = run_mpi(MODULE, ["--mode", "imbalance", "--costs", "3,1,1,1,3", "--scheduler",
                              "dynamic"], n_ranks=3, timeout=120).result
    assert [o["id"] for o in result["outcomes"]] == list(range(5))
    assert all(0 <= o["start"] <= o["end"] <= result["makespan"] for o in result["outcomes"])
    assert {o["worker"] for o in result["outcomes"]} <= {1, 2}


def test_ready_tasks_follow_dependencies():
    graph = T.graph_tasks([0.1, 0.2], 1)
    assert [t["id"] for t in T.ready_tasks(graph, set(), set())] == [0]
    assert [t["id"] for t in T.ready_tasks(graph, {0}, {0})] == [1, 2]
    assert [t["id"] for t in T.ready_tasks(graph, {0, 1, 2, 3}, {0, 1, 2, 3})] == [4]


def test_run_serial_rejects_a_cycle_and_unknown_kinds():
    with pytest.raises(ValueError, match="cycle"):
        T.run_serial([{"id": 0, "kind": "work", "units": 1, "deps": [1]},
                      {"id": 1, "kind": "work", "units": 1, "deps": [0]}])
    with pytest.raises(ValueError, match=r"task\['kind'\]"):
        T.run_task({"id": 0, "kind": "dance"})
    outcome = T.timed_task({"id": 3, "kind": "fail"}, {}, 0, 0.0)
    assert outcome["error"].startswith("RuntimeError: task 3 failed")


def test_scheduling_models_by_hand():
    costs = [6, 1, 6, 1, 6, 1, 6, 1]
    static = T.simulate_static(costs, 2)
    assert [e["worker"] for e in static] == [0, 1] * 4 and T.makespan(static) == 24
    dynamic = T.simulate_dynamic(costs, 2)
    # w0: 6 (0-6), then 1 (6-7), 6 (7-13), 1 (13-14); w1: 1, 6 (1-7), 1 (7-8), 6 (8-14)
    assert [e["worker"] for e in dynamic] == [0, 1, 1, 0, 0, 1, 1, 0]
    assert T.makespan(dynamic) == 14


def test_task_timeline_plot_has_a_bar_per_task():
    import matplotlib

    matplotlib.use("Agg")
    from tfcourse.course.viz import plot_task_timeline

    ax = plot_task_timeline(T.simulate_dynamic([3, 1, 2], 2), workers=[0, 1])
    assert sorted(p.get_width() for p in ax.patches) == [1, 2, 3]
