"""Classic wrong answers to solutions/01_attention.ipynb (see __init__.py)."""
MUTATIONS = {
    "softmax": {
        "no shift (overflows at 1e4)": """
e = np.exp(x)
return e / np.sum(e, axis=axis, keepdims=True)
""",
        "one maximum for the whole array instead of one per slice": """
e = np.exp(x - np.max(x))
return e / np.sum(e, axis=axis, keepdims=True)
""",
        "normalised along the wrong axis": """
e = np.exp(x - np.max(x, axis=axis, keepdims=True))
return e / np.sum(e, axis=0, keepdims=True)
""",
        "the mean subtracted instead of the maximum": """
e = np.exp(x - np.mean(x, axis=axis, keepdims=True))
return e / np.sum(e, axis=axis, keepdims=True)
""",
        "the minimum subtracted instead of the maximum": """
e = np.exp(x - np.min(x, axis=axis, keepdims=True))
return e / np.sum(e, axis=axis, keepdims=True)
""",
        "max subtracted, but an all -inf slice gives nan": """
e = np.exp(x - np.max(x, axis=axis, keepdims=True))
return e / np.sum(e, axis=axis, keepdims=True)
""",
        "-inf replaced by a large negative number (an all -inf slice becomes uniform)": """
x = np.maximum(x, -1e30)
e = np.exp(x - np.max(x, axis=axis, keepdims=True))
return e / np.sum(e, axis=axis, keepdims=True)
""",
    },
    "log_softmax": {
        "the log of the softmax (underflows to -inf)": """
e = np.exp(x - np.max(x, axis=axis, keepdims=True))
return np.log(e / np.sum(e, axis=axis, keepdims=True))
""",
        "no shift (overflows at 1e4)": """
with np.errstate(over="ignore", invalid="ignore"):
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))
""",
        "one maximum for the whole array": """
m = np.max(x)
with np.errstate(divide="ignore", invalid="ignore"):
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
""",
        "the shift subtracted but not added back": """
m = np.max(x, axis=axis, keepdims=True)
m = np.where(np.isfinite(m), m, 0.0)
with np.errstate(divide="ignore", invalid="ignore"):
    return x - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
""",
        "an all -inf slice gives nan": """
m = np.max(x, axis=axis, keepdims=True)
m = np.where(np.isfinite(m), m, 0.0)
with np.errstate(divide="ignore", invalid="ignore"):
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
""",
        "summed over the last axis whatever `axis` is": """
m = np.max(x, axis=axis, keepdims=True)
m = np.where(np.isfinite(m), m, 0.0)
with np.errstate(divide="ignore", invalid="ignore"):
    log_sum = m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    return np.where(np.isneginf(log_sum), -np.inf, x - log_sum)
""",
    },
    "attend": {
        "no 1/sqrt(d_k)": """
scores = q @ np.swapaxes(k, -1, -2)
if mask is not None:
    scores = np.where(mask, scores, -np.inf)
weights = softmax(scores, axis=-1)
return weights @ v, weights
""",
        "inverted mask (True = masked out)": """
scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
if mask is not None:
    scores = np.where(mask, -np.inf, scores)
weights = softmax(scores, axis=-1)
return weights @ v, weights
""",
        "mask applied to the weights after the softmax": """
scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
weights = softmax(scores, axis=-1)
if mask is not None:
    weights = weights * mask
return weights @ v, weights
""",
        "mask after the softmax, renormalised (nan for a query with nothing to attend to)": """
scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
weights = softmax(scores, axis=-1)
if mask is not None:
    weights = weights * mask
    with np.errstate(invalid="ignore"):
        weights = weights / weights.sum(axis=-1, keepdims=True)
return weights @ v, weights
""",
        "softmax over the queries": """
scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
if mask is not None:
    scores = np.where(mask, scores, -np.inf)
weights = softmax(scores, axis=-2)
return weights @ v, weights
""",
    },
}
