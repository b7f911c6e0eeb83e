"""Classic wrong answers to chapter 12's exercises (see __init__.py)."""
MUTATIONS = {
    "speedup_and_efficiency": {
        "speed-up inverted (t_p / t_1)": """
speedup = t_p / t_1
return speedup, speedup / p
""",
        "efficiency multiplied by p": """
speedup = t_1 / t_p
return speedup, speedup * p
""",
        "efficiency as 1 - 1/speed-up": """
speedup = t_1 / t_p
return speedup, 1 - 1 / speedup
""",
    },
    "implied_serial_fraction": {
        "1 - efficiency": """
return 1 - speedup / p
""",
        "inverted: (speed-up - 1) / (p - 1)": """
return (speedup - 1) / (p - 1)
""",
        "not divided by p - 1": """
return p / speedup - 1
""",
        "1 / speed-up (the serial share of the time)": """
return 1 / speedup
""",
    },
    "predict_data_parallel_step": {
        "compute not divided by p": """
return compute_s + cm.ring_allreduce_time(grad_bytes, p, alpha, beta)
""",
        "bandwidth term without 1/p: 2 (p - 1) grad_bytes beta": """
return compute_s / p + 2 * (p - 1) * (alpha + grad_bytes * beta)
""",
        "latency term forgotten": """
return compute_s / p + 2 * (p - 1) / p * grad_bytes * beta
""",
        "communication overlapped (max)": """
return max(compute_s / p, cm.ring_allreduce_time(grad_bytes, p, alpha, beta))
""",
        "p steps per phase instead of p - 1": """
return compute_s / p + 2 * p * (alpha + grad_bytes / p * beta)
""",
        "one latency for the whole all-reduce": """
return compute_s / p + alpha + 2 * (p - 1) / p * grad_bytes * beta
""",
    },
    "predicted_pipeline_amdahl": {  # the experiment: GPipe, p = 4, m = 8, simulated
        "ideal: p times faster, nothing serial": """
return 4.0, 0.0
""",
        "the bubble taken for the serial fraction": """
return 32 / 11, 3 / 11
""",
        "the bubble as (p - 1) / m": """
return 4 * (1 - 3 / 8), 0.2
""",
        "micro-batches counted as processes": """
return 8.0, 0.0
""",
    },
    "noise_scale": {
        "the ratio of the two norms": """
return small_sq / big_sq
""",
        "the big batch's norm taken for the true gradient's": """
trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
return trace / big_sq
""",
        "tr(Sigma) without dividing by 1/b_small - 1/b_big": """
true_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
return (small_sq - big_sq) / true_sq
""",
        "batch sizes swapped in |G|^2": """
true_sq = (b_small * big_sq - b_big * small_sq) / (b_small - b_big)
trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
return trace / true_sq
""",
    },
    "tokens_to_target": {
        "the last evaluation below the target, not the first": """
found = None
for step, loss in held_out_losses:
    if loss <= target:
        found = step * batch * seq_len
return found
""",
        "steps, not tokens": """
for step, loss in held_out_losses:
    if loss <= target:
        return step
return None
""",
        "strictly below the target": """
for step, loss in held_out_losses:
    if loss < target:
        return step * batch * seq_len
return None
""",
        "the step of the lowest loss": """
step, loss = min(held_out_losses, key=lambda pair: pair[1])
return step * batch * seq_len if loss <= target else None
""",
        "forgets the sequence length (sequences, not tokens)": """
for step, loss in held_out_losses:
    if loss <= target:
        return step * batch
return None
""",
    },
}
