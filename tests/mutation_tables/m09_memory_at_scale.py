"""Classic wrong answers to chapter 9's exercises (see __init__.py)."""
MUTATIONS = {
    "update_loss_scale": {
        "applies the step on overflow (trains on inf)": """
if not finite:
    return scale / 2, 0, True
if good_steps + 1 >= growth_interval:
    return scale * 2, 0, True
return scale, good_steps + 1, True
""",
        "keeps counting good steps across an overflow": """
if not finite:
    return scale / 2, good_steps, False
if good_steps + 1 >= growth_interval:
    return scale * 2, 0, True
return scale, good_steps + 1, True
""",
        "never grows the scale again": """
if not finite:
    return scale / 2, 0, False
return scale, good_steps + 1, True
""",
        "grows without restarting the count": """
if not finite:
    return scale / 2, 0, False
if good_steps + 1 >= growth_interval:
    return scale * 2, good_steps + 1, True
return scale, good_steps + 1, True
""",
        "doubles on overflow, halves when good (backwards)": """
if not finite:
    return scale * 2, 0, False
if good_steps + 1 >= growth_interval:
    return scale / 2, 0, True
return scale, good_steps + 1, True
""",
    },
    "layer_activation_bytes": {
        "everything split by t, with or without SP": """
return (34 * s * b * h + 5 * a * s * s * b) / t
""",
        "attention scores left whole on every rank": """
split = 24 * s * b * h
whole = 10 * s * b * h + 5 * a * s * s * b
if sequence_parallel:
    return (whole + split) / t
return whole + split / t
""",
        "SP splits only the LayerNorms (4 s b h)": """
split = 24 * s * b * h + 5 * a * s * s * b
if sequence_parallel:
    return 6 * s * b * h + (4 * s * b * h + split) / t
return 10 * s * b * h + split / t
""",
        "the regions' inputs counted as split (whole = 6 s b h)": """
split = 28 * s * b * h + 5 * a * s * s * b
whole = 6 * s * b * h
if sequence_parallel:
    return (whole + split) / t
return whole + split / t
""",
    },
    "cheapest_recompute": {
        "forgets the block rebuilt during full recomputation": """
def per_layer(mode):
    return cm.activation_bytes_per_layer(batch, seq_len, d_model, n_heads, d_ff, bytes_per_value,
                                         recompute=mode)
for mode in ("none", "selective", "full"):
    if n_layers * per_layer(mode) <= budget:
        return mode
return None
""",
        "always the most memory-saving mode": """
return "full"
""",
        "tries the most aggressive first": """
def per_layer(mode):
    return cm.activation_bytes_per_layer(batch, seq_len, d_model, n_heads, d_ff, bytes_per_value,
                                         recompute=mode)
needs = {"none": n_layers * per_layer("none"), "selective": n_layers * per_layer("selective"),
         "full": n_layers * per_layer("full") + per_layer("none")}
for mode in ("full", "selective", "none"):
    if needs[mode] <= budget:
        return mode
return None
""",
        "full when nothing fits, instead of None": """
def per_layer(mode):
    return cm.activation_bytes_per_layer(batch, seq_len, d_model, n_heads, d_ff, bytes_per_value,
                                         recompute=mode)
needs = {"none": n_layers * per_layer("none"), "selective": n_layers * per_layer("selective"),
         "full": n_layers * per_layer("full") + per_layer("none")}
for mode in ("none", "selective"):
    if needs[mode] <= budget:
        return mode
return "full"
""",
    },
    "zero3_hooks": {  # on real ranks, under mpiexec (tfcourse.check)
        "never drops a piece": """
order = gather.order

def forward_hook(piece):
    k = order.index(piece)
    gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)

def backward_hook(piece):
    k = order.index(piece)
    gather.fill(piece, order[k - 1] if k > 0 else None)

return forward_hook, backward_hook
""",
        "no prefetch": """
order = gather.order

def forward_hook(piece):
    k = order.index(piece)
    if k > 0:
        gather.drop(order[k - 1])
    gather.fill(piece, None)

def backward_hook(piece):
    k = order.index(piece)
    if k + 1 < len(order):
        gather.drop(order[k + 1])
    gather.fill(piece, None)

return forward_hook, backward_hook
""",
        "backward prefetches the piece after (the forward's direction)": """
order = gather.order

def forward_hook(piece):
    k = order.index(piece)
    if k > 0:
        gather.drop(order[k - 1])
    gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)

def backward_hook(piece):
    k = order.index(piece)
    if k + 1 < len(order):
        gather.drop(order[k + 1])
    gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)

return forward_hook, backward_hook
""",
        "fills before it drops (three pieces at once)": """
order = gather.order

def forward_hook(piece):
    k = order.index(piece)
    gather.fill(piece, order[k + 1] if k + 1 < len(order) else None)
    if k > 0:
        gather.drop(order[k - 1])

def backward_hook(piece):
    k = order.index(piece)
    gather.fill(piece, order[k - 1] if k > 0 else None)
    if k + 1 < len(order):
        gather.drop(order[k + 1])

return forward_hook, backward_hook
""",
    },
}
