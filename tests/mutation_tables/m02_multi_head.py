"""Classic wrong answers to solutions/02_multi_head.ipynb (see __init__.py)."""
MUTATIONS = {
    "split_heads": {
        "reshape without transpose": """
B, T, d_model = x.shape
return x.reshape(B, n_heads, T, d_model // n_heads)
""",
        "strided heads: reshape to (d_head, n_heads)": """
B, T, d_model = x.shape
return x.reshape(B, T, d_model // n_heads, n_heads).transpose(0, 3, 1, 2)
""",
        "batch and time flattened, heads mixed across the batch": """
B, T, d_model = x.shape
return x.reshape(B * T, n_heads, d_model // n_heads).transpose(1, 0, 2).reshape(
    B, n_heads, T, d_model // n_heads)
""",
        "transpose with the wrong axes (T and d_head swapped)": """
B, T, d_model = x.shape
return x.reshape(B, T, n_heads, d_model // n_heads).transpose(0, 2, 3, 1).reshape(
    B, n_heads, T, d_model // n_heads)
""",
    },
    "merge_heads": {
        "reshape without transpose": """
B, n_heads, T, d_head = heads.shape
return heads.reshape(B, T, n_heads * d_head)
""",
        "head axis moved last: columns interleaved": """
B, n_heads, T, d_head = heads.shape
return heads.transpose(0, 2, 3, 1).reshape(B, T, n_heads * d_head)
""",
        "heads summed instead of concatenated": """
return heads.sum(axis=1)
""",
    },
    "head_output": {
        "interleaved columns (head i takes every h-th column)": """
own = slice(i, None, n_heads)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
head, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return head @ params["w_o"][own, :]
""",
        "columns of W^O (transposed to fit) instead of its rows": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
head, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return head @ params["w_o"][:, own].T
""",
        "b^O added in every head's term": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
head, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return head @ params["w_o"][own, :] + params["b_o"]
""",
        "scores scaled by 1/sqrt(d_model) instead of 1/sqrt(d_head)": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(x.shape[-1])
if mask is not None:
    scores = np.where(mask, scores, -np.inf)
weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
weights /= weights.sum(axis=-1, keepdims=True)
return (weights @ v) @ params["w_o"][own, :]
""",
        "scores not scaled at all": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
scores = q @ np.swapaxes(k, -1, -2)
if mask is not None:
    scores = np.where(mask, scores, -np.inf)
weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
weights /= weights.sum(axis=-1, keepdims=True)
return (weights @ v) @ params["w_o"][own, :]
""",
        "mask not passed on": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = x @ params["w_q"][:, own] + params["b_q"][own]
k = x @ params["w_k"][:, own] + params["b_k"][own]
v = x @ params["w_v"][:, own] + params["b_v"][own]
head, _ = attention.scaled_dot_product_attention(q, k, v)
return head @ params["w_o"][own, :]
""",
        "every head projected, then head i taken (other heads' parameters used)": """
d_head = params["w_q"].shape[1] // n_heads
own = slice(i * d_head, (i + 1) * d_head)
q = attention.split_heads(x @ params["w_q"] + params["b_q"], n_heads)
k = attention.split_heads(x @ params["w_k"] + params["b_k"], n_heads)
v = attention.split_heads(x @ params["w_v"] + params["b_v"], n_heads)
heads, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return heads[:, i] @ params["w_o"][own, :]
""",
    },
    "multi_head_self_attention": {
        "b^O added once per head": """
return sum(head_output(x, params, n_heads, i, mask) + params["b_o"] for i in range(n_heads))
""",
        "b^O forgotten": """
return sum(head_output(x, params, n_heads, i, mask) for i in range(n_heads))
""",
        "heads averaged instead of summed": """
terms = [head_output(x, params, n_heads, i, mask) for i in range(n_heads)]
return sum(terms) / n_heads + params["b_o"]
""",
        "mask not passed on": """
return sum(head_output(x, params, n_heads, i) for i in range(n_heads)) + params["b_o"]
""",
    },
    "my_prediction": {
        "a multiply-add counted as one FLOP (mkn)": """
return [4 * B * T * d_model * d_model + 2 * B * T * T * d_model for h in head_counts]
""",
        "every head's attention at full width d_model (grows with h)": """
return [8 * B * T * d_model * d_model + 4 * B * h * T * T * d_model for h in head_counts]
""",
        "output projection forgotten": """
return [6 * B * T * d_model * d_model + 4 * B * T * T * d_model for h in head_counts]
""",
        "weighted values A V forgotten": """
return [8 * B * T * d_model * d_model + 2 * B * T * T * d_model for h in head_counts]
""",
        "T and d_model swapped in the attention term": """
return [8 * B * T * d_model * d_model + 4 * B * T * d_model * d_model for h in head_counts]
""",
        "the batch forgotten": """
return [8 * T * d_model * d_model + 4 * T * T * d_model for h in head_counts]
""",
        "one head's attention only (not multiplied by h)": """
return [8 * B * T * d_model * d_model + 4 * B * T * T * (d_model // h) for h in head_counts]
""",
    },
}
