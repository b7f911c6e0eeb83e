"""Classic wrong answers to chapter 11's exercises (see __init__.py)."""
SOFTMAX = """
weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
weights /= weights.sum(axis=-1, keepdims=True)
"""

MUTATIONS = {
    "attend_with_cache": {
        "attends before storing its own key (misses itself)": """
keys, values = cache_k[:, :length], cache_v[:, :length]
cache_k[:, length] = k[:, 0]
cache_v[:, length] = v[:, 0]
if length == 0:
    return v.copy(), length + 1
scores = q @ keys.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
""" + SOFTMAX + """
return weights @ values, length + 1
""",
        "attends over the whole cache, empty slots included": """
cache_k[:, length] = k[:, 0]
cache_v[:, length] = v[:, 0]
scores = q @ cache_k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
""" + SOFTMAX + """
return weights @ cache_v, length + 1
""",
        "no 1/sqrt(d_head) scaling": """
cache_k[:, length] = k[:, 0]
cache_v[:, length] = v[:, 0]
keys, values = cache_k[:, :length + 1], cache_v[:, :length + 1]
scores = q @ keys.transpose(0, 2, 1)
""" + SOFTMAX + """
return weights @ values, length + 1
""",
        "writes every key to slot 0": """
cache_k[:, 0] = k[:, 0]
cache_v[:, 0] = v[:, 0]
keys, values = cache_k[:, :length + 1], cache_v[:, :length + 1]
scores = q @ keys.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
""" + SOFTMAX + """
return weights @ values, length + 1
""",
        "keeps the length (the cache never grows)": """
cache_k[:, length] = k[:, 0]
cache_v[:, length] = v[:, 0]
keys, values = cache_k[:, :length + 1], cache_v[:, :length + 1]
scores = q @ keys.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
""" + SOFTMAX + """
return weights @ values, length
""",
    },
    "predict_memory_bound_batch": {
        "the ridge itself (forgets FLOPs per weight and bytes)": """
return peak_gflops / bandwidth_gbs
""",
        "bytes per value upside down": """
return peak_gflops / bandwidth_gbs * 2 / bytes_per_value
""",
        "one FLOP per weight (forgets the multiply-add's 2)": """
return peak_gflops / bandwidth_gbs * bytes_per_value
""",
        "bandwidth over peak": """
return bandwidth_gbs / peak_gflops * bytes_per_value / 2
""",
    },
    "tp_decode_allreduces": {  # checked against real runs under mpiexec
        "one decode call per new token, after the prefill": """
return 2 * n_layers * (new_tokens + 1)
""",
        "no model call when there are no new tokens": """
return 2 * n_layers * new_tokens
""",
        "one all-reduce per layer": """
return n_layers * max(new_tokens, 1)
""",
        "training's count (f's backward all-reduces too)": """
return 4 * n_layers * max(new_tokens, 1)
""",
        "forgets the layers": """
return 2 * max(new_tokens, 1)
""",
    },
}
