"""ZeRO stage 3 (Rajbhandari et al. 2020; PyTorch's FSDP, Zhao et al. 2023): the parameters
themselves sharded - `data_parallel --zero 3` runs this step.

Each parameter tensor lives on one owner rank only (the owners of stages 1 and 2), with its
gradient and AdamW state. A step walks the serial model piece by piece - embedding, block i,
head - through the model's own `forward_pass` and `backward_pass`, whose `before(piece)`
callbacks (`zero3_hooks`) do the communication:
- forward: the piece's tensors are broadcast from their owners into the working dict the
  model reads (the layer's "all-gather"); the next piece's broadcasts are already posted
  (non-blocking Ibcast: prefetch), and the previous piece's tensors are dropped;
- backward, walking back: each piece is gathered again, and once its gradients exist
  (`on_grads`) they are reduced, weighted by this rank's share of the batch, to their owners
  (non-blocking Ireduce) and the piece's tensors dropped.
So every rank receives every parameter twice and sends every gradient once a step: 3 Psi where
stages 0-2 move 2 Psi (an all-reduce, or a reduce and a broadcast). Then each owner updates its
tensors, clipped with the norm of the whole gradient.

What the memory shows: between steps a rank keeps 1/p of parameters, gradients and optimiser
state. Within a step, with --recompute full a block's cache holds only its input, so its
gathered weights really are freed between its forward and its backward; without it the caches
keep references to them until the backward, as they must (FSDP frees the storage behind
autograd's back and refills it before the backward, which NumPy arrays cannot do).
"""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import backward_pass, forward_pass, param_shapes, piece_params
from tfcourse.nn.optim import sum_of_squares
from tfcourse.parallel.plans.batches import batch_rows
from tfcourse.parallel.program import State
from tfcourse.train import optimizer_update


class Gather:
    """The working parameter dict of one step, filled piece by piece from the owners."""

    def __init__(self, local: dict, owners: dict, config, comm, log):
        self.local, self.owners, self.comm, self.log = local, owners, comm, log
        self.shapes, self.dtype = param_shapes(config), np.dtype(config.dtype)
        self.pieces = piece_params(config)
        self.order = list(self.pieces)
        self.working: dict[str, np.ndarray] = {}
        self.posted: dict[str, list] = {}

    def post(self, piece: str) -> None:
        """Start broadcasting `piece`'s tensors from their owners (once)."""
        if piece in self.posted:
            return
        requests = []
        for name in self.pieces[piece]:
            owner = self.owners[name]
            buf = (self.local[name].copy() if owner == self.comm.rank
                   else np.empty(self.shapes[name], self.dtype))
            requests.append((self.comm.Ibcast(buf, root=owner), name, buf))
        self.posted[piece] = requests

    def fill(self, piece: str, then: str | None) -> None:
        """Wait for `piece`'s tensors, put them in the working dict, post `then`'s."""
        self.post(piece)
        requests = self.posted.pop(piece)
        with self.log.span("gather", nbytes=sum(buf.nbytes for _, _, buf in requests)):
            MPI.Request.Waitall([request for request, _, _ in requests])
        self.working.update({name: buf for _, name, buf in requests})
        if then is not None:
            self.post(then)

    def drop(self, piece: str) -> None:
        """Take `piece`'s tensors out of the working dict (their memory can go)."""
        for name in self.pieces[piece]:
            self.working.pop(name, None)


def zero3_hooks(gather: Gather):
    """The model walk's `before(piece)` hooks, (forward_hook, backward_hook): the order in which
    ZeRO-3 frees, gathers and prefetches. Going forward, piece k drops piece k - 1, is filled,
    and piece k + 1's broadcasts start; walking back, piece k drops piece k + 1, is filled, and
    piece k - 1's start. So the working dict holds one piece, and one more is on its way."""
    order = gather.order

    def forward_hook(piece: str) -> None:
        k = order.index(piece)
        if k > 0:
            gather.drop(order[k - 1])
        gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)

    def backward_hook(piece: str) -> None:
        k = order.index(piece)
        if k + 1 < len(order):
            gather.drop(order[k + 1])
        gather.fill(piece, order[k - 1] if k > 0 else None)

    return forward_hook, backward_hook


def zero3_step(state: State, x, y, step: int, log, dp):
    """One ZeRO-3 step on the global batch; returns (new state, global loss, owned grads)."""
    comm = dp.comm
    lo, hi = batch_rows(len(x), comm.rank, comm.size)
    weight = (hi - lo) / len(x)
    gather = Gather(state.params, dp.owners, dp.config, comm, log)
    forward_hook, backward_hook = zero3_hooks(gather)
    grads, pending = {}, []  # owned gradients; the previous piece's reductions

    def finish(reductions: list) -> None:  # then their send buffers can go
        with log.span("reduce", nbytes=sum(send.nbytes for *_, send in reductions)):
            MPI.Request.Waitall([request for request, *_ in reductions])
        grads.update({name: total for _, name, total, _ in reductions if total is not None})

    def reduce_to_owners(piece_grads: dict) -> None:
        posted = []
        for name, grad in piece_grads.items():
            send = np.ascontiguousarray(grad) * grad.dtype.type(weight)
            owner = dp.owners[name]
            total = np.empty_like(send) if owner == comm.rank else None
            posted.append((comm.Ireduce(send, total, op=MPI.SUM, root=owner), name, total,
                           send))
        finish(pending)
        pending[:] = posted

    logits, caches = forward_pass(gather.working, x[lo:hi], dp.config,
                                  before=forward_hook)
    local_loss, loss_cache = cross_entropy_forward(logits, y[lo:hi])
    del logits
    backward_pass(cross_entropy_backward(loss_cache), caches, on_grads=reduce_to_owners,
                  before=backward_hook, keep=False)
    gather.drop("embed")
    finish(pending)
    loss = comm.allreduce(local_loss * weight, op=MPI.SUM)
    norm = math.sqrt(comm.allreduce(sum_of_squares(grads), op=MPI.SUM))
    params, opt_state, _ = optimizer_update(state.params, grads, state.opt_state, dp.settings,
                                            step, norm)
    return State(params, opt_state), loss, grads
