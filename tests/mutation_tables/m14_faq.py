"""Classic wrong answers to chapter 14's exercises (see __init__.py)."""
MUTATIONS = {
    "rnn_loop": {
        "h_{t-1} never updated (always zero)": """
batch, length, _ = x.shape
h = np.zeros((batch, length, w_hh.shape[0]))
h_zero = np.zeros((batch, w_hh.shape[0]))
for t in range(length):
    h[:, t] = np.tanh(x[:, t] @ w_xh + h_zero @ w_hh + b)
return h
""",
        "tanh forgotten": """
batch, length, _ = x.shape
h = np.zeros((batch, length, w_hh.shape[0]))
h_prev = np.zeros((batch, w_hh.shape[0]))
for t in range(length):
    h_prev = x[:, t] @ w_xh + h_prev @ w_hh + b
    h[:, t] = h_prev
return h
""",
        "W_hh transposed": """
batch, length, _ = x.shape
h = np.zeros((batch, length, w_hh.shape[0]))
h_prev = np.zeros((batch, w_hh.shape[0]))
for t in range(length):
    h_prev = np.tanh(x[:, t] @ w_xh + h_prev @ w_hh.T + b)
    h[:, t] = h_prev
return h
""",
        "the pre-activation carried to the next step": """
batch, length, _ = x.shape
h = np.zeros((batch, length, w_hh.shape[0]))
pre = np.zeros((batch, w_hh.shape[0]))
for t in range(length):
    pre = x[:, t] @ w_xh + pre @ w_hh + b
    h[:, t] = np.tanh(pre)
return h
""",
        "the input projection inside the loop (T products with W_xh)": """
batch, length, _ = x.shape
h = np.zeros((batch, length, w_hh.shape[0]))
h_prev = np.zeros((batch, w_hh.shape[0]))
for t in range(length):
    h_prev = np.tanh(x[:, t] @ w_xh + h_prev @ w_hh + b)
    h[:, t] = h_prev
return h
""",
    },
    "attention_crossover": {
        "d_model instead of d_ff": """
return d_model
""",
        "d_ff + 1 (strictly more than the feed-forward)": """
return d_ff + 1
""",
        "2 d_ff (only the scores QK^T counted)": """
return 2 * d_ff
""",
        "the ratio d_ff // d_model": """
return d_ff // d_model
""",
    },
    "split_batch_grads": {
        "no split: the whole batch at once": """
_, grads = model.loss_and_grads(params, tokens, targets, config)
return grads
""",
        "plain mean of the ranks' gradients": """
total = {name: np.zeros_like(p) for name, p in params.items()}
for x_r, y_r in zip(np.array_split(tokens, world_size), np.array_split(targets, world_size)):
    _, grads = model.loss_and_grads(params, x_r, y_r, config)
    for name, g in grads.items():
        total[name] += g / world_size
return total
""",
        "sum of the ranks' gradients": """
total = {name: np.zeros_like(p) for name, p in params.items()}
for x_r, y_r in zip(np.array_split(tokens, world_size), np.array_split(targets, world_size)):
    _, grads = model.loss_and_grads(params, x_r, y_r, config)
    for name, g in grads.items():
        total[name] += g
return total
""",
        "split along the sequence axis": """
batch = tokens.shape[1]
total = {name: np.zeros_like(p) for name, p in params.items()}
for x_r, y_r in zip(np.array_split(tokens, world_size, axis=1),
                    np.array_split(targets, world_size, axis=1)):
    _, grads = model.loss_and_grads(params, x_r, y_r, config)
    for name, g in grads.items():
        total[name] += x_r.shape[1] / batch * g
return total
""",
    },
    "conv_layers_needed": {
        "each layer sees k more positions: ceil(T / k)": """
return -(-T // k)
""",
        "rounded down: (T - 1) // (k - 1)": """
return (T - 1) // (k - 1)
""",
        "T // (k - 1)": """
return T // (k - 1)
""",
        "T - 1 layers, like the RNN's steps": """
return T - 1
""",
    },
    "predicted_dilated_layers": {  # the experiment: T = 512, k = 2 and 3
        "the plain convolution's count": """
return 511, 256
""",
        "log rounded down": """
return 9, 5
""",
        "one layer too many": """
return 10, 7
""",
        "log base 2 for every k": """
return 9, 9
""",
    },
}
