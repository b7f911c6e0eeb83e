"""Memory of one training step, measured in the process that runs it (chapter 9's anatomy of
memory): NumPy reports every buffer it allocates to Python's `tracemalloc`, so the bytes a
forward pass leaves behind for the backward, and the highest point of the whole step, can be
read exactly - per process, so per MPI rank too - and set against the cost model's formulas
and the planner's per-rank prediction (compare_memory, over MEMORY_LAYOUTS' runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tracemalloc

from tfcourse.nn import model
from tfcourse.nn.layers import cross_entropy_backward, cross_entropy_forward
from tfcourse.perf.planner import ModelSpec, Plan, rank_memory


def step_memory(params: dict, tokens, targets, config: model.TransformerConfig, rng=None
                ) -> dict[str, int]:
    """One training step of the serial model, traced. Returns bytes:
    "kept" - what the forward pass keeps for the backward (every block's activations, per
    config.recompute, and the loss's cache), measured after the forward;
    "peak" - the step's highest point above where it started (the kept activations plus, at
    that moment, the backward's temporaries and the gradients made so far);
    "grads" - the gradients' bytes, for reference.
    Tracing slows allocation down several times: for measuring, not for training."""
    tokens, targets = model.check_batch(params, tokens, targets, config)
    with traced() as found:
        logits, caches = model.forward_pass(params, tokens, config, rng)
        _, loss_cache = cross_entropy_forward(logits, targets)
        del logits  # the loss keeps what its backward needs
        kept = tracemalloc.get_traced_memory()[0] - found["base"]
        _, grads = model.backward_pass(cross_entropy_backward(loss_cache), caches)
    return {"kept": kept, "peak": found["peak"],
            "grads": sum(int(g.nbytes) for g in grads.values())}


@contextlib.contextmanager
def traced(on: bool = True):
    """With `on`, trace the allocations of the body (starting tracemalloc unless it runs);
    the yielded dict gets "base", the traced bytes at the start, and after the body "peak",
    the highest point above it. Off, it yields an empty dict and measures nothing."""
    found: dict[str, int] = {}
    if not on:
        yield found
        return
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        found["base"] = tracemalloc.get_traced_memory()[0]
        yield found
        found["peak"] = tracemalloc.get_traced_memory()[1] - found["base"]
    finally:
        if not tracing:
            tracemalloc.stop()


# --------------------------------------------------------------------------- planner vs measured


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """One run of the memory table: `mpiexec -n n_ranks python -m mpi4py -m module *argv`, and
    the plan the planner predicts it with."""

    name: str
    module: str
    argv: tuple[str, ...]
    n_ranks: int
    plan: Plan
    sequence_parallel: bool = False


def memory_layouts(recompute=("none", "full"), config: str = "tiny", steps: int = 1
                   ) -> list[MemoryLayout]:
    """Every layout this machine runs, for each recomputation in `recompute`: data
    parallelism with ZeRO 0-3 at 2 ranks, tensor parallelism at 2 with and without sequence
    parallelism, a 2-stage 1F1B pipeline of 4 micro-batches and hybrid dp 2 x tp 2 (4 ranks on
    2 cores: a check of memory, not of speed). Each traces its first step (--trace-memory)."""
    runs = [(f"DP ZeRO-{z}", "data_parallel", ["--zero", str(z)], 2, Plan(2, 1, 1, 1, z),
             False) for z in range(4)]
    runs += [("TP 2", "tensor_parallel", [], 2, Plan(1, 2, 1, 1), False),
             ("TP 2 + SP", "tensor_parallel", ["--sequence-parallel"], 2, Plan(1, 2, 1, 1),
              True),
             ("PP 2 1F1B m=4", "pipeline_parallel", ["--schedule", "1f1b", "--microbatches",
                                                     "4"], 2, Plan(1, 1, 2, 4), False),
             ("DP 2 x TP 2", "hybrid", ["--dp", "2", "--tp", "2"], 4, Plan(2, 2, 1, 1), False)]
    return [MemoryLayout(f"{name}, recompute {r}", f"tfcourse.parallel.{module}",
                         ("--config", config, "--steps", str(steps), "--trace-memory",
                          "--recompute", r, *argv), n, plan, sp)
            for r in recompute for name, module, argv, n, plan, sp in runs]


def run_spec(result: dict, sequence_parallel: bool = False) -> ModelSpec:
    """The planner's ModelSpec of a training program's JSON result: its config (dtype,
    recompute) and global batch. The planner counts seq_len learned positions, so the run's
    --seq-len must be its max_len (ValueError otherwise)."""
    config = model.TransformerConfig(**result["config"])
    settings = result["settings"]
    if settings["seq_len"] != config.max_len:
        raise ValueError(f"result: the planner counts seq_len position embeddings; expected a "
                         f"run with --seq-len = max_len={config.max_len}, got "
                         f"{settings['seq_len']}")
    spec = ModelSpec.from_config(config, settings["seq_len"], settings["batch_size"])
    return dataclasses.replace(spec, sequence_parallel=sequence_parallel)


STATE_PARTS = ("parameters", "gradients", "optimizer")


def compare_memory(result: dict, spec: ModelSpec, plan: Plan, layout: str = ""
                   ) -> list[dict]:
    """Rows {"layout", "part", "predicted", "measured", "ratio" = measured / predicted} of a
    program's JSON result against planner.rank_memory(spec, plan, as_run=True), bytes per rank.

    For each part the largest value on any rank is compared with the largest on any stage:
    - parameters, gradients, optimizer: `memory_bytes`, the arrays each rank holds after the
      run (state_nbytes); ZeRO shards whole tensors, so its most loaded rank holds a little
      more than the planner's even 1/dp;
    - "step peak": `step_peak_bytes` (--trace-memory: tracemalloc's peak of the first step
      above its start) against the predicted activations plus the backward's working set.
      Nothing is subtracted from the measurement: everything the step allocates is in it
      (activations, temporaries, the gradients it makes, ZeRO-3's gathered pieces, received
      messages), and the prediction models only the first two (see rank_memory).
    A result without --trace-memory has no step-peak row."""
    if result["world_size"] != plan.dp * plan.tp * plan.pp:
        raise ValueError(f"plan: expected dp*tp*pp = the run's {result['world_size']} ranks, "
                         f"got {plan}")
    stages = [rank_memory(spec, plan, stage=s, as_run=True) for s in range(plan.pp)]
    per_rank = [{name.split(" ")[0]: value for name, value in m.items()}
                for m in result["memory_bytes"]]
    pairs = [(part, max(m[part] for m in stages), max(m[part] for m in per_rank))
             for part in STATE_PARTS]
    if all(peak is not None for peak in result["step_peak_bytes"]):
        pairs.append(("step peak", max(m["activations"] + m["backward"] for m in stages),
                      max(result["step_peak_bytes"])))
    return [{"layout": layout, "part": part, "predicted": float(predicted),
             "measured": float(measured), "ratio": measured / predicted}
            for part, predicted, measured in pairs]


def format_memory_table(rows: list[dict]) -> str:
    """compare_memory's rows as a text table, bytes in kB (1000 bytes)."""
    width = max(len(r["layout"]) for r in rows)
    lines = [f"{'layout':<{width}}  {'part':<10}  {'predicted kB':>12}  {'measured kB':>11}  "
             f"{'ratio':>6}"]
    lines += [f"{r['layout']:<{width}}  {r['part']:<10}  {r['predicted'] / 1e3:>12.1f}  "
              f"{r['measured'] / 1e3:>11.1f}  {r['ratio']:>6.3f}" for r in rows]
    return "\n".join(lines)
