"""Classic wrong answers to chapter 6's exercises (see __init__.py)."""
MUTATIONS = {
    "simulate_reduce_scatter": {
        "p steps instead of p - 1": """
for step in range(p):
    messages = []
    for r in range(p):
        lo, hi = bounds[(r - step) % p]
        messages.append(((r + 1) % p, lo, hi, bufs[r][lo:hi].copy()))
    for dest, lo, hi, chunk in messages:
        bufs[dest][lo:hi] += chunk
""",
        "sends to the left neighbour": """
for step in range(p - 1):
    messages = []
    for r in range(p):
        lo, hi = bounds[(r - step) % p]
        messages.append(((r - 1) % p, lo, hi, bufs[r][lo:hi].copy()))
    for dest, lo, hi, chunk in messages:
        bufs[dest][lo:hi] += chunk
""",
        "received chunk copied instead of added (all-gather's step)": """
for step in range(p - 1):
    messages = []
    for r in range(p):
        lo, hi = bounds[(r - step) % p]
        messages.append(((r + 1) % p, lo, hi, bufs[r][lo:hi].copy()))
    for dest, lo, hi, chunk in messages:
        bufs[dest][lo:hi] = chunk
""",
        "sends chunk (r + s) instead of (r - s)": """
for step in range(p - 1):
    messages = []
    for r in range(p):
        lo, hi = bounds[(r + step) % p]
        messages.append(((r + 1) % p, lo, hi, bufs[r][lo:hi].copy()))
    for dest, lo, hi, chunk in messages:
        bufs[dest][lo:hi] += chunk
""",
    },
    "ring_reduce_scatter": {  # on real ranks, under mpiexec (tfcourse.check)
        "p steps instead of p - 1": """
right, left = (r + 1) % p, (r - 1) % p
incoming = np.empty(max(hi - lo for lo, hi in bounds), dtype=buf.dtype)
for step in range(p):
    send_lo, send_hi = bounds[(r - step) % p]
    recv_lo, recv_hi = bounds[(r - step - 1) % p]
    chunk = incoming[: recv_hi - recv_lo]
    comm.Sendrecv(buf[send_lo:send_hi], dest=right, recvbuf=chunk, source=left)
    buf[recv_lo:recv_hi] += chunk
return bounds[(r + 1) % p]
""",
        "received chunk overwrites instead of adding": """
right, left = (r + 1) % p, (r - 1) % p
for step in range(p - 1):
    send_lo, send_hi = bounds[(r - step) % p]
    recv_lo, recv_hi = bounds[(r - step - 1) % p]
    comm.Sendrecv(buf[send_lo:send_hi].copy(), dest=right, recvbuf=buf[recv_lo:recv_hi],
                  source=left)
return bounds[(r + 1) % p]
""",
        "returns the chunk it sent first": """
right, left = (r + 1) % p, (r - 1) % p
incoming = np.empty(max(hi - lo for lo, hi in bounds), dtype=buf.dtype)
for step in range(p - 1):
    send_lo, send_hi = bounds[(r - step) % p]
    recv_lo, recv_hi = bounds[(r - step - 1) % p]
    chunk = incoming[: recv_hi - recv_lo]
    comm.Sendrecv(buf[send_lo:send_hi], dest=right, recvbuf=chunk, source=left)
    buf[recv_lo:recv_hi] += chunk
return bounds[r]
""",
    },
    "ring_all_gather": {
        "one step short": """
right, left = (r + 1) % p, (r - 1) % p
for step in range(p - 2):
    send_lo, send_hi = bounds[(r + 1 - step) % p]
    recv_lo, recv_hi = bounds[(r - step) % p]
    comm.Sendrecv(buf[send_lo:send_hi], dest=right, recvbuf=buf[recv_lo:recv_hi], source=left)
""",
        "forwards every chunk to everyone (p - 1 messages per step)": """
for step in range(p - 1):
    for other in range(p):
        if other != r:
            lo, hi = bounds[(r + 1) % p]
            comm.Sendrecv(buf[lo:hi].copy(), dest=other, recvbuf=np.empty(hi - lo, buf.dtype),
                          source=other)
""",
    },
    "average_gradients": {
        "plain mean over ranks (ignores uneven slices)": """
return {name: sum(g[name] for g in grads) / len(grads) for name in grads[0]}
""",
        "sum over ranks (no averaging)": """
return {name: sum(g[name] for g in grads) for name in grads[0]}
""",
        "weighted by n_r, then divided by the number of ranks": """
return {name: sum(g[name] * n for g, n in zip(grads, sizes)) / len(grads) for name in grads[0]}
""",
    },
    "assign_owners": {
        "contiguous blocks of names, same count per rank": """
names = list(sizes)
return {name: i * world_size // len(names) for i, name in enumerate(names)}
""",
        "round-robin over the largest-first order": """
order = sorted(sizes, key=lambda n: -sizes[n])
return {name: i % world_size for i, name in enumerate(order)}
""",
        "least loaded rank, but in the dict's order (not largest first)": """
load = [0] * world_size
owners = {}
for name in sizes:
    rank = int(np.argmin(load))
    owners[name] = rank
    load[rank] += sizes[name]
return owners
""",
        "balances the number of tensors, not their sizes": """
count = [0] * world_size
owners = {}
for name in sorted(sizes, key=lambda n: -sizes[n]):
    rank = int(np.argmin(count))
    owners[name] = rank
    count[rank] += 1
return owners
""",
    },
    "broadcast_from_owners": {  # on real ranks, under mpiexec (tfcourse.check)
        "every tensor from rank 0": """
updated = {}
for name, value in params.items():
    buf = np.array(value, copy=True)
    comm.Bcast(buf, root=0)
    updated[name] = buf
return updated
""",
        "broadcast into the caller's arrays": """
updated = {}
for name, value in params.items():
    buf = np.ascontiguousarray(value)
    comm.Bcast(buf, root=owners[name])
    updated[name] = buf
return updated
""",
        "all-reduce (sum) as for gradients": """
updated = {}
for name, value in params.items():
    buf = np.empty_like(value)
    comm.Allreduce(np.ascontiguousarray(value), buf)
    updated[name] = buf
return updated
""",
    },
    "predicted_zero_fractions": {  # the experiment: a rank's state under ZeRO-1, -2 on 3 ranks
        "everything divided by p": """
return 1 / 3, 1 / 3
""",
        "no saving: ZeRO only moves the work": """
return 1.0, 1.0
""",
        "stages off by one: ZeRO-1 shards the gradients too": """
return (1 + (1 + 2) / 3) / 4, 1 / 3
""",
        "AdamW keeps one moment (3 values per parameter)": """
return (1 + 1 + 1 / 3) / 3, (1 + 2 / 3) / 3
""",
    },
}
