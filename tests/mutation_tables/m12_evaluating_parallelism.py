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
}
