"""The course's decoder-only model written in PyTorch, for benchmarks only.

Same architecture, shapes, dtype and initial weights as `tfcourse.nn.model` (it is built from a
tfcourse parameter dict), plain attention (matmul, mask, softmax) like the NumPy model, and
AdamW with the same gradient clipping. Used by benchmarks/train_step.py in its own process.
"""

import math

import torch
import torch.nn.functional as F


class TorchLM(torch.nn.Module):
    def __init__(self, params: dict, config):
        super().__init__()
        self.config = config
        self.p = torch.nn.ParameterDict(
            {name.replace(".", "__"): torch.nn.Parameter(torch.from_numpy(value.copy()))
             for name, value in params.items()})

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def forward(self, tokens):
        c, w = self.config, self.w
        B, T = tokens.shape
        x = w("tok_emb")[tokens] + w("pos_emb")[:T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(c.n_layers):
            b = f"blocks.{i}."
            h = F.layer_norm(x, (c.d_model,), w(b + "ln1.gamma"), w(b + "ln1.beta"), 1e-5)
            q, k, v = (h @ w(b + f"attn.w_{n}") + w(b + f"attn.b_{n}") for n in "qkv")
            q, k, v = (t.view(B, T, c.n_heads, c.d_head).transpose(1, 2) for t in (q, k, v))
            scores = (q / math.sqrt(c.d_head)) @ k.transpose(-1, -2)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            heads = (weights @ v).transpose(1, 2).reshape(B, T, c.d_model)
            x = x + heads @ w(b + "attn.w_o") + w(b + "attn.b_o")
            h = F.layer_norm(x, (c.d_model,), w(b + "ln2.gamma"), w(b + "ln2.beta"), 1e-5)
            hidden = F.gelu(h @ w(b + "ffn.w1") + w(b + "ffn.b1"), approximate="tanh")
            x = x + hidden @ w(b + "ffn.w2") + w(b + "ffn.b2")
        x = F.layer_norm(x, (c.d_model,), w("ln_f.gamma"), w("ln_f.beta"), 1e-5)
        return x @ w("head.w") + w("head.b")


def make_step(model: TorchLM, lr: float, clip: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return float(loss)

    return step
