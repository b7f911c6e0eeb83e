"""Classic wrong answers to solutions/04_transformer.ipynb (see __init__.py)."""
MUTATIONS = {
    "layernorm_backward": {
        "variance treated as a constant (no x_hat term)": """
d = x_hat.shape[-1]
dgamma = (dout * x_hat).reshape(-1, d).sum(axis=0)
dbeta = dout.reshape(-1, d).sum(axis=0)
g = dout * gamma
dx = rstd * (g - g.mean(axis=-1, keepdims=True))
return dx, dgamma, dbeta
""",
        "gamma forgotten in dx (g = dout)": """
d = x_hat.shape[-1]
dgamma = (dout * x_hat).reshape(-1, d).sum(axis=0)
dbeta = dout.reshape(-1, d).sum(axis=0)
g = dout
dx = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
return dx, dgamma, dbeta
""",
        "means over the batch axis instead of the features": """
d = x_hat.shape[-1]
dgamma = (dout * x_hat).reshape(-1, d).sum(axis=0)
dbeta = dout.reshape(-1, d).sum(axis=0)
g = dout * gamma
dx = rstd * (g - g.mean(axis=0, keepdims=True) - x_hat * (g * x_hat).mean(axis=0, keepdims=True))
return dx, dgamma, dbeta
""",
        "dgamma and dbeta averaged over rows instead of summed": """
d = x_hat.shape[-1]
dgamma = (dout * x_hat).reshape(-1, d).mean(axis=0)
dbeta = dout.reshape(-1, d).mean(axis=0)
g = dout * gamma
dx = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
return dx, dgamma, dbeta
""",
        "dgamma without x_hat": """
d = x_hat.shape[-1]
dgamma = dout.reshape(-1, d).sum(axis=0)
dbeta = dout.reshape(-1, d).sum(axis=0)
g = dout * gamma
dx = rstd * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
return dx, dgamma, dbeta
""",
    },
    "ffn_backward": {
        "ReLU's derivative forgotten": """
h = x @ w1 + b1
a = np.maximum(h, 0)
d = dout.reshape(-1, dout.shape[-1])
dw2 = a.reshape(-1, a.shape[-1]).T @ d
db2 = d.sum(axis=0)
dh = dout @ w2.T
dh2 = dh.reshape(-1, dh.shape[-1])
dw1 = x.reshape(-1, x.shape[-1]).T @ dh2
db1 = dh2.sum(axis=0)
return dh @ w1.T, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
""",
        "ReLU's derivative taken as the activation itself": """
h = x @ w1 + b1
a = np.maximum(h, 0)
d = dout.reshape(-1, dout.shape[-1])
dw2 = a.reshape(-1, a.shape[-1]).T @ d
db2 = d.sum(axis=0)
dh = (dout @ w2.T) * a
dh2 = dh.reshape(-1, dh.shape[-1])
dw1 = x.reshape(-1, x.shape[-1]).T @ dh2
db1 = dh2.sum(axis=0)
return dh @ w1.T, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
""",
        "bias gradients forgotten (left at zero)": """
h = x @ w1 + b1
a = np.maximum(h, 0)
d = dout.reshape(-1, dout.shape[-1])
dw2 = a.reshape(-1, a.shape[-1]).T @ d
dh = (dout @ w2.T) * (h > 0)
dh2 = dh.reshape(-1, dh.shape[-1])
dw1 = x.reshape(-1, x.shape[-1]).T @ dh2
return dh @ w1.T, {"w1": dw1, "b1": np.zeros_like(b1), "w2": dw2, "b2": np.zeros(w2.shape[1])}
""",
        "bias gradients averaged over tokens instead of summed": """
h = x @ w1 + b1
a = np.maximum(h, 0)
d = dout.reshape(-1, dout.shape[-1])
dw2 = a.reshape(-1, a.shape[-1]).T @ d
db2 = d.mean(axis=0)
dh = (dout @ w2.T) * (h > 0)
dh2 = dh.reshape(-1, dh.shape[-1])
dw1 = x.reshape(-1, x.shape[-1]).T @ dh2
db1 = dh2.mean(axis=0)
return dh @ w1.T, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
""",
        "dw2 from the pre-activation h instead of a": """
h = x @ w1 + b1
d = dout.reshape(-1, dout.shape[-1])
dw2 = h.reshape(-1, h.shape[-1]).T @ d
db2 = d.sum(axis=0)
dh = (dout @ w2.T) * (h > 0)
dh2 = dh.reshape(-1, dh.shape[-1])
dw1 = x.reshape(-1, x.shape[-1]).T @ dh2
db1 = dh2.sum(axis=0)
return dh @ w1.T, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
""",
    },
    "cross_entropy_grad": {
        "not divided by the number of tokens": """
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
probs[np.arange(len(targets)), targets] -= 1.0
return probs
""",
        "divided by every logit (N * V) instead of N": """
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
probs[np.arange(len(targets)), targets] -= 1.0
return probs / logits.size
""",
        "softmax over the tokens (axis 0)": """
shifted = logits - logits.max(axis=0, keepdims=True)
probs = np.exp(shifted) / np.exp(shifted).sum(axis=0, keepdims=True)
probs[np.arange(len(targets)), targets] -= 1.0
return probs / len(targets)
""",
        "one-hot subtracted in whole columns (probs[:, targets])": """
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
probs[:, targets] -= 1.0
return probs / len(targets)
""",
        "no max subtracted (overflows for large logits)": """
e = np.exp(logits)
probs = e / e.sum(axis=-1, keepdims=True)
probs[np.arange(len(targets)), targets] -= 1.0
return probs / len(targets)
""",
        "one maximum for the whole array instead of one per row": """
shifted = logits - logits.max()
probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
probs[np.arange(len(targets)), targets] -= 1.0
return probs / len(targets)
""",
        "softmax computed in place in the caller's logits": """
logits -= logits.max(axis=-1, keepdims=True)
np.exp(logits, out=logits)
logits /= logits.sum(axis=-1, keepdims=True)
logits[np.arange(len(targets)), targets] -= 1.0
logits /= len(targets)
return logits
""",
    },
    "adamw_step": {
        "no bias correction": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    decay = weight_decay * theta if theta.ndim >= 2 else 0.0
    new_params[name] = theta - lr * (m / (np.sqrt(v) + eps) + decay)
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "weight decay added to the gradient (Adam with L2, not decoupled)": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name] + (weight_decay * theta if theta.ndim >= 2 else 0.0)
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    new_params[name] = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "weight decay on the biases too": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    new_params[name] = theta - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * theta)
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "decay not multiplied by the learning rate": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    decay = weight_decay * theta if theta.ndim >= 2 else 0.0
    new_params[name] = theta - lr * m_hat / (np.sqrt(v_hat) + eps) - decay
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "eps inside the square root": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    decay = weight_decay * theta if theta.ndim >= 2 else 0.0
    new_params[name] = theta - lr * (m_hat / np.sqrt(v_hat + eps) + decay)
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "bias-corrected moments stored in the state": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    decay = weight_decay * theta if theta.ndim >= 2 else 0.0
    new_params[name] = theta - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    new_state["m." + name], new_state["v." + name] = m_hat, v_hat
return new_params, new_state
""",
        "in place: the caller's parameters and moments are overwritten": """
b1, b2 = betas
t = int(state["step"]) + 1
state["step"] = np.array(t, dtype=np.int64)
for name, theta in params.items():
    g = grads[name]
    m, v = state["m." + name], state["v." + name]
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    decay = weight_decay * theta if theta.ndim >= 2 else 0.0
    theta -= lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
return params, state
""",
    },
}
