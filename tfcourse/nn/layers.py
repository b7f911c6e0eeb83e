"""Chapter 4: the layers of a Transformer, each a forward/backward pair of pure functions.

    out, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(dout, cache)

The cache holds what the backward pass needs; nothing is stored between calls. A layer with
weights splits its backward in two (zero-bubble pipelining, Qi et al. 2024): B, the gradient
of its input (`linear_backward_input`), which the layer before waits for, and W, the gradients
of its weights (`linear_backward_weight`), which only the optimiser waits for and which reads
just the input x and dout - never the weights - so it can run any time later. The whole
backward (`linear_backward`) is B then W, the one implementation of both. Shapes use
B (batch), T (time/sequence), d (model width), V (vocabulary), E (experts), N (tokens = B T).
Arrays keep their dtype.
These functions trust their callers about shapes (the model validates its inputs once, at
its public entry points) so that the inner loop stays lean.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tfcourse.nn.precision import matmul

# --------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None, precision: str = "fp32"):
    """y = x @ w + b for x (..., d_in), w (d_in, d_out), b (d_out,) -> y (..., d_out).

    b=None leaves the bias out: a tensor-parallel rank adds it once, after summing the ranks'
    partial products (chapter 7). precision "bf16" or "fp16": mixed precision - the product's
    inputs and its result are rounded to 16 bits, the sums kept in float32 (precision.matmul),
    in the backward pass too."""
    y = _matmul_2d(x, w, precision)
    if b is not None:
        y += b  # in place: saves allocating and filling a second (..., d_out) array
    return y, (x, w, b is not None, precision)


def _matmul_2d(x, w, precision: str = "fp32"):
    """x (..., k) @ w (k, n) as ONE (rows, k) @ (k, n) BLAS call. NumPy runs a 3-D @ 2-D
    product as one small matmul per leading index, which uses two threads far worse."""
    return matmul(x.reshape(-1, x.shape[-1]), w, precision).reshape(*x.shape[:-1], w.shape[-1])


def linear_backward_input(dout, cache):
    """B: dx = dout @ w^T (..., d_in), the gradient the layer before waits for."""
    _, w, _, precision = cache
    return _matmul_2d(dout, w.T, precision)


def linear_backward_weight(dout, cache):
    """W: (dw, db) = (x^T dout, dout summed), both over every leading (batch, time) axis; db
    is None for a layer without bias. Needs x and dout, not w."""
    x, _, has_bias, precision = cache
    dout_2d = dout.reshape(-1, dout.shape[-1])
    dw = matmul(x.reshape(-1, x.shape[-1]).T, dout_2d, precision)
    db = dout_2d.sum(axis=0) if has_bias else None
    return dw, db


def linear_backward(dout, cache):
    """(dx, dw, db) of y = x @ w + b: B (`linear_backward_input`) then W
    (`linear_backward_weight`)."""
    dx = linear_backward_input(dout, cache)
    dw, db = linear_backward_weight(dout, cache)
    return dx, dw, db


# --------------------------------------------------------------------------- embedding


def embedding_forward(ids, table):
    """Rows of `table` (V, d) picked by integer `ids` (...,) -> (..., d)."""
    return table[ids], (ids, table.shape)


def embedding_backward(dout, cache):
    """Gradient of the table (V, d): row v accumulates dout at every position where ids == v.
    All of it is W (a weight gradient): the integer ids have no gradient, so there is no B."""
    ids, table_shape = cache
    dtable = np.zeros(table_shape, dtype=dout.dtype)
    np.add.at(dtable, ids.reshape(-1), dout.reshape(-1, table_shape[1]))
    return dtable


# --------------------------------------------------------------------------- layer norm


def layernorm_forward(x, gamma, beta, eps: float = 1e-5):
    """LayerNorm over the last axis: gamma * (x - mean) / sqrt(var + eps) + beta.

    x: (..., d); gamma, beta: (d,). Returns (out (..., d), cache).
    """
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    rstd = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    x_hat = centred * rstd
    return x_hat * gamma + beta, (x_hat, rstd, gamma)


def layernorm_backward_input(dout, cache):
    """B: dx of LayerNorm. With x_hat = (x - mean) * rstd and g = dout * gamma,
    differentiating through the mean and the variance gives
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))."""
    x_hat, rstd, gamma = cache
    g = dout * gamma
    return rstd * (g - g.mean(axis=-1, keepdims=True)
                   - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))


def layernorm_backward_weight(dout, cache):
    """W: (dgamma, dbeta) = (dout * x_hat, dout), each summed over every leading axis."""
    x_hat = cache[0]
    d = x_hat.shape[-1]
    dgamma = (dout * x_hat).reshape(-1, d).sum(axis=0)
    dbeta = dout.reshape(-1, d).sum(axis=0)
    return dgamma, dbeta


def layernorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of LayerNorm: B (`layernorm_backward_input`) then W
    (`layernorm_backward_weight`)."""
    dx = layernorm_backward_input(dout, cache)
    dgamma, dbeta = layernorm_backward_weight(dout, cache)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- activations

GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Written with in-place operations on one temporary: on large activations NumPy's
    element-wise passes cost more than the arithmetic (x**3 alone was 20x slower than x*x*x).
    """
    t = x * x
    t *= 0.044715
    t += 1.0
    t *= x
    t *= GELU_C
    np.tanh(t, out=t)  # t = tanh(sqrt(2/pi) (x + 0.044715 x^3))
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    """d/dx GELU = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    local = x * x
    local *= 3 * 0.044715 * GELU_C
    local += GELU_C  # sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    local *= x
    local *= 1.0 - t * t
    local += t
    local += 1.0
    local *= 0.5
    local *= dout
    return local


def relu_forward(x):
    """max(x, 0)."""
    return np.maximum(x, 0), x > 0


def relu_backward(dout, cache):
    """Gradient passes where the input was positive."""
    return dout * cache


ACTIVATIONS = {"gelu": (gelu_forward, gelu_backward), "relu": (relu_forward, relu_backward)}


# --------------------------------------------------------------------------- feed-forward


def ffn_forward(x, w1, b1, w2, b2=None, activation: str = "gelu", precision: str = "fp32"):
    """Position-wise feed-forward network act(x @ w1 + b1) @ w2 + b2.

    x: (..., d), w1: (d, d_ff), b1: (d_ff,), w2: (d_ff, d), b2: (d,) or None (no output bias:
    see linear_forward). Returns (out, cache). precision: see linear_forward.
    """
    act_forward, _ = ACTIVATIONS[activation]
    hidden, cache1 = linear_forward(x, w1, b1, precision)
    activated, cache_act = act_forward(hidden)
    out, cache2 = linear_forward(activated, w2, b2, precision)
    return out, (cache1, cache_act, cache2, activation)


def ffn_backward_input(dout, cache):
    """B of the feed-forward network: (dx, w_work). w_work is what W needs and no more: each
    linear layer's output gradient and cache (its input and weights), ((dhidden, cache1),
    (dout, cache2)); the activation's cache is not in it."""
    cache1, cache_act, cache2, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    dactivated = linear_backward_input(dout, cache2)
    dhidden = act_backward(dactivated, cache_act)
    dx = linear_backward_input(dhidden, cache1)
    return dx, ((dhidden, cache1), (dout, cache2))


def ffn_backward_weight(w_work):
    """W: {"w1", "b1", "w2", "b2"} from `ffn_backward_input`'s w_work ("b2" only if the
    forward pass had one)."""
    (dhidden, cache1), (dout, cache2) = w_work
    dw1, db1 = linear_backward_weight(dhidden, cache1)
    dw2, db2 = linear_backward_weight(dout, cache2)
    grads = {"w1": dw1, "b1": db1, "w2": dw2}
    if db2 is not None:
        grads["b2"] = db2
    return grads


def ffn_backward(dout, cache):
    """Returns (dx, {"w1", "b1", "w2", "b2"}) for the feed-forward network ("b2" only if the
    forward pass had one): B then W."""
    dx, w_work = ffn_backward_input(dout, cache)
    return dx, ffn_backward_weight(w_work)


# --------------------------------------------------------------------------- mixture of experts


class Routing(NamedTuple):
    """Where a mixture-of-experts layer sent its N tokens in one call (statistics of that
    call, kept in its cache: no state between calls)."""

    probs: np.ndarray              # (N, E) the router's softmax over all experts
    experts: np.ndarray            # (N, k) int: each token's choices, best first
    gates: np.ndarray              # (N, k) the weight of each choice in the output
    kept: np.ndarray               # (N, k) bool: False where the expert was full (dropped)
    capacity: int                  # slots per expert (moe_capacity)
    routed: np.ndarray             # (E,) int: choices of each expert, before the capacity cut
    tokens_per_expert: np.ndarray  # (E,) int: tokens each expert processed
    dropped: int                   # choices dropped at the capacity cut (tokens, for k = 1)
    aux_loss: float                # the load-balancing loss E sum_e f_e P_e


class MoECache(NamedTuple):
    routing: Routing
    router_cache: tuple            # linear_forward's cache of the router
    slots: list                    # per expert: (rows, ranks) of the (token, choice) it kept
    expert_cache: object           # experts.forward's cache (the serial one: per expert FFN's)
    expert_outs: list              # per expert: FFN_e(x) of its tokens, before the gate
    first_fraction: np.ndarray     # (E,) f_e: tokens whose first choice is e, over N
    shape: tuple                   # x's shape
    experts: ExpertOps             # how the experts were reached (the backward goes back so)


def moe_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * n_tokens * top_k / n_experts) (Switch
    Transformer, Fedus et al. 2021, eq. 3, with GShard's k choices per token). The product
    is rounded to 9 decimals before the ceiling, so a factor's binary rounding error costs no
    slot: 1.1 x 10 tokens is 11 slots, not 12 (1.1 * 10 = 11.000000000000002 in floats)."""
    return math.ceil(round(capacity_factor * n_tokens * top_k / n_experts, 9))


def moe_choose(probs, top_k: int):
    """Each token's k most probable experts and their gates: (experts (N, k), gates (N, k)).
    Equal probabilities go to the lower expert index (a stable sort), so routing is
    deterministic. Gates: k = 1 is Switch's - the softmax probability itself, p_e(x);
    k >= 2 renormalises over the chosen experts, p_e / sum_chosen p (GShard's top-2 gates;
    Mixtral's softmax over the top-k logits is the same number)."""
    experts = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    chosen = np.take_along_axis(probs, experts, axis=1)
    gates = chosen if top_k == 1 else chosen / chosen.sum(axis=1, keepdims=True)
    return experts, gates


def moe_claims(experts, n_experts: int) -> np.ndarray:
    """(k, E) int: how many tokens chose expert e as their choice r (r = 0 the first)."""
    return np.stack([np.bincount(column, minlength=n_experts) for column in experts.T])


def moe_route(probs, top_k: int, capacity: int, claimed_before=None):
    """Top-k routing with a capacity: (experts (N, k), gates (N, k), kept (N, k)).

    Choices and gates: `moe_choose`. Capacity: every choice r = 0 (first) of every token
    claims a slot before any choice r = 1, in token order (GShard, Lepikhin et al. 2020,
    Algorithm 1); a choice that finds its expert's `capacity` slots taken is dropped.
    claimed_before: (k, E) slots of expert e already claimed when these N tokens' choices r
    come (default none): where these tokens are one rank's part of a larger batch, the
    claims of every round before r and of the tokens before them in round r (`ExpertOps`'s
    agree), so the cut is the whole batch's."""
    n_tokens, n_experts = probs.shape
    experts, gates = moe_choose(probs, top_k)
    kept = np.zeros((n_tokens, top_k), dtype=bool)
    fill = np.zeros(n_experts, dtype=np.int64)
    for r in range(top_k):
        if claimed_before is not None:
            fill = np.asarray(claimed_before[r], dtype=np.int64)
        onehot = experts[:, r, None] == np.arange(n_experts)  # (N, E)
        before = np.cumsum(onehot, axis=0) - onehot           # same-rank claims before n
        position = fill[experts[:, r]] + before[np.arange(n_tokens), experts[:, r]]
        kept[:, r] = position < capacity
        fill = fill + onehot.sum(axis=0)
    return experts, gates, kept


def agree_alone(claims):
    """The serial `agree`: these tokens are the whole batch, so before their choices r come,
    the slots claimed are their choices of the rounds before r; their claims are all the
    claims."""
    return np.cumsum(claims, axis=0) - claims, claims


def experts_forward(params: dict, inputs: list, activation: str, precision: str):
    """The serial `forward`: expert e's FFN on inputs[e] (its tokens' rows), for every
    expert, all held here. Returns (outputs, per expert ffn_forward's cache)."""
    outs, caches = [], []
    for e, x_e in enumerate(inputs):
        w = {name: params[f"experts.{e}.{name}"] for name in ("w1", "b1", "w2", "b2")}
        out, cache = ffn_forward(x_e, w["w1"], w["b1"], w["w2"], w["b2"], activation, precision)
        outs.append(out)
        caches.append(cache)
    return outs, caches


def experts_backward_input(douts: list, caches):
    """The serial `backward_input`: (dinputs, w_work) - each expert's B on its tokens."""
    dxs, works = [], []
    for dout, cache in zip(douts, caches, strict=True):
        dx, work = ffn_backward_input(dout, cache)
        dxs.append(dx)
        works.append(work)
    return dxs, works


def experts_backward_weight(works) -> dict:
    """The serial `backward_weight`: {"experts.e.w1", ...} of every expert."""
    return {f"experts.{e}.{name}": g for e, work in enumerate(works)
            for name, g in ffn_backward_weight(work).items()}


@dataclasses.dataclass(frozen=True)
class ExpertOps:
    """How a mixture of experts reaches its experts - the serial one (the default) holds them
    all; expert parallelism (tfcourse.parallel.expert_parallel) holds a share on each rank
    and sends tokens to them with all-to-all.

    agree(claims (k, E)) -> (claimed_before (k, E), all_claims (k, E)): the routing
    decisions of the whole batch, for the capacity cut (`moe_route`), the number of tokens
    (all_claims[0].sum()) and the load-balancing loss's f (all_claims[0] / that);
    forward(params, inputs, activation, precision) -> (outputs, cache): FFN_e(inputs[e]) for
    every expert e, inputs[e] the rows of the tokens kept for e (dispatch, experts, combine);
    backward_input(douts, cache) -> (dinputs, w_work); backward_weight(w_work) -> the
    experts' gradients {"experts.e.w1", ...} (of the experts this process holds)."""

    agree: Callable = agree_alone
    forward: Callable = experts_forward
    backward_input: Callable = experts_backward_input
    backward_weight: Callable = experts_backward_weight


LOCAL_EXPERTS = ExpertOps()


def moe_forward(x, params: dict, top_k: int, capacity_factor: float,
                activation: str = "gelu", precision: str = "fp32",
                experts: ExpertOps = LOCAL_EXPERTS):
    """A mixture-of-experts feed-forward layer: y(x) = sum over kept choices of
    g_e(x) FFN_e(x), and its load-balancing loss. Returns (y, aux_loss, cache).

    x: (..., d), N = its number of tokens. params: "router.w" (d, E) - a linear router
    without bias, as in Switch and Mixtral - and for each expert e the model's FFN,
    "experts.e.w1" (d, d_ff), "experts.e.b1", "experts.e.w2" (d_ff, d), "experts.e.b2".
    Router probabilities p = softmax(x @ router.w); routing, gates and capacity: see
    `moe_route` and `moe_capacity`. A dropped choice contributes nothing (its expert never
    sees the token): with every choice dropped a token's output is zero, and the residual
    connection around the sublayer carries it.

    aux_loss = E sum_e f_e P_e (Switch Transformer, eq. 4-6): f_e the fraction of tokens
    whose first choice is e, before the capacity cut (not differentiable), P_e the mean
    router probability of e (differentiable). It is 1 when both are uniform. For k = 2 it
    uses the first choice, as GShard's mean(mask_1) does, so its value means the same for
    every k. The caller weights it (Switch: alpha = 0.01) and passes the weight to
    `moe_backward` as daux. cache.routing (a `Routing`) holds the step's statistics.

    experts: an `ExpertOps` (default: all experts here). Under expert parallelism x is one
    rank's tokens; capacity and f are then the whole batch's (agree), P_e this rank's mean,
    so the ranks' aux_loss weighted by their share of the tokens add up to the batch's.
    """
    shape = x.shape
    n_experts = params["router.w"].shape[1]
    x2 = x.reshape(-1, shape[-1])
    logits, router_cache = linear_forward(x2, params["router.w"], None, precision)
    probs = np.exp(log_softmax(logits))
    claimed_before, claims = experts.agree(moe_claims(moe_choose(probs, top_k)[0], n_experts))
    n_tokens = int(claims[0].sum())  # of the whole batch
    capacity = moe_capacity(n_tokens, n_experts, top_k, capacity_factor)
    chosen, gates, kept = moe_route(probs, top_k, capacity, claimed_before)
    slots = [np.nonzero((chosen == e) & kept) for e in range(n_experts)]  # an expert at most
    expert_outs, expert_cache = experts.forward(params, [x2[rows] for rows, _ in slots],
                                                activation, precision)  # once per token
    out = np.zeros(x2.shape, dtype=np.result_type(x2.dtype, gates.dtype))
    for (rows, ranks), expert_out in zip(slots, expert_outs, strict=True):
        out[rows] += gates[rows, ranks, None] * expert_out
    first_fraction = claims[0] / n_tokens
    aux_loss = float(n_experts * np.sum(first_fraction * probs.mean(axis=0)))
    routed = np.bincount(chosen.reshape(-1), minlength=n_experts)
    processed = np.bincount(chosen[kept], minlength=n_experts)
    routing = Routing(probs, chosen, gates, kept, capacity, routed, processed,
                      int(routed.sum() - processed.sum()), aux_loss)
    cache = MoECache(routing, router_cache, slots, expert_cache, expert_outs, first_fraction,
                     shape, experts)
    return out.reshape(shape), aux_loss, cache


def moe_backward_input(dout, cache: MoECache, daux: float = 0.0):
    """B of the mixture of experts: (dx, w_work), given dout = dL/dy and daux = dL/daux_loss
    (the loss's weight on the auxiliary loss, times any loss scale).

    Through the experts: each kept choice sends g dout to its expert (a dropped one sends
    nothing: its expert gets no gradient from that token). Through the gates:
    dg = dout . FFN_e(x) for kept choices; for k >= 2, g_i = p_i / S over the chosen S
    gives dp_j = (dg_j - sum_i dg_i g_i) / S; for k = 1, dp = dg. The auxiliary loss adds
    daux E f_e / N to dp_e of every token (f is a constant). Then the softmax,
    dlogits = p (dp - sum_e dp_e p_e), and the router: dx += dlogits @ router.w^T."""
    routing = cache.routing
    probs, experts, gates = routing.probs, routing.experts, routing.gates
    dout2 = dout.reshape(-1, dout.shape[-1])
    dx = np.zeros(dout2.shape, dtype=dout2.dtype)
    dgates = np.zeros_like(gates)
    for (rows, ranks), expert_out in zip(cache.slots, cache.expert_outs, strict=True):
        dgates[rows, ranks] = np.einsum("nd,nd->n", dout2[rows], expert_out)
    dxs, expert_work = cache.experts.backward_input(
        [gates[rows, ranks, None] * dout2[rows] for rows, ranks in cache.slots],
        cache.expert_cache)
    for (rows, _), dx_e in zip(cache.slots, dxs, strict=True):
        dx[rows] += dx_e
    if experts.shape[1] == 1:
        dchosen = dgates
    else:
        chosen = np.take_along_axis(probs, experts, axis=1)
        dchosen = (dgates - (dgates * gates).sum(axis=1, keepdims=True)) / chosen.sum(
            axis=1, keepdims=True)
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, experts, dchosen, axis=1)  # the k experts of a row differ
    if daux:
        dprobs += daux * probs.shape[1] / len(probs) * cache.first_fraction
    dlogits = probs * (dprobs - (dprobs * probs).sum(axis=1, keepdims=True))
    dx += linear_backward_input(dlogits, cache.router_cache)
    return dx.reshape(cache.shape), (dlogits, cache.router_cache, expert_work, cache.experts)


def moe_backward_weight(w_work) -> dict:
    """W: {"router.w", "experts.e.w1", ..., "experts.e.b2"}; an expert that processed no token
    gets zeros. Under expert parallelism, only the experts this rank holds."""
    dlogits, router_cache, expert_work, experts = w_work
    return {"router.w": linear_backward_weight(dlogits, router_cache)[0],
            **experts.backward_weight(expert_work)}


def moe_backward(dout, cache: MoECache, daux: float = 0.0):
    """(dx, grads) of the mixture of experts: B (`moe_backward_input`) then W
    (`moe_backward_weight`)."""
    dx, w_work = moe_backward_input(dout, cache, daux)
    return dx, moe_backward_weight(w_work)


# --------------------------------------------------------------------------- dropout


def dropout_forward(x, rate: float, rng: np.random.Generator | None):
    """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate).

    With rate == 0 (the default everywhere in the course) it is the identity and needs no rng,
    so runs stay bit-for-bit reproducible and comparable across parallel modes.
    """
    if rate == 0.0:
        return x, None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected a dropout probability in [0, 1), got {rate}")
    if rng is None:
        raise ValueError("rng: dropout with rate > 0 needs a np.random.Generator, got None")
    keep = (rng.random(x.shape) >= rate).astype(x.dtype) / x.dtype.type(1.0 - rate)
    return x * keep, keep


def dropout_backward(dout, cache):
    """Gradient flows only through the kept entries, with the same scale."""
    return dout if cache is None else dout * cache


# --------------------------------------------------------------------------- loss


def exp_shift(m):
    """What to subtract before exponentiating scores whose maximum is `m`: m itself, or 0
    where m is -inf. A row with nothing possible (all -inf, e.g. a fully masked query) has
    max -inf, and -inf - (-inf) is NaN; shifting it by 0 gives exp(-inf) = 0 instead.

    The one home of this rule: softmax, log_softmax, the online softmax of ring attention and
    its merge all use it."""
    return np.where(np.isfinite(m), m, 0)


def log_softmax(logits):
    """log softmax over the last axis, computed as x - max - log(sum(exp(x - max))).

    Entries equal to -inf get -inf; a row that is entirely -inf (nothing possible, e.g. a
    fully masked padding position) gives all -inf rather than NaN, like `softmax`'s zeros.
    """
    shifted = logits - exp_shift(logits.max(axis=-1, keepdims=True))
    total = np.exp(shifted).sum(axis=-1, keepdims=True)
    possible = total > 0
    log_total = np.log(total, out=np.zeros_like(total), where=possible)
    return np.subtract(shifted, log_total, out=np.full_like(shifted, -np.inf), where=possible)


def cross_entropy_forward(logits, targets, ignore_index: int | None = None):
    """Mean negative log-likelihood of `targets` under softmax(logits).

    logits: (..., V); targets: (...) integers in [0, V). Positions whose target equals
    `ignore_index` (padding) count neither in the sum nor in the mean. Returns (loss, cache);
    the loss is a Python float, 0.0 if every position is ignored.
    """
    logp = log_softmax(logits)
    flat_logp = logp.reshape(-1, logp.shape[-1])
    flat_targets = targets.reshape(-1)
    valid = np.ones_like(flat_targets, dtype=bool) if ignore_index is None else (
        flat_targets != ignore_index)
    n_valid = int(valid.sum())
    picked = flat_logp[np.arange(flat_targets.size), np.where(valid, flat_targets, 0)]
    picked = np.where(valid, picked, 0)  # an ignored row may be all -inf: -inf * 0 is NaN
    loss = float(-picked.sum() / max(n_valid, 1))
    return loss, (logp, flat_targets, valid, n_valid)


def cross_entropy_backward(cache, dloss: float = 1.0):
    """dlogits = (softmax(logits) - onehot(target)) / n_valid at valid positions, 0 elsewhere."""
    logp, flat_targets, valid, n_valid = cache
    dlogits = np.exp(logp).reshape(-1, logp.shape[-1])
    dlogits[np.arange(flat_targets.size), np.where(valid, flat_targets, 0)] -= 1.0
    dlogits *= (valid * (dloss / max(n_valid, 1)))[:, None].astype(dlogits.dtype)
    return dlogits.reshape(logp.shape)
