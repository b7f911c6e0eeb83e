"""Classic wrong answers to solutions/00_setup.ipynb (see __init__.py)."""
MUTATIONS = {
    "matmul_flops": {
        "a multiply-add counted as one operation": """
return m * k * n
""",
        "k - 1 adds per output (2k - 1 instead of 2k)": """
return m * n * (2 * k - 1)
""",
        "the inner dimension forgotten": """
return 2 * m * n
""",
    },
    "attainable": {
        "max instead of min": """
return np.maximum(peak_gflops, bandwidth_gbs * np.asarray(intensity, dtype=float))
""",
        "bandwidth divided by the intensity": """
return np.minimum(peak_gflops, bandwidth_gbs / np.asarray(intensity, dtype=float))
""",
        "only the memory roof (no min)": """
return bandwidth_gbs * np.asarray(intensity, dtype=float)
""",
        "Python's min (fails on arrays)": """
return min(peak_gflops, bandwidth_gbs * intensity)
""",
        "compute and memory times added (no overlap): a lower bound, not the roof": """
return 1 / (1 / peak_gflops + 1 / (bandwidth_gbs * np.asarray(intensity, dtype=float)))
""",
    },
    "ridge_point": {
        "inverted (bytes per FLOP)": """
return bandwidth_gbs / peak_gflops
""",
        "peak times bandwidth": """
return peak_gflops * bandwidth_gbs
""",
        "FLOPs per float32 value instead of per byte": """
return peak_gflops / (bandwidth_gbs / 4)
""",
    },
}
