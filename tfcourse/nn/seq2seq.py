"""Chapter 4: the encoder-decoder Transformer of "Attention Is All You Need", for toy tasks.

The encoder is a stack of the same pre-LN blocks as the language model, with a padding mask
instead of a causal one; each decoder block adds a cross-attention sublayer (queries from the
decoder, keys and values from the encoder's output, the "memory"). Positions use the fixed
sinusoidal encoding of chapter 3, and embeddings are scaled by sqrt(d_model), as in the paper.
One difference, on purpose: the paper normalises *after* each residual add (post-LN); we use
pre-LN, as GPT-2 and most later models do, because it trains reliably without warm-up.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tfcourse.nn.attention import causal_mask
from tfcourse.nn.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from tfcourse.nn.model import (
    attention_sublayer_backward,
    attention_sublayer_forward,
    block_param_shapes,
    check_config,
    check_params,
    check_tokens,
    ffn_sublayer_backward,
    ffn_sublayer_forward,
    init_value,
)
from tfcourse.nn.positional import sinusoidal_encoding

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyper-parameters of the encoder-decoder model; source and target share one vocabulary."""

    vocab_size: int
    d_model: int = 32
    n_heads: int = 4
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    d_ff: int = 128
    max_len: int = 32
    dtype: str = "float64"
    activation: str = "relu"  # the paper's choice
    init_std: float = 0.02

    def __post_init__(self):
        check_config(self, ("vocab_size", "d_model", "n_heads", "n_enc_layers", "n_dec_layers",
                            "d_ff", "max_len"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def param_shapes(config: Seq2SeqConfig) -> dict[str, tuple]:
    d, V = config.d_model, config.vocab_size
    shapes = {"src_emb": (V, d), "tgt_emb": (V, d)}
    for i in range(config.n_enc_layers):
        shapes.update(block_param_shapes(f"enc.{i}.", d, config.d_ff))
    shapes.update({"enc_ln.gamma": (d,), "enc_ln.beta": (d,)})
    for i in range(config.n_dec_layers):
        prefix = f"dec.{i}."
        shapes.update(block_param_shapes(prefix, d, config.d_ff))
        shapes.update({prefix + "ln_x.gamma": (d,), prefix + "ln_x.beta": (d,)})
        shapes.update({f"{prefix}xattn.{w}": (d, d) for w in ("w_q", "w_k", "w_v", "w_o")})
        shapes.update({f"{prefix}xattn.{b}": (d,) for b in ("b_q", "b_k", "b_v", "b_o")})
    shapes.update({"dec_ln.gamma": (d,), "dec_ln.beta": (d,), "head.w": (d, V), "head.b": (V,)})
    return shapes


def init_params(config: Seq2SeqConfig, seed: int) -> dict[str, np.ndarray]:
    """Like the language model's init; embeddings get std 1/sqrt(d_model) so that, scaled
    by sqrt(d_model), they are as large as the positional encoding they are added to."""
    rng = np.random.default_rng(seed)
    n_layers = config.n_enc_layers + config.n_dec_layers
    params = {}
    for name, shape in param_shapes(config).items():
        std = config.d_model**-0.5 if name.endswith("_emb") else config.init_std
        params[name] = init_value(name, shape, rng, std, n_layers, config.dtype)
    return params


def _embed(params, name, ids, config):
    """sqrt(d_model) * E[ids] + PE: (B, T) -> (B, T, d)."""
    scale = math.sqrt(config.d_model)
    tok, cache = embedding_forward(ids, params[name])
    pe = sinusoidal_encoding(ids.shape[1], config.d_model, dtype=config.dtype)
    return tok * tok.dtype.type(scale) + pe, (name, cache, scale)


def _embed_backward(dx, cache):
    name, emb_cache, scale = cache
    return {name: embedding_backward(dx * dx.dtype.type(scale), emb_cache)}


def source_mask(src: np.ndarray) -> np.ndarray:
    """(B, 1, S) True at real (non-padding) source tokens: every query may attend to them."""
    return (src != PAD_ID)[:, None, :]


def _run(params, src, tgt_in, config):
    """Forward pass with caches: encoder, then decoder, then head. Returns (logits, caches)."""
    caches = {"enc": [], "dec": []}
    x, caches["src_embed"] = _embed(params, "src_emb", src, config)
    src_mask = source_mask(src)
    for i in range(config.n_enc_layers):
        x, attn_cache = attention_sublayer_forward(params, f"enc.{i}.", x, src_mask,
                                                   config.n_heads)
        x, ffn_cache = ffn_sublayer_forward(params, f"enc.{i}.", x, config.activation)
        caches["enc"].append((attn_cache, ffn_cache))
    memory, caches["enc_ln"] = layernorm_forward(x, params["enc_ln.gamma"], params["enc_ln.beta"])

    y, caches["tgt_embed"] = _embed(params, "tgt_emb", tgt_in, config)
    self_mask = causal_mask(tgt_in.shape[1])
    for i in range(config.n_dec_layers):
        prefix = f"dec.{i}."
        y, self_cache = attention_sublayer_forward(params, prefix, y, self_mask, config.n_heads)
        y, cross_cache = attention_sublayer_forward(params, prefix, y, src_mask, config.n_heads,
                                                    memory=memory)
        y, ffn_cache = ffn_sublayer_forward(params, prefix, y, config.activation)
        caches["dec"].append((self_cache, cross_cache, ffn_cache))
    normed, caches["dec_ln"] = layernorm_forward(y, params["dec_ln.gamma"], params["dec_ln.beta"])
    logits, caches["head"] = linear_forward(normed, params["head.w"], params["head.b"])
    return logits, caches


def _backward(dlogits, caches):
    grads = {}
    dnormed, grads["head.w"], grads["head.b"] = linear_backward(dlogits, caches["head"])
    dy, grads["dec_ln.gamma"], grads["dec_ln.beta"] = layernorm_backward(dnormed,
                                                                         caches["dec_ln"])
    dmemory = 0.0
    for self_cache, cross_cache, ffn_cache in reversed(caches["dec"]):
        dy, ffn_grads = ffn_sublayer_backward(dy, ffn_cache)
        dy, dmem, cross_grads = attention_sublayer_backward(dy, cross_cache)
        dy, _, self_grads = attention_sublayer_backward(dy, self_cache)
        dmemory = dmemory + dmem  # the memory feeds every decoder layer's cross-attention
        grads.update({**ffn_grads, **cross_grads, **self_grads})
    grads.update(_embed_backward(dy, caches["tgt_embed"]))

    dx, grads["enc_ln.gamma"], grads["enc_ln.beta"] = layernorm_backward(dmemory,
                                                                         caches["enc_ln"])
    for attn_cache, ffn_cache in reversed(caches["enc"]):
        dx, ffn_grads = ffn_sublayer_backward(dx, ffn_cache)
        dx, _, attn_grads = attention_sublayer_backward(dx, attn_cache)
        grads.update({**ffn_grads, **attn_grads})
    grads.update(_embed_backward(dx, caches["src_embed"]))
    return grads


def _check_inputs(params, src, tgt_in, config):
    check_params(params, param_shapes(config), config.dtype)
    src = check_tokens("src", src, config.vocab_size, config.max_len)
    tgt_in = check_tokens("tgt_in", tgt_in, config.vocab_size, config.max_len)
    if tgt_in.shape[0] != src.shape[0]:
        raise ValueError(f"tgt_in: expected batch size {src.shape[0]} (of src), "
                         f"got shape {tgt_in.shape}")
    return src, tgt_in


def forward(params: dict, src, tgt_in, config: Seq2SeqConfig) -> np.ndarray:
    """Logits (B, T, vocab_size) for source ids (B, S) and decoder input ids (B, T)."""
    src, tgt_in = _check_inputs(params, src, tgt_in, config)
    return _run(params, src, tgt_in, config)[0]


def loss_and_grads(params: dict, src, tgt_in, tgt_out, config: Seq2SeqConfig):
    """Mean cross-entropy of `tgt_out` (B, T) ignoring PAD, and grads with params' keys."""
    src, tgt_in = _check_inputs(params, src, tgt_in, config)
    tgt_out = check_tokens("tgt_out", tgt_out, config.vocab_size, config.max_len)
    if tgt_out.shape != tgt_in.shape:
        raise ValueError(f"tgt_out: expected shape {tgt_in.shape} (of tgt_in), "
                         f"got {tgt_out.shape}")
    logits, caches = _run(params, src, tgt_in, config)
    loss, loss_cache = cross_entropy_forward(logits, tgt_out, ignore_index=PAD_ID)
    grads = _backward(cross_entropy_backward(loss_cache), caches)
    return loss, {name: grads[name] for name in params}


def greedy_decode(params: dict, src, config: Seq2SeqConfig, max_new: int) -> np.ndarray:
    """Decode (B, max_new) ids after BOS by repeatedly appending the most likely next token.

    Positions after a sequence's EOS are filled with PAD.
    """
    src = check_tokens("src", src, config.vocab_size, config.max_len)
    out = np.full((src.shape[0], 1), BOS_ID, dtype=np.int64)
    finished = np.zeros(src.shape[0], dtype=bool)
    for _ in range(min(max_new, config.max_len)):
        logits, _ = _run(params, src, out, config)  # re-encodes: simple, and fast enough here
        next_ids = np.where(finished, PAD_ID, logits[:, -1].argmax(axis=-1))
        out = np.concatenate([out, next_ids[:, None]], axis=1)
        finished |= next_ids == EOS_ID
        if finished.all():
            break
    return out[:, 1:]


def exact_match(predicted: np.ndarray, tgt_out: np.ndarray) -> float:
    """Fraction of rows whose predicted tokens up to and including EOS equal the target's."""
    matches = 0
    for pred_row, tgt_row in zip(predicted, tgt_out, strict=True):
        n = int(np.argmax(tgt_row == EOS_ID)) + 1  # target length including EOS
        matches += len(pred_row) >= n and np.array_equal(pred_row[:n], tgt_row[:n])
    return matches / len(tgt_out)

