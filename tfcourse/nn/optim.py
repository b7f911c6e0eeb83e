"""Optimisers as pure functions on flat parameter dicts: gradient clipping, SGD and AdamW.

Parameters, gradients and optimiser state are flat dicts of arrays, e.g.
{"tok_emb": ..., "blocks.0.attn.w_q": ..., "ln_f.gamma": ...}. Every function returns NEW
dicts and never modifies its inputs:

    state = adamw_init(params)
    grads, norm = clip_grad_norm(grads, max_norm=1.0)
    params, state = adamw_step(params, grads, state, lr=3e-4, weight_decay=0.1)

Optimiser state is itself a flat dict of arrays: "step" (a 0-d int64 counter) plus one entry
per parameter and slot, named "<slot>.<param name>" ("m.tok_emb", "v.tok_emb" for AdamW,
"momentum.tok_emb" for SGD). That makes it easy to save in a checkpoint and to shard by name.
Arrays keep their dtype: float32 parameters get float32 state and float32 updates.
"""

from __future__ import annotations

import math

import numpy as np

from tfcourse.nn.validate import (
    as_float_array,
    require_dtype,
    require_real,
    require_same_keys,
    require_shape,
)

SGD_SLOTS = ("momentum",)
ADAMW_SLOTS = ("m", "v")


# --------------------------------------------------------------------------- input checks


def _check_arrays(name: str, arrays) -> dict:
    """Return a dict of floating arrays, naming the offending entry (e.g. "grads['w']")."""
    if not isinstance(arrays, dict):
        raise ValueError(f"{name}: expected a dict of arrays, got {type(arrays).__name__}")
    return {key: as_float_array(f"{name}[{key!r}]", a) for key, a in arrays.items()}


def _check_grads(params, grads) -> tuple[dict, dict]:
    """Validate that grads has exactly the names, shapes and dtypes of params."""
    params = _check_arrays("params", params)
    require_same_keys("grads", grads, params, "params")
    grads = _check_arrays("grads", grads)
    for name, p in params.items():
        require_shape(f"grads[{name!r}]", grads[name], p.shape, f"shape of params[{name!r}]")
        require_dtype(f"grads[{name!r}]", grads[name], p.dtype, f"dtype of params[{name!r}]")
    return params, grads


def _check_state(state, params: dict, slots: tuple[str, ...], init_name: str):
    """Validate optimiser state against params; return (step as int, dict of state arrays)."""
    expected = {f"{slot}.{name}": p for slot in slots for name, p in params.items()}
    require_same_keys("state", state, {"step": None, **expected}, f"{init_name}(params)")
    step = np.asarray(state["step"])
    if step.shape != () or step.dtype.kind not in "iu" or step < 0:
        raise ValueError(
            f"state['step']: expected a non-negative 0-d integer array, got {state['step']!r}"
        )
    arrays = {key: np.asarray(state[key]) for key in expected}
    for key, p in expected.items():
        require_shape(f"state[{key!r}]", arrays[key], p.shape, "shape of the parameter")
        require_dtype(f"state[{key!r}]", arrays[key], p.dtype, "dtype of the parameter")
    return int(step), arrays


def _require_in_range(name: str, value, low: float, high: float) -> float:
    """Return `value` as a float if low <= value < high."""
    value = require_real(name, value)
    if not low <= value < high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}), got {value!r}")
    return value


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    return tuple(_require_in_range(f"betas[{i}]", beta, 0, 1) for i, beta in enumerate(betas))


def _init_state(params, slots: tuple[str, ...]) -> dict:
    params = _check_arrays("params", params)
    state = {"step": np.array(0, dtype=np.int64)}
    for slot in slots:
        state.update({f"{slot}.{name}": np.zeros_like(p) for name, p in params.items()})
    return state


# --------------------------------------------------------------------------- gradient norm


def sum_of_squares(grads: dict) -> float:
    """Sum of squares of every entry, in float64. Data-parallel shards add theirs up."""
    return sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values())


def state_nbytes(params: dict, grads: dict, opt_state: dict) -> dict[str, int]:
    """Bytes of the training state one process holds, in costmodel.training_state_bytes's
    parts: parameters, gradients and AdamW's moments (the "step" counter is not counted)."""
    def total(arrays) -> int:
        return sum(int(a.nbytes) for a in arrays)

    moments = [v for k, v in opt_state.items() if k != "step"]
    return {"parameters": total(params.values()), "gradients": total(grads.values()),
            "optimizer (m, v)": total(moments)}


def _global_norm(grads: dict) -> float:
    return math.sqrt(sum_of_squares(grads))


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor clip_grad_norm multiplies every gradient by: max_norm / norm, or 1."""
    return max_norm / norm if norm > max_norm else 1.0


def global_norm(grads) -> float:
    """sqrt of the sum of squares of every entry of every array in `grads`, in float64."""
    return _global_norm(_check_arrays("grads", grads))


def clip_grad_norm(grads, max_norm, norm: float | None = None,
                   check: bool = True) -> tuple[dict, float]:
    """Scale all gradients by one common factor so that their global norm is at most max_norm.

    Returns (clipped_grads, norm_before). When norm_before > max_norm every array is multiplied
    by max_norm / norm_before, which keeps the direction of the full gradient vector and makes
    its norm exactly max_norm; otherwise the gradients are returned unchanged (as copies).
    `norm` may be given when it is already known - a ZeRO rank holds only a shard of the
    gradients, so the global norm comes from all ranks' sums of squares. check=False skips
    the input checks (a training loop whose gradients come from the model itself).
    """
    if check:
        grads = _check_arrays("grads", grads)
        max_norm = require_real("max_norm", max_norm, positive=True)
        norm = None if norm is None else require_real("norm", norm)
    norm = _global_norm(grads) if norm is None else norm
    scale = clip_scale(norm, max_norm)
    return {name: g * g.dtype.type(scale) for name, g in grads.items()}, norm


# --------------------------------------------------------------------------- weight decay


def decays(name: str, array) -> bool:
    """Whether weight decay applies to parameter `name`: True for matrices (ndim >= 2).

    Weight matrices and embedding tables are decayed; vectors (biases, LayerNorm gains and
    shifts) are not, since pulling a gain towards 0 or a bias towards 0 is not a sensible
    prior. The rule only looks at the shape; `name` is part of the signature so that a
    variant can decide by name, e.g. exclude "tok_emb".
    """
    return np.ndim(array) >= 2


# --------------------------------------------------------------------------- SGD


def sgd_init(params) -> dict:
    """SGD state: {"step": 0-d int64, "momentum.<name>": zeros like each parameter}."""
    return _init_state(params, SGD_SLOTS)


def sgd_step(params, grads, state, lr, momentum=0.0, weight_decay=0.0) -> tuple[dict, dict]:
    """One step of SGD with heavy-ball momentum and L2 weight decay; returns (params, state).

    For each parameter p with gradient g and momentum buffer b:

        g = g + weight_decay * p     (only where decays(name, p))
        b = momentum * b + g
        p = p - lr * b

    With momentum=0 this is plain gradient descent. lr > 0, 0 <= momentum < 1,
    weight_decay >= 0.
    """
    params, grads = _check_grads(params, grads)
    step, state = _check_state(state, params, SGD_SLOTS, "sgd_init")
    lr = require_real("lr", lr, positive=True)
    momentum = _require_in_range("momentum", momentum, 0, 1)
    weight_decay = _require_in_range("weight_decay", weight_decay, 0, math.inf)

    new_params, new_state = {}, {"step": np.array(step + 1, dtype=np.int64)}
    for name, p in params.items():
        g = grads[name]
        if weight_decay and decays(name, p):
            g = g + weight_decay * p
        buf = momentum * state[f"momentum.{name}"] + g
        new_params[name] = p - lr * buf
        new_state[f"momentum.{name}"] = buf
    return new_params, new_state


# --------------------------------------------------------------------------- AdamW


def adamw_init(params) -> dict:
    """AdamW state: {"step": 0-d int64, "m.<name>", "v.<name>": zeros like each parameter}."""
    return _init_state(params, ADAMW_SLOTS)


def adamw_step(
    params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, check: bool = True
) -> tuple[dict, dict]:
    """One AdamW step (Loshchilov & Hutter, 2019); returns (new_params, new_state).

    With t = state["step"] + 1, for each parameter p with gradient g:

        m = beta1 * m + (1 - beta1) * g          running mean of g
        v = beta2 * v + (1 - beta2) * g**2       running mean of g**2
        m_hat = m / (1 - beta1**t)               bias correction: m and v start at 0
        v_hat = v / (1 - beta2**t)
        p = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)

    The decay term is "decoupled": it shrinks p directly instead of being added to g, so it
    is not rescaled by 1 / sqrt(v_hat) (that is what distinguishes AdamW from Adam with L2).
    As in PyTorch, it is multiplied by lr. It applies only where decays(name, p) is True,
    i.e. to matrices (ndim >= 2), not to biases or LayerNorm parameters.
    lr > 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0. check=False skips the input
    checks, which rescan every array (a training loop that checked its settings once).
    """
    if check:
        params, grads = _check_grads(params, grads)
        step, state = _check_state(state, params, ADAMW_SLOTS, "adamw_init")
        lr = require_real("lr", lr, positive=True)
        betas = _check_betas(betas)
        eps = require_real("eps", eps, positive=True)
        weight_decay = _require_in_range("weight_decay", weight_decay, 0, math.inf)
    else:
        step = int(state["step"])
    beta1, beta2 = betas

    t = step + 1
    new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
    for name, p in params.items():
        g = grads[name]
        m = beta1 * state[f"m.{name}"] + (1 - beta1) * g
        v = beta2 * state[f"v.{name}"] + (1 - beta2) * (g * g)
        update = (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
        if weight_decay and decays(name, p):
            update = update + weight_decay * p
        new_params[name] = p - lr * update
        new_state[f"m.{name}"], new_state[f"v.{name}"] = m, v
    return new_params, new_state


# --------------------------------------------------------------------------- loss scaling


def loss_scale_init(scale: float = 2.0**16) -> dict:
    """Dynamic loss scaling's state (Micikevicius et al. 2018): the scale the loss is
    multiplied by before the backward pass, the good steps since it last changed, and the
    steps skipped in a row. 2^16 is PyTorch's GradScaler start."""
    require_real("scale", scale, positive=True)
    return {"scale": float(scale), "good_steps": 0, "skipped_in_a_row": 0}


def loss_scale_update(state: dict, finite: bool, growth_interval: int = 100,
                      max_skips: int = 24) -> tuple[dict, bool]:
    """One step of dynamic loss scaling; returns (new state, whether to apply the step).

    Gradients with an inf or NaN (fp16 overflowed, at 65504): skip the step, halve the scale.
    After `growth_interval` good steps in a row: double it, to keep small gradients clear of
    fp16's underflow at 2^-24. (GradScaler waits 2000 steps; this course's runs are 200
    long.) `max_skips` skipped steps in a row - the scale has fallen 2^max_skips - means the
    gradients are not finite at any scale: a FloatingPointError, not training on garbage."""
    scale, good, skipped = state["scale"], state["good_steps"], state["skipped_in_a_row"]
    if not finite:
        if skipped + 1 >= max_skips:
            raise FloatingPointError(
                f"loss scaling: {skipped + 1} steps in a row had inf or NaN gradients (scale "
                f"now {scale / 2:g}): training diverged - lower the learning rate, or use bf16")
        return {"scale": scale / 2, "good_steps": 0, "skipped_in_a_row": skipped + 1}, False
    if good + 1 >= growth_interval:
        return {"scale": scale * 2, "good_steps": 0, "skipped_in_a_row": 0}, True
    return {"scale": scale, "good_steps": good + 1, "skipped_in_a_row": 0}, True
