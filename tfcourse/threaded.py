"""Chapter 5: data parallelism over threads, inside one process.

NumPy releases Python's GIL inside its element-wise loops and its BLAS calls, so T Python
threads can each run the model's own `loss_and_grads` on a block of the batch's sequences at
the same time. The loss is a mean over the batch's counted tokens, so the step's loss and
gradient are the blocks' ones weighted by their share of those tokens:

    L = sum_b (N_b / N) L_b,        dL/dW = sum_b (N_b / N) dL_b/dW

the same algebra as chapter 6's all-reduce, with shared memory instead of messages. Why it
beats giving BLAS two threads: BLAS threads only the matmuls, and splits each small matmul
finely; the element-wise passes (GELU, softmax, LayerNorm: about a third of the step) stay on
one thread. Splitting the batch puts every pass of the step on both cores. Run it with ONE
BLAS thread (threads x BLAS threads <= cores). The results equal the one-thread step up to
float rounding (the sum is grouped differently); with dropout each block draws from its own
generator, spawned from `rng`, so dropout masks differ from the one-thread step's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tfcourse.nn import model
from tfcourse.nn.validate import require_positive_int


def batch_blocks(batch_size: int, threads: int) -> list[slice]:
    """Contiguous blocks of sequences, one per thread (sizes differ by at most one; never an
    empty block: fewer blocks than threads when the batch is smaller)."""
    bounds = np.linspace(0, batch_size, min(threads, batch_size) + 1).round().astype(int)
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def loss_and_grads(params: dict, tokens, targets, config: model.TransformerConfig,
                   threads: int, ignore_index: int | None = None,
                   rng: np.random.Generator | None = None, check: bool = True):
    """model.loss_and_grads computed by `threads` threads on blocks of the batch's sequences.

    Returns (loss, grads) as model.loss_and_grads does; threads=1 is exactly that call."""
    threads = require_positive_int("threads", threads)
    if check:  # once, at the door: the threads trust their blocks
        tokens, targets = model.check_batch(params, tokens, targets, config, ignore_index)
    if threads == 1:
        return model.loss_and_grads(params, tokens, targets, config, ignore_index, rng,
                                    check=False)
    blocks = batch_blocks(tokens.shape[0], threads)
    rngs = rng.spawn(len(blocks)) if rng is not None else [None] * len(blocks)

    def block_step(i):
        rows = blocks[i]
        return model.loss_and_grads(params, tokens[rows], targets[rows], config,
                                    ignore_index, rngs[i], check=False)

    with ThreadPoolExecutor(len(blocks)) as pool:
        results = list(pool.map(block_step, range(len(blocks))))
    counted = [targets[rows].size if ignore_index is None
               else int(np.count_nonzero(targets[rows] != ignore_index)) for rows in blocks]
    total = sum(counted)
    shares = [n / total if total else 0.0 for n in counted]
    loss = sum(share * block_loss for share, (block_loss, _) in zip(shares, results, strict=True))
    grads = {name: sum(share * block_grads[name]
                       for share, (_, block_grads) in zip(shares, results, strict=True))
             for name in params}  # a Python float times a float32 array stays float32
    return float(loss), grads
