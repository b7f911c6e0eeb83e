"""Chapter 7: tensor parallelism (Megatron-LM, Shoeybi et al. 2019) - split every matrix.

    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.tensor_parallel --config tiny --steps 50

Each rank holds 1/p of every block's weights and computes 1/p of every block:
- attention is split by heads: rank r owns heads [r h/p, (r+1) h/p), i.e. those columns of
  W_q, W_k, W_v ("column-parallel") and the matching rows of W_o ("row-parallel");
- the MLP splits W_1 by columns (so GELU applies locally) and W_2 by rows.
A row-parallel product gives each rank a partial sum of the full output: Megatron's operator
g all-reduces it in the forward pass (identity backward); its conjugate f, applied where the
replicated input enters the split, is the identity forward and all-reduces the input
gradient backward. One all-reduce per sublayer forward, one backward. Embeddings, LayerNorms
and the head are replicated: they see identical inputs, so their gradients agree on every rank
without any communication.

In code, f and g are the serial model's entry and exit operators (`SublayerOps`): the sublayers
are the model's own, run on this rank's shard of the parameter dict, dropout included.

--sequence-parallel (Megatron sequence parallelism, Korthikanti et al. 2022): between the
sublayers the residual stream is split along the sequence too, so the LayerNorms, biases,
dropout and residual adds each run on this rank's T/p positions instead of all T. f becomes an
all-gather along the sequence (its backward a reduce-scatter) and g a reduce-scatter (its
backward an all-gather): the same bytes on the wire as the all-reduce they replace, since an
all-reduce is a reduce-scatter followed by an all-gather. The parameters outside the split
matrices now see different positions on each rank, so their gradients are summed over ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

import numpy as np
from mpi4py import MPI

from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.nn.model import (
    Operator,
    SublayerOps,
    backward_pass,
    embed_backward,
    embed_forward,
    forward_pass,
    init_params,
    loss_and_grads,
)
from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.comm import mpi_allreduce
from tfcourse.parallel.data_parallel import average_gradients
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import chunk_bounds
from tfcourse.parallel.plans.tensor import (
    check_world_size,
    shard_axis,
    squares_counted_once,
    unshard_params,
)
from tfcourse.parallel.program import (
    State,
    add_split_waiting_argument,
    bytes_sent,
    program_parser,
    result_record,
    run_program,
    train,
)
from tfcourse.perf.costmodel import (
    allgather_bytes,
    allreduce_bytes,
    reduce_scatter_bytes,
    tensor_parallel_allreduce_bytes,
    tensor_parallel_bytes_sent,
)
from tfcourse.train import TrainingSetup, TrainSettings, optimizer_update, training_setup

# --------------------------------------------------------------------------- f and g


def megatron_ops(comm, log) -> SublayerOps:
    """Megatron's conjugate operators as the model's entry and exit operators:
    f = identity forward, all-reduce of the input gradient backward (enter);
    g = all-reduce of the partial outputs forward, identity backward (exit)."""
    def allreduce(name: str):
        def summed(x):  # x is a fresh array the sublayer owns: reduce it in place
            flat = np.ascontiguousarray(x).reshape(-1)
            log.collective(name, mpi_allreduce, flat, comm)
            return flat.reshape(x.shape)
        return summed

    f = Operator(backward=allreduce("f backward"))
    g = Operator(forward=allreduce("g forward"))
    return SublayerOps(enter=f, exit=g)


def sequence_ops(comm, log) -> SublayerOps:
    """Megatron's sequence-parallel operators: enter = all-gather of the ranks' slices of the
    sequence (backward: reduce-scatter of the gradient); exit = reduce-scatter of the partial
    outputs, each rank keeping the sum at its own positions (backward: all-gather)."""
    def gather(name: str):
        def gathered(x):  # (B, T/p, d) -> (B, T, d)
            local = np.ascontiguousarray(np.swapaxes(x, 0, 1))  # sequence first: MPI blocks
            full = np.empty((local.shape[0] * comm.size, *local.shape[1:]), local.dtype)
            log.collective(name, lambda buf, c: c.Allgather(buf, full), local, comm,
                           nbytes=full.nbytes)
            return np.ascontiguousarray(np.swapaxes(full, 0, 1))
        return gathered

    def scatter(name: str):
        def scattered(x):  # (B, T, d), a partial sum on every rank -> the sum, (B, T/p, d)
            full = np.ascontiguousarray(np.swapaxes(x, 0, 1))
            local = np.empty((full.shape[0] // comm.size, *full.shape[1:]), full.dtype)
            log.collective(name, lambda buf, c: c.Reduce_scatter_block(buf, local, op=MPI.SUM),
                           full, comm)
            return np.ascontiguousarray(np.swapaxes(local, 0, 1))
        return scattered

    return SublayerOps(enter=Operator(gather("f all-gather"), scatter("f reduce-scatter")),
                       exit=Operator(scatter("g reduce-scatter"), gather("g all-gather")))


def sp_loss_and_grads(params: dict, x, y, config, comm, log) -> tuple[float, dict]:
    """Tensor parallelism with sequence parallelism: every rank embeds the whole sequence
    (the tables are replicated), then the model's own walk runs on its slice of positions
    with `sequence_ops`; the loss is the mean of the ranks' equal slices."""
    p, length = comm.size, x.shape[1]
    lo, hi = chunk_bounds(length, p)[comm.rank]
    ops = sequence_ops(comm, log)
    emb, emb_cache = embed_forward(params, x, config)
    logits, caches = forward_pass(params, emb[:, lo:hi], config, ops=ops, embed=False)
    local_loss, loss_cache = cross_entropy_forward(logits, y[:, lo:hi])
    dx, grads = backward_pass(cross_entropy_backward(loss_cache) / p, caches)
    grads.update(embed_backward(ops.enter.forward(dx), emb_cache)[1])  # slices gathered
    return comm.allreduce(local_loss) / p, sum_sequence_split(grads, comm, log)


def sum_sequence_split(grads: dict, comm, log) -> dict:
    """Under sequence parallelism each rank saw only its slice of the positions, so the
    gradients of the tensors every rank holds whole (LayerNorms, the biases added after g, the
    head) are partial: sum them over the group. The embedding tables' gradients were
    computed from the gathered whole, so they are complete already."""
    seen_here = [n for n in grads if shard_axis(n) is None and not n.endswith("_emb")]
    return {**grads, **average_gradients(grads, 1.0, [seen_here], comm, "mpi", log)}


def global_grad_norm(grads: dict, comm) -> float:
    """Norm of the full gradient: shards summed over ranks, replicated tensors counted once."""
    return math.sqrt(comm.allreduce(squares_counted_once(grads, comm.rank), op=MPI.SUM))


def max_relative_error(a: dict, b: dict) -> float:
    """max |a - b| over every entry, relative to the largest |b| entry of all arrays (so that
    exactly-zero gradients such as attention's b_k do not divide rounding noise by zero)."""
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in b) / scale


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What every step of this run shares."""

    config: object
    settings: TrainSettings
    comm: object
    full: dict | None  # the serial parameters, kept only for --check-grads
    sequence_parallel: bool = False


def tp_loss_and_grads(params: dict, x, y, config, comm, log) -> tuple[float, dict]:
    """The serial model's loss and this rank's gradients: the model's own walk on this rank's
    shard of the parameter dict, with f and g as its entry and exit operators."""
    return loss_and_grads(params, x, y, config, ops=megatron_ops(comm, log), check=False)


def tp_update(state: State, grads: dict, step: int, settings: TrainSettings, comm,
              update=optimizer_update) -> State:
    """AdamW on this rank's shard, clipped with the norm of the full gradient (update: see
    pipeline_stage.finish_step)."""
    norm = global_grad_norm(grads, comm)
    params, opt_state, _ = update(state.params, grads, state.opt_state, settings, step, norm)
    return State(params, opt_state)


def train_step(state: State, x, y, step: int, log, tp: TensorParallel):
    """One tensor-parallel step on the global batch; returns (new state, loss, grads)."""
    step_fn = sp_loss_and_grads if tp.sequence_parallel else tp_loss_and_grads
    loss, grads = step_fn(state.params, x, y, tp.config, tp.comm, log)
    if step == 0 and tp.full is not None:  # gathered shards == the serial model's gradients
        log.info["grad_error"] = max_relative_error(unshard_params(tp.comm.allgather(grads)),
                                                    loss_and_grads(tp.full, x, y, tp.config)[1])
    return tp_update(state, grads, step, tp.settings, tp.comm), loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    setup = training_setup(args)
    check_world_size(setup.config, world_size)  # heads and FFN columns split evenly
    if args.sequence_parallel and setup.settings.seq_len % world_size:
        raise ValueError(f"--sequence-parallel: --seq-len must split evenly over the "
                         f"{world_size} rank(s), got {setup.settings.seq_len}")
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    config, settings = setup.config, setup.settings
    start, saving = start_training(comm, args, setup, placement.tensor(comm.rank, comm.size),
                                   {"program": "tensor_parallel"})
    local = start.state.params
    full = init_params(config, settings.seed) if args.check_grads and not args.resume else None
    tp = TensorParallel(config, settings, comm, full, args.sequence_parallel)
    result = train(comm, setup, start, functools.partial(train_step, tp=tp), args.split_waiting,
                   saving, args.trace_memory)
    record = result_record(result, setup, comm, state_nbytes(
        result.state.params, result.grads, result.state.opt_state))
    return {
        **record,
        "comm_bytes_per_step": record["comm_bytes"] / settings.steps,
        "predicted_comm_bytes_per_step": None if args.sequence_parallel  # buffers: all-reduces
        else tensor_parallel_allreduce_bytes(settings.batch_size, settings.seq_len,
                                             config.d_model, config.n_layers,
                                             np.dtype(config.dtype).itemsize),
        "allreduces_per_step": record["comm_calls"] / settings.steps,
        "activation_bytes_sent_per_step": bytes_sent(result.logs, comm.size, SENDS)
        / settings.steps,
        "predicted_activation_bytes_sent_per_step": tensor_parallel_bytes_sent(
            settings.batch_size, settings.seq_len, config.d_model, config.n_layers, comm.size,
            np.dtype(config.dtype).itemsize, args.sequence_parallel),
        "param_bytes_per_rank": sum(int(v.nbytes) for v in local.values()),
        "grad_max_rel_error": result.logs[0].info.get("grad_error"),
    }


SENDS = {"f backward": allreduce_bytes, "g forward": allreduce_bytes,  # per n-byte collective
         "f all-gather": allgather_bytes, "g all-gather": allgather_bytes,
         "f reduce-scatter": reduce_scatter_bytes, "g reduce-scatter": reduce_scatter_bytes}


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.tensor_parallel", __doc__)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="split the sequence between the sublayers too (Megatron SP)")
    parser.add_argument("--check-grads", action="store_true",
                        help="at step 0, compare gathered gradients with the serial model's")
    add_split_waiting_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        return (f"tensor parallel on {result['world_size']} rank(s): final loss "
                f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
