"""Classic wrong answers to solutions/03_positional_encoding.ipynb (see __init__.py)."""
MUTATIONS = {
    "rope": {
        "rotation the wrong way (sin sign flipped)": """
x_even, x_odd = x[..., 0::2], x[..., 1::2]
pairs = np.stack([x_even * cos + x_odd * sin, -x_even * sin + x_odd * cos], axis=-1)
return pairs.reshape(x.shape)
""",
        "pairs taken as halves (x[:d/2], x[d/2:]) instead of interleaved": """
half = x.shape[-1] // 2
x1, x2 = x[..., :half], x[..., half:]
return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
""",
        "cos and sin swapped": """
x_even, x_odd = x[..., 0::2], x[..., 1::2]
pairs = np.stack([x_even * sin - x_odd * cos, x_even * cos + x_odd * sin], axis=-1)
return pairs.reshape(x.shape)
""",
        "one sign wrong (not a rotation: lengths change)": """
x_even, x_odd = x[..., 0::2], x[..., 1::2]
pairs = np.stack([x_even * cos - x_odd * sin, x_odd * cos - x_even * sin], axis=-1)
return pairs.reshape(x.shape)
""",
        "even columns updated in place before the odd ones are computed": """
x_odd = x[..., 1::2]
x[..., 0::2] = x[..., 0::2] * cos - x_odd * sin
x[..., 1::2] = x[..., 0::2] * sin + x_odd * cos
return x
""",
        "right values, but written into the caller's x": """
x_even, x_odd = x[..., 0::2].copy(), x[..., 1::2].copy()
x[..., 0::2] = x_even * cos - x_odd * sin
x[..., 1::2] = x_even * sin + x_odd * cos
return x
""",
        "no rotation (positions ignored)": """
return x.copy()
""",
    },
    "rope_backward": {
        "backward = forward (no transpose)": """
return rope(dout, cos, sin)
""",
        "backward not rotating at all": """
return dout
""",
        "only one sine flipped (the transpose half done)": """
d_even, d_odd = dout[..., 0::2], dout[..., 1::2]
pairs = np.stack([d_even * cos + d_odd * sin, d_even * sin + d_odd * cos], axis=-1)
return pairs.reshape(dout.shape)
""",
        "angle negated through the cosine (rope(dout, -cos, sin))": """
return rope(dout, -cos, sin)
""",
        "transpose taken over the pairs as halves": """
half = dout.shape[-1] // 2
d1, d2 = dout[..., :half], dout[..., half:]
return np.concatenate([d1 * cos + d2 * sin, -d1 * sin + d2 * cos], axis=-1)
""",
    },
    "shift_matrix": {
        "rotation block transposed (shifts by -k)": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
m = np.zeros((d_model, d_model))
for i, b in enumerate(k * omega):
    m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(b), np.sin(b)], [-np.sin(b), np.cos(b)]]
return m
""",
        "frequencies base^(i/d)": """
omega = base ** (-np.arange(d_model // 2) / d_model)
m = np.zeros((d_model, d_model))
for i, b in enumerate(k * omega):
    m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(b), -np.sin(b)], [np.sin(b), np.cos(b)]]
return m
""",
        "the angle is k for every block (frequency forgotten)": """
m = np.zeros((d_model, d_model))
for i in range(d_model // 2):
    b = k
    m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(b), -np.sin(b)], [np.sin(b), np.cos(b)]]
return m
""",
        "block i placed at row i instead of 2i": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
m = np.zeros((d_model, d_model))
for i, b in enumerate(k * omega):
    m[i : i + 2, i : i + 2] = [[np.cos(b), -np.sin(b)], [np.sin(b), np.cos(b)]]
return m
""",
        "only the diagonal (cos terms; the sin cross terms dropped)": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
return np.diag(np.repeat(np.cos(k * omega), 2))
""",
    },
}
