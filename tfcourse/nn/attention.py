"""Chapters 1-2: softmax, masks, scaled dot-product attention and multi-head attention.

Every layer is a pair of pure functions, as in CS231n's layers.py:

    out, cache = sdpa_forward(q, k, v, mask)
    dq, dk, dv = sdpa_backward(dout, cache)

Masks are boolean with True = "may attend" (the PyTorch convention). Weight matrices follow
the `x @ W` convention, so W has shape (in_features, out_features). Arrays keep their dtype:
float32 in gives float32 out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from tfcourse.nn.layers import (
    exp_shift,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from tfcourse.nn.precision import matmul, to_grid
from tfcourse.nn.validate import (
    as_bool_array,
    as_float_array,
    as_float_dtype,
    as_int_array,
    require_broadcastable,
    require_dim,
    require_divisible,
    require_dtype,
    require_generator,
    require_last_dim,
    require_ndim,
    require_nonempty_axis,
    require_positive_int,
    require_shape,
)

MHA_PARAM_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


# --------------------------------------------------------------------------- softmax


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = x - exp_shift(np.max(x, axis=axis, keepdims=True))
    np.exp(e, out=e)  # in place: one array fewer to allocate and fill
    total = np.sum(e, axis=axis, keepdims=True)
    return np.divide(e, total, out=e, where=total > 0)  # an all -inf row stays all zeros


def _softmax_backward(dout: np.ndarray, probs: np.ndarray, axis: int) -> np.ndarray:
    # Jacobian-vector product of softmax: J = diag(p) - p p^T, so J @ g = p * (g - <g, p>).
    dx = dout - np.sum(dout * probs, axis=axis, keepdims=True)
    dx *= probs
    return dx


def softmax(x, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of `x` (any shape) along `axis`.

    Entries equal to -inf get probability 0, and a slice that is entirely -inf gives all
    zeros (not NaN), which is what attention wants for a query with nothing to attend to.
    The axis must hold at least one entry.
    """
    x = as_float_array("x", x, allow_neg_inf=True)
    require_nonempty_axis("x", x, axis)
    return _softmax(x, axis)


def softmax_backward(dout, probs, axis: int = -1) -> np.ndarray:
    """Gradient of the loss w.r.t. the softmax input, given `probs = softmax(x, axis)`.

    dout, probs: same shape. Returns dx with that shape.
    """
    probs = as_float_array("probs", probs)
    dout = as_float_array("dout", dout)
    require_shape("dout", dout, probs.shape, "shape of probs")
    require_dtype("dout", dout, probs.dtype, "dtype of probs")
    return _softmax_backward(dout, probs, axis)


# --------------------------------------------------------------------------- masks


def causal_mask(n: int) -> np.ndarray:
    """Bool (n, n) mask, True on and below the diagonal: position i may attend to j <= i."""
    n = require_positive_int("n", n)
    return np.tril(np.ones((n, n), dtype=bool))


def padding_mask(lengths, n: int) -> np.ndarray:
    """Key-padding mask of shape (B, 1, n) for sequences padded to length `n`.

    lengths: (B,) integers in [0, n]; sequence b has real tokens at positions < lengths[b].
    The middle axis of size 1 lets the mask broadcast against scores of shape (B, n_q, n_k):
    every query of sequence b may attend to the first lengths[b] keys only.
    """
    n = require_positive_int("n", n)
    lengths = as_int_array("lengths", lengths, 0, n)
    require_ndim("lengths", lengths, 1, 1)
    return (np.arange(n) < lengths[:, None])[:, None, :]


# --------------------------------------------------------------------------- attention


def _check_qkv(q, k, v):
    q, k, v = (as_float_array(name, a) for name, a in (("q", q), ("k", k), ("v", v)))
    for name, a in (("q", q), ("k", k), ("v", v)):
        require_ndim(name, a, 2)
    require_nonempty_axis("q", q, -2, "query position")  # a zero-length sequence
    require_nonempty_axis("q", q, -1, "feature (d_k)")  # 1 / sqrt(d_k)
    require_last_dim("k", k, q.shape[-1], "d_k of q")
    require_nonempty_axis("k", k, -2, "key position")  # softmax over no keys
    require_dim("v", v, -2, k.shape[-2], "n_k of k")
    for name, a in (("k", k), ("v", v)):
        require_dtype(name, a, q.dtype, "dtype of q")
        require_shape(name, a, q.shape[:-2] + a.shape[-2:], f"leading dims of q {q.shape[:-2]}")
    return q, k, v


def _attention_weights(q, k, mask, precision: str = "fp32"):
    """softmax(q k^T / sqrt(d_k)) with masked scores at -inf: the forward pass and a
    recomputing backward pass call this one function, so they get the same bits. The softmax
    runs in float32 even under mixed precision; its inputs and outputs are 16-bit."""
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    scores = matmul(q * scale, np.swapaxes(k, -1, -2), precision)  # q scaled: cheaper
    if mask is not None:
        np.copyto(scores, -np.inf, where=~mask)
    return to_grid(_softmax(scores, axis=-1), precision)


def sdpa_forward(q, k, v, mask=None, check: bool = True, keep_weights: bool = True,
                 precision: str = "fp32"):
    """Scaled dot-product attention softmax(q k^T / sqrt(d_k)) v, returning (out, cache).

    q: (..., n_q, d_k), k: (..., n_k, d_k), v: (..., n_k, d_v), with identical leading
    (batch/head) dims and n_q, n_k, d_k >= 1. mask: bool, broadcastable to (..., n_q, n_k),
    True = may attend. out: (..., n_q, d_v). A query row whose mask is all False gets zero
    output and zero weights. cache["weights"] holds the attention weights (..., n_q, n_k).
    check=False skips the input checks: for callers that validated once at their own door
    (the model does, for every layer of every step).

    keep_weights=False is *selective recomputation* (Korthikanti et al. 2022): the cache keeps
    q, k, v and the mask but not the (..., n_q, n_k) weights - the one activation that grows
    with the square of the sequence - and `sdpa_backward` recomputes them from q and k.
    precision "bf16" or "fp16": every product has 16-bit inputs and result (see
    tfcourse.nn.precision.matmul), in the backward pass too.
    """
    if check:
        q, k, v = _check_qkv(q, k, v)
        if mask is not None:
            mask = as_bool_array("mask", mask)
            require_broadcastable("mask", mask, q.shape[:-1] + k.shape[-2:-1],
                                  "scores (..., n_q, n_k)")
    weights = _attention_weights(q, k, mask, precision)
    out = matmul(weights, v, precision)
    cache = {"q": q, "k": k, "v": v, "mask": None, "weights": weights, "precision": precision}
    if not keep_weights:  # recomputed from q, k and the mask in the backward pass
        cache.update(mask=mask, weights=None)
    return out, cache


def sdpa_backward(dout, cache, check: bool = True):
    """Gradients (dq, dk, dv) of scaled dot-product attention, given dout (..., n_q, d_v).

    Masked entries have weight 0, so softmax_backward already gives them zero gradient. If the
    forward pass did not keep the weights (selective recomputation), they are recomputed here
    from q, k and the mask.
    """
    q, k, v, weights, precision = (cache[name] for name in ("q", "k", "v", "weights",
                                                             "precision"))
    if weights is None:
        weights = _attention_weights(q, k, cache["mask"], precision)
    if check:
        dout = as_float_array("dout", dout)
        require_shape("dout", dout, weights.shape[:-1] + v.shape[-1:], "shape of out")
        require_dtype("dout", dout, q.dtype, "dtype of out")
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    dv = matmul(np.swapaxes(weights, -1, -2), dout, precision)
    dweights = matmul(dout, np.swapaxes(v, -1, -2), precision)
    dscores = _softmax_backward(dweights, weights, axis=-1)
    dq = matmul(dscores, k, precision)
    dq *= scale
    dk = matmul(np.swapaxes(dscores, -1, -2), q, precision)
    dk *= scale
    return dq, dk, dv


def local_attention_forward(q, k, v, mask=None, keep_weights: bool = True,
                            precision: str = "fp32"):
    """The attention kernel of one process: `sdpa_forward` (no input checks) over the
    positions it is given. mask "causal" is the causal mask over k's positions."""
    if isinstance(mask, str):
        mask = causal_mask(k.shape[-2])
    return sdpa_forward(q, k, v, mask, check=False, keep_weights=keep_weights,
                        precision=precision)


def local_attention_backward(dout, cache):
    """(dq, dk, dv) of `local_attention_forward`: `sdpa_backward`, no input checks."""
    return sdpa_backward(dout, cache, check=False)


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """How multi-head attention turns its per-head q, k, v (B, H, T, d_head) into the heads'
    outputs (B, H, T, d_head): the part between the projections.

    forward(q, k, v, mask, keep_weights, precision) -> (out, cache); backward(dout, cache)
    -> (dq, dk, dv). The serial kernel is sdpa on what the process holds; context
    parallelism passes one whose q, k, v hold a slice of the sequence and which
    communicates to attend over all of it (DeepSpeed-Ulysses: all-to-alls around the serial
    sdpa; ring attention: K/V blocks passed round a ring with the online softmax)."""

    forward: Callable = local_attention_forward
    backward: Callable = local_attention_backward


LOCAL_ATTENTION = AttentionKernel()


def scaled_dot_product_attention(q, k, v, mask=None):
    """Attention output and weights: returns (out (..., n_q, d_v), weights (..., n_q, n_k)).

    Same arguments as `sdpa_forward`.
    """
    out, cache = sdpa_forward(q, k, v, mask)
    return out, cache["weights"]


# --------------------------------------------------------------------------- multi-head


def init_mha_params(
    d_model: int, n_heads: int, rng, d_kv_in: int | None = None, dtype=np.float64
) -> dict:
    """Multi-head attention parameters, Glorot-uniform weights and zero biases.

    Returns {"w_q": (d_model, d_model), "w_k": (d_kv_in, d_model), "w_v": (d_kv_in, d_model),
    "w_o": (d_model, d_model), "b_q", "b_k", "b_v", "b_o": (d_model,)}. d_kv_in is the width
    of the key/value input (default d_model; differs only in cross-attention).
    rng: np.random.Generator.
    """
    d_model = require_positive_int("d_model", d_model)
    n_heads = require_positive_int("n_heads", n_heads)
    require_divisible("d_model", d_model, "n_heads", n_heads)
    d_kv_in = d_model if d_kv_in is None else require_positive_int("d_kv_in", d_kv_in)
    rng = require_generator("rng", rng)
    dtype = as_float_dtype("dtype", dtype)

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    params = {
        "w_q": glorot(d_model, d_model),
        "w_k": glorot(d_kv_in, d_model),
        "w_v": glorot(d_kv_in, d_model),
        "w_o": glorot(d_model, d_model),
    }
    for name in ("b_q", "b_k", "b_v", "b_o"):
        params[name] = np.zeros(d_model, dtype=dtype)
    return params


def mha_param_count(d_model: int, d_kv_in: int | None = None, bias: bool = True) -> int:
    """Number of scalars in the multi-head attention parameters (independent of n_heads)."""
    d_model = require_positive_int("d_model", d_model)
    d_kv_in = d_model if d_kv_in is None else require_positive_int("d_kv_in", d_kv_in)
    weights = 2 * d_model * d_model + 2 * d_kv_in * d_model
    return weights + (4 * d_model if bias else 0)


def split_heads(x, n_heads: int) -> np.ndarray:
    """(..., T, d_model) -> (..., n_heads, T, d_head) with d_head = d_model // n_heads.

    Head h takes columns h*d_head : (h+1)*d_head of the last axis.
    """
    x = np.asanyarray(x)
    require_ndim("x", x, 2)
    n_heads = require_positive_int("n_heads", n_heads)
    d_model = x.shape[-1]
    require_divisible("d_model", d_model, "n_heads", n_heads)
    x = x.reshape(x.shape[:-1] + (n_heads, d_model // n_heads))
    return np.swapaxes(x, -2, -3)


def merge_heads(x) -> np.ndarray:
    """(..., n_heads, T, d_head) -> (..., T, n_heads * d_head); the inverse of split_heads."""
    x = np.asanyarray(x)
    require_ndim("x", x, 3)
    x = np.swapaxes(x, -2, -3)
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _check_mha_inputs(x_q, x_kv, params, n_heads, mask):
    """Validate multi-head attention inputs; return (x_q, x_kv, params, mask) as arrays."""
    if not isinstance(params, dict) or set(params) != set(MHA_PARAM_NAMES):
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: expected keys {sorted(MHA_PARAM_NAMES)}, got {found}")
    params = {name: as_float_array(name, params[name]) for name in MHA_PARAM_NAMES}
    require_ndim("w_q", params["w_q"], 2, 2)
    require_ndim("w_k", params["w_k"], 2, 2)
    require_nonempty_axis("w_q", params["w_q"], 0, "row (d_model)")  # else d_head = 0
    d_model, d_kv_in = params["w_q"].shape[0], params["w_k"].shape[0]
    expected = {
        "w_q": (d_model, d_model),
        "w_k": (d_kv_in, d_model),
        "w_v": (d_kv_in, d_model),
        "w_o": (d_model, d_model),
    }
    dtype = params["w_q"].dtype
    for name, p in params.items():
        require_shape(name, p, expected.get(name, (d_model,)))
        require_dtype(name, p, dtype, "dtype of w_q")
    n_heads = require_positive_int("n_heads", n_heads)
    require_divisible("d_model", d_model, "n_heads", n_heads)

    x_q, x_kv = as_float_array("x_q", x_q), as_float_array("x_kv", x_kv)
    require_ndim("x_q", x_q, 3, 3)
    require_ndim("x_kv", x_kv, 3, 3)
    require_nonempty_axis("x_q", x_q, 1, "query position")
    require_nonempty_axis("x_kv", x_kv, 1, "key position")
    require_last_dim("x_q", x_q, d_model, "d_model = rows of w_q")
    require_last_dim("x_kv", x_kv, d_kv_in, "d_kv_in = rows of w_k")
    require_dim("x_kv", x_kv, 0, x_q.shape[0], "batch size of x_q")
    for name, x in (("x_q", x_q), ("x_kv", x_kv)):
        require_dtype(name, x, dtype, "dtype of the params")
    if mask is None:
        return x_q, x_kv, params, None

    mask = as_bool_array("mask", mask)
    (batch, n_q, _), n_k = x_q.shape, x_kv.shape[1]
    layouts = {
        2: ((n_q, n_k), "(n_q, n_k)"),
        3: ((batch, n_q, n_k), "(B, n_q, n_k)"),
        4: ((batch, n_heads, n_q, n_k), "(B, n_heads, n_q, n_k)"),
    }
    if mask.ndim not in layouts:
        raise ValueError(
            f"mask: expected 2, 3 or 4 dims, broadcastable to (n_q, n_k), (B, n_q, n_k) or "
            f"(B, n_heads, n_q, n_k), got shape {mask.shape}"
        )
    require_broadcastable("mask", mask, *layouts[mask.ndim])
    return x_q, x_kv, params, mask


def mha_forward(x_q, x_kv, params: dict, n_heads: int, mask=None, check: bool = True,
                keep_weights: bool = True, precision: str = "fp32",
                kernel: AttentionKernel = LOCAL_ATTENTION):
    """Multi-head attention, returning (out (B, n_q, d_model), cache).

    x_q: (B, n_q, d_model) queries; x_kv: (B, n_k, d_kv_in) keys/values. For self-attention
    pass the same array twice. params: see `init_mha_params`.
    mask: bool, True = may attend, of one of these shapes (each size may also be 1):
      (n_q, n_k)              the same mask for every sequence, e.g. causal_mask(n);
      (B, n_q, n_k)           per sequence, e.g. padding_mask(lengths, n) of shape (B, 1, n_k);
      (B, n_heads, n_q, n_k)  per sequence and head.
    A 3-dim mask gets a head axis inserted, so it is shared by all heads.

    check=False (the model's inner loop) trusts the caller: no input checks, and params may
    leave out "b_o" (no output bias: a tensor-parallel rank adds it after
    summing the ranks' partial outputs, chapter 7). n_heads then counts the heads of this
    params' columns. keep_weights=False: selective recomputation (see `sdpa_forward`).
    precision: mixed precision in every product (see `sdpa_forward`). mask may also be
    "causal": causal over the positions the kernel attends over. kernel: what runs between
    the projections (`AttentionKernel`; the serial sdpa by default, context parallelism
    passes its own).
    """
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"mask: expected a bool array, None or 'causal', got {mask!r}")
    if check:
        x_q, x_kv, params, checked = _check_mha_inputs(x_q, x_kv, params, n_heads,
                                                       None if causal else mask)
        mask = mask if causal else checked
    if not causal and mask is not None and mask.ndim == 3:
        mask = mask[:, None]  # insert the head axis: the same mask for every head
    q, cache_q = linear_forward(x_q, params["w_q"], params["b_q"], precision)
    k, cache_k = linear_forward(x_kv, params["w_k"], params["b_k"], precision)
    v, cache_v = linear_forward(x_kv, params["w_v"], params["b_v"], precision)
    q, k, v = (split_heads(a, n_heads) for a in (q, k, v))
    heads, attn_cache = kernel.forward(q, k, v, mask,  # (B, n_heads, n_q, d_head)
                                       keep_weights=keep_weights, precision=precision)
    out, cache_o = linear_forward(merge_heads(heads), params["w_o"], params.get("b_o"),
                                  precision)
    cache = {
        "x_q": x_q,
        "params": params,
        "n_heads": n_heads,
        "attn": attn_cache,
        "kernel": kernel,
        "linear": (cache_q, cache_k, cache_v, cache_o),
    }
    return out, cache


def mha_backward_input(dout, cache, check: bool = True):
    """B of multi-head attention: (dx_q, dx_kv, w_work), the input gradients and what W needs.

    w_work holds, for each projection "q", "k", "v", "o", its output gradient and linear
    cache (its input and weights) - not the attention weights, which B alone reads.
    sdpa has no weights: its whole backward is B."""
    x_q, params, n_heads = cache["x_q"], cache["params"], cache["n_heads"]
    cache_q, cache_k, cache_v, cache_o = cache["linear"]
    if check:
        dout = as_float_array("dout", dout)
        require_shape("dout", dout, x_q.shape[:2] + (params["w_o"].shape[1],), "shape of out")
        require_dtype("dout", dout, x_q.dtype, "dtype of out")
    dconcat = linear_backward_input(dout, cache_o)
    dq, dk, dv = (merge_heads(a) for a in cache["kernel"].backward(
        split_heads(dconcat, n_heads), cache["attn"]))
    dx_q = linear_backward_input(dq, cache_q)
    dx_kv = linear_backward_input(dk, cache_k) + linear_backward_input(dv, cache_v)
    w_work = {"q": (dq, cache_q), "k": (dk, cache_k), "v": (dv, cache_v), "o": (dout, cache_o)}
    return dx_q, dx_kv, w_work


def mha_backward_weight(w_work) -> dict:
    """W of multi-head attention: grads with the keys of params ("b_o" only if the forward
    pass had it), from `mha_backward_input`'s w_work."""
    grads = {}
    for name, (dout, lin_cache) in w_work.items():
        grads["w_" + name], grads["b_" + name] = linear_backward_weight(dout, lin_cache)
    return {name: grads[name] for name in MHA_PARAM_NAMES if grads[name] is not None}


def mha_backward(dout, cache, check: bool = True):
    """Gradients of multi-head attention: returns (dx_q, dx_kv, grads), B then W.

    dout: (B, n_q, d_model). grads has the same keys and shapes as params. For
    self-attention (x_q and x_kv the same array) the gradient w.r.t. x is dx_q + dx_kv.
    """
    dx_q, dx_kv, w_work = mha_backward_input(dout, cache, check)
    return dx_q, dx_kv, mha_backward_weight(w_work)


def mha_forward_loop(x_q, x_kv, params: dict, n_heads: int, mask=None) -> np.ndarray:
    """Reference multi-head attention that loops over heads; returns out (B, n_q, d_model).

    Head h uses columns h*d_head : (h+1)*d_head of w_q, w_k, w_v (and the matching biases),
    runs ordinary attention, and the head outputs are concatenated before w_o. Same
    arguments and result as `mha_forward`, written for reading rather than speed.
    """
    x_q, x_kv, params, mask = _check_mha_inputs(x_q, x_kv, params, n_heads, mask)
    d_head = params["w_q"].shape[1] // n_heads
    head_outputs = []
    for h in range(n_heads):
        cols = slice(h * d_head, (h + 1) * d_head)
        q = x_q @ params["w_q"][:, cols] + params["b_q"][cols]
        k = x_kv @ params["w_k"][:, cols] + params["b_k"][cols]
        v = x_kv @ params["w_v"][:, cols] + params["b_v"][cols]
        mask_h = mask
        if mask is not None and mask.ndim == 4:
            mask_h = mask[:, h if mask.shape[1] > 1 else 0]
        out_h, _ = scaled_dot_product_attention(q, k, v, mask_h)
        head_outputs.append(out_h)
    return np.concatenate(head_outputs, axis=-1) @ params["w_o"] + params["b_o"]


# --------------------------------------------------------------------------- blocks of keys
#
# Causal attention between two ranges of global positions, and the online softmax (Milakov and
# Gimelshein 2018; the heart of FlashAttention and of ring attention, chapter 8). A partial
# result over some of the keys is (m, l, acc): per query the largest score m,
# l = sum_j exp(s_j - m) and acc = sum_j exp(s_j - m) v_j (un-normalised). Partials over
# disjoint key sets merge exactly, so attention can be computed one key block at a time.


def causal_block_kind(q_range: tuple[int, int], k_range: tuple[int, int]) -> str:
    """How causal attention treats queries at positions [q_lo, q_hi) against keys [k_lo, k_hi):
    "skip" (every key is in every query's future: no compute), "full" (every key is at or
    before every query: no mask needed) or "masked" (the block crosses the diagonal)."""
    (q_lo, q_hi), (k_lo, k_hi) = q_range, k_range
    if k_lo > q_hi - 1:
        return "skip"
    if k_hi - 1 <= q_lo:
        return "full"
    return "masked"


def causal_block_mask(q_range: tuple[int, int], k_range: tuple[int, int]) -> np.ndarray:
    """Bool (n_q, n_k) causal mask between two position ranges: True where k <= q (global
    positions, so a block away from the diagonal is all True or all False)."""
    return np.arange(*k_range)[None, :] <= np.arange(*q_range)[:, None]


def block_scores(q: np.ndarray, k: np.ndarray, q_range: tuple[int, int] | None = None,
                 k_range: tuple[int, int] | None = None) -> np.ndarray:
    """Scaled scores (q / sqrt(d)) k^T of one block, (..., n_q, n_k), with -inf where the
    causal mask (from the global ranges, if given) forbids attending.

    q: (..., n_q, d), k: (..., n_k, d)."""
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    scores = (q * scale) @ np.swapaxes(k, -1, -2)
    if q_range is not None and causal_block_kind(q_range, k_range) != "full":
        np.copyto(scores, -np.inf, where=~causal_block_mask(q_range, k_range))
    return scores


def partial_softmax(scores: np.ndarray, v: np.ndarray) -> tuple:
    """The partial result (m, l, acc) of one key block: m, l (..., n_q, 1), acc (..., n_q, d_v).

    scores: (..., n_q, n_k), -inf where masked; v: (..., n_k, d_v). A query whose scores are
    all -inf gets m = -inf, l = 0 and acc = 0 (it contributes nothing when merged)."""
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - exp_shift(m))
    return m, np.sum(e, axis=-1, keepdims=True), e @ v


def empty_partial(q_shape: tuple, d_v: int, dtype) -> tuple:
    """The partial result over no keys at all (the identity of `merge_partials`), for queries
    of shape q_shape = (..., n_q, d_k)."""
    rows = tuple(q_shape[:-1]) + (1,)
    return (np.full(rows, -np.inf, dtype=dtype), np.zeros(rows, dtype=dtype),
            np.zeros(tuple(q_shape[:-1]) + (d_v,), dtype=dtype))


def merge_partials(a: tuple, b: tuple) -> tuple:
    """Merge two partial results (m, l, acc) over disjoint key sets into the one over their
    union: rescale both to the larger max, m = max(m_a, m_b), by exp(m_a - m) and exp(m_b - m)."""
    (m_a, l_a, acc_a), (m_b, l_b, acc_b) = a, b
    m = np.maximum(m_a, m_b)
    shift = exp_shift(m)  # both -inf: no keys yet, keep the weights at 0
    w_a, w_b = np.exp(m_a - shift), np.exp(m_b - shift)
    return m, l_a * w_a + l_b * w_b, acc_a * w_a + acc_b * w_b


def finish_partial(partial: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Attention output and log-sum-exp from a partial over all keys: out = acc / l
    (..., n_q, d_v) and lse = m + log l (..., n_q, 1); a query with no keys gets out 0 and
    lse -inf."""
    m, total, acc = partial
    has_keys = total > 0
    out = np.divide(acc, total, out=np.zeros_like(acc), where=has_keys)
    lse = np.full_like(m, -np.inf)
    np.add(m, np.log(total, out=np.zeros_like(total), where=has_keys), out=lse, where=has_keys)
    return out, lse


def block_attention_grads(scores, q, k, v, dout, lse, delta) -> tuple:
    """One block's share of the attention gradients (dq, dk, dv), FlashAttention-2 style.

    scores: (..., n_q, n_k) from `block_scores`; q (..., n_q, d), k, v (..., n_k, d),
    dout (..., n_q, d_v); lse (..., n_q, 1) over ALL keys (from the forward pass) and
    delta = rowsum(dout * out) (..., n_q, 1). The probabilities are recomputed exactly as
    P = exp(S - lse), and the softmax backward P * (dP - rowsum(dP * P)) uses
    rowsum(dP * P) = rowsum(dout * out) = delta, which needs no other key block.
    """
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    probs = np.exp(scores - exp_shift(lse))  # a query with no keys: all scores -inf, P = 0
    dv = np.swapaxes(probs, -1, -2) @ dout
    dscores = dout @ np.swapaxes(v, -1, -2)
    dscores -= delta
    dscores *= probs
    dq = dscores @ k
    dq *= scale
    dk = np.swapaxes(dscores, -1, -2) @ q
    dk *= scale
    return dq, dk, dv
