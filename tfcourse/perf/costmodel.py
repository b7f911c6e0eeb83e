"""Chapter 5 (and every later chapter's predictions): what training costs, in closed form.

FLOPs, memory and communication of the course's model, written as small pure functions so
that notebooks can plot a prediction next to each measurement. Conventions: a multiply-add is
2 FLOPs; sizes are in bytes; time in seconds; `p` is the number of processes.
"""

from __future__ import annotations

import math

import numpy as np

from tfcourse.nn.model import block_param_shapes, is_moe_block
from tfcourse.nn.validate import require_nonnegative_real, require_positive_int
from tfcourse.parallel.plans.pipeline import check_schedule_args
from tfcourse.parallel.plans.sequence import sequence_chunks
from tfcourse.perf.hardware import matmul_flops

# --------------------------------------------------------------------------- parameters


def block_params(d_model: int, d_ff: int, n_experts: int = 0) -> int:
    """One pre-LN block: attention 4d^2 + 4d, FFN 2 d d_ff + d_ff + d, two LayerNorms 4d -
    counted from the model's own parameter shapes (the one home of the architecture). With
    n_experts E > 0 the FFN is a mixture of experts: E FFNs and a d x E router."""
    return sum(math.prod(shape)
               for shape in block_param_shapes("", d_model, d_ff, n_experts).values())


def lm_params(vocab_size: int, d_model: int, n_layers: int, d_ff: int, max_len: int,
              tied_head: bool = False, n_experts: int = 0, moe_every: int = 2) -> int:
    """All parameters of `tfcourse.nn.model` (learned positions): embeddings (V + max_len) d,
    n_layers blocks, final LayerNorm 2d and the head d V + V.

    tied_head=True counts as GPT-2 and GPT-3 do: the head reuses the token embedding
    (logits = h E^T, no head bias), so it adds no parameters. The course's model has its own
    head; published sizes (GPT-2 small's 124M) are tied counts. n_experts > 0: every
    moe_every-th block (model.is_moe_block) holds n_experts FFNs and a router - all stored
    and trained, though each token uses only top_k of them."""
    d = d_model
    embeddings = vocab_size * d + max_len * d
    head = 0 if tied_head else d * vocab_size + vocab_size
    n_moe = sum(is_moe_block(i, n_experts, moe_every) for i in range(n_layers))
    blocks = (n_layers - n_moe) * block_params(d, d_ff) + (
        n_moe * block_params(d, d_ff, n_experts) if n_moe else 0)
    return embeddings + blocks + 2 * d + head


def matmul_params(vocab_size: int, d_model: int, n_layers: int, d_ff: int) -> int:
    """N in "6N": the weights that take part in a matmul for every token (all blocks' matrices
    and the head); embedding lookups, biases and LayerNorm gains cost no matmul FLOPs."""
    d = d_model
    return n_layers * (4 * d * d + 2 * d * d_ff) + d * vocab_size


# --------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(vocab_size: int, d_model: int, n_layers: int, d_ff: int,
                            seq_len: int) -> dict[str, int]:
    """Matmul FLOPs of one token's forward pass, by kind (attention computed in full, as the
    NumPy model does: masked scores are computed, then discarded)."""
    d, T = d_model, seq_len
    return {
        "qkv projections": n_layers * 3 * matmul_flops(1, d, d),
        "attention scores QK^T": n_layers * matmul_flops(1, d, T),
        "attention values AV": n_layers * matmul_flops(1, T, d),
        "output projection": n_layers * matmul_flops(1, d, d),
        "feed-forward": n_layers * 2 * matmul_flops(1, d, d_ff),
        "head": matmul_flops(1, d, vocab_size),
    }


def training_flops_per_token(vocab_size: int, d_model: int, n_layers: int, d_ff: int,
                             seq_len: int, recompute: str = "none") -> int:
    """Forward + backward = 3 x forward: the backward pass of y = x W needs two matmuls of
    the same size (dx = dy W^T and dW = x^T dy). Equals 6N + 12 L d T: the model FLOPs that
    MFU counts.

    recompute (the model's config.recompute): the FLOPs the hardware executes when the
    backward pass recomputes - "full" runs every block's forward a second time (the head's is
    kept): about 8N + 16 L d T, Megatron's "8 instead of 6"; "selective" recomputes only the
    attention scores QK^T (the softmax costs no matmul). Divided by time and peak this gives
    the hardware FLOPs utilisation (HFU); MFU never counts recomputed FLOPs."""
    forward = forward_flops_per_token(vocab_size, d_model, n_layers, d_ff, seq_len)
    again = {"none": 0, "selective": forward["attention scores QK^T"],
             "full": sum(v for k, v in forward.items() if k != "head")}
    if recompute not in again:
        raise ValueError(f"recompute: expected one of {list(again)}, got {recompute!r}")
    return 3 * sum(forward.values()) + again[recompute]


def generation_flops_per_token(vocab_size: int, d_model: int, n_layers: int, d_ff: int,
                               context: int, kv_cache: bool = True) -> int:
    """Matmul FLOPs to produce one new token whose context (itself included) is `context`
    positions long. With a KV cache the model runs that one position: its projections, MLP
    and head (2N) and one query row against `context` cached keys and values
    (4 L d T): O(T d). Without, it runs the whole context again: `context` times that, O(T^2 d)
    in attention (and T x 2N in the matmuls)."""
    one = sum(forward_flops_per_token(vocab_size, d_model, n_layers, d_ff, context).values())
    return one if kv_cache else context * one


def kv_cache_bytes(n_layers: int, d_model: int, bytes_per_value: int = 4, tokens: int = 1,
                   batch: int = 1) -> int:
    """Bytes of the KV cache: every block keeps a key and a value vector of d_model values
    (all heads) for every token of every sequence, 2 L d x bytes per token."""
    return 2 * n_layers * d_model * bytes_per_value * tokens * batch


def decode_arithmetic_intensity(batch: int, bytes_per_value: int = 4) -> float:
    """FLOPs per byte of weights read in one decoding step of `batch` sequences: each of the N
    matmul weights is read once per step and does 2 FLOPs per sequence,
    2 B N / (N bytes_per_value) = 2B / bytes_per_value, whatever N. The KV cache and
    activations are left out (small next to the weights at short contexts). Prefill of T
    tokens reads the weights once for B T tokens: 2 B T / bytes_per_value."""
    return 2.0 * batch / bytes_per_value


def memory_bound_batch(peak_flops_per_s: float, bandwidth_bytes_per_s: float,
                       bytes_per_value: int = 4) -> float:
    """The batch where decoding's intensity 2B / bytes_per_value reaches the roofline's ridge
    (peak FLOP/s over bandwidth): below it a decoding step is bound by reading the weights,
    and more sequences per step are nearly free."""
    return peak_flops_per_s / bandwidth_bytes_per_s * bytes_per_value / 2


def tp_decode_comm_seconds(n_layers: int, batch: int, d_model: int, bytes_per_value: int,
                           p: int, alpha: float, beta: float) -> float:
    """alpha-beta time of tensor-parallel decoding's communication for one new token of
    `batch` sequences (tfcourse.parallel.inference).

    Megatron's g all-reduces each sublayer's partial output, so every block runs two
    all-reduces of the new positions' activations, B x d values: 2 L of them per step. The
    embedding, final LayerNorm and head are replicated (every rank holds them whole and sees
    the same input), so they add none. With ring_allreduce_time for each:

        t = 2 L [2 (p - 1) alpha + 2 (p - 1) / p  B d bytes beta].

    For a few sequences B d bytes is a few KB and the latency term 4 L (p - 1) alpha
    dominates: decoding's communication is latency-bound (Pope et al. 2022), and it does not
    shrink with a smaller model. The prefill of T prompt positions is the same sum with
    batch = B T. (MPI's own Allreduce may use fewer messages for small buffers - recursive
    doubling, log2 p of them - so the ring's 2 (p - 1) alpha is an upper estimate there.)"""
    n_layers = require_positive_int("n_layers", n_layers)
    values = require_positive_int("batch", batch) * require_positive_int("d_model", d_model)
    n_bytes = values * require_positive_int("bytes_per_value", bytes_per_value)
    return 2 * n_layers * ring_allreduce_time(n_bytes, p, alpha, beta)


def tp_decode_pays_off_width(p: int, alpha: float, beta: float, flops_per_s: float,
                             batch: int = 1, bytes_per_value: int = 4) -> float:
    """The model width d above which splitting decoding over p ranks (tensor parallelism)
    saves more matmul time per token than its all-reduces cost.

    One step of B sequences runs 2 N B matmul FLOPs with N = 12 L d^2 (per block the four
    d x d attention projections, 4 d^2, and the d x 4d MLP, 8 d^2; the head and the attention
    over the cache are left out). On p ranks each does 1/p of them, which saves

        2 N B (1 - 1/p) / F = 24 L d^2 B (p - 1) / (p F)       (F: flops_per_s)

    per step, against tp_decode_comm_seconds = 4 L (p - 1) [alpha + B d bytes beta / p].
    Dividing both by 4 L (p - 1) / p, the layers and the (p - 1) cancel:

        6 B d^2 / F = p alpha + B d bytes beta,
        d* = [F B bytes beta + sqrt((F B bytes beta)^2 + 24 B p F alpha)] / (12 B),

    which is sqrt(p F alpha / (6 B)) when beta = 0: the latency is paid per all-reduce while
    the saving grows as d^2, so only wide models gain, and more ranks need wider ones.
    F is the rate the matmuls really run at: at small batch decoding is bound by reading the
    weights (decode_arithmetic_intensity), so pass min(peak, 2 B / bytes x bandwidth)."""
    p = require_positive_int("p", p)
    if p < 2:
        raise ValueError(f"p: expected at least 2 ranks to split over, got {p}")
    alpha, beta = require_nonnegative_real("alpha", alpha), require_nonnegative_real("beta", beta)
    rate = require_nonnegative_real("flops_per_s", flops_per_s)
    if rate == 0:
        raise ValueError(f"flops_per_s: expected a positive rate, got {flops_per_s!r}")
    batch = require_positive_int("batch", batch)
    linear = rate * batch * require_positive_int("bytes_per_value", bytes_per_value) * beta
    return (linear + math.sqrt(linear**2 + 24 * batch * p * rate * alpha)) / (12 * batch)


class FlopCounter(np.ndarray):
    """An ndarray that adds the FLOPs of every matmul it takes part in to `FlopCounter.total`.

    Wrap a model's parameters and inputs with `.view(FlopCounter)` and run it: results of
    operations stay FlopCounters, so every `@` in the forward and backward passes is counted.
    """

    total = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(x):
            if isinstance(x, tuple):
                return tuple(plain(item) for item in x)
            return x.view(np.ndarray) if isinstance(x, FlopCounter) else x

        args = [plain(x) for x in inputs]
        if ufunc is np.matmul and method == "__call__":
            a, b = np.asarray(args[0]), np.asarray(args[1])
            batch = int(np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), dtype=np.int64))
            FlopCounter.total += batch * matmul_flops(a.shape[-2], a.shape[-1], b.shape[-1])
        result = getattr(ufunc, method)(*args, **{k: plain(v) for k, v in kwargs.items()})
        if "out" in kwargs:  # written in place: hand back the caller's own output array(s)
            out = kwargs["out"]
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return result.view(FlopCounter) if isinstance(result, np.ndarray) else result


def count_matmul_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run fn(*args, **kwargs) with every ndarray argument (and dict of ndarrays) wrapped in
    FlopCounter; return (matmul FLOPs performed, fn's result)."""

    def wrap(x):
        if isinstance(x, dict):
            return {k: wrap(v) for k, v in x.items()}
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            return x.view(FlopCounter)
        return x

    FlopCounter.total = 0
    result = fn(*(wrap(a) for a in args), **{k: wrap(v) for k, v in kwargs.items()})
    return FlopCounter.total, result


# --------------------------------------------------------------------------- utilisation


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """tokens/s x FLOPs per token / peak FLOP/s.

    With the model's FLOPs (training_flops_per_token) and the hardware's datasheet peak this is
    the model FLOPs utilisation, MFU (Chowdhery et al. 2022, PaLM); with recomputed FLOPs
    counted (recompute="full") it is the hardware FLOPs utilisation, HFU. This course's CPU has
    no reliable datasheet peak (a virtual machine's share of a boosting core), so chapters 0
    and 5 divide by a *measured* matmul peak instead and call the result the fraction of
    measured matmul peak: an upper bound on the true MFU."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak_flops_per_s: expected > 0, got {peak_flops_per_s}")
    return tokens_per_s * flops_per_token / peak_flops_per_s


def amdahl_speedup(serial_fraction: float, p):
    """Strong scaling bound: 1 / (s + (1 - s) / p) for a fixed problem on p processes."""
    _check_fraction(serial_fraction)
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / np.asarray(p, dtype=float))


def gustafson_speedup(serial_fraction: float, p):
    """Weak scaling: s + (1 - s) p when the problem grows with p (s measured on p processes)."""
    _check_fraction(serial_fraction)
    return serial_fraction + (1.0 - serial_fraction) * np.asarray(p, dtype=float)


def _check_fraction(s: float) -> None:
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"serial_fraction: expected a value in [0, 1], got {s}")


# --------------------------------------------------------------------------- memory


def training_state_bytes(n_params: int, bytes_per_value: int = 4,
                         mixed_precision: bool = False) -> dict[str, int]:
    """Bytes of the training state of N parameters trained with AdamW.

    Single precision (mixed_precision=False, as this course trains): 4 copies of N values of
    bytes_per_value - parameters, gradients and Adam's moments m and v - 16 bytes per parameter
    in float32. Mixed precision (Micikevicius et al. 2018; the ZeRO paper's K = 12): parameters
    and gradients in 16 bits (bytes_per_value, normally 2) plus a float32 master copy of the
    parameters and float32 m and v in the optimizer: 2 + 2 + (4 + 4 + 4) = 16 bytes per
    parameter, of which 12 are optimizer state."""
    one_copy = n_params * bytes_per_value
    if mixed_precision:
        return {"parameters": one_copy, "gradients": one_copy,
                "optimizer (master, m, v)": 3 * 4 * n_params}
    return {"parameters": one_copy, "gradients": one_copy, "optimizer (m, v)": 2 * one_copy}


def zero_state_bytes_per_rank(n_params: int, p: int, stage: int, bytes_per_value: int = 4,
                              mixed_precision: bool = False) -> dict[str, float]:
    """Per-rank training state under ZeRO (Rajbhandari et al. 2020) with p data-parallel ranks,
    in training_state_bytes's parts.

    Stage 0: everything replicated; 1: optimizer state sharded; 2: + gradients sharded;
    3: + parameters sharded. With mixed precision the stages shard 12, 14 and 16 of the 16
    bytes per parameter (the paper's (2 + 2 + K/p), (2 + (2 + K)/p) and (2 + 2 + K)/p).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage: expected 0, 1, 2 or 3, got {stage}")
    full = training_state_bytes(n_params, bytes_per_value, mixed_precision)
    sharded_from = {"parameters": 3, "gradients": 2}  # the optimizer's part from stage 1
    return {name: size / p if stage >= sharded_from.get(name, 1) else float(size)
            for name, size in full.items()}


def activation_bytes_per_layer(batch: int, seq_len: int, d_model: int, n_heads: int,
                               d_ff: int, bytes_per_value: int = 4, tp: int = 1,
                               recompute: str = "none", sequence_parallel: bool = False) -> int:
    """Activations one decoder block keeps for its backward pass, as `tfcourse.nn.model` stores
    them: 8 (B, T, d) arrays (two LayerNorms' normalised x_hat and outputs, q, k, v, the
    merged heads), 3 (B, T, d_ff) arrays (FFN pre-activation, its tanh, the activation), the
    (B, heads, T, T) attention weights and two LayerNorm 1/std vectors (B, T).

    tp > 1: what one rank of Megatron tensor parallelism keeps. The head- and column-split
    arrays (q, k, v, merged heads, the FFN's three, the attention weights) shrink by tp.
    Without sequence parallelism the LayerNorms' arrays and 1/std vectors stay whole on every
    rank (Korthikanti et al. 2022: s b h (10 + 24/t + 5 a s/(h t)) for their model). With it
    (`tensor_parallel --sequence-parallel`) x_hat and 1/std are kept for this rank's T/tp
    positions only, but each sublayer still keeps the all-gathered (B, T, d) input its
    column-parallel matmuls read - Megatron also drops those and gathers them again in the
    backward pass, which is how it reaches s b h (34/t + 5 a s/(h t)).

    recompute (the model's config.recompute): "selective" drops the attention weights - the
    term that grows with T^2 - and keeps the (T, T) bool causal mask instead (1 byte an entry)
    to recompute them; "full" keeps only the block's input, one (B, T, d) array (its slice of
    T/tp positions under sequence parallelism)."""
    tokens = batch * seq_len
    if tp < 1 or n_heads % tp or d_ff % tp:
        raise ValueError(f"tp: expected a divisor of n_heads={n_heads} and d_ff={d_ff}, got {tp}")
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"seq_len: expected a multiple of tp={tp} with sequence parallelism, "
                         f"got {seq_len}")
    if recompute == "full":
        return tokens * d_model * bytes_per_value // (tp if sequence_parallel else 1)
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute: expected one of ['none', 'selective', 'full'], "
                         f"got {recompute!r}")
    weights = batch * n_heads * seq_len * seq_len
    if sequence_parallel:  # x_hat and 1/std sliced; the gathered sublayer inputs whole
        replicated = tokens * (2 * d_model + 2) // tp + tokens * 2 * d_model
    else:
        replicated = tokens * (4 * d_model + 2)
    split = tokens * (4 * d_model + 3 * d_ff) + (weights if recompute == "none" else 0)
    mask = seq_len * seq_len if recompute == "selective" else 0  # bool: bytes, not values
    return (replicated + split // tp) * bytes_per_value + mask


def weight_work_bytes_per_layer(batch: int, seq_len: int, d_model: int, d_ff: int,
                                bytes_per_value: int = 4, tp: int = 1) -> int:
    """What one decoder block's deferred W keeps alive between its B and its W (zero-bubble
    pipelining), as `tfcourse.nn.model.block_backward_input`'s w_work holds it: every
    weight-bearing layer's input and the gradient at its output.

    Per sublayer, whole on every tensor-parallel rank: its output gradient (the output bias's,
    and the output projection's), the normalised input LN(x) the projections read, the
    LayerNorm's x_hat and the gradient at its output (4 (B, T, d) arrays), and 1/std (B, T).
    Split over tp: attention's dq, dk, dv and merged heads (4 (B, T, d)), the FFN's activation
    and the gradient of its pre-activation (2 (B, T, d_ff)). So B T (8 d + 2 + (4 d + 2 d_ff)
    / tp) values, whatever config.recompute: under full recomputation W holds the replay's.
    With d_ff = 4 d and tp = 1 that is B T (20 d + 2), as much as the block's activations
    without the attention weights; 1F1B keeps nothing of a block after its whole backward.
    Sequence parallelism is not counted here."""
    tokens = batch * seq_len
    if tp < 1 or d_model % tp or d_ff % tp:
        raise ValueError(f"tp: expected a divisor of d_model={d_model} and d_ff={d_ff}, "
                         f"got {tp}")
    return (tokens * (8 * d_model + 2) + tokens * (4 * d_model + 2 * d_ff) // tp) * bytes_per_value


# --------------------------------------------------------------------------- communication


def allreduce_bytes(n_bytes: float, p: int) -> float:
    """Bytes each rank sends in a ring all-reduce: 2 (p - 1) / p * n (n may be an array)."""
    p = require_positive_int("p", p)
    return 2.0 * (p - 1) / p * n_bytes


def allgather_bytes(n_bytes: float, p: int) -> float:
    """Bytes each rank sends in a ring all-gather of an n-byte result: (p - 1) / p * n."""
    p = require_positive_int("p", p)
    return (p - 1) / p * n_bytes


reduce_scatter_bytes = allgather_bytes  # the same traffic, run in reverse


def ring_allreduce_time(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """alpha-beta model of a ring all-reduce: 2 (p - 1) messages of latency alpha, and
    2 (p - 1) / p * n bytes at beta seconds per byte. p >= 1; n_bytes, alpha, beta >= 0."""
    p = require_positive_int("p", p)
    for name, value in (("n_bytes", n_bytes), ("alpha", alpha), ("beta", beta)):
        require_nonnegative_real(name, value)
    if p == 1:
        return 0.0
    return 2 * (p - 1) * alpha + allreduce_bytes(n_bytes, p) * beta


def fit_alpha_beta(message_bytes, seconds) -> tuple[float, float]:
    """Fit of t = alpha + beta * bytes to point-to-point measurements, minimising the
    *relative* error of every point: sizes span orders of magnitude, and a plain least-squares
    line is decided by the largest messages alone, leaving alpha (the latency, which only the
    small messages show) to their noise. A latency cannot be negative: if the fitted line
    crosses zero above the origin, the fit is redone through the origin (alpha = 0)."""
    x = np.asarray(message_bytes, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"message_bytes, seconds: expected two equal-length lists of >= 2 "
                         f"values, got shapes {x.shape} and {y.shape}")
    if np.any(y <= 0):
        raise ValueError(f"seconds: expected positive times, got {y.tolist()}")
    beta, alpha = np.polyfit(x, y, 1, w=1.0 / y)
    if alpha < 0:  # least relative error through the origin: sum((1 - beta x / y)^2)
        r = x / y
        alpha, beta = 0.0, float(r.sum() / (r @ r))
    return float(alpha), float(beta)


def fit_ring_links(sizes_bytes, ring_seconds, p: int) -> tuple[float, float]:
    """(alpha seconds per message, beta seconds per byte) of the link, from ring all-reduce
    timings of buffers of sizes_bytes on p ranks: fit_alpha_beta of t against the bytes each
    rank sends, 2 (p-1)/p n, over every size (the small messages carry alpha, the large ones
    beta); the intercept is 2 (p - 1) messages' latency. Measured from Python, alpha is one
    ring step's cost: the mpi4py call, the addition and MPI's own latency."""
    require_positive_int("p", p)
    if p < 2:
        raise ValueError(f"p: expected at least 2 ranks to measure a link, got {p}")
    alpha, beta = fit_alpha_beta(allreduce_bytes(np.asarray(sizes_bytes, dtype=float), p),
                                 ring_seconds)
    return alpha / (2 * (p - 1)), beta


def pipeline_bubble_fraction(p: int, m: int, schedule: str = "1f1b", v: int = 1,
                             t_forward: float = 1.0, t_backward: float = 2.0,
                             t_weight: float | None = None) -> float:
    """Idle fraction of a pipeline schedule with p stages and m micro-batches.

    GPipe and 1F1B: (p - 1) / (m + p - 1), whatever the costs - the ramp-up and ramp-down
    take p - 1 micro-batch slots of the m + p - 1. Interleaved with v chunks per stage
    (Narayanan et al. 2021): each slot is a v-th as long, (p - 1) / (v m + p - 1).
    ZB-H1 (Qi et al. 2024): the backward split into B (its input gradient, T_B = t_backward -
    t_weight) and W (T_W = t_weight, default half), the ramp-down's waits filled with W's:
    each stage idles (p - 1)(T_F + T_B) - min(p - 1, m - 1) min(T_B, T_W) - the paper's
    (p - 1)(T_F + T_B - T_W) when m >= p and T_W <= T_B - against 1F1B's
    (p - 1)(T_F + T_B + T_W). (Derived from the simulator's timelines, and tested on them.)"""
    p, m = require_positive_int("p", p), require_positive_int("m", m)
    check_schedule_args(schedule, p, 0, m, v, sent=False)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule != "zb-h1":
        return (p - 1) / (m + p - 1)
    t_weight = t_backward / 2 if t_weight is None else t_weight
    t_input = t_backward - t_weight
    idle = (p - 1) * (t_forward + t_input) - min(p - 1, m - 1) * min(t_input, t_weight)
    return idle / (idle + m * (t_forward + t_backward))


def tensor_parallel_allreduce_bytes(batch: int, seq_len: int, d_model: int, n_layers: int,
                                    bytes_per_value: int = 4) -> float:
    """Activation bytes all-reduced per training step by Megatron tensor parallelism: two
    all-reduces of a (B, T, d) array per layer in the forward pass and two in the backward."""
    return 4 * n_layers * batch * seq_len * d_model * bytes_per_value


def zero_bytes_sent_per_step(n_params: int, p: int, stage: int, bytes_per_value: int = 4
                             ) -> float:
    """Bytes one data-parallel rank sends per step for gradients and parameters, counting each
    collective as its ring algorithm costs (all-reduce 2 (p-1)/p n, all-gather, reduce-scatter
    and the owners' broadcasts (p-1)/p n), for what `data_parallel --zero` does:
    0: all-reduce the gradients (2 Psi); 1: the same, then the owners broadcast their updated
    tensors (3 Psi: the paper's stage 1 reduce-scatters instead, 2 Psi); 2: reduce each
    gradient to its owner, then broadcast (2 Psi); 3: gather every parameter before its
    forward and again before its backward, reduce each gradient to its owner (3 Psi)."""
    n = n_params * bytes_per_value
    gradients = allreduce_bytes(n, p) if stage in (0, 1) else reduce_scatter_bytes(n, p)
    parameters = {0: 0, 1: 1, 2: 1, 3: 2}
    if stage not in parameters:
        raise ValueError(f"stage: expected 0, 1, 2 or 3, got {stage}")
    return gradients + parameters[stage] * allgather_bytes(n, p)


def tensor_parallel_bytes_sent(batch: int, seq_len: int, d_model: int, n_layers: int, p: int,
                               bytes_per_value: int = 4, sequence_parallel: bool = False
                               ) -> float:
    """Activation bytes one rank sends per training step under Megatron tensor parallelism over
    p ranks: per layer two all-reduces of a (B, T, d) array forward and two backward, each
    sending 2 (p - 1)/p of it. With sequence parallelism each all-reduce becomes an all-gather
    and a reduce-scatter, (p - 1)/p each: the same bytes; the embedding's gradient, computed
    in slices, is gathered once more. (The sequence-split parameters' gradient all-reduce is
    parameter traffic and not counted here.)"""
    n = batch * seq_len * d_model * bytes_per_value
    sent = n_layers * 4 * allreduce_bytes(n, p)
    return sent + (allgather_bytes(n, p) if sequence_parallel else 0.0)


def expert_alltoall_bytes(tokens: int, d_model: int, top_k: int, p: int,
                          n_moe_layers: int = 1, bytes_per_value: int = 8,
                          full_recompute: bool = False) -> float:
    """Activation bytes one rank sends per training step under expert parallelism over p
    ranks, `tokens` being that rank's tokens (its rows x seq_len): every MoE layer moves each
    of its tokens' top_k hidden states (d values) to the experts' owners and back in the
    forward pass (dispatch, combine) and their gradients the same two ways in the backward -
    four all-to-alls, six with full recomputation (the forward runs again). A dispatch sends
    the rank's own rows, a combine the rows its experts processed for the other ranks. With
    balanced routing and no token dropped, both are (p - 1)/p of its tokens' k rows (the rest
    stay with its own experts), so each all-to-all sends tokens k (p - 1)/p d values.
    Imbalance moves the measure either way; dropped choices send nothing. The exchanged row
    counts and routing decisions (a few E integers) are not counted."""
    per_alltoall = tokens * top_k * (p - 1) / p * d_model * bytes_per_value
    return (6 if full_recompute else 4) * n_moe_layers * per_alltoall


def ulysses_alltoall_bytes(batch: int, seq_len: int, d_model: int, p: int,
                           n_layers: int = 1, bytes_per_value: int = 8,
                           full_recompute: bool = False) -> float:
    """Bytes one rank sends per training step in DeepSpeed-Ulysses' all-to-alls (Jacobs et
    al. 2023) over p ranks, each holding seq_len/p positions of every one of `batch`
    sequences. A tensor of the attention's width d_model on a rank's slice is batch
    seq_len/p d_model values; one all-to-all keeps the 1/p of it that is this rank's heads
    of its own slice and sends the other (p - 1)/p. Per layer, the forward sends q, k and v
    from the sequence split to the head split (3) and the heads' output back (1); the
    backward sends the output's gradient to the head split (1) and dq, dk, dv back (3): 8
    all-to-all tensors, 12 with full recomputation (the forward's 4 again). About
    8 batch seq_len d / p values: it falls as p grows, where ring attention's K/V traffic
    does not (ring_attention_bytes_sent)."""
    per_tensor = batch * seq_len / p * d_model * (p - 1) / p * bytes_per_value
    return (12 if full_recompute else 8) * n_layers * per_tensor


def training_days(n_params: float, n_tokens: float, n_devices: int, peak_flops_per_s: float,
                  utilisation: float, flops_per_param: float = 6) -> float:
    """Wall-clock days to train on n_tokens with flops_per_param x N FLOPs per token (attention
    ignored): 6 counts the model's FLOPs (use MFU as utilisation), 8 also full recomputation
    (use HFU; Narayanan et al. 2021 estimate 8 T N / (n X) with X the achieved FLOP/s)."""
    return flops_per_param * n_params * n_tokens / (n_devices * peak_flops_per_s
                                                     * utilisation) / 86400


def pipeline_peak_microbatches(schedule: str, p: int, stage: int, m: int, v: int = 1) -> int:
    """Micro-batches whose activations stage `stage` of p keeps alive at once, at the peak:
    GPipe runs all m forwards before any backward (m); 1F1B starts backwards after
    p - stage - 1 warm-up forwards, so at most min(p - stage, m); ZB-H1 keeps each until its
    W, stage s running W s backwards late, so min(p, m) on every stage - 1F1B's stage 0 (and
    from B to W only what W needs: weight_work_bytes_per_layer). Interleaved: (micro-batch,
    chunk) pairs, each a v-th of the stage's layers - its warm-up of 2 (p - stage - 1) +
    (v - 1) p forwards, plus one (all m v when m = p)."""
    check_schedule_args(schedule, p, stage, m, v, sent=False)
    if schedule == "interleaved":
        return m * v if m == p else min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v)
    return {"gpipe": m, "1f1b": min(p - stage, m), "zb-h1": min(p, m)}[schedule]


# --------------------------------------------------------------------------- sequence parallelism


def _sequence_chunk_sizes(seq_len: int, p: int, zigzag: bool) -> tuple[list[int], list[list]]:
    """Chunk sizes in sequence order and the chunk indices each rank holds, exactly as
    `plans.sequence.sequence_chunks` cuts the sequence (one home for the layout)."""
    chunks = sequence_chunks(seq_len, p, zigzag)
    bounds = sorted(b for rank_chunks in chunks for b in rank_chunks)
    index = {b: i for i, b in enumerate(bounds)}
    owned = [[index[b] for b in rank_chunks] for rank_chunks in chunks]
    return [hi - lo for lo, hi in bounds], owned


def full_attention_score_bytes(seq_len: int, batch: int, heads: int,
                               bytes_per_value: int = 4) -> int:
    """One (B, heads, n, n) score (or probability) array of full attention: quadratic in n."""
    return batch * heads * seq_len * seq_len * bytes_per_value


def ring_attention_score_entries(seq_len: int, p: int, zigzag: bool = False) -> list[int]:
    """(query, key) score entries each rank computes per (sequence, head) in one ring pass.

    Causal ring attention computes, for each of its query chunks a, one block against every
    key chunk b <= a (later chunks are skipped; the diagonal block is computed whole, then
    masked), so a rank computes sum over its chunks of n_a * end_a, with end_a the position
    where chunk a ends. Contiguous: rank r computes about (r + 1) (n / p)^2, so the last rank
    does p times the first's work; zig-zag pairs an early and a late chunk and every rank
    computes about (2p + 1) (n / 2p)^2.
    """
    sizes, owned = _sequence_chunk_sizes(seq_len, p, zigzag)
    ends = np.cumsum(sizes)
    return [int(sum(sizes[a] * ends[a] for a in chunks)) for chunks in owned]


def ring_attention_flops(seq_len: int, p: int, batch: int, heads: int, d_head: int,
                         zigzag: bool = False) -> list[int]:
    """Matmul FLOPs of ring attention, forward + backward, per rank: 14 d_head FLOPs per score
    entry, 4 d forward (S = Q K^T, P V) and 10 d backward (S again, dV, dP, dQ, dK)."""
    entries = ring_attention_score_entries(seq_len, p, zigzag)
    return [14 * d_head * batch * heads * e for e in entries]


def ring_attention_peak_score_bytes(seq_len: int, p: int, batch: int, heads: int,
                                    bytes_per_value: int = 4, zigzag: bool = False) -> list[int]:
    """Largest (B, heads, n_q, n_k) score block each rank materialises: its longest query
    chunk against the longest key chunk (chunk 0), about (n / p)^2 instead of n^2 (n / 2p
    zig-zag). Blocks are computed one at a time, so this is the score memory of a rank."""
    sizes, owned = _sequence_chunk_sizes(seq_len, p, zigzag)
    return [batch * heads * bytes_per_value * sizes[0] * max(sizes[a] for a in chunks)
            for chunks in owned]


def ring_attention_bytes_sent(seq_len: int, p: int, batch: int, heads: int, d_head: int,
                              bytes_per_value: int = 4, zigzag: bool = False,
                              n_layers: int = 1, full_recompute: bool = False) -> list[int]:
    """Bytes each rank sends in ring attention's forward and backward pass together, for each
    of n_layers attention layers (context-parallel training: heads d_head = d_model).

    Forward: p - 1 steps, each passing the (K, V) block it holds to the next rank. Backward:
    p - 1 steps passing (K, V, dK, dV), then one last step sending (dK, dV) of the block it
    holds home. Rank r never sends block r + 1's K and V (it receives it last), so it sends
    6 (n - n_{r+1}) + 2 n_{r+1} token rows of B heads d_head values: linear in n, about
    6 n (p - 1) / p, while the scores that are never sent are quadratic - and, unlike
    Ulysses' all-to-alls (ulysses_alltoall_bytes), not falling as p grows. Full
    recomputation replays the forward: 2 (n - n_{r+1}) rows more.
    """
    sizes, owned = _sequence_chunk_sizes(seq_len, p, zigzag)
    if p == 1:
        return [0] * p
    row_bytes = batch * heads * d_head * bytes_per_value * n_layers
    forward = 4 if full_recompute else 2
    block_rows = [sum(sizes[a] for a in chunks) for chunks in owned]
    return [row_bytes * ((forward + 4) * (seq_len - block_rows[(r + 1) % p])
                         + 2 * block_rows[(r + 1) % p]) for r in range(p)]


# --------------------------------------------------------------------------- model quality


def gradient_noise_scale(small_sq_norm: float, big_sq_norm: float, b_small: float,
                         b_big: float) -> dict[str, float]:
    """McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A), the
    simple noise scale from two batch sizes - which data parallelism measures for free: each
    rank's gradient of its b_small examples, and the averaged one of all b_big.

    A gradient of B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B (the true gradient plus the
    per-example noise over B). Two batch sizes give two equations and unbiased estimates

        |G|^2 = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small),
        S     = (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big),

    and B_simple = S / |G|^2: the batch above which a larger batch stops saving steps in
    proportion (the critical batch is of its order). Both estimates are noisy from one step:
    average each over steps before dividing, as McCandlish et al. do. Returns
    {"true_sq_norm", "trace", "noise_scale"}."""
    if not 0 < b_small < b_big:
        raise ValueError(f"b_small, b_big: expected 0 < b_small < b_big, got {b_small}, {b_big}")
    true_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace = (small_sq_norm - big_sq_norm) / (1 / b_small - 1 / b_big)
    return {"true_sq_norm": true_sq, "trace": trace,
            "noise_scale": trace / true_sq if true_sq > 0 else math.inf}
