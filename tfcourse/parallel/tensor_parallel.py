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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.data import lm_batch
from tfcourse.nn.attention import causal_mask, mha_backward, mha_forward
from tfcourse.nn.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    ffn_backward,
    ffn_forward,
    layernorm_backward,
    layernorm_forward,
)
from tfcourse.nn.model import (
    embed_backward,
    embed_forward,
    head_backward,
    head_forward,
    init_params,
    loss_and_grads,
    subdict,
)
from tfcourse.nn.optim import adamw_init, state_nbytes, sum_of_squares
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.comm import (
    CommLog,
    StepTimes,
    add_json_argument,
    add_split_waiting_argument,
    mpi_allreduce,
    program_parser,
    run_program,
)
from tfcourse.parallel.partition import check_world_size, shard_axis, shard_params
from tfcourse.perf.costmodel import tensor_parallel_allreduce_bytes
from tfcourse.train import (
    TrainingSetup,
    optimizer_update,
    training_setup,
)


def gather_params(local: dict, comm) -> dict:
    """Inverse of `shard_params`: every rank gets the full arrays back (for checks and
    checkpoints)."""
    full = {}
    for name, value in local.items():
        axis = shard_axis(name)
        full[name] = value if axis is None else np.concatenate(comm.allgather(value), axis=axis)
    return full


# --------------------------------------------------------------------------- f and g


def f_forward(x):
    """Megatron's f: the replicated input enters the split layer unchanged."""
    return x


def f_backward(dout, comm, log: CommLog):
    """f's backward: each rank holds part of the input gradient; sum them."""
    return _allreduce(dout, comm, log, "f backward")


def g_forward(partial, comm, log: CommLog):
    """Megatron's g: sum the ranks' partial outputs of a row-parallel product."""
    return _allreduce(partial, comm, log, "g forward")


def g_backward(dout):
    """g's backward: every rank already has the full output gradient."""
    return dout


def _allreduce(x, comm, log: CommLog, name: str):
    flat = np.ascontiguousarray(x).reshape(-1).copy()
    log.timed(name, mpi_allreduce, flat, comm)
    return flat.reshape(x.shape)


# --------------------------------------------------------------------------- one block


def attention_forward(local: dict, prefix: str, x, n_heads_local: int, comm, log: CommLog):
    """x + g(Attention_r(f(LN(x)))): causal self-attention over this rank's heads."""
    normed, ln_cache = layernorm_forward(x, local[prefix + "ln1.gamma"],
                                         local[prefix + "ln1.beta"])
    inp = f_forward(normed)
    attn = subdict(local, prefix + "attn.")
    attn["b_o"] = np.zeros_like(attn["b_o"])  # the bias is added once, after the sum
    partial, mha_cache = mha_forward(inp, inp, attn, n_heads_local, causal_mask(x.shape[1]))
    out = g_forward(partial, comm, log) + local[prefix + "attn.b_o"]
    return x + out, (prefix, ln_cache, mha_cache)


def attention_backward(dy, cache, comm, log: CommLog):
    prefix, ln_cache, mha_cache = cache
    dx_q, dx_kv, grads = mha_backward(g_backward(dy), mha_cache)  # grads["b_o"] = sum of dy
    dnormed = f_backward(dx_q + dx_kv, comm, log)
    dx_ln, dgamma, dbeta = layernorm_backward(dnormed, ln_cache)
    grads = {prefix + "attn." + k: v for k, v in grads.items()}
    grads.update({prefix + "ln1.gamma": dgamma, prefix + "ln1.beta": dbeta})
    return dy + dx_ln, grads


def mlp_forward(local: dict, prefix: str, x, activation: str, comm, log: CommLog):
    """x + g(GELU(f(LN(x)) W1_r) W2_r) + b2: column-parallel W1, row-parallel W2."""
    normed, ln_cache = layernorm_forward(x, local[prefix + "ln2.gamma"],
                                         local[prefix + "ln2.beta"])
    p = subdict(local, prefix + "ffn.")
    partial, ffn_cache = ffn_forward(f_forward(normed), p["w1"], p["b1"], p["w2"],
                                     np.zeros_like(p["b2"]), activation)
    out = g_forward(partial, comm, log) + p["b2"]
    return x + out, (prefix, ln_cache, ffn_cache)


def mlp_backward(dy, cache, comm, log: CommLog):
    prefix, ln_cache, ffn_cache = cache
    dnormed_partial, grads = ffn_backward(g_backward(dy), ffn_cache)  # grads["b2"] = sum of dy
    dx_ln, dgamma, dbeta = layernorm_backward(f_backward(dnormed_partial, comm, log), ln_cache)
    grads = {prefix + "ffn." + k: v for k, v in grads.items()}
    grads.update({prefix + "ln2.gamma": dgamma, prefix + "ln2.beta": dbeta})
    return dy + dx_ln, grads


# --------------------------------------------------------------------------- the model


def tp_loss_and_grads(local: dict, tokens, targets, config, comm, log: CommLog):
    """The serial model's loss and this rank's gradients (shards and replicated params)."""
    n_heads_local = config.n_heads // comm.size
    x, embed_cache = embed_forward(local, tokens, config)
    caches = []
    for i in range(config.n_layers):
        x, attn_cache = attention_forward(local, f"blocks.{i}.", x, n_heads_local, comm, log)
        x, mlp_cache = mlp_forward(local, f"blocks.{i}.", x, config.activation, comm, log)
        caches.append((attn_cache, mlp_cache))
    logits, head_cache = head_forward(local, x)
    loss, loss_cache = cross_entropy_forward(logits, targets)
    dx, grads = head_backward(cross_entropy_backward(loss_cache), head_cache)
    for attn_cache, mlp_cache in reversed(caches):
        dx, mlp_grads = mlp_backward(dx, mlp_cache, comm, log)
        dx, attn_grads = attention_backward(dx, attn_cache, comm, log)
        grads.update({**mlp_grads, **attn_grads})
    grads.update(embed_backward(dx, embed_cache))
    return loss, {name: grads[name] for name in local}


def global_grad_norm(grads: dict, comm) -> float:
    """Norm of the full gradient: shards summed over ranks, replicated tensors counted once."""
    sharded = {n: g for n, g in grads.items() if shard_axis(n) is not None}
    replicated = {n: g for n, g in grads.items() if shard_axis(n) is None}
    return math.sqrt(comm.allreduce(sum_of_squares(sharded), op=MPI.SUM)
                     + sum_of_squares(replicated))


def max_relative_error(a: dict, b: dict) -> float:
    """max |a - b| over every entry, relative to the largest |b| entry of all arrays (so that
    exactly-zero gradients such as attention's b_k do not divide rounding noise by zero)."""
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in b) / scale


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see comm.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    setup = training_setup(args)
    check_world_size(setup.config, world_size)  # heads and FFN columns split evenly
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    corpus, config, settings = setup.corpus, setup.config, setup.settings
    full = init_params(config, settings.seed)
    local = shard_params(full, comm.rank, comm.size)
    opt_state = adamw_init(local)
    losses, step_seconds, grad_error = [], [], None
    log, times = CommLog(split_waiting=args.split_waiting), StepTimes()
    for step in range(settings.steps):
        x, y = lm_batch(corpus.ids, settings.batch_size, settings.seq_len, settings.seed, step)
        comm.Barrier()
        started, first_record = time.perf_counter(), len(log.records)
        loss, grads = tp_loss_and_grads(local, x, y, config, comm, log)
        if step == 0 and args.check_grads:  # gathered shards == the serial model's gradients
            gathered = gather_params(grads, comm)
            grad_error = max_relative_error(gathered, loss_and_grads(full, x, y, config)[1])
        norm = global_grad_norm(grads, comm)
        local, opt_state, _ = optimizer_update(local, grads, opt_state, settings, step, norm)
        step_seconds.append(time.perf_counter() - started)
        times.add(step_seconds[-1], *log.communication_and_waiting(first_record))
        losses.append(loss)
    itemsize = np.dtype(config.dtype).itemsize
    return {
        "losses": losses,
        "world_size": comm.size,
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "step_seconds": step_seconds,
        "comm_seconds": log.total_seconds(),
        "comm_bytes_per_step": log.total_bytes() / settings.steps,
        "predicted_comm_bytes_per_step": tensor_parallel_allreduce_bytes(
            settings.batch_size, settings.seq_len, config.d_model, config.n_layers, itemsize),
        "allreduces_per_step": len(log.records) / settings.steps,
        "param_bytes_per_rank": sum(int(v.nbytes) for v in local.values()),
        "memory_bytes": comm.gather(state_nbytes(local, grads, opt_state), root=0),
        "seconds_per_step_per_rank": comm.gather(times.mean(), root=0),
        "grad_max_rel_error": grad_error,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.tensor_parallel", __doc__)
    parser.add_argument("--check-grads", action="store_true",
                        help="at step 0, compare gathered gradients with the serial model's")
    add_split_waiting_argument(parser)
    add_json_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        return (f"tensor parallel on {result['world_size']} rank(s): final loss "
                f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps")

    return run_program(args, prepare, run, summary)

if __name__ == "__main__":
    sys.exit(main())
