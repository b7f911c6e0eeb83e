"""The learner program's check of a learner's `ulysses_attention(comm)` (chapter 10,
DeepSpeed-Ulysses): the AttentionKernel that context parallelism's model runs between
attention's projections, rank r holding positions [r T/p, (r + 1) T/p) of every sequence.

Every rank draws the same whole-sequence q, k, v and output gradient (B, H, T, d_head), keeps
its slice of the positions (plans.batches.chunk_bounds) and runs the learner's forward (mask
"causal") and backward; its out, dq, dk and dv must be the serial attention's over the whole
sequence, restricted to its slice. Cases: one head per rank (H = p), two per rank with B = 2,
one position per rank, and two layers - both forwards, then the backwards in reverse order, as
the model runs them (a kernel that keeps its cache instead of returning it fails there). All
passes run on every rank before anything is judged, so a rank whose output is wrong does not
leave the others waiting in an all-to-all. What differs is named with a likely cause (see
learner_cases): an output of the wrong split, attention over the rank's own slice only, heads
that come back in each other's places, a backward without the causal mask; otherwise the
first place that differs.
"""

from __future__ import annotations

import numpy as np

from tfcourse.nn.attention import local_attention_backward, local_attention_forward
from tfcourse.parallel.plans.batches import chunk_bounds

TOL = 1e-12


def cases(p: int) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(name, (B, H, T, d_head), layers) with p dividing H and T."""
    return [("one head per rank", (1, p, 2 * p, 3), 1),
            ("two heads per rank, B=2", (2, 2 * p, 3 * p, 4), 1),
            ("one position per rank", (2, p, p, 2), 1),
            ("two layers", (2, 2 * p, 2 * p, 3), 2)]


def close(got, want) -> bool:
    return got.shape == want.shape and np.allclose(got, want, rtol=TOL, atol=TOL)


def where(got: np.ndarray, want: np.ndarray, lo: int) -> str:
    """The largest difference and its first place, positions counted in the whole sequence."""
    error = np.abs(got - want)
    b, h, t, _ = np.unravel_index(int(np.argmax(error > TOL * (1 + np.abs(want)))), got.shape)
    return (f"max error {error.max():.3g}, first at sequence {b}, head {h}, position "
            f"{lo + t}")


def moved_heads(got: np.ndarray, want: np.ndarray) -> str | None:
    """'head h holds head g's output' when every head of `got` is another head of `want`."""
    found = []
    for h in range(got.shape[1]):
        match = [g for g in range(want.shape[1]) if close(got[:, h], want[:, g])]
        if not match:
            return None
        found.append(match[0])
    moved = [(h, g) for h, g in enumerate(found) if h != g]
    if not moved:
        return None
    h, g = moved[0]
    return (f"each head's output is right but in another head's place (head {h} holds head "
            f"{g}'s): every head must come back to where it left from")


def out_problem(got, want, own_slice, lo: int) -> str:
    """What is wrong with an output of the right shape that differs."""
    if close(got, own_slice):
        return ("out is causal attention over this rank's own positions only: a query must "
                "also see the keys and values of the earlier positions the other ranks hold")
    return moved_heads(got, want) or (
        f"out differs from causal attention over the whole sequence ({where(got, want, lo)}): "
        f"does each rank attend over the whole sequence, with the slices in position order "
        f"(rank s holds positions s T/p to (s + 1) T/p)?")


TRANSPOSE = ("the backward is the forward's transpose - the output gradient to the split the "
             "forward attended in, the gradients back to the slices")
STATE = ("one layer alone passed, but the model runs every layer's forward before the "
         "backwards: does backward use nothing but the cache it is given?")


def grad_problem(name: str, got, want, unmasked, own_slice, lo: int, hint: str) -> str:
    """What is wrong with a gradient of the right shape that differs."""
    if close(got, own_slice):
        return (f"{name} is the gradient of attention over this rank's own positions only: "
                f"the queries the other ranks hold see this slice too, and add to it")
    if close(got, unmasked):
        return (f"the forward is right, but {name} is the gradient of attention without the "
                f"causal mask: the backward must mask the scores as the forward did")
    return moved_heads(got, want) or (
        f"{name} differs from the gradient of causal attention over the whole sequence "
        f"({where(got, want, lo)}): {hint}")


def split(what: str, got, want) -> str | None:
    """A message when `got` is not an array of `want`'s shape (B, H, T/p, d_head)."""
    shape = np.shape(got)
    if shape == want.shape:
        return None
    return (f"{what} has shape {shape}, expected {want.shape} = (B, H, T/p, d_head), this "
            f"rank's slice of the positions for every head: did it go back to the sequence "
            f"split?")


def judge(out, grads, whole, lo: int, hi: int, hint: str = TRANSPOSE) -> str | None:
    """This rank's out and (dq, dk, dv) against the serial attention over `whole` (q, k, v,
    dout), restricted to positions [lo, hi); `hint` follows a gradient that differs."""
    q, k, v, dout = whole
    mine = [a[:, :, lo:hi] for a in whole]
    want, want_cache = local_attention_forward(q, k, v, "causal")
    want_grads = [g[:, :, lo:hi] for g in local_attention_backward(dout, want_cache)]
    unmasked = local_attention_backward(dout, local_attention_forward(q, k, v)[1])
    own_slice, own_cache = local_attention_forward(*mine[:3], "causal")
    own_grads = local_attention_backward(mine[3], own_cache)
    want, out = want[:, :, lo:hi], np.asarray(out)
    if problem := split("out", out, want):
        return problem
    if not close(out, want):
        return out_problem(out, want, own_slice, lo)
    if isinstance(grads, Exception):
        raise grads
    if not isinstance(grads, tuple | list) or len(grads) != 3:
        return f"backward returned {type(grads).__name__}, expected the tuple (dq, dk, dv)"
    for name, got, expect, free, own in zip(("dq", "dk", "dv"), grads, want_grads, unmasked,
                                            own_grads, strict=True):
        got = np.asarray(got)
        if problem := split(f"backward's {name}", got, expect):
            return problem
        if not close(got, expect):
            return grad_problem(name, got, expect, free[:, :, lo:hi], own, lo, hint)
    return None


def run_case(kernel, comm, shape, layers: int) -> str | None:
    """`layers` forwards of the learner's kernel on this rank's slice of random cases, then
    their backwards in reverse order (as the model runs them), then the judgement."""
    rng = np.random.default_rng([7, layers, *shape])  # the same sequences on every rank
    wholes = [[rng.standard_normal(shape) for _ in range(4)] for _ in range(layers)]
    lo, hi = chunk_bounds(shape[2], comm.size)[comm.rank]
    forwards = [kernel.forward(*(a[:, :, lo:hi].copy() for a in whole[:3]), "causal")
                for whole in wholes]
    backwards = [None] * layers
    for i in reversed(range(layers)):
        try:  # run on every rank before judging: the others may be waiting in an all-to-all
            backwards[i] = kernel.backward(wholes[i][3][:, :, lo:hi].copy(), forwards[i][1])
        except Exception as err:  # noqa: BLE001 - reported after the forward's own problem
            backwards[i] = err
    for i, (whole, (out, _), grads) in enumerate(zip(wholes, forwards, backwards, strict=True)):
        if problem := judge(out, grads, whole, lo, hi, TRANSPOSE if layers == 1 else STATE):
            return problem if layers == 1 else f"layer {i}: {problem}"
    return None


def check_ulysses_attention(fn, comm):
    """Yields, case by case, this rank's problem (None if the case passed)."""
    kernel = fn(comm)
    for name, shape, layers in cases(comm.size):
        try:
            problem = run_case(kernel, comm, shape, layers)
        except Exception as err:  # noqa: BLE001 - the learner's code failed on this case
            problem = f"raised {type(err).__name__}: {err}"
        yield f"{name} (B, H, T, d_head) = {shape}: {problem}" if problem else None
