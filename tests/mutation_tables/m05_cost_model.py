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
        "recomputed FLOPs counted (8N + 16LTd: that is HFU)": """
per_token = 8 * n_matmul_params + 16 * n_layers * seq_len * d_model
return batch * seq_len * per_token / step_s / (n_devices * peak_flops_per_s)
""",
        "attention term forgotten (6N per token)": """
return batch * seq_len * 6 * n_matmul_params / step_s / (n_devices * peak_flops_per_s)
""",
        "one device's peak for the whole run": """
per_token = 6 * n_matmul_params + 12 * n_layers * seq_len * d_model
return batch * seq_len * per_token / step_s / peak_flops_per_s
""",
        "one device's share of the batch over the whole run's peak": """
per_token = 6 * n_matmul_params + 12 * n_layers * seq_len * d_model
return batch / n_devices * seq_len * per_token / step_s / (n_devices * peak_flops_per_s)
""",
        "forward FLOPs only (2N + 4LTd)": """
per_token = 2 * n_matmul_params + 4 * n_layers * seq_len * d_model
return batch * seq_len * per_token / step_s / (n_devices * peak_flops_per_s)
""",
        "a percentage instead of a fraction": """
per_token = 6 * n_matmul_params + 12 * n_layers * seq_len * d_model
return 100 * batch * seq_len * per_token / step_s / (n_devices * peak_flops_per_s)
""",
        "tokens counted per sequence, not per batch": """
per_token = 6 * n_matmul_params + 12 * n_layers * seq_len * d_model
return seq_len * per_token / step_s / (n_devices * peak_flops_per_s)
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
    "my_prediction": {
        "the run's count copied instead of predicted": """
return counted[128], counted[256] / counted[128]
""",
        "growth 2: FLOPs per token taken as independent of T": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = L * (4 * d * d + 2 * d * f) + d * V
return 2 * 128 * (6 * n + 12 * L * 128 * d), 2.0
""",
        "growth 4: attention is quadratic": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = L * (4 * d * d + 2 * d * f) + d * V
return 2 * 128 * (6 * n + 12 * L * 128 * d), 4.0
""",
        "attention term forgotten (6N per token)": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = L * (4 * d * d + 2 * d * f) + d * V
return 2 * 128 * 6 * n, 2.0
""",
        "forward FLOPs only": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = L * (4 * d * d + 2 * d * f) + d * V
step = {T: 2 * T * (2 * n + 4 * L * T * d) for T in (128, 256)}
return step[128], step[256] / step[128]
""",
        "FLOPs of one token instead of the step": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = L * (4 * d * d + 2 * d * f) + d * V
per_token = {T: 6 * n + 12 * L * T * d for T in (128, 256)}
return per_token[128], 2 * per_token[256] / per_token[128]
""",
        "N = every parameter (embeddings, biases, LayerNorms counted)": """
V, d, L, f = lm_config.vocab_size, lm_config.d_model, lm_config.n_layers, lm_config.d_ff
n = costmodel.lm_params(V, d, L, f, lm_config.max_len)
step = {T: 2 * T * (6 * n + 12 * L * T * d) for T in (128, 256)}
return step[128], step[256] / step[128]
""",
    },
}
