"""Memory of one training step, measured in the process that runs it (chapter 10's anatomy of
memory): NumPy reports every buffer it allocates to Python's `tracemalloc`, so the bytes a
forward pass leaves behind for the backward, and the highest point of the whole step, can be
read exactly - per process, so per MPI rank too - and set against the cost model's formulas.
"""

from __future__ import annotations

import contextlib
import tracemalloc

from tfcourse.nn import model
from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward


def step_memory(params: dict, tokens, targets, config: model.TransformerConfig, rng=None
                ) -> dict[str, int]:
    """One training step of the serial model, traced. Returns bytes:
    "kept" - what the forward pass keeps for the backward (every block's activations, per
    config.recompute, and the loss's cache), measured after the forward;
    "peak" - the step's highest point above where it started (the kept activations plus, at
    that moment, the backward's temporaries and the gradients made so far);
    "grads" - the gradients' bytes, for reference.
    Tracing slows allocation down several times: for measuring, not for training."""
    tokens, targets = model.check_batch(params, tokens, targets, config)
    with traced() as found:
        logits, caches = model.forward_pass(params, tokens, config, rng)
        _, loss_cache = cross_entropy_forward(logits, targets)
        del logits  # the loss keeps what its backward needs
        kept = tracemalloc.get_traced_memory()[0] - found["base"]
        _, grads = model.backward_pass(cross_entropy_backward(loss_cache), caches)
    return {"kept": kept, "peak": found["peak"],
            "grads": sum(int(g.nbytes) for g in grads.values())}


@contextlib.contextmanager
def traced(on: bool = True):
    """With `on`, trace the allocations of the body (starting tracemalloc unless it runs);
    the yielded dict gets "base", the traced bytes at the start, and after the body "peak",
    the highest point above it. Off, it yields an empty dict and measures nothing."""
    found: dict[str, int] = {}
    if not on:
        yield found
        return
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        found["base"] = tracemalloc.get_traced_memory()[0]
        yield found
        found["peak"] = tracemalloc.get_traced_memory()[1] - found["base"]
    finally:
        if not tracing:
            tracemalloc.stop()
