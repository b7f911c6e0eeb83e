"""Chapter 4: a GPT-style decoder-only Transformer, as pure functions over a dict of arrays.

    config = preset("tiny", vocab_size=30)
    params = init_params(config, seed=0)                # {"tok_emb": ..., "blocks.0.attn.w_q": ...}
    logits = forward(params, tokens, config)            # (B, T, V)
    loss, grads = loss_and_grads(params, tokens, targets, config)   # grads: same keys as params

Pre-LN blocks (GPT-2): x = x + Attention(LN(x)); x = x + FFN(LN(x)), then a final LayerNorm and
a linear head to vocabulary logits. With config.n_experts > 0, every moe_every-th block's FFN
is a mixture of experts (layers.moe_forward; Switch Transformer, GShard), and the loss gains
its weighted load-balancing loss. Every parallel chapter reuses *these* functions on
*this* dict: `forward_pass`/`backward_pass` are the one walk over the model (pipeline stages
run a range of blocks; data parallelism sends each piece's gradients from `on_grads`), and
the sublayers take entry/exit operators (`SublayerOps`: tensor parallelism passes f and g).

Every backward is B then W (zero-bubble pipelining, Qi et al. 2024): B, `*_backward_input`,
returns the input gradient - what the previous piece, or pipeline stage, waits for - and the
w_work that W, `*_backward_weight`, turns into the weight gradients later.
`backward_input_pass` and `weight_pass` walk the model that way; `backward_pass` runs each
piece's B and W back to back. w_work keeps each weight-bearing layer's input and output
gradient alive until W runs (`perf.costmodel.weight_work_bytes_per_layer` counts them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tfcourse.nn.attention import (
    LOCAL_ATTENTION,
    MHA_PARAM_NAMES,
    AttentionKernel,
    local_attention_forward,
    mha_backward_input,
    mha_backward_weight,
    mha_forward,
    softmax,
)
from tfcourse.nn.layers import (
    ACTIVATIONS,
    LOCAL_EXPERTS,
    ExpertOps,
    cross_entropy_backward,
    cross_entropy_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    ffn_backward_input,
    ffn_backward_weight,
    ffn_forward,
    layernorm_backward_input,
    layernorm_backward_weight,
    layernorm_forward,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
    moe_backward_input,
    moe_backward_weight,
    moe_forward,
)
from tfcourse.nn.positional import learned_positions_backward, learned_positions_forward
from tfcourse.nn.precision import require_precision
from tfcourse.nn.validate import (
    require_divisible,
    require_nonnegative_int,
    require_nonnegative_real,
    require_positive_int,
    require_real,
)

DTYPES = ("float32", "float64")
RECOMPUTE = ("none", "selective", "full")  # activation recomputation (Korthikanti et al. 2022)


def check_config(config, size_names: tuple[str, ...]) -> None:
    """Checks shared by the model configs: positive sizes, heads dividing d_model, a known
    dtype and activation, a positive finite init_std (NaN would make NaN weights, blamed
    later on a diverged training); ValueError naming the field."""
    for name in size_names:
        require_positive_int(name, getattr(config, name))
    require_divisible("d_model", config.d_model, "n_heads", config.n_heads)
    require_real("init_std", config.init_std, positive=True)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {config.dtype!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {sorted(ACTIVATIONS)}, got {config.activation!r}"
        )


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the decoder-only model (all sizes are positive integers)."""

    vocab_size: int
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    max_len: int = 32
    dtype: str = "float64"
    activation: str = "gelu"
    dropout: float = 0.0
    init_std: float = 0.02
    recompute: str = "none"  # how training keeps activations (see forward_pass); same numbers
    precision: str = "fp32"  # "bf16" | "fp16": 16-bit products (see tfcourse.nn.precision)
    # mixture of experts (layers.moe_forward): 0 experts = every block dense, and the other
    # four fields keep their defaults; else blocks i with (i + 1) % moe_every == 0 use it
    n_experts: int = 0
    top_k: int = 1               # experts per token, 1..n_experts (Switch 1, GShard 2)
    capacity_factor: float = 1.25  # slots per expert over the even share (Switch)
    moe_every: int = 2           # 2: every other block (Switch, GShard); 1: all
    aux_loss_weight: float = 0.01  # alpha of the load-balancing loss (Switch)

    def __post_init__(self):
        check_config(self, ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        require_recompute("recompute", self.recompute)
        if require_precision("precision", self.precision) != "fp32" and self.dtype != "float32":
            raise ValueError(f"dtype: mixed precision ({self.precision}) keeps float32 master "
                             f"weights and sums, expected 'float32', got {self.dtype!r}")
        check_moe_config(self)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def __repr__(self) -> str:
        """The dataclass's repr, without the mixture-of-experts fields of a dense model (they
        are at their defaults there, check_moe_config), so a dense config reads as before."""
        shown = [f"{field.name}={getattr(self, field.name)!r}"
                 for field in dataclasses.fields(self)
                 if self.n_experts or field.name not in MOE_DEFAULTS]
        return f"{type(self).__name__}({', '.join(shown)})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MOE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TransformerConfig)
                if field.name in ("n_experts", "top_k", "capacity_factor", "moe_every",
                                  "aux_loss_weight")}


def check_moe_config(config: TransformerConfig) -> None:
    """The mixture-of-experts fields: a ValueError naming the field. A dense model (0
    experts) must leave the others at their defaults, so a config means one model."""
    require_nonnegative_int("n_experts", config.n_experts)
    if config.n_experts == 0:
        for name, default in MOE_DEFAULTS.items():
            if getattr(config, name) != default:
                raise ValueError(f"{name}: a dense model (n_experts=0) has no experts, "
                                 f"expected the default {default!r}, got "
                                 f"{getattr(config, name)!r} (set n_experts)")
        return
    if not 1 <= require_positive_int("top_k", config.top_k) <= config.n_experts:
        raise ValueError(f"top_k: expected an integer in 1..{config.n_experts} (n_experts), "
                         f"got {config.top_k!r}")
    require_real("capacity_factor", config.capacity_factor, positive=True)
    if require_positive_int("moe_every", config.moe_every) > config.n_layers:
        raise ValueError(f"moe_every: expected at most n_layers={config.n_layers} (else no "
                         f"block has experts), got {config.moe_every}")
    require_nonnegative_real("aux_loss_weight", config.aux_loss_weight)


def is_moe_block(i: int, n_experts: int, moe_every: int) -> bool:
    """Whether block i's FFN is a mixture of experts: blocks moe_every - 1, 2 moe_every - 1,
    ... (fairseq's (i + 1) % moe_freq == 0: with 2, the second block of every pair)."""
    return n_experts > 0 and (i + 1) % moe_every == 0


PRESETS = {
    # seconds on 2 cores: for tests, notebooks and the parallel chapters' equivalence checks
    "tiny": dict(d_model=32, n_heads=4, n_layers=2, d_ff=128, max_len=32),
    # for benchmarks (chapter 5)
    "small": dict(d_model=128, n_heads=4, n_layers=4, d_ff=512, max_len=128),
    # the benchmark's larger shape: wider, longer context (attention's T^2 share grows)
    "medium": dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024, max_len=256),
}


def preset(name: str, vocab_size: int, **overrides) -> TransformerConfig:
    """A named configuration ("tiny", "small" or "medium") for a vocabulary, with overrides."""
    if name not in PRESETS:
        raise ValueError(f"config: expected one of {sorted(PRESETS)}, got {name!r}")
    return TransformerConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------- parameters


def block_param_shapes(prefix: str, d_model: int, d_ff: int, n_experts: int = 0
                       ) -> dict[str, tuple]:
    """Shapes of one pre-LN block's parameters (self-attention + feed-forward). With
    n_experts > 0 the feed-forward is a mixture of experts: "moe.router.w" (d, E), then each
    expert's FFN, "moe.experts.e.w1", "b1", "w2", "b2"."""
    d, f = d_model, d_ff
    shapes = {
        f"{prefix}ln1.gamma": (d,), f"{prefix}ln1.beta": (d,),
        f"{prefix}attn.w_q": (d, d), f"{prefix}attn.w_k": (d, d),
        f"{prefix}attn.w_v": (d, d), f"{prefix}attn.w_o": (d, d),
        f"{prefix}attn.b_q": (d,), f"{prefix}attn.b_k": (d,),
        f"{prefix}attn.b_v": (d,), f"{prefix}attn.b_o": (d,),
        f"{prefix}ln2.gamma": (d,), f"{prefix}ln2.beta": (d,),
    }  # fmt: skip
    if n_experts == 0:
        return {**shapes, f"{prefix}ffn.w1": (d, f), f"{prefix}ffn.b1": (f,),
                f"{prefix}ffn.w2": (f, d), f"{prefix}ffn.b2": (d,)}
    shapes[f"{prefix}moe.router.w"] = (d, n_experts)
    for e in range(n_experts):
        expert = f"{prefix}moe.experts.{e}."
        shapes.update({expert + "w1": (d, f), expert + "b1": (f,), expert + "w2": (f, d),
                       expert + "b2": (d,)})
    return shapes


def param_shapes(config: TransformerConfig) -> dict[str, tuple]:
    """Name -> shape of every parameter, in a fixed order (the order init draws them in)."""
    shapes = {"tok_emb": (config.vocab_size, config.d_model),
              "pos_emb": (config.max_len, config.d_model)}
    for i in range(config.n_layers):
        experts = config.n_experts if is_moe_block(i, config.n_experts, config.moe_every) else 0
        shapes.update(block_param_shapes(f"blocks.{i}.", config.d_model, config.d_ff, experts))
    shapes.update({"ln_f.gamma": (config.d_model,), "ln_f.beta": (config.d_model,),
                   "head.w": (config.d_model, config.vocab_size),
                   "head.b": (config.vocab_size,)})
    return shapes


def init_value(name: str, shape: tuple, rng: np.random.Generator, std: float, n_layers: int,
               dtype) -> np.ndarray:
    """GPT-2 initialisation: LayerNorm gains 1, biases 0, matrices N(0, std^2), with the two
    projections that write into the residual stream (attn.w_o, ffn.w2, every expert's w2)
    scaled by 1/sqrt(2 n_layers) so the residual sum does not grow with depth."""
    if name.endswith(".gamma"):
        return np.ones(shape, dtype=dtype)
    if len(shape) == 1:
        return np.zeros(shape, dtype=dtype)
    residual = name.endswith(("attn.w_o", "ffn.w2")) or (
        "moe.experts." in name and name.endswith(".w2"))
    scale = std / np.sqrt(2 * n_layers) if residual else std
    return (scale * rng.standard_normal(shape)).astype(dtype)


def init_params(config: TransformerConfig, seed: int) -> dict[str, np.ndarray]:
    """A fresh parameter dict; the same (config, seed) always gives the same arrays.
    seed: a non-negative integer."""
    rng = np.random.default_rng(require_nonnegative_int("seed", seed))
    return {name: init_value(name, shape, rng, config.init_std, config.n_layers, config.dtype)
            for name, shape in param_shapes(config).items()}


def count_params(params: dict[str, np.ndarray]) -> int:
    return sum(int(p.size) for p in params.values())


def subdict(params: dict, prefix: str) -> dict:
    """The entries whose name starts with `prefix`, with the prefix removed."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def add_prefix(grads: dict, prefix: str) -> dict:
    return {prefix + name: value for name, value in grads.items()}


def check_params(params: dict, expected_shapes: dict[str, tuple], dtype: str) -> None:
    """ValueError naming any missing, unexpected, mis-shaped, mis-typed or non-finite parameter."""
    missing = sorted(set(expected_shapes) - set(params))
    extra = sorted(set(params) - set(expected_shapes))
    if missing or extra:
        raise ValueError(f"params: missing {missing[:5]}, unexpected {extra[:5]} for this config")
    for name, shape in expected_shapes.items():
        value = params[name]
        if not isinstance(value, np.ndarray) or value.shape != shape:
            got = getattr(value, "shape", type(value).__name__)
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {got}")
        if value.dtype != np.dtype(dtype):
            raise ValueError(f"params[{name!r}]: expected dtype {dtype} (config.dtype), "
                             f"got {value.dtype}")
        _require_finite(f"params[{name!r}]", value)


def _require_finite(name: str, value: np.ndarray) -> None:
    """NaN or infinity in a parameter would poison every output; name the first one found.

    One np.isfinite pass per array: cheap next to a forward pass, and it turns "the loss is
    NaN" into the name of the broken parameter (after training diverged, or a bad checkpoint).
    """
    if not np.isfinite(value).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
        raise ValueError(f"{name}: expected finite values, got {value[where]} at index {where} "
                         f"(if training diverged, lower the learning rate)")


def check_tokens(name: str, tokens, vocab_size: int, max_len: int,
                 ignore_index: int | None = None) -> np.ndarray:
    """Integer (B, T) ids in [0, vocab_size) (or == ignore_index) with T <= max_len."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (B, T) array, got shape {tokens.shape}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{name}: sequence length {tokens.shape[1]} exceeds max_len={max_len}")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected ids in [0, {vocab_size}) (vocab_size), "
                         f"got {tokens[where]} at {where}")
    return tokens


# --------------------------------------------------------------------------- entry and exit


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Operator:
    """A map applied to activations in the forward pass, and the map the backward pass applies
    to their gradient. The identity both ways by default."""

    forward: Callable = _identity
    backward: Callable = _identity


@dataclasses.dataclass(frozen=True)
class SublayerOps:
    """Where a parallel layout communicates inside every sublayer.

    `enter` maps the normalised input LN(x) before it meets the attention or MLP weights;
    `exit` maps their output before the output bias, dropout and the residual add. The serial
    model uses the identity for both. Megatron's tensor parallelism (chapter 7) passes
    enter = f (identity; all-reduce of the gradient) and exit = g (all-reduce; identity).
    `experts`: how a mixture-of-experts sublayer reaches its experts (layers.ExpertOps; the
    serial one holds them all) - expert parallelism passes the routing agreement across
    ranks and the all-to-all dispatch and combine around each rank's share of the experts.
    `attention`: the kernel between attention's projections (attention.AttentionKernel; the
    serial sdpa) - context parallelism, whose ranks hold a slice of every sequence, passes
    one that communicates to attend over the whole sequence (DeepSpeed-Ulysses).
    """

    enter: Operator = Operator()
    exit: Operator = Operator()
    experts: ExpertOps = LOCAL_EXPERTS
    attention: AttentionKernel = LOCAL_ATTENTION


SERIAL = SublayerOps()

# --------------------------------------------------------------------------- pieces


def embed_forward(params: dict, tokens: np.ndarray, config: TransformerConfig,
                  positions=0):
    """Token embedding + learned position embedding (chapter 3): (B, T) ids -> (B, T, d).
    positions: the position of tokens[:, 0], or a (T,) array of every token's position
    (context parallelism: a rank's slice of every sequence; zig-zag holds two pieces)."""
    tok, tok_cache = embedding_forward(tokens, params["tok_emb"])
    pos, pos_cache = learned_positions_forward(params["pos_emb"], tokens.shape[1], check=False,
                                               positions=positions)
    tok += pos
    return tok, (tok_cache, pos_cache)


def embed_backward_input(dx: np.ndarray, cache):
    """B of the embedding: token ids have no gradient, so there is nothing to do now;
    returns (None, w_work) with w_work = (dx, cache) - the two tables' gradients are all W."""
    return None, (dx, cache)


def embed_backward_weight(w_work) -> dict:
    """W of the embedding: {"tok_emb", "pos_emb"} gradients."""
    dx, (tok_cache, pos_cache) = w_work
    return {"tok_emb": embedding_backward(dx, tok_cache),
            "pos_emb": learned_positions_backward(dx, pos_cache, check=False)}


def embed_backward(dx: np.ndarray, cache):
    """(None, grads): token ids have no gradient; the two tables do (B then W)."""
    dids, w_work = embed_backward_input(dx, cache)
    return dids, embed_backward_weight(w_work)


def attention_sublayer_forward(params: dict, prefix: str, x, mask, n_heads: int,
                               dropout: float = 0.0, rng=None, memory=None, ops=SERIAL,
                               keep_weights: bool = True, precision: str = "fp32"):
    """x + Dropout(exit(MultiHeadAttention(enter(LN(x)), kv)) + b_o), kv = enter(LN(x)) (self)
    or `memory` (cross-attention).

    Reads params[prefix + "ln1.*"] and [prefix + "attn.*"] (cross: "ln_x.*", "xattn.*").
    mask: a bool mask, None, or "causal": causal over the positions the attention kernel
    attends over (under sequence parallelism x holds a slice of the sequence and `enter`
    gathers all of it; under context parallelism ops.attention reaches the other slices).
    n_heads: the heads whose columns this params dict holds (all of them, unless it is a
    tensor-parallel shard). The output bias is added after `exit`, so that a layout whose exit
    sums partial outputs over ranks adds it once. keep_weights=False: the backward pass
    recomputes the attention weights (selective recomputation). precision: 16-bit products
    (mixed precision, see tfcourse.nn.precision); LayerNorm, softmax and the residual stream
    stay float32.
    """
    ln_name, attn_name = _names(prefix, memory is not None)
    normed, ln_cache = layernorm_forward(x, params[ln_name + "gamma"], params[ln_name + "beta"])
    entered = ops.enter.forward(normed)
    kv = entered if memory is None else memory
    weights = {name: params[attn_name + name] for name in MHA_PARAM_NAMES if name != "b_o"}
    partial, attn_cache = mha_forward(entered, kv, weights, n_heads, mask, check=False,
                                      keep_weights=keep_weights, precision=precision,
                                      kernel=ops.attention)
    out = ops.exit.forward(partial)
    out += params[attn_name + "b_o"]
    dropped, drop_cache = dropout_forward(out, dropout, rng)
    return x + dropped, (prefix, memory is not None, ops, ln_cache, attn_cache, drop_cache)


def attention_sublayer_backward_input(dy, cache):
    """B: (dx, dmemory or None, w_work). The entry and exit operators' backward maps (tensor
    parallelism's communication) are on the input gradient's path, so they run here; W
    communicates nothing."""
    prefix, is_cross, ops, ln_cache, attn_cache, drop_cache = cache
    dout = dropout_backward(dy, drop_cache)
    dentered, dkv, mha_work = mha_backward_input(ops.exit.backward(dout), attn_cache,
                                                 check=False)
    dnormed = ops.enter.backward(dentered if is_cross else dentered + dkv)
    dx_ln = layernorm_backward_input(dnormed, ln_cache)
    w_work = (prefix, is_cross, dout, mha_work, dnormed, ln_cache)
    return dy + dx_ln, (dkv if is_cross else None), w_work


def attention_sublayer_backward_weight(w_work) -> dict:
    """W: the sublayer's gradients with full names (b_o's is the sum of its output's)."""
    prefix, is_cross, dout, mha_work, dnormed, ln_cache = w_work
    ln_name, attn_name = _names(prefix, is_cross)
    db_o = dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    dgamma, dbeta = layernorm_backward_weight(dnormed, ln_cache)
    return {**add_prefix(mha_backward_weight(mha_work), attn_name), attn_name + "b_o": db_o,
            ln_name + "gamma": dgamma, ln_name + "beta": dbeta}


def attention_sublayer_backward(dy, cache):
    """Returns (dx, dmemory or None, grads with full names): B then W."""
    dx, dmemory, w_work = attention_sublayer_backward_input(dy, cache)
    return dx, dmemory, attention_sublayer_backward_weight(w_work)


def _names(prefix: str, is_cross: bool) -> tuple[str, str]:
    """Parameter name prefixes of an attention sublayer: self uses ln1/attn, cross ln_x/xattn."""
    if is_cross:
        return prefix + "ln_x.", prefix + "xattn."
    return prefix + "ln1.", prefix + "attn."


def ffn_sublayer_forward(params: dict, prefix: str, x, activation: str = "gelu",
                         dropout: float = 0.0, rng=None, ops=SERIAL, precision: str = "fp32"):
    """x + Dropout(exit(FFN(enter(LN(x)))) + b2) with params prefix + "ln2.*" and "ffn.*"."""
    normed, ln_cache = layernorm_forward(x, params[prefix + "ln2.gamma"],
                                         params[prefix + "ln2.beta"])
    p = subdict(params, prefix + "ffn.")
    partial, ffn_cache = ffn_forward(ops.enter.forward(normed), p["w1"], p["b1"], p["w2"], None,
                                     activation, precision)
    out = ops.exit.forward(partial)
    out += p["b2"]
    dropped, drop_cache = dropout_forward(out, dropout, rng)
    return x + dropped, (prefix, ops, ln_cache, ffn_cache, drop_cache)


def ffn_sublayer_backward_input(dy, cache):
    """B: (dx, w_work); the operators' backward maps run here (see the attention sublayer)."""
    prefix, ops, ln_cache, ffn_cache, drop_cache = cache
    dout = dropout_backward(dy, drop_cache)
    dentered, ffn_work = ffn_backward_input(ops.exit.backward(dout), ffn_cache)
    dnormed = ops.enter.backward(dentered)
    dx_ln = layernorm_backward_input(dnormed, ln_cache)
    return dy + dx_ln, (prefix, dout, ffn_work, dnormed, ln_cache)


def ffn_sublayer_backward_weight(w_work) -> dict:
    """W: the sublayer's gradients with full names."""
    prefix, dout, ffn_work, dnormed, ln_cache = w_work
    db2 = dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    dgamma, dbeta = layernorm_backward_weight(dnormed, ln_cache)
    return {**add_prefix(ffn_backward_weight(ffn_work), prefix + "ffn."), prefix + "ffn.b2": db2,
            prefix + "ln2.gamma": dgamma, prefix + "ln2.beta": dbeta}


def ffn_sublayer_backward(dy, cache):
    """Returns (dx, grads with full names): B then W."""
    dx, w_work = ffn_sublayer_backward_input(dy, cache)
    return dx, ffn_sublayer_backward_weight(w_work)


def moe_sublayer_forward(params: dict, prefix: str, x, config: TransformerConfig, rng=None,
                         ops=SERIAL, aux_seed: float = 0.0):
    """x + Dropout(exit(MoE(enter(LN(x))))) with params prefix + "ln2.*" and "moe.*": the
    feed-forward sublayer with a mixture of experts (layers.moe_forward) in place of the FFN.
    The experts' output biases are inside the experts (each gated), so nothing is added
    after `exit`; tensor parallelism does not split experts (its programs refuse MoE);
    expert parallelism shards them (ops.experts: the all-to-alls around the experts).
    aux_seed: dL/d(this layer's load-balancing loss), the loss's weight times any loss scale;
    the backward adds its gradient. The cache's [3].routing holds the routing statistics."""
    normed, ln_cache = layernorm_forward(x, params[prefix + "ln2.gamma"],
                                         params[prefix + "ln2.beta"])
    out, _, moe_cache = moe_forward(ops.enter.forward(normed), subdict(params, prefix + "moe."),
                                    config.top_k, config.capacity_factor, config.activation,
                                    config.precision, ops.experts)
    dropped, drop_cache = dropout_forward(ops.exit.forward(out), config.dropout, rng)
    return x + dropped, (prefix, ops, ln_cache, moe_cache, drop_cache, aux_seed)


def moe_sublayer_backward_input(dy, cache):
    """B: (dx, w_work), the load-balancing loss's gradient included."""
    prefix, ops, ln_cache, moe_cache, drop_cache, aux_seed = cache
    dout = dropout_backward(dy, drop_cache)
    dentered, moe_work = moe_backward_input(ops.exit.backward(dout), moe_cache, aux_seed)
    dnormed = ops.enter.backward(dentered)
    dx_ln = layernorm_backward_input(dnormed, ln_cache)
    return dy + dx_ln, (prefix, moe_work, dnormed, ln_cache)


def moe_sublayer_backward_weight(w_work) -> dict:
    """W: the router's, the experts' and ln2's gradients with full names."""
    prefix, moe_work, dnormed, ln_cache = w_work
    dgamma, dbeta = layernorm_backward_weight(dnormed, ln_cache)
    return {**add_prefix(moe_backward_weight(moe_work), prefix + "moe."),
            prefix + "ln2.gamma": dgamma, prefix + "ln2.beta": dbeta}


FEED_FORWARD = {  # is the block's FFN a mixture of experts -> (B, W) of that sublayer
    False: (ffn_sublayer_backward_input, ffn_sublayer_backward_weight),
    True: (moe_sublayer_backward_input, moe_sublayer_backward_weight),
}


def block_forward(params: dict, i: int, x, config: TransformerConfig, rng=None, ops=SERIAL,
                  keep_weights: bool = True, loss_scale: float = 1.0):
    """Decoder block i: causal self-attention sublayer, then feed-forward sublayer (a mixture
    of experts where `is_moe_block`; loss_scale: what the backward's seed will be multiplied
    by, so the load-balancing loss's gradient is scaled like the rest)."""
    prefix = f"blocks.{i}."
    n_heads = params[prefix + "attn.w_q"].shape[1] // config.d_head  # fewer on a TP shard
    h, attn_cache = attention_sublayer_forward(params, prefix, x, "causal", n_heads,
                                               config.dropout, rng, ops=ops,
                                               keep_weights=keep_weights,
                                               precision=config.precision)
    moe = is_moe_block(i, config.n_experts, config.moe_every)
    if moe:
        y, ffn_cache = moe_sublayer_forward(params, prefix, h, config, rng, ops,
                                            config.aux_loss_weight * loss_scale)
    else:
        y, ffn_cache = ffn_sublayer_forward(params, prefix, h, config.activation,
                                            config.dropout, rng, ops, config.precision)
    return y, (attn_cache, ffn_cache, moe)


def block_backward_input(dy, cache):
    """B of block i: (dx, w_work) - dx for the block before, w_work for `block_backward_weight`."""
    attn_cache, ffn_cache, moe = cache
    dh, ffn_work = FEED_FORWARD[moe][0](dy, ffn_cache)
    dx, _, attn_work = attention_sublayer_backward_input(dh, attn_cache)
    return dx, (attn_work, ffn_work, moe)


def block_backward_weight(w_work) -> dict:
    """W of block i: its parameters' gradients, with full names."""
    attn_work, ffn_work, moe = w_work
    return {**attention_sublayer_backward_weight(attn_work),
            **FEED_FORWARD[moe][1](ffn_work)}


def block_backward(dy, cache):
    """Returns (dx, grads of block i's parameters, with full names): each sublayer's B then
    its W (the same functions as block_backward_input and _weight), so a sublayer's
    gradient work is freed before the next sublayer's backward starts."""
    attn_cache, ffn_cache, moe = cache
    ffn_b, ffn_w = FEED_FORWARD[moe]
    dh, ffn_work = ffn_b(dy, ffn_cache)
    ffn_grads = ffn_w(ffn_work)
    del ffn_work  # freed before the attention sublayer's backward, as its fused backward did
    dx, _, attn_grads = attention_sublayer_backward(dh, attn_cache)
    return dx, {**attn_grads, **ffn_grads}


def block_routing(cache):
    """The `layers.Routing` of block i's mixture of experts from its block_forward cache, or
    None for a dense block."""
    _, ffn_cache, moe = cache
    return ffn_cache[3].routing if moe else None


def recomputed_block_backward_input(dy, saved):
    """B under full recomputation: block i kept only its input; run its forward again - with
    a copy of the dropout generator taken before the first run, so the same masks - then its
    B. The w_work holds the replay's caches of the weight-bearing layers, so W needs no
    second replay (`block_backward_weight`). The replay routes every token as the first run
    did (routing is a function of the same numbers)."""
    params, i, x, config, rng, ops, loss_scale, _ = saved
    _, cache = block_forward(params, i, x, config, rng, ops, loss_scale=loss_scale)
    return block_backward_input(dy, cache)


def recomputed_block_backward(dy, saved):
    """Full recomputation: block i kept only its input; B runs its forward again, then W.
    Costs one more forward of the block (and, under tensor parallelism, its all-reduces
    again); saves everything else the block would have kept."""
    dx, w_work = recomputed_block_backward_input(dy, saved)
    return dx, block_backward_weight(w_work)


def _twin(rng: np.random.Generator | None) -> np.random.Generator | None:
    """A generator that will draw exactly what `rng` draws next (None stays None)."""
    if rng is None:
        return None
    twin = np.random.Generator(type(rng.bit_generator)(0))
    twin.bit_generator.state = rng.bit_generator.state
    return twin


def require_recompute(name: str, value) -> str:
    """`value` if it is one of RECOMPUTE, else a ValueError naming `name`."""
    if not isinstance(value, str) or value not in RECOMPUTE:
        raise ValueError(f"{name}: expected one of {list(RECOMPUTE)}, got {value!r}")
    return value


def head_forward(params: dict, x, precision: str = "fp32"):
    """Final LayerNorm and the linear map to vocabulary logits: (B, T, d) -> (B, T, V)."""
    normed, ln_cache = layernorm_forward(x, params["ln_f.gamma"], params["ln_f.beta"])
    logits, lin_cache = linear_forward(normed, params["head.w"], params["head.b"], precision)
    return logits, (ln_cache, lin_cache)


def head_backward_input(dlogits, cache):
    """B of the head: (dx, w_work); w_work keeps dlogits (B, T, V), the largest gradient."""
    ln_cache, lin_cache = cache
    dnormed = linear_backward_input(dlogits, lin_cache)
    dx = layernorm_backward_input(dnormed, ln_cache)
    return dx, (dlogits, lin_cache, dnormed, ln_cache)


def head_backward_weight(w_work) -> dict:
    """W of the head: {"head.w", "head.b", "ln_f.gamma", "ln_f.beta"} gradients."""
    dlogits, lin_cache, dnormed, ln_cache = w_work
    dw, db = linear_backward_weight(dlogits, lin_cache)
    dgamma, dbeta = layernorm_backward_weight(dnormed, ln_cache)
    return {"head.w": dw, "head.b": db, "ln_f.gamma": dgamma, "ln_f.beta": dbeta}


def head_backward(dlogits, cache):
    """Returns (dx, grads of the final LayerNorm and the head): B then W."""
    dx, w_work = head_backward_input(dlogits, cache)
    return dx, head_backward_weight(w_work)


# --------------------------------------------------------------------------- the walk


def piece_params(config: TransformerConfig) -> dict[str, list[str]]:
    """The walk's pieces in forward order - "embed", "blocks.0", ..., "head" - and the names of
    the parameters each one reads (ZeRO-3 gathers them piece by piece)."""
    shapes = param_shapes(config)
    pieces = {"embed": ["tok_emb", "pos_emb"]}
    for i in range(config.n_layers):
        pieces[f"blocks.{i}"] = [n for n in shapes if n.startswith(f"blocks.{i}.")]
    pieces["head"] = [n for n in shapes if n.startswith(("ln_f.", "head."))]
    return pieces


def forward_pass(params: dict, inputs, config: TransformerConfig, rng=None, ops=SERIAL,
                 layers: tuple[int, int] | None = None, embed: bool = True, head: bool = True,
                 before: Callable[[str], None] | None = None, loss_scale: float = 1.0,
                 positions=0):
    """The model's forward walk - embedding, blocks, head - or a contiguous part of it.

    inputs: token ids (B, T) if `embed`, else activations (B, T, d_model). layers: the blocks
    [lo, hi) to run (default all); `head`: finish with the final LayerNorm and the head.
    Returns (logits or activations, caches) with caches a list of (backward, cache, piece)
    in forward order, which `backward_pass` walks in reverse. A pipeline stage runs the part
    it holds; tensor parallelism passes its `ops`; `before(piece)` is called before each
    piece ("embed", "blocks.i", "head") runs - ZeRO-3 gathers its parameters into `params`
    there. No input checks (see `forward`).

    config.recompute (one of RECOMPUTE) trades compute for activation memory: "selective"
    keeps everything but the attention weights, which the backward recomputes; "full" keeps
    only each block's input and runs the block's forward again in the backward. The gradients
    are the same bits either way, so every layout gets it from the config.

    Mixture-of-experts blocks keep their routing in their caches (`moe_routing(caches)`
    reads it back: statistics and load-balancing losses), and seed their load-balancing
    loss's gradient with config.aux_loss_weight x `loss_scale` - the factor the caller will
    start the backward from (see loss_and_grads).

    positions: the position of the inputs' first token, or a (T,) array of every input's
    position (context parallelism: a rank holds a slice of every sequence - zig-zag: two
    pieces - and its ops.attention reaches the others).
    """
    def enter(piece: str) -> str:
        if before is not None:
            before(piece)
        return piece

    caches = []
    x = inputs
    if embed:
        piece = enter("embed")
        x, cache = embed_forward(params, x, config, positions)
        caches.append((embed_backward, cache, piece))
    lo, hi = (0, config.n_layers) if layers is None else layers
    for i in range(lo, hi):
        piece = enter(f"blocks.{i}")
        if config.recompute == "full":  # keep the input, and a generator that replays the dropout
            saved = (params, i, x, config, _twin(rng), ops, loss_scale)
            x, cache = block_forward(params, i, x, config, rng, ops, loss_scale=loss_scale)
            caches.append((recomputed_block_backward, (*saved, block_routing(cache)), piece))
            del cache
        else:
            x, cache = block_forward(params, i, x, config, rng, ops,
                                     keep_weights=config.recompute == "none",
                                     loss_scale=loss_scale)
            caches.append((block_backward, cache, piece))
    if head:
        piece = enter("head")
        x, cache = head_forward(params, x, config.precision)
        caches.append((head_backward, cache, piece))
    return x, caches


def moe_routing(caches: list) -> dict:
    """{piece: layers.Routing} for every mixture-of-experts block in `forward_pass`'s caches,
    in walk order (empty for a dense model): tokens per expert, dropped choices and the
    load-balancing loss of this forward pass. Read from the caches, so no state is kept."""
    routing = {}
    for backward, cache, piece in caches:
        if backward is block_backward:
            found = block_routing(cache)
        elif backward is recomputed_block_backward:
            found = cache[-1]
        else:
            continue
        if found is not None:
            routing[piece] = found
    return routing


BACKWARD_SPLIT = {  # each piece's backward -> (its B, its W); backward = B then W
    embed_backward: (embed_backward_input, embed_backward_weight),
    block_backward: (block_backward_input, block_backward_weight),
    recomputed_block_backward: (recomputed_block_backward_input, block_backward_weight),
    head_backward: (head_backward_input, head_backward_weight),
}


def _given(grads: dict) -> dict:
    return grads


def backward_split(backward: Callable) -> tuple[Callable, Callable]:
    """(B, W) of a piece's backward: B(dout, cache) -> (dx, w_work), W(w_work) -> grads.
    A backward the model does not know (a caller's own piece, e.g. an embedding whose backward
    gathers its gradient first) runs whole in B, and its W hands the gradients back."""
    return BACKWARD_SPLIT.get(backward, (backward, _given))


def backward_input_pass(dout, caches: list, before: Callable[[str], None] | None = None):
    """B of the backward walk over `forward_pass`'s caches, last piece first: only the input
    gradients, on a pipeline's critical path.

    Returns (gradient of the walk's inputs - None if it began at the embedding, deferred),
    deferred being a list of (W, w_work, piece) for `weight_pass`, in the walk's order.
    `before(piece)` as in `backward_pass`.

    Memory: deferred keeps, for every weight-bearing layer, its input and the gradient at its
    output (and the LayerNorms' x_hat and 1/std) alive until `weight_pass` runs - for a block,
    `perf.costmodel.weight_work_bytes_per_layer` (with d_ff = 4 d as much as its activations
    without the attention weights); for the head, dlogits (B, T, V). So a zero-bubble schedule
    holds this much per micro-batch whose B ran and W did not, where 1F1B holds nothing of a
    micro-batch after its whole backward.
    """
    deferred = []
    for backward, cache, piece in reversed(caches):
        if before is not None:
            before(piece)
        backward_input, backward_weight = backward_split(backward)
        dout, w_work = backward_input(dout, cache)
        deferred.append((backward_weight, w_work, piece))
    return dout, deferred


def weight_pass(deferred: list, on_grads: Callable[[dict], None] | None = None,
                keep: bool = True) -> dict:
    """W of the backward walk: the weight gradients from `backward_input_pass`'s deferred
    work, any time later (and, for several micro-batches, in any order). W reads activations
    and their gradients only, never a parameter, and communicates nothing. `on_grads` and
    `keep` as in `backward_pass`."""
    grads = {}
    for backward_weight, w_work, _ in deferred:
        piece_grads = backward_weight(w_work)
        if on_grads is not None:
            on_grads(piece_grads)
        if keep:
            grads.update(piece_grads)
    return grads


def backward_pass(dout, caches: list, on_grads: Callable[[dict], None] | None = None,
                  before: Callable[[str], None] | None = None, keep: bool = True):
    """The backward walk over `forward_pass`'s caches, last piece first: each piece's B,
    then at once its W, sublayer by sublayer (`backward_input_pass` and `weight_pass` split
    them, keeping W's work for later).

    Returns (gradient of the walk's inputs - None if it began at the embedding, grads of
    every parameter it used). `on_grads(piece_grads)` is called as soon as each piece (head,
    block, embedding) has produced its gradients: data parallelism starts sending them from
    there while the backward pass goes on (chapter 6). `before(piece)` is called before each
    piece's backward (ZeRO-3 gathers its parameters again); keep=False returns no gradients
    (a caller that sends each piece's away in `on_grads` need not hold them all).
    """
    grads = {}
    for backward, cache, piece in reversed(caches):
        if before is not None:
            before(piece)
        dout, piece_grads = backward(dout, cache)  # the piece's B, then its W
        if on_grads is not None:
            on_grads(piece_grads)
        if keep:
            grads.update(piece_grads)
    return dout, grads


def forward(params: dict, tokens, config: TransformerConfig) -> np.ndarray:
    """Logits (B, T, vocab_size) for integer tokens (B, T); dropout is off at inference."""
    check_params(params, param_shapes(config), config.dtype)
    tokens = check_tokens("tokens", tokens, config.vocab_size, config.max_len)
    inference = dataclasses.replace(config, dropout=0.0, recompute="none")  # no backward
    return forward_pass(params, tokens, inference)[0]


def check_batch(params: dict, tokens, targets, config: TransformerConfig,
                ignore_index: int | None = None):
    """Check a training step's inputs once, at the door; returns (tokens, targets) as arrays."""
    check_params(params, param_shapes(config), config.dtype)
    tokens = check_tokens("tokens", tokens, config.vocab_size, config.max_len)
    targets = check_tokens("targets", targets, config.vocab_size, config.max_len, ignore_index)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets: expected shape {tokens.shape} (of tokens), "
                         f"got {targets.shape}")
    return tokens, targets


def loss_and_grads(params: dict, tokens, targets, config: TransformerConfig,
                   ignore_index: int | None = None, rng: np.random.Generator | None = None,
                   *, ops: SublayerOps = SERIAL, on_grads=None, check: bool = True,
                   loss_scale: float = 1.0, return_routing: bool = False, positions=0):
    """Mean cross-entropy of next-token `targets` (B, T) and its gradient for every parameter.

    Returns (loss: float, grads: dict with exactly the keys of params), and with
    return_routing a third item, `moe_routing`'s {piece: Routing} of this step (empty for a
    dense model). With mixture-of-experts blocks the loss is the cross-entropy plus
    config.aux_loss_weight x the sum of their load-balancing losses (Switch Transformer's
    alpha sum_layers E sum_e f_e P_e), and the gradients are of that sum; the cross-entropy
    alone is loss - aux_loss_weight x sum(r.aux_loss for r in routing.values()).

    `rng` is needed only when config.dropout > 0. The parallel modes call it too, having
    checked their inputs once (check=False): tensor parallelism with its `ops` on a shard of
    the dict, data parallelism with `on_grads` (see `backward_pass`). config.recompute: see
    `forward_pass`. loss_scale: the backward pass starts from loss_scale x dloss, so every
    gradient comes out multiplied by it (mixed precision's loss scaling:
    optim.loss_scale_update; the caller divides it out) - the load-balancing loss's
    gradient too (forward_pass). positions: the position of tokens[:, 0] or of every token
    (forward_pass; context parallelism passes its slice's and its ops, check=False).
    """
    if check:
        tokens, targets = check_batch(params, tokens, targets, config, ignore_index)
    logits, caches = forward_pass(params, tokens, config, rng, ops, loss_scale=loss_scale,
                                  positions=positions)
    loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index)
    routing = moe_routing(caches)
    if routing:
        loss += config.aux_loss_weight * sum(r.aux_loss for r in routing.values())
    dlogits = cross_entropy_backward(loss_cache)
    if loss_scale != 1.0:
        dlogits *= loss_scale
    _, grads = backward_pass(dlogits, caches, on_grads)
    grads = {name: grads[name] for name in params}
    return (loss, grads, routing) if return_routing else (loss, grads)


# --------------------------------------------------------------------------- inference


@dataclasses.dataclass
class KVCache:
    """What decoding keeps of the positions already seen: every block's keys and values,
    (B, H, max_len, d_head) arrays (H: the heads this process holds - fewer on a
    tensor-parallel shard), and how many positions of each sequence they hold, lengths (B,).
    `decode` fills the arrays in place: 2 n_layers d_model values per token and sequence
    (costmodel.kv_cache_bytes)."""

    keys: list
    values: list
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the positions held (the arrays are allocated for max_len)."""
        per_position = sum(k[0, :, 0].nbytes + v[0, :, 0].nbytes
                           for k, v in zip(self.keys, self.values, strict=True))
        return int(per_position * self.lengths.sum())


def empty_kv_cache(params: dict, config: TransformerConfig, batch: int) -> KVCache:
    """An empty cache for `batch` sequences of up to config.max_len positions, for the heads
    `params` holds (a tensor-parallel shard holds n_heads / p)."""
    w_k = params["blocks.0.attn.w_k"]
    shape = (batch, w_k.shape[1] // config.d_head, config.max_len, config.d_head)
    return KVCache([np.zeros(shape, w_k.dtype) for _ in range(config.n_layers)],
                   [np.zeros(shape, w_k.dtype) for _ in range(config.n_layers)],
                   np.zeros(batch, dtype=np.int64))


def cached_attention(cache: KVCache, block: dict) -> AttentionKernel:
    """The attention kernel of decoding. The new positions' keys and values go into the
    cache at each sequence's length; the new queries attend over everything the cache holds
    up to themselves (causal) - one query row against the cached keys, O(T d) per token,
    instead of recomputing the whole context. block["index"]: the block running (`decode`'s
    forward_pass hook sets it). Inference only: there is no backward pass."""

    def forward(q, k, v, mask=None, keep_weights: bool = True, precision: str = "fp32"):
        keys, values = cache.keys[block["index"]], cache.values[block["index"]]
        rows = cache.lengths[:, None] + np.arange(q.shape[2])      # (B, n) new positions
        seq = np.arange(len(rows))[:, None]
        keys[seq, :, rows] = k.transpose(0, 2, 1, 3)               # (B, n, H, d_head)
        values[seq, :, rows] = v.transpose(0, 2, 1, 3)
        total = int(rows.max()) + 1
        visible = np.arange(total) <= rows[:, :, None]             # (B, n, total): causal
        out, _ = local_attention_forward(q, keys[:, :, :total], values[:, :, :total],
                                         visible[:, None], keep_weights=False,
                                         precision=precision)
        return out, None

    def backward(dout, cache_):
        raise ValueError("cached_attention: decoding has no backward pass")

    return AttentionKernel(forward, backward)


def decode(params: dict, tokens, cache: KVCache, config: TransformerConfig, ops=SERIAL):
    """The model on the next n positions of every sequence, tokens (B, n), with the cache of
    the earlier ones: returns logits (B, n, vocab) and adds the n positions to the cache.
    Prefill is decode on the prompt with an empty cache; then one token at a time. Each
    position embeds its own index (positions = cache.lengths + t), so the sequences of a
    batch may hold different lengths. ops: a layout's entry and exit operators (tensor
    parallelism's f and g); its attention kernel is replaced by the cache's. No input
    checks (see `generate`)."""
    block = {"index": None}

    def before(piece: str) -> None:
        if piece.startswith("blocks."):
            block["index"] = int(piece.split(".")[1])

    ops = dataclasses.replace(ops, attention=cached_attention(cache, block))
    positions = cache.lengths[:, None] + np.arange(tokens.shape[1])
    if cache.lengths.max() + tokens.shape[1] > config.max_len:
        raise ValueError(f"tokens: the cache holds {cache.lengths.max()} positions, "
                         f"expected at most max_len={config.max_len} with the "
                         f"{tokens.shape[1]} new ones")
    logits, _ = forward_pass(params, tokens, config, ops=ops, before=before,
                             positions=positions)
    cache.lengths += tokens.shape[1]
    return logits


def next_token(logits, temperature: float, rng) -> int:
    """Greedy when temperature == 0, else a sample of softmax(logits / temperature)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    p = softmax(logits / temperature)
    return int(rng.choice(len(p), p=p))


def _check_generation(params, n_new, config, temperature, seed, check_weights: bool = True):
    if require_real("temperature", temperature) < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    n_new = require_nonnegative_int("n_new", n_new)
    seed = require_nonnegative_int("seed", seed)
    if check_weights:  # once, not once per token
        check_params(params, param_shapes(config), config.dtype)
    return n_new, seed, dataclasses.replace(config, dropout=0.0, recompute="none")


def generate(params: dict, prompt, n_new: int, config: TransformerConfig,
             temperature: float = 0.0, seed: int = 0, kv_cache: bool = True) -> np.ndarray:
    """Extend 1-D `prompt` ids by `n_new` tokens: greedy when temperature == 0, else sampled
    from softmax(logits / temperature) with a seeded generator. Only the last max_len tokens
    are fed to the model (a longer prompt is cut to its last max_len tokens).

    kv_cache=True (the default): prefill the context once, then run one position per new
    token against the cache of keys and values (`decode`), O(T d) per token; False
    recomputes the whole context for every token, O(T^2 d). The same tokens either way.
    When the context reaches max_len the window slides, every position moves, and the cache
    is filled again from the last max_len tokens (as the uncached model sees them). A
    mixture of experts cuts its capacity over the tokens of each call, so cached and
    uncached generation may drop different choices there."""
    n_new, seed, config = _check_generation(params, n_new, config, temperature, seed)
    rng = np.random.default_rng(seed)
    prompt = check_tokens("prompt", np.asarray(prompt).reshape(1, -1), config.vocab_size,
                          np.iinfo(np.int64).max)  # longer prompts are cut to max_len below
    ids, cache = list(prompt[0]), None
    for _ in range(n_new):
        if not kv_cache:
            context = np.array(ids[-config.max_len:], dtype=np.int64)[None, :]
            logits = forward_pass(params, context, config)[0][0, -1]
        elif cache is None or cache.lengths[0] == config.max_len:  # prefill, or the window slid
            cache = empty_kv_cache(params, config, 1)
            context = np.array(ids[-config.max_len:], dtype=np.int64)[None, :]
            logits = decode(params, context, cache, config)[0, -1]
        else:
            logits = decode(params, np.array([[ids[-1]]]), cache, config)[0, -1]
        ids.append(next_token(logits, temperature, rng))
    return np.array(ids, dtype=np.int64)


def generate_batch(params: dict, prompts: list, n_new: int, config: TransformerConfig,
                   temperature: float = 0.0, seed: int = 0,
                   ops_per_call: Callable[[], SublayerOps] | None = None,
                   return_cache: bool = False):
    """`generate` for several prompts of different lengths at once, with one KV cache: every
    sequence of the batch has its own length, its own positions and its own sampler (seeded
    with `seed`, as if it were generated alone), so each result equals `generate` of its
    prompt. The prompts are padded on the right for the prefill; a query never sees a
    padded key (causal), and the first decoded token overwrites the first pad. Every prompt
    plus n_new must fit in max_len.

    ops_per_call: a layout's entry and exit operators, made afresh for each `decode` call
    (the prefill, then one call per new token but the last) - tensor-parallel decoding passes
    Megatron's f and g with a new event log each time, on its shard of the params (whose
    shapes are then not the config's: they are not checked). Returns the token arrays, and
    with return_cache the KV cache too."""
    n_new, seed, config = _check_generation(params, n_new, config, temperature, seed,
                                            check_weights=ops_per_call is None)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of 1-D token arrays, got "
                         f"{type(prompts).__name__}")
    prompts = [check_tokens(f"prompts[{i}]", np.asarray(p).reshape(1, -1), config.vocab_size,
                            config.max_len)[0] for i, p in enumerate(prompts)]
    longest = max(len(p) for p in prompts)
    if longest + n_new > config.max_len:
        raise ValueError(f"n_new: the longest prompt has {longest} tokens, expected at most "
                         f"max_len={config.max_len} - {longest} = {config.max_len - longest} "
                         f"new ones, got {n_new}")
    ops_per_call = ops_per_call or (lambda: SERIAL)
    lengths = np.array([len(p) for p in prompts])
    padded = np.zeros((len(prompts), longest), dtype=np.int64)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    rngs = [np.random.default_rng(seed) for _ in prompts]
    ids = [list(p) for p in prompts]
    cache = empty_kv_cache(params, config, len(prompts))
    logits = decode(params, padded, cache, config, ops_per_call())
    logits = logits[np.arange(len(prompts)), lengths - 1]
    cache.lengths[:] = lengths
    for step in range(n_new):
        for b, row in enumerate(logits):
            ids[b].append(next_token(row, temperature, rngs[b]))
        if step + 1 < n_new:
            latest = np.array([[seq[-1]] for seq in ids])
            logits = decode(params, latest, cache, config, ops_per_call())[:, -1]
    tokens = [np.array(seq, dtype=np.int64) for seq in ids]
    return (tokens, cache) if return_cache else tokens
