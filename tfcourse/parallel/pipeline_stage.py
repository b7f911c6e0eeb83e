"""One pipeline stage (chapter 7): its part of the model's forward and backward walks, and the
executor that runs a schedule - a list of ("F" | "B", micro-batch) operations from
tfcourse.parallel.plans.pipeline - with point-to-point messages between the stages.
`pipeline_parallel` runs it over the stages, `hybrid` inside each replica (with tensor and
sequence parallelism splitting each stage: 3D).

Sends are non-blocking (`Isend`, completed at the end of the step), receives blocking
(`Recv`); see pipeline_parallel's docstring for why a blocking Send deadlocks 1F1B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import numpy as np
from mpi4py import MPI

from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import (
    SERIAL,
    SublayerOps,
    backward_input_pass,
    backward_pass,
    embed_backward,
    embed_forward,
    forward_pass,
    weight_pass,
)
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import chunk_bounds
from tfcourse.parallel.plans.pipeline import (
    chunk_layers,
    message_tag,
    microbatch_rows,
    op_chunk,
    stage_layers,
    stage_param_names,
)
from tfcourse.parallel.plans.tensor import squares_counted_once
from tfcourse.parallel.program import State
from tfcourse.train import TrainSettings, optimizer_update

# --------------------------------------------------------------------------- a stage


@dataclasses.dataclass(frozen=True)
class Stage:
    """Which part of the model this rank runs (its parameters are in the State)."""

    index: int
    world_size: int
    layers: tuple[int, int]  # blocks [lo, hi)
    slowdown: float = 1.0  # > 1 simulates a slower device: compute is stretched by sleeping
    slices: int = 1  # sequence parallelism (3D, chapter 9): this rank runs slice `slice` of
    slice: int = 0  # `slices` of every sequence, and sends only that slice to the next stage
    chunks: tuple = ()  # interleaved: the blocks [lo, hi) of each of this rank's chunks

    def positions(self, length: int) -> tuple[int, int]:
        return chunk_bounds(length, self.slices)[self.slice]

    def blocks(self, chunk: int) -> tuple[int, int]:
        return self.chunks[chunk] if self.chunks else self.layers

    def embeds(self, chunk: int) -> bool:  # virtual stage 0 of p v
        return self.first and chunk == 0

    def ends(self, chunk: int) -> bool:  # the last virtual stage: the head and the loss
        return self.last and chunk == max(len(self.chunks), 1) - 1

    def upstream(self, chunk: int) -> tuple[int, int]:
        """(rank, chunk) of the virtual stage before this chunk's: its forward feeds ours."""
        return (self.index - 1, chunk) if not self.first else (self.world_size - 1, chunk - 1)

    def downstream(self, chunk: int) -> tuple[int, int]:
        return (self.index + 1, chunk) if not self.last else (0, chunk + 1)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world_size - 1


def start(config, comm, layer_counts: list[int] | None = None, slowdown: float = 1.0,
          v: int = 1) -> tuple[Stage, placement.Placement]:
    """This rank's stage and where its parameters sit among the serial model's (a contiguous
    part of them; `layer_counts`: blocks per stage, default as even as possible; v > 1: v
    interleaved chunks, plans.pipeline.chunk_layers)."""
    names = stage_param_names(config, comm.size, comm.rank, layer_counts, v)
    if v > 1:
        chunks = tuple(chunk_layers(config.n_layers, comm.size, v)[comm.rank])
        return (Stage(comm.rank, comm.size, chunks[0], slowdown, chunks=chunks),
                placement.stage(names))
    layers = stage_layers(config.n_layers, comm.size, layer_counts)[comm.rank]
    return Stage(comm.rank, comm.size, layers, slowdown), placement.stage(names)


@contextlib.contextmanager
def slower_device(stage: Stage):
    """Make the compute in the `with` body last `stage.slowdown` times as long, by sleeping -
    a device 1/slowdown as fast, without burning a shared core."""
    started = time.perf_counter()
    yield
    if stage.slowdown > 1.0:
        time.sleep((stage.slowdown - 1.0) * (time.perf_counter() - started))


def stage_forward(stage: Stage, params: dict, x, config, tokens, targets, weight: float,
                  ops: SublayerOps = SERIAL, chunk: int = 0):
    """This stage's part (its `chunk`) of the forward pass; returns (output or weighted loss,
    cache).
    ops: the sublayers' operators (tensor parallelism's f and g when the stage is split;
    with sequence parallelism its all-gather and reduce-scatter, and then stage 0 embeds the
    whole sequence - the tables are replicated - and keeps its slice, whose gradient the
    embedding's backward gathers whole again, as tensor_parallel.sp_loss_and_grads does)."""
    lo, hi = stage.positions(tokens.shape[1])
    first, last = stage.embeds(chunk), stage.ends(chunk)
    inputs, embed = (tokens, True) if first else (x, False)
    if first and stage.slices > 1:
        embedded, embed_cache = embed_forward(params, tokens, config)
        inputs, embed = embedded[:, lo:hi], False
    out, caches = forward_pass(params, inputs, config, ops=ops, layers=stage.blocks(chunk),
                               embed=embed, head=last)
    if first and stage.slices > 1:
        caches.insert(0, (functools.partial(gathered_embed_backward, ops), embed_cache, "embed"))
    if not last:
        return np.ascontiguousarray(out), caches
    loss, loss_cache = cross_entropy_forward(out, targets[:, lo:hi])
    weight /= stage.slices  # each slice's mean loss, averaged over the slices
    return loss * weight, (caches, loss_cache, weight)


def gathered_embed_backward(ops: SublayerOps, dx, cache):
    """The embedding's backward from this rank's slice of the gradient, gathered whole."""
    return embed_backward(ops.enter.forward(dx), cache)


def stage_backward(stage: Stage, dy, cache, grads: dict, chunk: int = 0,
                   deferred: list | None = None):
    """This stage's part (its `chunk`) of the backward pass: adds into `grads`, returns the
    input gradient to send to the previous virtual stage (None on the first). With a
    `deferred` list (zero-bubble schedules) only B runs - the input gradient - and W's work
    is appended to it for `stage_weights` later."""
    if stage.ends(chunk):
        cache, loss_cache, weight = cache
        dy = cross_entropy_backward(loss_cache, weight)
    if deferred is None:
        dx, piece_grads = backward_pass(dy, cache)
        add_into(grads, piece_grads)
    else:
        dx, work = backward_input_pass(dy, cache)
        deferred.extend(work)
    return None if stage.embeds(chunk) else np.ascontiguousarray(dx)


def stage_weights(deferred: list, grads: dict) -> None:
    """W: the weight gradients B left in `deferred`, added into `grads`."""
    add_into(grads, weight_pass(deferred))


def add_into(grads: dict, piece_grads: dict) -> None:
    for name, g in piece_grads.items():
        grads[name] += g


# --------------------------------------------------------------------------- the executor


def receive(shape, dtype, source: int, tag: int, microbatch: int, comm, log):
    """Receive one activation (or gradient) array. The time until the message is there
    (Probe) is logged as "wait" - the pipeline bubble as this rank sees it - and the copy
    itself as "recv"."""
    with log.span("wait", microbatch):
        comm.Probe(source=source, tag=tag)
    buf = np.empty(shape, dtype=dtype)
    with log.span("recv", microbatch):
        comm.Recv(buf, source=source, tag=tag)
    return buf


def run_schedule(stage: Stage, params: dict, ops, tokens, targets, config, comm, log,
                 sublayer_ops: SublayerOps = SERIAL):
    """Run one step's operations in the order `ops` (plans.pipeline.schedule's); returns
    (weighted loss of this stage's micro-batches (0.0 except on the last stage), gradients,
    peak of micro-batches - (micro-batch, chunk) pairs when interleaved - whose activations
    were kept at once). With W operations a "B" runs only the input gradient and "W" the
    weight gradients later. comm: the stages' communicator (its rank is the stage);
    sublayer_ops: see stage_forward."""
    rows = microbatch_rows(len(tokens), len({op[1] for op in ops if op[0] == "F"}))
    dtype = np.dtype(config.dtype)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    split = any(op[0] == "W" for op in ops)
    caches, deferred, pending, loss, peak = {}, {}, [], 0.0, 0

    def send(buf, to: tuple[int, int], kind: str, mb: int) -> None:  # completed at the end
        with log.span("send", mb, nbytes=buf.nbytes):
            pending.append((comm.Isend(buf, dest=to[0], tag=message_tag(kind, mb, to[1])), buf))

    for op in ops:
        kind, mb, chunk = op[0], op[1], op_chunk(op)
        # forget sends that have completed (this also lets MPI progress the others)
        pending[:] = [(request, buf) for request, buf in pending if not request.Test()]
        lo, hi = rows[mb]
        first, last = stage.positions(tokens.shape[1])  # all of them without SP
        shape = (hi - lo, last - first, config.d_model)
        if kind == "F":
            x = None if stage.embeds(chunk) else receive(
                shape, dtype, stage.upstream(chunk)[0], message_tag("F", mb, chunk), mb, comm,
                log)
            with log.span("forward", mb), slower_device(stage):
                out, caches[mb, chunk] = stage_forward(stage, params, x, config, tokens[lo:hi],
                                                       targets[lo:hi], (hi - lo) / len(tokens),
                                                       sublayer_ops, chunk)
            peak = max(peak, len(caches) + len(deferred))
            if stage.ends(chunk):
                loss += out
            else:
                send(out, stage.downstream(chunk), "F", mb)
        elif kind == "B":
            dy = None if stage.ends(chunk) else receive(
                shape, dtype, stage.downstream(chunk)[0], message_tag("B", mb, chunk), mb,
                comm, log)
            work = deferred.setdefault((mb, chunk), []) if split else None
            with log.span("backward", mb), slower_device(stage):
                dx = stage_backward(stage, dy, caches.pop((mb, chunk)), grads, chunk, work)
            if not stage.embeds(chunk):
                send(dx, stage.upstream(chunk), "B", mb)
        else:  # "W": the weight gradients this micro-batch's B left
            with log.span("weight", mb), slower_device(stage):
                stage_weights(deferred.pop((mb, chunk)), grads)
    if pending:  # the buffers must stay alive until MPI has sent them
        with log.span("send"):  # microbatch None: waiting for all outstanding sends
            MPI.Request.Waitall([request for request, _ in pending])
    return loss, grads, peak


def finish_step(state: State, loss: float, grads: dict, step: int, settings: TrainSettings,
                comm, log, tp_rank: int = 0, update=optimizer_update) -> tuple[State, float]:
    """After the schedule: the global gradient norm (every stage holds different parameters,
    so their squares add up), the optimiser update of this stage's parameters, and the loss
    (known on the last stage) sent to every rank; returns (new state, loss). comm: all the
    ranks of the model - with tensor-parallel stages (3D), every stage's group, ordered stage
    by stage, and tp_rank this rank's place in its group. update: train.optimizer_update, or
    with ZeRO-1 over replicas (hybrid) data_parallel.owner_update bound to its owners."""
    with log.span("sync"):
        comm.Barrier()  # the other stages are still draining the pipeline
    with log.span("allreduce"):
        norm = math.sqrt(comm.allreduce(squares_counted_once(grads, tp_rank), op=MPI.SUM))
        loss = comm.bcast(loss, root=comm.size - 1)
    params, opt_state, _ = update(state.params, grads, state.opt_state, settings, step, norm)
    return State(params, opt_state), loss
