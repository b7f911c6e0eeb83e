"""Classic wrong answers to chapter 7's exercises (see __init__.py)."""
MUTATIONS = {
    "row_parallel_forward": {
        "bias added on every rank": """
return sum(x @ w + b for x, w in zip(x_parts, w_parts))
""",
        "bias forgotten": """
return sum(x @ w for x, w in zip(x_parts, w_parts))
""",
        "partial products averaged instead of summed": """
return sum(x @ w for x, w in zip(x_parts, w_parts)) / len(w_parts) + b
""",
    },
    "row_parallel_backward": {
        "dX divided by the number of ranks": """
dy_2d = dy.reshape(-1, dy.shape[-1])
dx_parts = [dy @ w.T / len(w_parts) for w in w_parts]
dw_parts = [x.reshape(-1, x.shape[-1]).T @ dy_2d for x in x_parts]
return dx_parts, dw_parts, dy_2d.sum(axis=0)
""",
        "bias gradient averaged over the batch": """
dy_2d = dy.reshape(-1, dy.shape[-1])
dx_parts = [dy @ w.T for w in w_parts]
dw_parts = [x.reshape(-1, x.shape[-1]).T @ dy_2d for x in x_parts]
return dx_parts, dw_parts, dy_2d.mean(axis=0)
""",
        "bias gradient counted once per rank": """
dy_2d = dy.reshape(-1, dy.shape[-1])
dx_parts = [dy @ w.T for w in w_parts]
dw_parts = [x.reshape(-1, x.shape[-1]).T @ dy_2d for x in x_parts]
return dx_parts, dw_parts, len(w_parts) * dy_2d.sum(axis=0)
""",
        "dW from the first batch element only": """
dy_2d = dy.reshape(-1, dy.shape[-1])
dx_parts = [dy @ w.T for w in w_parts]
dw_parts = [x[0].T @ dy[0] for x in x_parts]
return dx_parts, dw_parts, dy_2d.sum(axis=0)
""",
    },
    "g_forward": {
        "no all-reduce: each rank keeps its partial": """
return [p.copy() for p in partials]
""",
        "all-reduce mean instead of sum": """
mean = sum(partials) / len(partials)
return [mean.copy() for _ in partials]
""",
        "one array instead of one per rank": """
return sum(partials)
""",
    },
    "g_backward": {
        "all-reduce sum (f's backward)": """
total = sum(douts)
return [total.copy() for _ in douts]
""",
        "all-reduce mean": """
mean = sum(douts) / len(douts)
return [mean.copy() for _ in douts]
""",
        "each rank's share: divided by the number of ranks": """
return [d / len(douts) for d in douts]
""",
        "every rank takes rank 0's gradient (a broadcast)": """
return [douts[0].copy() for _ in douts]
""",
    },
    "megatron_ops": {  # on real ranks, under mpiexec (tfcourse.check)
        "f's backward averages over the ranks": """
def summed(x):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out)
    return out

def averaged(x):
    return summed(x) / comm.size

return SublayerOps(enter=Operator(backward=averaged), exit=Operator(forward=summed))
""",
        "f and g swapped": """
def summed(x):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out)
    return out

return SublayerOps(enter=Operator(forward=summed), exit=Operator(backward=summed))
""",
        "no all-reduce in f's backward": """
def summed(x):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out)
    return out

return SublayerOps(enter=Operator(), exit=Operator(forward=summed))
""",
        "all-reduce in g's backward too": """
def summed(x):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out)
    return out

return SublayerOps(enter=Operator(backward=summed), exit=Operator(forward=summed,
                                                                   backward=summed))
""",
    },
    "gpipe_schedule": {
        "each micro-batch's backward right after its forward": """
return [op for i in range(m) for op in (("F", i), ("B", i))]
""",
        "stages disagree on the order of the backwards": """
backwards = range(m) if stage % 2 else reversed(range(m))
return [("F", i) for i in range(m)] + [("B", i) for i in backwards]
""",
        "1F1B instead of a flush": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
return ops + [("B", i) for i in range(m - warmup, m)]
""",
        "backwards before forwards (deadlocks)": """
return [("B", i) for i in reversed(range(m))] + [("F", i) for i in range(m)]
""",
        "last micro-batch forgotten": """
return [("F", i) for i in range(m - 1)] + [("B", i) for i in reversed(range(m - 1))]
""",
    },
    "predicted_peaks": {  # the experiment: micro-batches in flight per stage, p = 3
        "1F1B keeps one micro-batch at a time": """
return [6, 6, 6], [1, 1, 1], [1, 1, 1]
""",
        "1F1B keeps p on every stage": """
return [6, 6, 6], [3, 3, 3], [3, 3, 3]
""",
        "stages reversed: the last stage holds the most": """
return [6, 6, 6], [1, 2, 3], [1, 2, 2]
""",
        "m < p ignored": """
return [6, 6, 6], [3, 2, 1], [3, 2, 1]
""",
        "GPipe frees as it goes (m - s)": """
return [6, 5, 4], [3, 2, 1], [2, 2, 1]
""",
    },
    "schedule_1f1b": {  # run under mpiexec by tfcourse.check
        "warm-up of p - s forwards": """
warmup = min(p - stage, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
return ops + [("B", i) for i in range(m - warmup, m)]
""",
        "GPipe's order (no interleaving)": """
return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
""",
        "backward before the forward in the steady state": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("B", i), ("F", warmup + i)]
return ops + [("B", i) for i in range(m - warmup, m)]
""",
    },
    "schedule_zb_h1": {  # run under mpiexec by tfcourse.check
        "W right after its own B (1F1B with a split backward)": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = 0
with_w = []
for kind, i in ops:
    with_w.append((kind, i))
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
return with_w + [("W", i) for i in range(max(m - late, 0), m)]
""",
        "every W at the end": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = m
with_w = []
for kind, i in ops:
    with_w.append((kind, i))
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
return with_w + [("W", i) for i in range(max(m - late, 0), m)]
""",
        "W before its B": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = stage
with_w = []
for kind, i in ops:
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
    with_w.append((kind, i))
return with_w + [("W", i) for i in range(max(m - late, 0), m)]
""",
        "leftover W's forgotten": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = stage
with_w = []
for kind, i in ops:
    with_w.append((kind, i))
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
return with_w
""",
        "a W twice": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = stage
with_w = []
for kind, i in ops:
    with_w.append((kind, i))
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
return with_w + [("W", i) for i in range(m)]
""",
        "W late by p - stage - 1 (the wrong direction)": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
late = p - stage - 1
with_w = []
for kind, i in ops:
    with_w.append((kind, i))
    if kind == "B" and i >= late:
        with_w.append(("W", i - late))
return with_w + [("W", i) for i in range(max(m - late, 0), m)]
""",
        "whole backwards, no W (that is 1F1B)": """
warmup = min(p - stage - 1, m)
ops = [("F", i) for i in range(warmup)]
for i in range(m - warmup):
    ops += [("F", warmup + i), ("B", i)]
ops += [("B", i) for i in range(m - warmup, m)]
return ops
""",
    },
}
