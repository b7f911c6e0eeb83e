"""Classic wrong answers to solutions/04_transformer.ipynb (see __init__.py)."""
MUTATIONS = {
    "rmsnorm_backward": {
        "r treated as a constant (no path through r)": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
return r * dout * g, dg
""",
        "g forgotten in dx": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout
dx = r * (gd - x_hat * np.mean(gd * x_hat, axis=-1, keepdims=True))
return dx, dg
""",
        "LayerNorm's backward copied (the mean of g-bar subtracted too)": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout * g
mean_gd, mean_gx = gd.mean(axis=-1, keepdims=True), np.mean(gd * x_hat, axis=-1, keepdims=True)
dx = r * (gd - mean_gd - x_hat * mean_gx)
return dx, dg
""",
        "the 1/d of the mean forgotten (a sum over the row)": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout * g
dx = r * (gd - x_hat * np.sum(gd * x_hat, axis=-1, keepdims=True))
return dx, dg
""",
        "dr/dx taken as -r x / d (r instead of r cubed)": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout * g
dx = r * gd - r * x * np.mean(gd * x, axis=-1, keepdims=True)
return dx, dg
""",
        "r recomputed without eps": """
r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout * g
dx = r * (gd - x_hat * np.mean(gd * x_hat, axis=-1, keepdims=True))
return dx, dg
""",
        "dg averaged over rows instead of summed": """
x_hat = x * r
dg = (dout * x_hat).reshape(-1, x.shape[-1]).mean(axis=0)
gd = dout * g
dx = r * (gd - x_hat * np.mean(gd * x_hat, axis=-1, keepdims=True))
return dx, dg
""",
        "dg without x_hat": """
x_hat = x * r
dg = dout.reshape(-1, x.shape[-1]).sum(axis=0)
gd = dout * g
dx = r * (gd - x_hat * np.mean(gd * x_hat, axis=-1, keepdims=True))
return dx, dg
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
    "smoothed_cross_entropy_grad": {
        "smoothing ignored (chapter 4's p - onehot)": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs[np.arange(n), targets] -= 1.0
return probs / n
""",
        "alpha spread over the V - 1 other classes only": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / (vocab - 1)
probs[np.arange(n), targets] -= 1 - smoothing - smoothing / (vocab - 1)
return probs / n
""",
        "the one-hot part not scaled by 1 - alpha (q sums to 1 + alpha)": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / vocab
probs[np.arange(n), targets] -= 1.0
return probs / n
""",
        "sign flipped (q - p)": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / vocab
probs[np.arange(n), targets] -= 1 - smoothing
return -probs / n
""",
        "not divided by the number of rows": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / vocab
probs[np.arange(n), targets] -= 1 - smoothing
return probs
""",
        "divided by every logit (N * V) instead of N": """
n, vocab = logits.shape
shifted = logits - logits.max(axis=-1, keepdims=True)
probs = np.exp(shifted)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / vocab
probs[np.arange(n), targets] -= 1 - smoothing
return probs / logits.size
""",
        "no max subtracted (overflows for large logits)": """
n, vocab = logits.shape
probs = np.exp(logits)
probs /= probs.sum(axis=-1, keepdims=True)
probs -= smoothing / vocab
probs[np.arange(n), targets] -= 1 - smoothing
return probs / n
""",
        "softmax computed in place in the caller's logits": """
n, vocab = logits.shape
logits -= logits.max(axis=-1, keepdims=True)
np.exp(logits, out=logits)
logits /= logits.sum(axis=-1, keepdims=True)
logits -= smoothing / vocab
logits[np.arange(n), targets] -= 1 - smoothing
logits /= n
return logits
""",
    },
    "folded_step": {
        "no bias correction at all": """
return lr, eps
""",
        "eps left unchanged (Kingma and Ba's eps-hat = eps)": """
b1, b2 = betas
return lr * math.sqrt(1 - b2**t) / (1 - b1**t), eps
""",
        "both corrections inverted": """
b1, b2 = betas
root = math.sqrt(1 - b2**t)
return lr * (1 - b1**t) / root, eps / root
""",
        "square root forgotten": """
b1, b2 = betas
return lr * (1 - b2**t) / (1 - b1**t), eps * (1 - b2**t)
""",
        "eps scaled the wrong way (eps / sqrt(1 - beta2^t))": """
b1, b2 = betas
root = math.sqrt(1 - b2**t)
return lr * root / (1 - b1**t), eps / root
""",
        "only the first moment corrected": """
b1, b2 = betas
return lr / (1 - b1**t), eps
""",
    },
    "adamw_step": {
        "the library's step called (folded_step unused)": """
return optim.adamw_step(params, grads, state, lr, betas, eps, weight_decay)
""",
        "the textbook m-hat and v-hat per element (folded_step unused)": """
b1, b2 = betas
t = int(state["step"]) + 1
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "t not incremented (the first step is t = 0)": """
b1, b2 = betas
t = int(state["step"])
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t + 1, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps_hat)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "bias correction applied twice (folded step and m-hat)": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps_hat)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "plain eps instead of folded_step's eps_hat": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "weight decay added to the gradient (Adam with L2, not decoupled)": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name] + (weight_decay * theta if theta.ndim >= 2 else 0.0)
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new_params[name] = theta - step_size * m / (np.sqrt(v) + eps_hat)
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "weight decay on the biases too": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new_params[name] = theta - step_size * m / (np.sqrt(v) + eps_hat) - lr * weight_decay * theta
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "decay scaled by the folded step size instead of lr": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps_hat)
    if theta.ndim >= 2:
        new = new - step_size * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "decay not multiplied by the learning rate": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps_hat)
    if theta.ndim >= 2:
        new = new - weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "moving averages the wrong way round (beta weights the new gradient)": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = (1 - b1) * state["m." + name] + b1 * g
    v = (1 - b2) * state["v." + name] + b2 * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps_hat)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m, v
return new_params, new_state
""",
        "bias-corrected moments stored in the state": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
new_params, new_state = {}, {"step": np.array(t, dtype=np.int64)}
for name, theta in params.items():
    g = grads[name]
    m = b1 * state["m." + name] + (1 - b1) * g
    v = b2 * state["v." + name] + (1 - b2) * g * g
    new = theta - step_size * m / (np.sqrt(v) + eps_hat)
    if theta.ndim >= 2:
        new = new - lr * weight_decay * theta
    new_params[name] = new
    new_state["m." + name], new_state["v." + name] = m / (1 - b1**t), v / (1 - b2**t)
return new_params, new_state
""",
        "in place: the caller's parameters and moments are overwritten": """
b1, b2 = betas
t = int(state["step"]) + 1
step_size, eps_hat = folded_step(t, lr, betas, eps)
state["step"] = np.array(t, dtype=np.int64)
for name, theta in params.items():
    g = grads[name]
    m, v = state["m." + name], state["v." + name]
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    if theta.ndim >= 2:
        theta -= lr * weight_decay * theta
    theta -= step_size * m / (np.sqrt(v) + eps_hat)
return params, state
""",
    },
    "my_prediction": {
        "the run's results copied instead of predicted": """
return smoothed_losses[-1], smoothed_gaps[-1], "keeps growing"
""",
        "a perfect model reaches loss 0": """
return 0.0, np.log(0.905 / 0.005), "keeps growing"
""",
        "alpha spread over the V - 1 other classes (0.9 on the target)": """
q_target, q_other = 0.9, 0.1 / 19
return (-(q_target * np.log(q_target) + 19 * q_other * np.log(q_other)), np.log(q_target / q_other),
        "keeps growing")
""",
        "the gap as the log-odds of the target against all the others together": """
q_target, q_other = 0.905, 0.005
return (-(q_target * np.log(q_target) + 19 * q_other * np.log(q_other)),
        np.log(q_target / (19 * q_other)), "keeps growing")
""",
        "hard targets settle (gradient descent always converges)": """
q_target, q_other = 0.905, 0.005
return (-(q_target * np.log(q_target) + 19 * q_other * np.log(q_other)), np.log(q_target / q_other),
        "settles")
""",
        "an answer that is not one of the two strings": """
q_target, q_other = 0.905, 0.005
return (-(q_target * np.log(q_target) + 19 * q_other * np.log(q_other)), np.log(q_target / q_other),
        "grows")
""",
    },
}
