"""Classic wrong answers to chapter 10's exercises (see __init__.py)."""
ROUTE_HEAD = """
n_tokens, n_experts = probs.shape
"""
KEEP_ROUNDS = """
kept = np.zeros((n_tokens, top_k), dtype=bool)
used = np.zeros(n_experts, dtype=int)
for j in range(top_k):
    for n in range(n_tokens):
        e = experts[n, j]
        if used[e] < capacity:
            kept[n, j] = True
            used[e] += 1
return experts, gates, kept
"""
STABLE = """
experts = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
chosen = np.take_along_axis(probs, experts, axis=1)
"""
GATES = """
gates = chosen if top_k == 1 else chosen / chosen.sum(axis=1, keepdims=True)
"""


def ulysses(to_heads_recv: str, to_sequence_back: str, forward: str, backward: str) -> str:
    """A whole ulysses_attention with its pieces replaced (the solution's are the defaults)."""
    return f"""
p = comm.size

def exchange(send):
    send = np.ascontiguousarray(send)
    recv = np.empty_like(send)
    comm.Alltoall(send, recv)
    return recv

def to_heads(*xs):
    n, (b, h, t, d) = len(xs), xs[0].shape
    send = np.stack(xs).reshape(n, b, p, h // p, t, d).transpose(2, 0, 1, 3, 4, 5)
    recv = exchange(send)
    {to_heads_recv}

def to_sequence(*ys):
    n, (b, h, t, d) = len(ys), ys[0].shape
    send = np.stack(ys).reshape(n, b, h, p, t // p, d).transpose(3, 0, 1, 2, 4, 5)
    recv = exchange(send)
    {to_sequence_back}

def forward(q, k, v, mask=None, keep_weights=True, precision="fp32"):
    {forward}

def backward(dout, cache):
    {backward}

return AttentionKernel(forward, backward)
"""


HEADS = "return recv.transpose(1, 2, 3, 0, 4, 5).reshape(n, b, h // p, p * t, d)"
SEQUENCE = "return recv.transpose(1, 2, 0, 3, 4, 5).reshape(n, b, p * h, t // p, d)"
FORWARD = """q, k, v = to_heads(q, k, v)
    out, cache = local_attention_forward(q, k, v, mask, keep_weights, precision)
    return to_sequence(out)[0], cache"""
BACKWARD = """dq, dk, dv = local_attention_backward(to_heads(dout)[0], cache)
    return tuple(to_sequence(dq, dk, dv))"""

MUTATIONS = {
    "route": {
        "a token's second choice claims before the next token's first":
            ROUTE_HEAD + STABLE + GATES + """
kept = np.zeros((n_tokens, top_k), dtype=bool)
used = np.zeros(n_experts, dtype=int)
for n in range(n_tokens):
    for j in range(top_k):
        e = experts[n, j]
        if used[e] < capacity:
            kept[n, j] = True
            used[e] += 1
return experts, gates, kept
""",
        "Switch's k = 1 gate renormalised to 1 (the router gets no gradient)":
            ROUTE_HEAD + STABLE + """
gates = chosen / chosen.sum(axis=1, keepdims=True)
""" + KEEP_ROUNDS,
        "top-2 gates not renormalised": ROUTE_HEAD + STABLE + """
gates = chosen
""" + KEEP_ROUNDS,
        "capacity off by one (capacity + 1 slots)": ROUTE_HEAD + STABLE + GATES + """
kept = np.zeros((n_tokens, top_k), dtype=bool)
used = np.zeros(n_experts, dtype=int)
for j in range(top_k):
    for n in range(n_tokens):
        e = experts[n, j]
        if used[e] <= capacity:
            kept[n, j] = True
            used[e] += 1
return experts, gates, kept
""",
        "ties to the higher expert index": ROUTE_HEAD + """
experts = np.argsort(probs, axis=1, kind="stable")[:, ::-1][:, :top_k]
chosen = np.take_along_axis(probs, experts, axis=1)
""" + GATES + KEEP_ROUNDS,
        "no capacity: every choice kept": ROUTE_HEAD + STABLE + GATES + """
return experts, gates, np.ones((n_tokens, top_k), dtype=bool)
""",
    },
    "switch_aux_loss": {
        "no factor E": """
n_tokens, n_experts = probs.shape
f = np.bincount(first_choice, minlength=n_experts) / n_tokens
return np.sum(f * probs.mean(axis=0)), np.broadcast_to(f / n_tokens, probs.shape).copy()
""",
        "P_e from the first choices too (E sum f_e^2)": """
n_tokens, n_experts = probs.shape
f = np.bincount(first_choice, minlength=n_experts) / n_tokens
return n_experts * np.sum(f * f), np.zeros_like(probs)
""",
        "gradient E P_e / N (f and P swapped)": """
n_tokens, n_experts = probs.shape
f = np.bincount(first_choice, minlength=n_experts) / n_tokens
P = probs.mean(axis=0)
return n_experts * np.sum(f * P), np.broadcast_to(n_experts * P / n_tokens, probs.shape).copy()
""",
        "gradient without the 1/N of the mean": """
n_tokens, n_experts = probs.shape
f = np.bincount(first_choice, minlength=n_experts) / n_tokens
loss = n_experts * np.sum(f * probs.mean(axis=0))
return loss, np.broadcast_to(n_experts * f, probs.shape).copy()
""",
        "f counts every choice's probability mass (f = P)": """
n_tokens, n_experts = probs.shape
P = probs.mean(axis=0)
return n_experts * np.sum(P * P), 2 * n_experts * np.broadcast_to(P / n_tokens, probs.shape).copy()
""",
    },
    "attention_bytes": {
        "ring passes K, V p times (counts the block it keeps)": """
if method == "ring":
    return 8 * T * B * d * bytes_per_value
return 8 * (p - 1) / p * (B * T // p * d) * bytes_per_value
""",
        "ring without the dK, dV sent home": """
if method == "ring":
    return 6 * (T - T // p) * B * d * bytes_per_value
return 8 * (p - 1) / p * (B * T // p * d) * bytes_per_value
""",
        "Ulysses sends all of each array (its own share too)": """
if method == "ring":
    block = T // p
    return (6 * (T - block) + 2 * block) * B * d * bytes_per_value
return 8 * (B * T // p * d) * bytes_per_value
""",
        "Ulysses counts the forward's 4 all-to-alls only": """
if method == "ring":
    block = T // p
    return (6 * (T - block) + 2 * block) * B * d * bytes_per_value
return 4 * (p - 1) / p * (B * T // p * d) * bytes_per_value
""",
        "Ulysses' arrays of the whole sequence": """
if method == "ring":
    block = T // p
    return (6 * (T - block) + 2 * block) * B * d * bytes_per_value
return 8 * (p - 1) / p * (B * T * d) * bytes_per_value
""",
    },
    "ulysses_attention": {  # on real ranks, under mpiexec (tfcourse.check)
        "the forward's output left in the head split": ulysses(HEADS, SEQUENCE, """
    q, k, v = to_heads(q, k, v)
    return local_attention_forward(q, k, v, mask, keep_weights, precision)""", BACKWARD),
        "slices stacked in reverse rank order": ulysses(
            HEADS.replace("recv.", "recv[::-1]."), SEQUENCE, FORWARD, BACKWARD),
        "positions interleaved instead of stacked by rank": ulysses(
            HEADS.replace("(1, 2, 3, 0, 4, 5)", "(1, 2, 3, 4, 0, 5)"), SEQUENCE, FORWARD, BACKWARD),
        "the backward's gradients left in the head split": ulysses(HEADS, SEQUENCE, FORWARD, """
    dq, dk, dv = local_attention_backward(to_heads(dout)[0], cache)
    return dq, dk, dv"""),
        "attention over the rank's own slice (no all-to-all)": ulysses(
            HEADS, SEQUENCE,
            "return local_attention_forward(q, k, v, mask, keep_weights, precision)",
            "return local_attention_backward(dout, cache)"),
    },
}
