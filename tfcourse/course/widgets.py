"""ipywidgets explorers for the notebooks.

Each explorer is a thin `interact` front end over a pure function (tested in
tests/test_widgets.py), so what the sliders show is checked even though nbval cannot compare
widget output.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tfcourse.nn.attention import causal_mask, softmax
from tfcourse.nn.positional import sinusoidal_encoding
from tfcourse.nn.precision import require_precision
from tfcourse.perf import costmodel, planner


def explorer_attention_weights(d_k: int, temperature: float, scaled: bool, causal: bool,
                               n: int = 8, seed: int = 0) -> np.ndarray:
    """Weights (n, n) of attention over random q, k with entries ~ N(0, 1).

    The scores are q k^T / sqrt(d_k) when `scaled` (else q k^T), divided by `temperature`.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d_k))
    k = rng.standard_normal((n, d_k))
    scores = q @ k.T / (math.sqrt(d_k) if scaled else 1.0) / temperature
    if causal:
        scores = np.where(causal_mask(n), scores, -np.inf)
    return softmax(scores, axis=-1)


def attention_explorer():
    """Sliders for d_k and temperature, toggles for scaling and the causal mask."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from tfcourse.course.viz import plot_attention

    def draw(d_k=16, temperature=1.0, scaled=True, causal=False):
        weights = explorer_attention_weights(d_k, temperature, scaled, causal)
        entropy = -np.sum(weights * np.log(np.where(weights > 0, weights, 1.0)), axis=-1)
        plot_attention(weights, title=f"d_k={d_k}, T={temperature:.2f}, "
                       f"mean entropy {entropy.mean():.2f} nats")
        plt.show()

    return widgets.interact(
        draw,
        d_k=widgets.IntSlider(value=16, min=1, max=1024, step=1, description="d_k"),
        temperature=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1,
                                           description="temperature"),
        scaled=widgets.Checkbox(value=True, description="divide by sqrt(d_k)"),
        causal=widgets.Checkbox(value=False, description="causal mask"),
    )


def explorer_positional_rows(d_model: int, max_len: int = 64) -> np.ndarray:
    """The sinusoidal table the positional explorer draws: (max_len, d_model)."""
    return sinusoidal_encoding(max_len, d_model)


def positional_explorer():
    """Slider for d_model and a position: the PE table and one position's vector."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from tfcourse.course.viz import plot_heatmap

    def draw(d_model=32, position=10):
        table = explorer_positional_rows(d_model)
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        plot_heatmap(table, ax=left, title=f"PE, d_model={d_model}", xlabel="dimension",
                     ylabel="position", cmap="RdBu", vmin=-1, vmax=1)
        left.axhline(position, color="k", lw=1)
        right.bar(range(d_model), table[position], color="tab:blue")
        right.set_title(f"PE[{position}]")
        right.set_xlabel("dimension")
        right.set_ylim(-1.05, 1.05)
        plt.show()

    return widgets.interact(
        draw,
        d_model=widgets.IntSlider(value=32, min=2, max=128, step=2, description="d_model"),
        position=widgets.IntSlider(value=10, min=0, max=63, description="position"),
    )


def explorer_pipeline(schedule_name: str, p: int, m: int, backward_cost: float = 2.0,
                      v: int = 2, forward_cost: float = 1.0, weight_cost: float | None = None):
    """Simulated timeline and bubble of a schedule on p stages with m micro-batches: (events
    per stage, simulated bubble, the cost model's formula - (p-1)/(m+p-1) for GPipe and 1F1B).
    A stage's forward takes forward_cost, its whole backward backward_cost, of which W takes
    weight_cost with zb-h1 (default half); v: the interleaved schedule's chunks per stage
    (the others run one)."""
    from tfcourse.parallel.plans.pipeline import bubble_fraction, schedule, simulate_pipeline
    from tfcourse.perf.costmodel import pipeline_bubble_fraction

    v = v if schedule_name == "interleaved" else 1
    events = simulate_pipeline([schedule(schedule_name, p, s, m, v) for s in range(p)],
                               forward_cost, backward_cost, weight_cost, v)
    return events, bubble_fraction(events), pipeline_bubble_fraction(
        p, m, schedule_name, v, forward_cost, backward_cost, weight_cost)


PIPELINE_FORMULAS = {"gpipe": "(p-1)/(m+p-1)", "1f1b": "(p-1)/(m+p-1)",
                     "interleaved": "(p-1)/(vm+p-1)", "zb-h1": "ZB-H1's"}


def explorer_pipelines(p: int, m: int, v: int = 2, forward_cost: float = 1.0,
                       input_cost: float = 1.0, weight_cost: float = 1.0) -> dict:
    """The four schedules side by side, for p stages, m micro-batches, v interleaved chunks
    per stage and a stage's forward, B (input gradient) and W (weight gradient) costs - the
    schedules without W run B and W as one backward. Returns {schedule: {"events" (per stage,
    or None when the schedule refuses these sizes), "simulated" and "formula" bubbles,
    "title"}}."""
    from tfcourse.parallel.plans.pipeline import SCHEDULES

    shown = {}
    for name in SCHEDULES:
        try:
            events, simulated, formula = explorer_pipeline(
                name, p, m, input_cost + weight_cost, v, forward_cost, weight_cost)
        except ValueError as error:  # interleaved: m must be a multiple of p
            shown[name] = {"events": None, "simulated": None, "formula": None,
                           "title": f"{name}: {error}"}
            continue
        label = f"{name}, v={v} (lighter: later chunks)" if name == "interleaved" else name
        shown[name] = {"events": events, "simulated": simulated, "formula": formula,
                       "title": f"{label}: bubble {simulated:.1%} simulated, "
                                f"{formula:.1%} by {PIPELINE_FORMULAS[name]}"}
    return shown


def bubble_explorer():
    """Sliders for stages p, micro-batches m, interleaved chunks v and the F, B and W costs:
    the four schedules' simulated timelines, one above the other on one time axis, each with
    its simulated bubble next to its formula."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from tfcourse.course.viz import plot_pipeline_timeline

    def draw(p=4, m=8, v=2, forward=1.0, backward_input=1.0, weight=1.0):
        shown = explorer_pipelines(p, m, v, forward, backward_input, weight)
        _, axes = plt.subplots(len(shown), 1, sharex=True,
                               figsize=(10, len(shown) * (0.9 + 0.35 * p)))
        for ax, panel in zip(axes, shown.values(), strict=True):
            if panel["events"] is None:
                ax.set_title(panel["title"], loc="left", fontsize="medium")
                ax.set_yticks([])
            else:
                plot_pipeline_timeline(panel["events"], ax=ax, title=panel["title"],
                                       unit="time", scale=1.0)
        plt.tight_layout()
        plt.show()

    def cost(value, description):
        return widgets.FloatSlider(value=value, min=0.25, max=4.0, step=0.25,
                                   description=description)

    return widgets.interact(
        draw,
        p=widgets.IntSlider(value=4, min=1, max=8, description="stages p"),
        m=widgets.IntSlider(value=8, min=1, max=32, description="micro-batches m"),
        v=widgets.IntSlider(value=2, min=2, max=4, description="chunks v"),
        forward=cost(1.0, "forward F"),
        backward_input=cost(1.0, "input grad B"),
        weight=cost(1.0, "weight grad W"),
    )


# GPT-3 6.7B (Brown et al. 2020, table 2.1): 2M-token batches of 2048 tokens
PLANNER_MODELS = {
    "GPT-3 175B": planner.GPT3_175B,
    "GPT-3 6.7B": planner.ModelSpec(vocab_size=50257, d_model=4096, n_heads=32, n_layers=32,
                                    d_ff=4 * 4096, seq_len=2048, global_batch=1024),
}


def explorer_plans(model_name: str, n_devices: int, memory_gb: float, network_gbs: float,
                   top: int = 5) -> list[str]:
    """The planner's verdict for a model on an A100-like cluster with `n_devices` devices of
    `memory_gb` and `network_gbs` GB/s between nodes: a summary line, then the `top`
    fastest plans that fit (one per layout: the ZeRO stage with the least memory among the
    fastest)."""
    if model_name not in PLANNER_MODELS:
        raise ValueError(f"model_name: expected one of {sorted(PLANNER_MODELS)}, "
                         f"got {model_name!r}")
    cluster = dataclasses.replace(planner.A100_CLUSTER, n_devices=n_devices,
                                  memory_bytes=memory_gb * 1e9,
                                  inter_bandwidth=network_gbs * 1e9)
    fitting, rejected = planner.rank_plans(PLANNER_MODELS[model_name], cluster)
    lines = [f"{len(fitting) + len(rejected)} plans, {len(rejected)} do not fit in "
             f"{memory_gb:g} GB"]
    seen = set()
    for estimate in fitting:
        layout = (estimate.plan.dp, estimate.plan.tp, estimate.plan.pp, estimate.plan.microbatches)
        if layout not in seen:
            seen.add(layout)
            lines.append(f"{estimate}; {estimate.days(300e9):.1f} days for 300B tokens")
        if len(seen) == top:
            break
    return lines


def planner_explorer():
    """Drop-downs for the model, the number of A100s, their memory and the network: the
    planner's best layouts."""
    import ipywidgets as widgets

    def show(model_name="GPT-3 175B", n_devices=1024, memory_gb=80.0, network_gbs=25.0):
        print("\n".join(explorer_plans(model_name, n_devices, memory_gb, network_gbs)))

    return widgets.interact(
        show,
        model_name=widgets.Dropdown(options=list(PLANNER_MODELS), description="model"),
        n_devices=widgets.Dropdown(options=[64, 128, 256, 512, 1024, 2048], value=1024,
                                   description="A100s"),
        memory_gb=widgets.Dropdown(options=[40.0, 80.0], value=80.0, description="GB each"),
        network_gbs=widgets.FloatLogSlider(value=25.0, base=10, min=0, max=2.5, step=0.25,
                                           description="network GB/s"),
    )


def explorer_memory(model_name: str, dp: int, tp: int, pp: int, zero: int, recompute: str,
                    precision: str) -> dict[str, float]:
    """GB per device of a PLANNER_MODELS model under a layout (the planner's rank_memory on
    its most loaded stage, 1F1B with micro-batches of one sequence, as Megatron runs GPT-3):
    "fp32" trains with 4-byte values throughout (16 bytes of state per parameter, 4-byte
    activations), "bf16"/"fp16" with mixed precision (16 bytes of state, 2-byte
    activations). Sequence parallelism is on wherever tp > 1."""
    if model_name not in PLANNER_MODELS:
        raise ValueError(f"model_name: expected one of {sorted(PLANNER_MODELS)}, "
                         f"got {model_name!r}")
    mixed = require_precision("precision", precision) != "fp32"
    spec = dataclasses.replace(PLANNER_MODELS[model_name], recompute=recompute,
                               bytes_per_value=2 if mixed else 4, mixed_precision=mixed,
                               sequence_parallel=tp > 1)
    if spec.global_batch % dp or spec.n_layers % pp:
        raise ValueError(f"dp, pp: expected dp to divide the batch of {spec.global_batch} and "
                         f"pp the {spec.n_layers} layers, got dp={dp}, pp={pp}")
    plan = planner.Plan(dp, tp, pp, spec.global_batch // dp, zero)
    return {part: size / 1e9 for part, size in planner.rank_memory(spec, plan).items()}


def memory_explorer():
    """The memory calculator: a model, dp x tp x pp, the ZeRO stage, recomputation and
    precision; one stacked bar of GB per device against an 80 GB A100."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def show(model_name="GPT-3 175B", dp=8, tp=8, pp=16, zero=1, recompute="selective",
             precision="bf16"):
        try:
            parts = explorer_memory(model_name, dp, tp, pp, zero, recompute, precision)
        except ValueError as err:
            print(err)
            return
        fig, ax = plt.subplots(figsize=(7, 1.8))
        left = 0.0
        for part, gb in parts.items():
            ax.barh([0], [gb], left=left, label=f"{part} {gb:.1f}")
            left += gb
        ax.axvline(80, color="k", linestyle="--", label="A100 80 GB")
        ax.set_yticks([])
        ax.set_xlabel("GB per device (most loaded pipeline stage)")
        ax.set_title(f"{dp * tp * pp} devices: {left:.1f} GB per device")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.6))
        plt.show()

    powers = [1, 2, 4, 8, 16, 32, 64]
    return widgets.interact(
        show,
        model_name=widgets.Dropdown(options=list(PLANNER_MODELS), description="model"),
        dp=widgets.Dropdown(options=powers, value=8, description="dp"),
        tp=widgets.Dropdown(options=powers[:5], value=8, description="tp"),
        pp=widgets.Dropdown(options=powers, value=16, description="pp"),
        zero=widgets.Dropdown(options=[0, 1, 2, 3], value=1, description="ZeRO stage"),
        recompute=widgets.Dropdown(options=["none", "selective", "full"], value="selective",
                                   description="recompute"),
        precision=widgets.Dropdown(options=["fp32", "bf16", "fp16"], value="bf16",
                                   description="precision"),
    )


# Datasheet peaks (dense bf16 tensor-core FLOP/s, HBM bytes/s), the bytes of a bf16 weight, and
# the device's memory in bytes
DECODE_DEVICES = {
    "A100 80GB (bf16)": (312e12, 2.039e12, 2, 80e9),
    "H100 SXM (bf16)": (989e12, 3.35e12, 2, 80e9),
}


def explorer_decode(model_name: str, device: str, batch: int, context: int) -> dict:
    """One decoding step of `batch` sequences holding `context` tokens each, on one device,
    by the roofline: the step reads every matmul weight once and each sequence's KV cache
    (costmodel.kv_cache_bytes), and computes batch x costmodel.generation_flops_per_token;
    it takes whichever of reading and computing is longer. Returns ms per step (the latency
    of one token), tokens/s, what bounds it, costmodel.memory_bound_batch (which counts the
    weights only: at long contexts and large batches the caches keep decoding memory-bound
    past it), the GB the weights and caches occupy and whether they fit the device."""
    if model_name not in PLANNER_MODELS or device not in DECODE_DEVICES:
        raise ValueError(f"model_name, device: expected one of {sorted(PLANNER_MODELS)} and "
                         f"{sorted(DECODE_DEVICES)}, got {model_name!r}, {device!r}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch, context: expected positive integers, got {batch}, {context}")
    spec, (peak, bandwidth, nbytes, memory) = PLANNER_MODELS[model_name], DECODE_DEVICES[device]
    sizes = (spec.vocab_size, spec.d_model, spec.n_layers, spec.d_ff)
    read = (costmodel.matmul_params(*sizes) * nbytes
            + costmodel.kv_cache_bytes(spec.n_layers, spec.d_model, nbytes, context, batch))
    compute = batch * costmodel.generation_flops_per_token(*sizes, context)
    step = max(read / bandwidth, compute / peak)
    return {"step_ms": step * 1e3, "tokens_per_s": batch / step,
            "bound": "memory" if read / bandwidth >= compute / peak else "compute",
            "memory_bound_batch": costmodel.memory_bound_batch(peak, bandwidth, nbytes),
            "memory_gb": read / 1e9, "fits": read <= memory}


def decode_explorer():
    """Batch size against tokens/s and latency when decoding: two curves over the batch, the
    chosen batch marked, for a PLANNER_MODELS model on a DECODE_DEVICES device."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def show(model_name="GPT-3 6.7B", device="A100 80GB (bf16)", batch=16, context=1024):
        batches = 2 ** np.arange(0, 11)
        rows = [explorer_decode(model_name, device, int(b), context) for b in batches]
        here = explorer_decode(model_name, device, batch, context)
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
        left.loglog(batches, [r["tokens_per_s"] for r in rows], "o-")
        right.loglog(batches, [r["step_ms"] for r in rows], "o-", color="C1")
        for ax in (left, right):
            ax.axvline(here["memory_bound_batch"], color="grey", ls=":")
            ax.axvline(batch, color="k", lw=0.8)
            ax.set_xlabel("batch (sequences decoded together)")
        left.set_ylabel("tokens / s")
        right.set_ylabel("ms per token (latency)")
        fits = "" if here["fits"] else " - DOES NOT FIT the device's memory"
        fig.suptitle(f"batch {batch}: {here['tokens_per_s']:,.0f} tokens/s, "
                     f"{here['step_ms']:.1f} ms per token, {here['bound']}-bound, "
                     f"{here['memory_gb']:.0f} GB{fits} (dotted: B* = "
                     f"{here['memory_bound_batch']:.0f})", fontsize=9)
        plt.tight_layout()
        plt.show()

    return widgets.interact(
        show,
        model_name=widgets.Dropdown(options=list(PLANNER_MODELS), description="model"),
        device=widgets.Dropdown(options=list(DECODE_DEVICES), description="device"),
        batch=widgets.Dropdown(options=[int(b) for b in 2 ** np.arange(0, 11)], value=16,
                               description="batch"),
        context=widgets.Dropdown(options=[128, 512, 1024, 2048], value=1024,
                                 description="context"),
    )
