"""Chapter 14: five common questions about parallel Transformers, answered by experiments.

Small pure functions the FAQ notebook runs: an Elman RNN to compare with attention, timing and
FLOPs of both against sequence length, the length of the dependency path between two positions,
the cost of models of growing size, and a batch split across "ranks" computed serially.
Everything else (attention, the model, the cost model) is reused from earlier chapters.
"""

from __future__ import annotations

import math
import statistics
from unittest import mock

import numpy as np

from tfcourse.nn import model
from tfcourse.nn.attention import causal_mask, init_mha_params, mha_forward
from tfcourse.nn.validate import (
    as_float_array,
    require_ndim,
    require_nonnegative_int,
    require_positive_int,
    require_shape,
)
from tfcourse.parallel.plans.batches import batch_rows
from tfcourse.perf import costmodel
from tfcourse.perf.hardware import call_times

KINDS = ("rnn", "attention", "conv", "dilated conv")
# Matmul rounds on an attention layer's critical path, whatever T: the Q/K/V projections (run
# side by side), the scores Q K^T, the weighted values A V, the output projection.
ATTENTION_ROUNDS = 4

# name: (vocab_size, d_model, n_layers, n_heads, d_ff, max_len, tied_head); GPT-2 and GPT-3 as
# published, counted as their papers count them: the head tied to the token embedding
MODEL_SIZES = {
    "course 'small'": (48, 128, 4, 4, 512, 128, False),  # the bundled corpus has 48 characters
    "GPT-2 small": (50257, 768, 12, 12, 3072, 1024, True),
    "GPT-2 XL": (50257, 1600, 48, 25, 6400, 1024, True),
    "GPT-3 6.7B": (50257, 4096, 32, 32, 16384, 2048, True),
    "GPT-3 175B": (50257, 12288, 96, 96, 49152, 2048, True),
}


def rnn_init(d: int, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Elman RNN parameters {"w_xh": (d, d), "w_hh": (d, d), "b": (d,)}, N(0, 1/d) weights."""
    d = require_positive_int("d", d)
    rng = np.random.default_rng(require_nonnegative_int("seed", seed))
    w_xh, w_hh = (rng.standard_normal((d, d)) / math.sqrt(d) for _ in range(2))
    return {"w_xh": w_xh.astype(dtype), "w_hh": w_hh.astype(dtype), "b": np.zeros(d, dtype)}


def rnn_forward(x, w_xh, w_hh, b) -> np.ndarray:
    """Hidden states h (B, T, d_h) of h_t = tanh(x_t W_xh + h_{t-1} W_hh + b), h_{-1} = 0.

    x: (B, T, d_in), w_xh: (d_in, d_h), w_hh: (d_h, d_h), b: (d_h,). The input projection does
    not depend on h, so it runs for all positions in one matmul; the recurrence cannot: T
    dependent (B, d_h) @ (d_h, d_h) matmuls, one after the other.
    """
    x, w_xh, w_hh, b = (as_float_array(n, a) for n, a in
                        (("x", x), ("w_xh", w_xh), ("w_hh", w_hh), ("b", b)))
    require_ndim("x", x, 3, 3)
    require_ndim("w_xh", w_xh, 2, 2)
    require_shape("w_xh", w_xh, (x.shape[-1], w_xh.shape[1]), "rows = d_in of x")
    d_h = w_xh.shape[1]
    require_shape("w_hh", w_hh, (d_h, d_h), "d_h = columns of w_xh")
    require_shape("b", b, (d_h,), "d_h = columns of w_xh")
    batch, length = x.shape[:2]
    xw = x @ w_xh + b  # (B, T, d_h): parallel over positions
    h = np.zeros((batch, length, d_h), dtype=xw.dtype)
    h_prev = np.zeros((batch, d_h), dtype=xw.dtype)
    for t in range(length):  # sequential: step t needs h_{t-1}
        h_prev = np.tanh(xw[:, t] + h_prev @ w_hh)
        h[:, t] = h_prev
    return h


def rnn_flops(batch: int, seq_len: int, d: int) -> int:
    """Matmul FLOPs of rnn_forward with d_in = d_h = d: 2 B T (d d + d d)."""
    return 2 * batch * seq_len * (d * d + d * d)


def attention_flops(batch: int, seq_len: int, d: int) -> int:
    """Matmul FLOPs of one self-attention layer (mha_forward, full scores as it computes them):
    4 projections 8 B T d^2, scores Q K^T and weighted values A V 2 B T^2 d each."""
    return 8 * batch * seq_len * d * d + 4 * batch * seq_len * seq_len * d


def sequential_steps(kind: str, seq_len: int) -> int:
    """Matmul rounds one forward pass must run one after another over a sequence of seq_len:
    RNN T + 1 (the input projection, then T recurrence steps); attention 4, whatever T."""
    seq_len = require_positive_int("seq_len", seq_len)
    if kind == "rnn":
        return seq_len + 1
    if kind == "attention":
        return ATTENTION_ROUNDS
    raise ValueError(f"kind: expected 'rnn' or 'attention', got {kind!r}")


def time_layer(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds (time.perf_counter) of `repeats` calls of fn() after `warmup` calls."""
    repeats = require_positive_int("repeats", repeats)
    return statistics.median(call_times(fn, repeats, require_nonnegative_int("warmup", warmup)))


def _lengths(lengths) -> list[int]:
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths: expected at least one sequence length, got none")
    return [require_positive_int("lengths", t) for t in lengths]


def sequence_length_sweep(lengths, d_model: int = 64, batch: int = 8, n_heads: int = 4,
                          repeats: int = 5, seed: int = 0, dtype=np.float32) -> dict[str, list]:
    """For every T in `lengths`, the median time of rnn_forward and of one causal multi-head
    self-attention (mha_forward) on the same input x (batch, T, d_model), with their
    sequential matmul rounds and FLOPs. Returns {"T", "rnn_s", "attention_s", "rnn_steps",
    "attention_steps", "rnn_flops", "attention_flops"}: lists, one entry per T."""
    lengths = _lengths(lengths)
    d, batch = require_positive_int("d_model", d_model), require_positive_int("batch", batch)
    rnn = rnn_init(d, seed, dtype)
    attn = init_mha_params(d, n_heads, np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("T", "rnn_s", "attention_s", "rnn_steps",
                                            "attention_steps", "rnn_flops", "attention_flops")}
    for t in lengths:
        x = rng.standard_normal((batch, t, d)).astype(dtype)
        mask = causal_mask(t)
        out["T"].append(t)
        out["rnn_s"].append(time_layer(lambda x=x: rnn_forward(x, **rnn), repeats))
        out["attention_s"].append(
            time_layer(lambda x=x, m=mask: mha_forward(x, x, attn, n_heads, m), repeats))
        out["rnn_steps"].append(sequential_steps("rnn", t))
        out["attention_steps"].append(sequential_steps("attention", t))
        out["rnn_flops"].append(rnn_flops(batch, t, d))
        out["attention_flops"].append(attention_flops(batch, t, d))
    return out


def dependency_path_length(kind: str, seq_len: int, kernel_size: int = 3) -> int:
    """Longest chain of dependent operations from position 0 to position seq_len - 1:
    RNN seq_len - 1 steps; attention 1 layer; a plain causal convolution of width k needs
    ceil((seq_len - 1) / (k - 1)) layers (each layer widens the receptive field by k - 1); a
    dilated one (WaveNet, ByteNet: layer l looks k^l positions apart, so the receptive field
    after L layers is k^L) needs the smallest L with k^L >= seq_len, about log_k(seq_len)."""
    seq_len = require_positive_int("seq_len", seq_len)
    kernel_size = require_positive_int("kernel_size", kernel_size)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind == "rnn":
        return seq_len - 1
    if kind == "attention":
        return min(1, seq_len - 1)
    if kernel_size < 2:
        raise ValueError(f"kernel_size: expected >= 2 for a convolution, got {kernel_size}")
    if kind == "conv":
        return math.ceil((seq_len - 1) / (kernel_size - 1))
    layers, field = 0, 1
    while field < seq_len:
        layers, field = layers + 1, field * kernel_size
    return layers


def generation_forward_calls(params: dict, prompt, n_new: int, config) -> int:
    """How many forward passes model.generate runs to add n_new tokens (one per token: token
    t + 1 is an input of step t + 2, so generation is sequential for a Transformer too)."""
    with mock.patch.object(model, "forward_pass", wraps=model.forward_pass) as spy:
        model.generate(params, prompt, n_new, config)
    return spy.call_count


def model_size_table(sizes: dict | None = None, batch: int = 1,
                     bytes_per_value: int = 4) -> list[dict]:
    """Per model (default MODEL_SIZES, sequences of its max_len): parameters, training FLOPs
    per token, training state (weights, gradients, AdamW m and v) and activation bytes for
    `batch` sequences, from tfcourse.perf.costmodel."""
    sizes = MODEL_SIZES if sizes is None else sizes
    if not sizes:
        raise ValueError("sizes: expected at least one model, got none")
    batch = require_positive_int("batch", batch)
    rows = []
    for name, (vocab, d, layers, heads, d_ff, max_len, tied) in sizes.items():
        n = costmodel.lm_params(vocab, d, layers, d_ff, max_len, tied_head=tied)
        rows.append({
            "name": name, "params": n,
            "flops_per_token": costmodel.training_flops_per_token(vocab, d, layers, d_ff, max_len),
            "state_bytes": sum(costmodel.training_state_bytes(n, bytes_per_value).values()),
            "activation_bytes": layers * costmodel.activation_bytes_per_layer(
                batch, max_len, d, heads, d_ff, bytes_per_value),
        })
    return rows


def attention_mlp_flops(seq_len: int, d_model: int, d_ff: int) -> tuple[int, int]:
    """Forward FLOPs per token of one layer: (attention scores + weighted values, feed-forward),
    4 T d and 4 d d_ff, from costmodel.forward_flops_per_token."""
    f = costmodel.forward_flops_per_token(1, d_model, 1, d_ff, seq_len)
    return f["attention scores QK^T"] + f["attention values AV"], f["feed-forward"]


def data_parallel_grads(params: dict, tokens, targets, config, world_size: int):
    """(loss, grads) of a batch split row-wise over world_size "ranks", each running the serial
    model.loss_and_grads on its rows, combined with weights rows / B (as an all-reduce would)."""
    world_size = require_positive_int("world_size", world_size)
    batch = np.asarray(tokens).shape[0]
    loss, grads = 0.0, {name: np.zeros_like(p) for name, p in params.items()}
    for rank in range(world_size):
        lo, hi = batch_rows(batch, rank, world_size)
        part_loss, part = model.loss_and_grads(params, tokens[lo:hi], targets[lo:hi], config)
        loss += part_loss * (hi - lo) / batch
        for name, g in part.items():
            grads[name] += g * ((hi - lo) / batch)
    return loss, grads
