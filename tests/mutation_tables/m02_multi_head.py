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
    },
    "merge_heads": {
        "reshape without transpose": """
B, n_heads, T, d_head = x.shape
return x.reshape(B, T, n_heads * d_head)
""",
        "head axis moved last: columns interleaved": """
B, n_heads, T, d_head = x.shape
return x.transpose(0, 2, 3, 1).reshape(B, T, n_heads * d_head)
""",
        "heads summed instead of concatenated": """
return x.sum(axis=1)
""",
    },
    "multi_head_self_attention": {
        "no output projection": """
q = split_heads(x @ params["w_q"] + params["b_q"], n_heads)
k = split_heads(x @ params["w_k"] + params["b_k"], n_heads)
v = split_heads(x @ params["w_v"] + params["b_v"], n_heads)
heads, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return merge_heads(heads)
""",
        "mask not passed on": """
q = split_heads(x @ params["w_q"] + params["b_q"], n_heads)
k = split_heads(x @ params["w_k"] + params["b_k"], n_heads)
v = split_heads(x @ params["w_v"] + params["b_v"], n_heads)
heads, _ = attention.scaled_dot_product_attention(q, k, v)
return merge_heads(heads) @ params["w_o"] + params["b_o"]
""",
        "one head over the whole d_model (never split)": """
q = x @ params["w_q"] + params["b_q"]
k = x @ params["w_k"] + params["b_k"]
v = x @ params["w_v"] + params["b_v"]
heads, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return heads @ params["w_o"] + params["b_o"]
""",
        "biases forgotten": """
q = split_heads(x @ params["w_q"], n_heads)
k = split_heads(x @ params["w_k"], n_heads)
v = split_heads(x @ params["w_v"], n_heads)
heads, _ = attention.scaled_dot_product_attention(q, k, v, mask)
return merge_heads(heads) @ params["w_o"]
""",
    },
}
