"""Classic wrong answers to solutions/05_cost_model.ipynb (see __init__.py)."""
MUTATIONS = {
    "attention_flops": {
        "a multiply-add counted as one operation": """
return batch * (n_q * d_k * n_k + n_q * n_k * d_v)
""",
        "d_v assumed equal to d_k": """
return batch * 4 * n_q * n_k * d_k
""",
        "square attention assumed (n_k = n_q)": """
return batch * (2 * n_q * d_k * n_q + 2 * n_q * n_q * d_v)
""",
        "the batch forgotten": """
return 2 * n_q * d_k * n_k + 2 * n_q * n_k * d_v
""",
        "only the scores QK^T": """
return batch * 2 * n_q * d_k * n_k
""",
    },
    "adamw_training_bytes": {
        "mixed precision all in 16 bits (8 bytes per parameter)": """
return 4 * n_params * bytes_per_value
""",
        "mixed precision without the float32 master weights (12 bytes)": """
weights_and_grads = 2 * n_params * bytes_per_value
if mixed_precision:
    return weights_and_grads + 2 * 4 * n_params
return weights_and_grads + 2 * n_params * bytes_per_value
""",
        "mixed precision with 16-bit moments": """
weights_and_grads = 2 * n_params * bytes_per_value
if mixed_precision:
    return weights_and_grads + 4 * n_params + 2 * n_params * bytes_per_value
return weights_and_grads + 2 * n_params * bytes_per_value
""",
        "always 16 bytes per parameter (bytes_per_value ignored)": """
return 16 * n_params
""",
        "gradients forgotten (3 copies)": """
if mixed_precision:
    return n_params * bytes_per_value + 3 * 4 * n_params
return 3 * n_params * bytes_per_value
""",
    },
    "model_flops_utilisation": {
        "inverted": """
return peak_flops_per_s / (tokens_per_s * flops_per_token)
""",
        "a percentage instead of a fraction": """
return 100 * tokens_per_s * flops_per_token / peak_flops_per_s
""",
        "6 applied again to FLOPs that already include it": """
return 6 * tokens_per_s * flops_per_token / peak_flops_per_s
""",
        "forward FLOPs only (a third of the training FLOPs)": """
return tokens_per_s * flops_per_token / 3 / peak_flops_per_s
""",
    },
    "combine_blocks": {
        "equal-weight mean of the blocks": """
loss = sum(block_loss for block_loss, _ in results) / len(results)
grads = {name: sum(block_grads[name] for _, block_grads in results) / len(results)
         for name in results[0][1]}
return loss, grads
""",
        "sum of the blocks (no weights)": """
loss = sum(block_loss for block_loss, _ in results)
grads = {name: sum(block_grads[name] for _, block_grads in results) for name in results[0][1]}
return loss, grads
""",
        "loss token-weighted but gradients an equal-weight mean": """
total = sum(counted)
loss = sum(n / total * block_loss for n, (block_loss, _) in zip(counted, results))
grads = {name: sum(block_grads[name] for _, block_grads in results) / len(results)
         for name in results[0][1]}
return loss, grads
""",
        "weighted by counted tokens but not divided by the total": """
loss = sum(n * block_loss for n, (block_loss, _) in zip(counted, results))
grads = {name: sum(n * block_grads[name] for n, (_, block_grads) in zip(counted, results))
         for name in results[0][1]}
return loss, grads
""",
        "token-weighted, 0/0 when no token counts": """
shares = np.array(counted, dtype=float) / np.sum(counted)
loss = float(sum(share * block_loss for share, (block_loss, _) in zip(shares, results)))
grads = {name: sum(share * block_grads[name] for share, (_, block_grads) in zip(shares, results))
         for name in results[0][1]}
return loss, grads
""",
    },
}
