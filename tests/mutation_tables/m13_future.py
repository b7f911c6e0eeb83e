"""Classic wrong answers to chapter 13's exercises (see __init__.py)."""
MUTATIONS = {
    "state_bytes_per_device": {
        "hard-coded 4 bytes per value": """
one_copy = n_params * 4
moments = 2 * one_copy / (dp if zero_stage >= 1 else 1)
gradients = one_copy / (dp if zero_stage >= 2 else 1)
parameters = one_copy / (dp if zero_stage >= 3 else 1)
return parameters + gradients + moments
""",
        "Adam's moments as 8 bytes per parameter": """
one_copy = n_params * bytes_per_value
moments = 8 * n_params / (dp if zero_stage >= 1 else 1)
gradients = one_copy / (dp if zero_stage >= 2 else 1)
parameters = one_copy / (dp if zero_stage >= 3 else 1)
return parameters + gradients + moments
""",
        "stages off by one (ZeRO-1 shards the gradients too)": """
one_copy = n_params * bytes_per_value
moments = 2 * one_copy / (dp if zero_stage >= 1 else 1)
gradients = one_copy / (dp if zero_stage >= 1 else 1)
parameters = one_copy / (dp if zero_stage >= 2 else 1)
return parameters + gradients + moments
""",
        "one moment instead of two": """
one_copy = n_params * bytes_per_value
moments = one_copy / (dp if zero_stage >= 1 else 1)
gradients = one_copy / (dp if zero_stage >= 2 else 1)
parameters = one_copy / (dp if zero_stage >= 3 else 1)
return parameters + gradients + moments
""",
        "every stage shards everything": """
return 4 * n_params * bytes_per_value / (dp if zero_stage >= 1 else 1)
""",
    },
    "layers_for_stage_0": {
        "proportional split, rounded": """
return min(max(1, round(n_layers * speed_0 / (speed_0 + speed_1))), n_layers - 1)
""",
        "proportional split, rounded down": """
return min(max(1, int(n_layers * speed_0 / (speed_0 + speed_1))), n_layers - 1)
""",
        "ties go to the largest k": """
return min(range(n_layers - 1, 0, -1), key=lambda k: max(k / speed_0, (n_layers - k) / speed_1))
""",
        "minimises the sum of the stage times, not the slower": """
return min(range(1, n_layers), key=lambda k: k / speed_0 + (n_layers - k) / speed_1)
""",
        "speeds used as times per layer": """
return min(range(1, n_layers), key=lambda k: max(k * speed_0, (n_layers - k) * speed_1))
""",
    },
    "choose": {
        "minimum instead of median": """
return min(measured, key=lambda key: min(measured[key]))
""",
        "mean instead of median": """
return min(measured, key=lambda key: statistics.mean(measured[key]))
""",
        "the first measurement only": """
return min(measured, key=lambda key: measured[key][0])
""",
        "returns the lowest median, not its key": """
return min(statistics.median(times) for times in measured.values())
""",
        "the highest median": """
return max(measured, key=lambda key: statistics.median(measured[key]))
""",
    },
    "predicted_zero3_fit": {  # the experiment: GPT-3, dp 128 x tp 8, m = 1, ZeRO-3
        "ZeRO-3 makes it fit": """
return "a"
""",
        "the training state does not fit": """
return "b"
""",
    },
}
