"""What the learner program (tfcourse.parallel.learner) compares, function by function: each
check runs the learner's function and the library's on the same inputs on every rank and yields,
case by case, this rank's problem (None when the case passed). Messages point at the likely
cause without giving the answer away (issue 18).
"""

from __future__ import annotations

import numpy as np

from tfcourse.parallel import comm as collectives
from tfcourse.parallel.learner_master import check_master
from tfcourse.parallel.learner_schedules import check_schedule_1f1b, check_schedule_zb_h1
from tfcourse.parallel.learner_ulysses import check_ulysses_attention
from tfcourse.parallel.learner_zero3 import check_zero3_hooks
from tfcourse.parallel.plans.batches import chunk_bounds

LENGTHS = (1, 2, 3, 7, 1001)


class CountingComm:
    """A communicator that counts the point-to-point messages this rank sends (and their
    bytes) and passes everything to the real one."""

    SENDS = ("Send", "Isend", "Sendrecv", "Ssend", "send", "isend", "sendrecv", "ssend")

    def __init__(self, comm):
        self._comm, self.messages, self.bytes = comm, 0, 0

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in self.SENDS:
            return attribute

        def counted(buf, *args, **kwargs):
            self.messages += 1
            self.bytes += int(getattr(buf, "nbytes", 0))
            return attribute(buf, *args, **kwargs)
        return counted


def _data(comm, n: int, dtype) -> np.ndarray:
    rng = np.random.default_rng([comm.rank, n])
    return (rng.standard_normal(n) * 100).astype(dtype)


def _differs(got: np.ndarray, want: np.ndarray) -> str | None:
    """Where `got` first differs from `want`, or None."""
    close = (got == want) if got.dtype.kind in "iu" else np.isclose(got, want, rtol=1e-12,
                                                                     atol=1e-9)
    if close.all():
        return None
    i = int(np.argmin(close))
    return f"element {i}: expected {want[i].item()!r}, got {got[i].item()!r}"


def _messages(counter: CountingComm, p: int) -> str | None:
    if counter.messages != p - 1:
        return (f"sent {counter.messages} messages, expected p - 1 = {p - 1} (one per ring "
                f"step): how many steps does a ring of p ranks need?")
    return None


def check_ring_reduce_scatter(fn, comm):
    """Yields, case by case, this rank's problem (None if the case passed)."""
    p, r = comm.size, comm.rank
    for n in LENGTHS:
        for dtype in (np.int64, np.float64):
            data = _data(comm, n, dtype)
            want = data.copy()
            want_bounds = collectives.ring_reduce_scatter(want, comm)
            got, counter = data.copy(), CountingComm(comm)
            got_bounds = fn(got, counter)
            owned = chunk_bounds(n, p)[(r + 1) % p]
            where = f"n={n} {np.dtype(dtype).name}"
            lo, hi = owned
            if tuple(got_bounds) != tuple(want_bounds):
                yield f"{where}: returned bounds {tuple(got_bounds)}, expected {owned}"
            elif problem := _differs(got[lo:hi], want[lo:hi]):
                yield f"{where}: the owned chunk {(r + 1) % p} ({lo}:{hi}) is wrong at {problem}"
            elif problem := _messages(counter, p):
                yield f"{where}: {problem}"
            elif problem := _differs(got, want):
                yield (f"{where}: a chunk this rank does not own differs from the library's "
                       f"ring ({problem}): every step must add exactly one received chunk")
            else:
                yield None


def check_ring_all_gather(fn, comm):
    """Yields, case by case, this rank's problem (None if the case passed)."""
    p, r = comm.size, comm.rank
    for n in LENGTHS:
        for dtype in (np.int64, np.float64):
            full = np.arange(n, dtype=dtype) * 3 + 1  # what every rank must end with
            lo, hi = chunk_bounds(n, p)[(r + 1) % p]
            got = np.full(n, -7, dtype=dtype)
            got[lo:hi] = full[lo:hi]  # each rank starts owning chunk (rank + 1) % p
            counter = CountingComm(comm)
            fn(got, counter)
            problem = _differs(got, full) or _messages(counter, p)
            yield f"n={n} {np.dtype(dtype).name}: {problem}" if problem else None


def check_merge_partials(fn, comm):
    """The online-softmax merge of ring attention (chapter 8): partial results (m, l, acc) of
    random score blocks - maxima far apart both ways (exp underflows unless rescaled to the
    larger one), and a side with no keys yet (m = -inf) - against the library's merge."""
    from tfcourse.nn.attention import merge_partials, partial_softmax

    rng = np.random.default_rng(comm.rank)
    for gap in (0.0, 5.0, -800.0, 800.0, None):
        q, k1, k2, v1, v2 = (rng.standard_normal((2, 3, 4, 5)) for _ in range(5))
        a = partial_softmax(q @ np.swapaxes(k1, -1, -2), v1)
        b = partial_softmax(q @ np.swapaxes(k2, -1, -2) + (gap or 0.0), v2)
        if gap is None:  # nothing seen yet on one side
            a = (np.full_like(a[0], -np.inf), np.zeros_like(a[1]), np.zeros_like(a[2]))
        want, got = merge_partials(a, b), fn(a, b)
        case = "one side empty" if gap is None else f"maxima {gap:+g} apart"
        problem = None
        for part, w, g in zip(("m", "l", "acc"), want, got, strict=True):
            if np.shape(g) != np.shape(w) or not np.allclose(g, w, rtol=1e-12, atol=0):
                first = float(np.ravel(g)[0]), float(np.ravel(w)[0])
                problem = (f"{case}: {part} differs from the exact merge (first value "
                           f"{first[0]!r} instead of {first[1]!r}): rescale both sides to the "
                           f"larger maximum")
                break
        yield problem


def check_broadcast_from_owners(fn, comm):
    """ZeRO's parameter update: each owner's updated tensors reach every rank. Every rank
    starts with different values; afterwards every tensor must hold its owner's, and the
    caller's dict must be left as it was."""
    from tfcourse.parallel.plans.batches import partition_params

    shapes = {"w": (3, 4), "b": (4,), "emb": (5, 2), "ln": (2,)}
    for world_sized in (False, True):
        owners = partition_params({n: int(np.prod(s)) for n, s in shapes.items()}, comm.size)
        if world_sized:  # more tensors than ranks, and one rank owning nothing
            owners = {n: (i * 3) % comm.size for i, n in enumerate(shapes)}
        mine = {n: np.full(s, 10.0 * comm.rank + i) for i, (n, s) in enumerate(shapes.items())}
        before = {n: a.copy() for n, a in mine.items()}
        got = fn(mine, owners, comm)
        problem = None
        for i, name in enumerate(shapes):
            want = 10.0 * owners[name] + i
            if name not in got or not np.array_equal(got[name], np.full(shapes[name], want)):
                value = got[name].flat[0] if name in got else "nothing"
                problem = (f"{name!r} (owner rank {owners[name]}): expected the owner's value "
                           f"{want}, got {value}: did the owner send it to every rank?")
                break
            if not np.array_equal(mine[name], before[name]):
                problem = f"{name!r}: the caller's dict was changed in place; return a new dict"
                break
        yield problem


def check_megatron_ops(fn, comm):
    """Megatron's f and g (chapter 7): `fn(comm)` returns the model's SublayerOps. Each rank
    holds different arrays; f must pass its input on unchanged and sum the gradients over the
    ranks, g must sum the partial outputs and pass the gradient on unchanged."""
    ops = fn(comm)
    for shape in ((5,), (2, 3, 4)):
        x = np.random.default_rng([comm.rank, len(shape)]).standard_normal(shape)
        total, mean = comm.allreduce(x), comm.allreduce(x) / comm.size
        cases = (("enter (f) forward", lambda o: o.enter.forward, x,
                  "the replicated input enters every rank's shard as it is"),
                 ("enter (f) backward", lambda o: o.enter.backward, total,
                  "every rank's shard used the same input, so its gradient has a contribution "
                  "from every rank"),
                 ("exit (g) forward", lambda o: o.exit.forward, total,
                  "each rank holds a partial product; the layer's output is all of them "
                  "together"),
                 ("exit (g) backward", lambda o: o.exit.backward, x,
                  "how does a sum change when one of its terms changes?"))
        problem = None
        for what, operator, want, hint in cases:
            got = np.asarray(operator(ops)(x.copy()))
            if got.shape == want.shape and np.allclose(got, want, rtol=1e-12, atol=1e-12):
                continue
            seen = ("the mean over the ranks" if got.shape == x.shape and comm.size > 1
                    and np.allclose(got, mean) else "the sum over the ranks"
                    if got.shape == x.shape and np.allclose(got, total) else
                    "this rank's own array" if got.shape == x.shape and np.allclose(got, x)
                    else f"an array of shape {got.shape}")
            expected = "this rank's own array" if want is x else "the sum over the ranks"
            problem = (f"shape {shape}: {what} returned {seen}, expected {expected}: {hint}")
            break
        yield problem


CHECKS = {"ring_reduce_scatter": check_ring_reduce_scatter,
          "broadcast_from_owners": check_broadcast_from_owners,
          "ring_all_gather": check_ring_all_gather,
          "merge_partials": check_merge_partials,
          "schedule_1f1b": check_schedule_1f1b,
          "schedule_zb_h1": check_schedule_zb_h1,
          "megatron_ops": check_megatron_ops,
          "master": check_master,
          "zero3_hooks": check_zero3_hooks,
          "ulysses_attention": check_ulysses_attention}
