"""Issue 22: tensor-parallel decoding - Megatron-LM (Shoeybi et al. 2019) generating text,
each rank holding its heads' slice of the KV cache.

    mpiexec -n 2 python -m mpi4py -m tfcourse.parallel.inference --tp 2 --new-tokens 16 \\
        [--prompt TEXT ...] [--temperature T --seed S] [--batch B] [--config tiny|small] \\
        [--checkpoint DIR] [--alpha A --beta B] [--json out.json]

Every rank builds the same parameters (init_params from --seed, or the newest checkpoint in
--checkpoint DIR, any training run's) and keeps the shard training's tensor parallelism keeps
(plans.tensor.shard_params): its n_heads/p heads of attention, 1/p of the MLP's columns. The
serial model's `decode` runs on the shard with Megatron's f and g as its entry and exit
operators (tensor_parallel.megatron_ops): g all-reduces each sublayer's partial output, two
all-reduces per layer and step, nothing else. A rank computes its own heads' keys and values
only, so its KV cache (model.empty_kv_cache of the shard) is 1/p of the serial one. The
embeddings, final LayerNorm and head are replicated: every rank gets the same logits and, with
the same seeded generator, picks the same token.

Prefill runs the prompts in one `decode` call, then each step one position per sequence. A
step all-reduces B x d values per sublayer, so its communication is latency, 2 L x 2 (p - 1)
alpha per token however small the model (Pope et al. 2022, "Efficiently Scaling Transformer
Inference": small-batch decoding is latency-bound): costmodel.tp_decode_comm_seconds
(--alpha, --beta: chapter 6's fitted link), and costmodel.tp_decode_pays_off_width says how
wide a model must be for the split to pay.

--prompt may repeat (prompts of different lengths, right-padded for the prefill as in
model.generate_batch); --batch B decodes B sequences, the prompts in turn. A prompt plus
--new-tokens must fit in max_len: longer requests are refused (model.generate would slide its
window and prefill again for every token, which is not decoding). Rank 0 checks the tokens
against the serial model.generate of each prompt (equals_serial).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import NamedTuple

import numpy as np

from tfcourse.checkpoint import read_distributed
from tfcourse.data import CharVocab
from tfcourse.nn.model import (
    TransformerConfig,
    check_params,
    generate,
    generate_batch,
    init_params,
    param_shapes,
    preset,
)
from tfcourse.nn.validate import (
    require_nonnegative_int,
    require_nonnegative_real,
    require_positive_int,
)
from tfcourse.parallel.plans.tensor import check_world_size, shard_params
from tfcourse.parallel.program import EventLog, program_parser, run_program
from tfcourse.parallel.tensor_parallel import megatron_ops
from tfcourse.perf.costmodel import allreduce_bytes, kv_cache_bytes, tp_decode_comm_seconds
from tfcourse.train import load_corpus

DEFAULT_PROMPT = "Beautiful is"


class Model(NamedTuple):
    """The whole model (each rank cuts its shard) and the ids of the B sequences' prompts."""

    config: TransformerConfig
    params: dict
    vocab: CharVocab
    prompts: list


def load_model(args: argparse.Namespace, vocab: CharVocab) -> tuple[TransformerConfig, dict]:
    """The --config preset initialised from --seed, or the newest checkpoint in --checkpoint."""
    if args.checkpoint is None:
        try:
            config = preset(args.config or "tiny", vocab.size)
        except ValueError as err:
            raise ValueError(f"--{err}") from None
        return config, init_params(config, args.seed)
    if args.config is not None:
        raise ValueError(f"--config: the model is the checkpoint's, expected no --config with "
                         f"--checkpoint, got --config {args.config}")
    try:
        params, _, manifest = read_distributed(args.checkpoint)
        config = TransformerConfig(**manifest["config"])
        check_params(params, param_shapes(config), config.dtype)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"--checkpoint: {str(err).removeprefix('folder: ')}") from None
    if config.n_experts:
        raise ValueError(f"--checkpoint: tensor parallelism splits dense MLPs, expected a "
                         f"dense model, got one with {config.n_experts} experts")
    if config.vocab_size != vocab.size:
        raise ValueError(f"--text: the checkpoint's model has {config.vocab_size} token ids, "
                         f"this text's vocabulary {vocab.size}: decode with the --text it "
                         f"was trained on")
    return config, params


def encode_prompts(texts: list[str], vocab: CharVocab, max_len: int, new_tokens: int,
                   batch: int | None) -> list[np.ndarray]:
    """The B sequences' prompt ids: each prompt and its new tokens must fit in max_len."""
    prompts = []
    for text in texts:
        try:
            ids = vocab.encode(text)
        except ValueError as err:
            raise ValueError(f"--prompt: {str(err).removeprefix('text: ')}") from None
        if not 1 <= len(ids) <= max_len:
            raise ValueError(f"--prompt: expected 1 to max_len={max_len} characters (the "
                             f"model's positions), got {len(ids)}")
        if len(ids) + new_tokens > max_len:
            raise ValueError(f"--new-tokens: the prompt {text!r} has {len(ids)} characters, "
                             f"expected at most max_len={max_len} - {len(ids)} = "
                             f"{max_len - len(ids)} new tokens, got {new_tokens}")
        prompts.append(ids)
    batch = len(texts) if batch is None else require_positive_int("--batch", batch)
    if batch < len(texts):
        raise ValueError(f"--batch: expected at least the {len(texts)} prompts given, "
                         f"got {batch}")
    return [prompts[b % len(prompts)] for b in range(batch)]


def prepare(args: argparse.Namespace, world_size: int) -> Model:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments)."""
    if require_positive_int("--tp", args.tp) != world_size:
        raise ValueError(f"--tp: expected the number of ranks (mpiexec -n), {world_size}, "
                         f"got {args.tp}")
    require_nonnegative_int("--new-tokens", args.new_tokens)
    require_nonnegative_real("--temperature", args.temperature)
    require_nonnegative_int("--seed", args.seed)
    require_positive_int("--threads", args.threads)
    if (args.alpha is None) != (args.beta is None):
        raise ValueError(f"--alpha, --beta: expected both (the link's fit) or neither, got "
                         f"--alpha {args.alpha} --beta {args.beta}")
    if args.alpha is not None:
        require_nonnegative_real("--alpha", args.alpha)
        require_nonnegative_real("--beta", args.beta)
    vocab = load_corpus(args.text).vocab
    config, params = load_model(args, vocab)
    try:
        check_world_size(config, world_size)
    except ValueError as err:
        raise ValueError(f"--tp: {str(err).removeprefix('world_size: ')}") from None
    prompts = encode_prompts(args.prompt or [DEFAULT_PROMPT], vocab, config.max_len,
                             args.new_tokens, args.batch)
    return Model(dataclasses.replace(config, dropout=0.0, recompute="none"), params, vocab,
                 prompts)


def generate_tp(shard: dict, model: Model, args: argparse.Namespace, comm):
    """model.generate_batch on this rank's shard, with f and g as the operators of every
    `decode` call and a fresh EventLog for each: the tokens (B lists), the KV cache, the
    logs and each call's seconds (the prefill first; a step's time includes picking its
    tokens)."""
    logs, starts = [], []

    def tensor_parallel_ops():
        starts.append(time.perf_counter())
        logs.append(EventLog())
        return megatron_ops(comm, logs[-1])

    comm.Barrier()
    tokens, cache = generate_batch(shard, list(model.prompts), args.new_tokens, model.config,
                                   args.temperature, args.seed, tensor_parallel_ops,
                                   return_cache=True)
    ends = starts[1:] + [time.perf_counter()]
    return ([ids.tolist() for ids in tokens], cache, logs,
            [end - start for start, end in zip(starts, ends, strict=True)])


def run(args: argparse.Namespace, model: Model, comm) -> dict:
    config, p, n_new = model.config, comm.size, args.new_tokens
    shard = shard_params(model.params, comm.rank, p)
    tokens, cache, logs, seconds = generate_tp(shard, model, args, comm)
    events = [log.communication_events() for log in logs]
    calls, nbytes = [len(e) for e in events], [sum(x["bytes"] for x in e) for e in events]
    comm_seconds = [sum(x["end"] - x["start"] for x in e) for e in events]
    per_token = float(np.median(seconds[1:])) if n_new > 1 else None
    everyone = comm.gather({"tokens": tokens, "kv_cache_bytes": cache.nbytes,
                            "param_bytes": sum(int(v.nbytes) for v in shard.values())}, root=0)
    if comm.rank != 0:
        return {}
    serial = {tuple(ids): generate(model.params, ids, n_new, config, args.temperature,
                                   args.seed).tolist() for ids in model.prompts}
    itemsize, batch = np.dtype(config.dtype).itemsize, len(tokens)
    return {
        "world_size": p,
        "config": config.to_dict(),
        **{name: getattr(args, name) for name in ("checkpoint", "temperature", "seed")},
        "prompts": [model.vocab.decode(ids) for ids in model.prompts],
        "batch": batch,
        "new_tokens": n_new,
        "tokens": tokens,
        "text": [model.vocab.decode(np.array(ids)) for ids in tokens],
        "equals_serial": all(ids == serial[tuple(prompt)]
                             for ids, prompt in zip(tokens, model.prompts, strict=True)),
        "ranks_agree": all(rank["tokens"] == tokens for rank in everyone),
        "prefill_positions": int(max(len(ids) for ids in model.prompts)),
        "prefill_seconds": seconds[0],
        "prefill_allreduces": calls[0],
        "prefill_allreduce_bytes": nbytes[0],
        "decode_step_seconds": seconds[1:],
        "decode_step_allreduces": calls[1:],
        "decode_step_allreduce_bytes": nbytes[1:],
        "decode_step_comm_seconds": comm_seconds[1:],
        "seconds_per_token": per_token,
        "comm_seconds_per_token": float(np.median(comm_seconds[1:])) if n_new > 1 else None,
        "bytes_sent_per_token_per_rank": allreduce_bytes(nbytes[1], p) if n_new > 1 else None,
        "predicted_comm_seconds_per_token": None if args.alpha is None else
        tp_decode_comm_seconds(config.n_layers, batch, config.d_model, itemsize, p,
                               args.alpha, args.beta),
        "kv_cache_positions": cache.lengths.tolist(),
        "kv_cache_bytes_per_rank": [rank["kv_cache_bytes"] for rank in everyone],
        "kv_cache_bytes_serial": kv_cache_bytes(config.n_layers, config.d_model, itemsize,
                                                int(cache.lengths.sum())),
        "param_bytes_per_rank": [rank["param_bytes"] for rank in everyone],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.inference", __doc__, training=False)
    parser.add_argument("--tp", type=int, required=True, help="ranks (all of the job's)")
    parser.add_argument("--new-tokens", type=int, required=True, help="tokens to generate")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"a prompt (repeat for several; default {DEFAULT_PROMPT!r})")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences decoded together (default: one per prompt)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sampler's seed, and the model's (without --checkpoint)")
    parser.add_argument("--config", default=None, help="tiny (default) or small")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="decode the newest checkpoint in DIR (any training run's)")
    parser.add_argument("--text", default=None, help="the vocabulary's text (default: Zen)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="link latency in s (chapter 6's fit): predict the all-reduces")
    parser.add_argument("--beta", type=float, default=None, help="link seconds per byte")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        per_token = result["seconds_per_token"]
        timing = "" if per_token is None else f", {per_token * 1e3:.2f} ms per token"
        return (f"tensor-parallel decoding on {result['world_size']} rank(s): "
                f"{result['text'][0]!r}; {result['new_tokens']} new token(s) x "
                f"{result['batch']} sequence(s), equal to serial: {result['equals_serial']}; "
                f"prefill {result['prefill_seconds'] * 1e3:.2f} ms{timing}; KV cache "
                f"{result['kv_cache_bytes_per_rank'][0] / 1024:.1f} KiB per rank")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
