"""Classic wrong answers to chapter 8's exercises (see __init__.py)."""
import inspect
import textwrap

from tfcourse.parallel import task_parallel

# the master exercise's answer is the library's master: its body, after the docstring
_MASTER_BODY = textwrap.dedent(inspect.getsource(task_parallel.master).split('"""', 2)[2])


def _master(right: str, wrong: str) -> str:
    """The library's master with one line made wrong."""
    assert right in _MASTER_BODY, right
    return _MASTER_BODY.replace(right, wrong)


MUTATIONS = {
    "master_worker": {
        "static round-robin (task i to worker i mod n)": """
free_at = [0.0] * n_workers
timeline = []
for task_id, cost in enumerate(costs):
    worker = task_id % n_workers
    timeline.append({"id": task_id, "worker": worker, "start": free_at[worker],
                     "end": free_at[worker] + cost})
    free_at[worker] += cost
return timeline
""",
        "ties go to the highest worker number": """
free_at = [0.0] * n_workers
timeline = []
for task_id, cost in enumerate(costs):
    worker = min(range(n_workers), key=lambda w: (free_at[w], -w))
    timeline.append({"id": task_id, "worker": worker, "start": free_at[worker],
                     "end": free_at[worker] + cost})
    free_at[worker] += cost
return timeline
""",
        "worker with the fewest tasks, not the first free": """
done = [0] * n_workers
free_at = [0.0] * n_workers
timeline = []
for task_id, cost in enumerate(costs):
    worker = min(range(n_workers), key=lambda w: (done[w], w))
    timeline.append({"id": task_id, "worker": worker, "start": free_at[worker],
                     "end": free_at[worker] + cost})
    free_at[worker] += cost
    done[worker] += 1
return timeline
""",
        "end = cost (the start forgotten)": """
free_at = [0.0] * n_workers
timeline = []
for task_id, cost in enumerate(costs):
    worker = min(range(n_workers), key=lambda w: (free_at[w], w))
    timeline.append({"id": task_id, "worker": worker, "start": free_at[worker], "end": cost})
    free_at[worker] += cost
return timeline
""",
    },
    "master": {  # on real ranks, under mpiexec (tfcourse.check); the library's own loop, mutated
        "tasks dealt round-robin, as a static schedule": _master(
            "dest=idle.pop(0)", "dest=1 + task['id'] % (comm.size - 1)"),
        "results awaited in a fixed worker order": _master(
            "wait_for_message(comm, MPI.ANY_SOURCE, RESULT, status)",
            "wait_for_message(comm, min(set(range(1, comm.size)) - set(idle)), RESULT, status)"),
        "dependencies ignored": _master("ready_tasks(tasks, set(outcomes), started)",
                                        "[t for t in tasks if t['id'] not in started]"),
        "a task whose input failed is run anyway": _master(
            "inputs, failure = dependency_inputs(task, outcomes)",
            "inputs, failure = {d: outcomes[d].get('result') for d in task.get('deps', [])}, None"),
    },
    "merge": {
        "no rescale: l and acc simply added": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
return np.maximum(m_a, m_b), l_a + l_b, acc_a + acc_b
""",
        "a's maximum instead of the larger (overflows)": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
m = m_a
scale_a, scale_b = np.exp(m_a - m), np.exp(m_b - m)
return m, scale_a * l_a + scale_b * l_b, scale_a * acc_a + scale_b * acc_b
""",
        "the smaller maximum (overflows)": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
m = np.minimum(m_a, m_b)
scale_a, scale_b = np.exp(m_a - m), np.exp(m_b - m)
return m, scale_a * l_a + scale_b * l_b, scale_a * acc_a + scale_b * acc_b
""",
        "rescaled by exp(m - m_side) (sign inverted)": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
m = np.maximum(m_a, m_b)
scale_a, scale_b = np.exp(m - m_a), np.exp(m - m_b)
return m, scale_a * l_a + scale_b * l_b, scale_a * acc_a + scale_b * acc_b
""",
        "l rescaled but acc not": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
m = np.maximum(m_a, m_b)
scale_a, scale_b = np.exp(m_a - m), np.exp(m_b - m)
return m, scale_a * l_a + scale_b * l_b, acc_a + acc_b
""",
        "returns a's maximum with sums relative to the larger": """
m_a, l_a, acc_a = a
m_b, l_b, acc_b = b
m = np.maximum(m_a, m_b)
scale_a, scale_b = np.exp(m_a - m), np.exp(m_b - m)
return m_a, scale_a * l_a + scale_b * l_b, scale_a * acc_a + scale_b * acc_b
""",
    },
    "predicted_bytes_sent": {  # the experiment: ring attention, L = 48, p = 3; blocks of 4096 bytes
        "the forward pass only": """
return 2 * 2 * 4096
""",
        "the gradients never sent home": """
return (2 * 2 + 4 * 2) * 4096
""",
        "p steps in each pass": """
return (2 * 3 + 4 * 3) * 4096
""",
        "the backward passes only dK and dV": """
return (2 * 2 + 2 * 2 + 2) * 4096
""",
        "4 bytes a value": """
return 14 * 4096 // 2
""",
    },
}
