"""Classic wrong answers to solutions/03_positional_encoding.ipynb (see __init__.py)."""
MUTATIONS = {
    "sinusoidal": {
        "ratio from d_model steps instead of d_model/2 (base^(i/d))": """
omega = base ** (-np.arange(d_model // 2) / d_model)
angles = np.arange(max_len)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles)
table[:, 1::2] = np.cos(angles)
return table
""",
        "the last pair reaches base (ratio from d_model/2 - 1 steps)": """
omega = base ** (-np.arange(d_model // 2) / (d_model // 2 - 1))
angles = np.arange(max_len)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles)
table[:, 1::2] = np.cos(angles)
return table
""",
        "speeds growing instead of slowing (base^(+2i/d))": """
omega = base ** (2 * np.arange(d_model // 2) / d_model)
angles = np.arange(max_len)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles)
table[:, 1::2] = np.cos(angles)
return table
""",
        "sin and cos swapped": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
angles = np.arange(max_len)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.cos(angles)
table[:, 1::2] = np.sin(angles)
return table
""",
        "exponent from the column index (odd columns use (2i+1)/d)": """
angles = np.arange(max_len)[:, None] / base ** (np.arange(d_model)[None, :] / d_model)
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles[:, 0::2])
table[:, 1::2] = np.cos(angles[:, 1::2])
return table
""",
        "sines and cosines in two halves instead of interleaved": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
angles = np.arange(max_len)[:, None] * omega[None, :]
return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
""",
        "positions counted from 1": """
omega = base ** (-2 * np.arange(d_model // 2) / d_model)
angles = np.arange(1, max_len + 1)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles)
table[:, 1::2] = np.cos(angles)
return table
""",
        "base ignored (always 10000)": """
omega = 10000.0 ** (-2 * np.arange(d_model // 2) / d_model)
angles = np.arange(max_len)[:, None] * omega[None, :]
table = np.zeros((max_len, d_model))
table[:, 0::2] = np.sin(angles)
table[:, 1::2] = np.cos(angles)
return table
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
