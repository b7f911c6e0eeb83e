"""Chapter 13: a 3D-parallelism planner - which split of a cluster trains a model fastest, and
does it fit in memory? Pure functions (no MPI) of a `ModelSpec` and a `Cluster`, built on the
formulas of `tfcourse.perf.costmodel` (chapter 5) and the splits of `tfcourse.parallel.plans`.

n_devices = dp x tp x pp devices train one step of B sequences of T tokens:

- tensor parallelism (tp, Megatron): each layer's heads and FFN columns are split over tp
  devices, which all-reduce a (b, T, d) activation 4 times per layer and micro-batch. That is
  on the critical path, so tp stays inside a node (on NVLink), never across the network;
- pipeline parallelism (pp): contiguous layer ranges per stage; a replica's B/dp rows go
  through in m micro-batches of b = B/(dp m) rows on the 1F1B schedule, which takes m + pp - 1
  micro-batch slots of the slowest stage, so the bubble is (pp - 1)/m x the busy time;
- data parallelism (dp): replicas all-reduce their gradients once per step; ZeRO stage z
  shards the optimizer state (z >= 1), gradients (z >= 2) and parameters (z = 3) over dp.

Per device and step, with F = costmodel.training_flops_per_token, N parameters, L layers,
L_s layers on the slowest stage s and v_s the speed of its slowest device (1 = nominal):

    compute = F B T / (dp tp L) x L_s / v_s / (flops_per_s x efficiency)
              (F with what recompute runs again: hardware FLOPs)
    tp_comm = 4 L_s m x ring_allreduce_time(b T d bytes, tp)        (intra-node link;
              6 with full recomputation: the forward's two all-reduces run again)
    pp_comm = 2 m x (alpha + b T d bytes / bandwidth)              (pp > 1)
    bubble  = (pp - 1)/m x (compute + tp_comm + pp_comm)
    dp_comm = ring_allreduce_time(N L_s/(L tp) bytes, dp), x 1.5 for ZeRO-3
    step    = compute + tp_comm + pp_comm + bubble + dp_comm        (no overlap assumed)
    memory  = ZeRO state of N L_s/(L tp) parameters (mixed precision: 16 bytes each unsharded)
              + activation_bytes_per_layer(b, tp, recompute) x L_s x min(pp - s, m)
              (worst stage; full recomputation: + one layer rebuilt at a time)

    MFU = model FLOPs / (step x n_devices x flops_per_s); HFU counts recomputed FLOPs too.

What it leaves out, on purpose (chapter 13 lists them next to its numbers): Megatron's
sequence parallelism beyond this course's (which keeps each sublayer's gathered input: see
costmodel.activation_bytes_per_layer), FlashAttention (the T x T
attention weights are kept), overlap of communication with computation, and every kernel
reaching the same fraction `mfu` of peak whatever the matrix shapes.

Ranks are laid out tp fastest, then dp, then pp: rank = (stage dp + replica) tp + shard. A
group spans tp (tp), dp tp (dp) or n_devices (pp) consecutive ranks; it uses the intra-node
link when that aligned block lies inside one node, the inter-node link otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tfcourse.nn.model import TransformerConfig, param_shapes, require_recompute
from tfcourse.nn.validate import require_nonnegative_int, require_positive_int, require_real
from tfcourse.parallel.plans.pipeline import stage_layers, stage_param_names
from tfcourse.parallel.plans.tensor import check_world_size, shard_axis
from tfcourse.perf import costmodel as cm

# --------------------------------------------------------------------------- descriptions


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LM and its batch: sizes as in `tfcourse.nn.model.TransformerConfig`,
    seq_len T tokens per sequence, global_batch B sequences per optimizer step.

    bytes_per_value: size of a parameter, an activation, a gradient or a message value
    (2 for bf16).
    mixed_precision: the training state is costmodel.training_state_bytes's mixed-precision
    AdamW (16-bit parameters and gradients, float32 master copy, m and v: 2 + 2 + 12 bytes per
    parameter, of which ZeRO-1/2/3 shard 12, 14 and 16); False: 4 copies of bytes_per_value
    (how this course trains, in float32 or float64).
    recompute: activation recomputation, as the model's config.recompute - "full" (Chen et
    al. 2016; Megatron 2021): each block keeps only its input and runs its forward again in the
    backward pass, a third more FLOPs (hardware_flops_per_step) for far fewer activations;
    "selective" (Korthikanti et al. 2022): only the attention weights are dropped and their
    scores recomputed; "none".
    sequence_parallel: Megatron sequence parallelism wherever tp > 1 (`tensor_parallel
    --sequence-parallel`): the LayerNorms' activations split along the sequence too, with the
    same tensor-parallel traffic; needs tp to divide seq_len.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    seq_len: int
    global_batch: int
    bytes_per_value: int = 2
    mixed_precision: bool = True
    recompute: str = "none"
    sequence_parallel: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("mixed_precision", "sequence_parallel"):
                if not isinstance(value, bool):
                    raise TypeError(f"{field.name}: expected True or False, got {value!r}")
            elif field.name == "recompute":
                require_recompute("recompute", value)
            else:
                require_positive_int(field.name, value)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={self.d_model}, "
                             f"got {self.n_heads}")

    @classmethod
    def from_config(cls, config, seq_len: int | None = None, global_batch: int = 1) -> ModelSpec:
        """The spec of a `TransformerConfig`; every value is kept in config.dtype, and
        activations per config.recompute."""
        return cls(config.vocab_size, config.d_model, config.n_heads, config.n_layers,
                   config.d_ff, seq_len or config.max_len, global_batch,
                   bytes_per_value=np.dtype(config.dtype).itemsize, mixed_precision=False,
                   recompute=config.recompute)

    @property
    def n_params(self) -> int:
        """N: costmodel.lm_params with learned positions for seq_len (untied head)."""
        return cm.lm_params(self.vocab_size, self.d_model, self.n_layers, self.d_ff,
                            self.seq_len)

    @property
    def flops_per_step(self) -> float:
        """Model FLOPs of one step (what MFU counts): training_flops_per_token x B T."""
        return self._flops_per_step(recompute="none")

    @property
    def hardware_flops_per_step(self) -> float:
        """FLOPs executed in one step (what HFU counts): recomputed forwards included."""
        return self._flops_per_step(self.recompute)

    def _flops_per_step(self, recompute: str) -> float:
        per_token = cm.training_flops_per_token(self.vocab_size, self.d_model, self.n_layers,
                                                self.d_ff, self.seq_len, recompute)
        return per_token * self.global_batch * self.seq_len


# GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, d 12288, 96 heads, 2048 tokens,
# batch 3.2M tokens ~ 1536 sequences. Untied head: 175.2e9 parameters (the paper ties it).
GPT3_175B = ModelSpec(vocab_size=50257, d_model=12288, n_heads=96, n_layers=96,
                      d_ff=4 * 12288, seq_len=2048, global_batch=1536)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """n_devices devices in nodes of devices_per_node. Per device: memory_bytes, peak
    flops_per_s (the datasheet's), of which every kernel is assumed to reach the fraction
    `efficiency` (the planner's u; the MFU of a plan is lower: it also pays the bubble and
    the communication). Links (alpha-beta model):
    latency *_alpha in seconds, *_bandwidth in bytes/s per device and direction.
    device_speeds: relative speed of every device (None: all 1.0)."""

    n_devices: int
    devices_per_node: int
    memory_bytes: float
    flops_per_s: float
    intra_alpha: float
    intra_bandwidth: float
    inter_alpha: float
    inter_bandwidth: float
    efficiency: float = 0.5
    device_speeds: tuple[float, ...] | None = None

    def __post_init__(self):
        require_positive_int("n_devices", self.n_devices)
        require_positive_int("devices_per_node", self.devices_per_node)
        if self.n_devices % self.devices_per_node:
            raise ValueError(f"n_devices: expected whole nodes, a multiple of devices_per_node="
                             f"{self.devices_per_node}, got {self.n_devices}")
        for name in ("memory_bytes", "flops_per_s", "intra_bandwidth", "inter_bandwidth",
                     "efficiency"):
            require_real(name, getattr(self, name), positive=True)
        for name in ("intra_alpha", "inter_alpha"):
            if require_real(name, getattr(self, name)) < 0:
                raise ValueError(f"{name}: expected seconds >= 0, got {getattr(self, name)}")
        if self.efficiency > 1:
            raise ValueError(f"efficiency: expected a fraction in (0, 1], got {self.efficiency}")
        if self.device_speeds is not None:
            speeds = _check_speeds("device_speeds", self.device_speeds, self.n_devices)
            object.__setattr__(self, "device_speeds", speeds)

    def speeds(self) -> tuple[float, ...]:
        return self.device_speeds or (1.0,) * self.n_devices


# 1024 A100-SXM4-80GB (NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 80 GB HBM2e) in DGX
# nodes of 8: NVLink 3 600 GB/s per GPU in both directions = 300e9 per direction; one
# 200 Gb/s HDR InfiniBand adapter per GPU = 25e9 B/s. Latencies: a few microseconds.
A100_CLUSTER = Cluster(n_devices=1024, devices_per_node=8, memory_bytes=80e9,
                       flops_per_s=312e12, intra_alpha=3e-6, intra_bandwidth=300e9,
                       inter_alpha=5e-6, inter_bandwidth=25e9, efficiency=0.5)


@dataclasses.dataclass(frozen=True)
class Plan:
    """dp x tp x pp devices, m micro-batches per replica and step, ZeRO stage `zero`.
    Positive integers and a stage in 0-3; whether the plan suits a model and a cluster is
    plan_problem's question."""

    dp: int
    tp: int
    pp: int
    microbatches: int
    zero: int = 0

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "microbatches"):
            require_positive_int(name, getattr(self, name))
        if require_nonnegative_int("zero", self.zero) > 3:
            raise ValueError(f"zero: expected a ZeRO stage 0, 1, 2 or 3, got {self.zero!r}")


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    """A plan's predicted step (seconds, per device) and memory (bytes, on its fullest stage:
    parameters, gradients, optimizer, activations). reason says why it does not fit."""

    plan: Plan
    memory: dict
    memory_bytes: float
    fits: bool
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    stage_bounds: tuple
    reason: str = ""

    def days(self, n_tokens: float) -> float:
        """Wall-clock days to train on n_tokens at this plan's tokens_per_s."""
        return n_tokens / self.tokens_per_s / 86400

    def __str__(self) -> str:
        p = self.plan
        return (f"dp={p.dp} tp={p.tp} pp={p.pp} m={p.microbatches} ZeRO-{p.zero}: "
                f"{self.memory_bytes / 1e9:.1f} GB, step {self.step_s:.2f} s (compute "
                f"{self.compute_s:.2f}, bubble {self.bubble_s:.2f}, TP {self.tp_comm_s:.2f}, "
                f"PP {self.pp_comm_s:.2f}, DP {self.dp_comm_s:.2f}), MFU {self.mfu:.2f}")


# --------------------------------------------------------------------------- enumeration


def plan_problem(model: ModelSpec, cluster: Cluster, plan: Plan) -> str:
    """Why `plan` is not a valid layout of `model` on `cluster` ("" if it is)."""
    dp, tp, pp, m = plan.dp, plan.tp, plan.pp, plan.microbatches  # positive (Plan checks)
    if dp * tp * pp != cluster.n_devices:
        return f"plan: expected dp*tp*pp == n_devices={cluster.n_devices}, got {plan}"
    try:
        check_world_size(model, tp)  # heads and FFN columns split evenly
    except ValueError as err:
        return f"plan.tp: {err}"
    if cluster.devices_per_node % tp:
        return (f"plan.tp: expected a divisor of devices_per_node={cluster.devices_per_node} "
                f"(tensor parallelism stays inside a node), got {tp}")
    if pp > model.n_layers:
        return f"plan.pp: expected at most n_layers={model.n_layers} stages, got {pp}"
    if model.global_batch % (dp * m):
        return (f"plan: expected dp*microbatches to divide global_batch={model.global_batch}, "
                f"got dp={dp}, microbatches={m}")
    if plan.zero > 0 and dp == 1:
        return f"plan.zero: expected 0 when dp == 1 (nothing to shard), got {plan.zero}"
    if model.sequence_parallel and model.seq_len % tp:
        return (f"plan.tp: sequence parallelism splits seq_len={model.seq_len} over tp, "
                f"got {tp}")
    return ""


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_plans(model: ModelSpec, cluster: Cluster, zero_stages=(0, 1, 2, 3),
                    max_microbatches: int = 64, dp: int | None = None, tp: int | None = None,
                    pp: int | None = None) -> list[Plan]:
    """Every valid plan (see plan_problem) with m <= max_microbatches; dp, tp or pp fix one."""
    require_positive_int("max_microbatches", max_microbatches)
    n, plans = cluster.n_devices, []
    for t in _divisors(n):
        for p in _divisors(n // t):
            d = n // (t * p)
            if any(v is not None and v != w for v, w in ((dp, d), (tp, t), (pp, p))):
                continue
            if model.global_batch % d:
                continue
            for m in _divisors(model.global_batch // d):
                for z in zero_stages:
                    plan = Plan(d, t, p, m, z)
                    if m <= max_microbatches and not plan_problem(model, cluster, plan):
                        plans.append(plan)
    return plans


# --------------------------------------------------------------------------- estimation


def _link(cluster: Cluster, span: int) -> tuple[float, float]:
    """(alpha, seconds per byte) for a group spanning `span` consecutive, aligned ranks."""
    if span <= cluster.devices_per_node and cluster.devices_per_node % span == 0:
        return cluster.intra_alpha, 1.0 / cluster.intra_bandwidth
    return cluster.inter_alpha, 1.0 / cluster.inter_bandwidth


def estimate(model: ModelSpec, cluster: Cluster, plan: Plan) -> PlanEstimate:
    """Predicted step time and per-device memory of `plan` (formulas: module docstring).

    Approximations: embeddings and head are spread over the layers (for FLOPs and
    parameters); activations are activation_bytes_per_layer(tp=tp): Megatron TP without
    sequence parallelism, the LayerNorms' activations replicated on the tp ranks; logits
    and recomputation are left out; stage s's devices run at its slowest device's speed."""
    problem = plan_problem(model, cluster, plan)
    if problem:
        raise ValueError(problem)
    dp, tp, pp, m = plan.dp, plan.tp, plan.pp, plan.microbatches
    L, T, d, bpv = model.n_layers, model.seq_len, model.d_model, model.bytes_per_value
    b = model.global_batch // (dp * m)  # rows per micro-batch
    speeds = cluster.speeds()
    group = dp * tp  # devices per stage
    stage_speeds = [min(speeds[s * group:(s + 1) * group]) for s in range(pp)]
    bounds = balance_stages(L, stage_speeds)
    layers = [hi - lo for lo, hi in bounds]

    layer_s = model.hardware_flops_per_step / (group * L) / (cluster.flops_per_s
                                                             * cluster.efficiency)
    alpha, beta = _link(cluster, tp)
    per_allreduce = cm.tensor_parallel_allreduce_bytes(b, T, d, 1, bpv) / 4
    per_layer = 6 if model.recompute == "full" else 4  # a recomputed forward all-reduces twice
    tp_layer_s = per_layer * m * cm.ring_allreduce_time(per_allreduce, tp, alpha, beta)
    busy = [(layer_s / v + tp_layer_s) * n for n, v in zip(layers, stage_speeds, strict=True)]
    s = int(np.argmax(busy))  # the slowest stage sets the pace
    compute_s, tp_comm_s = layer_s * layers[s] / stage_speeds[s], tp_layer_s * layers[s]
    alpha, beta = _link(cluster, cluster.n_devices)
    pp_comm_s = 2 * m * (alpha + b * T * d * bpv * beta) if pp > 1 else 0.0
    f = cm.pipeline_bubble_fraction(pp, m)
    bubble_s = (compute_s + tp_comm_s + pp_comm_s) * f / (1 - f)
    stage_params = [model.n_params * n / (L * tp) for n in layers]
    alpha, beta = _link(cluster, group)
    grad_bytes = max(stage_params) * bpv
    dp_comm_s = cm.ring_allreduce_time(grad_bytes, dp, alpha, beta) * (1.5 if plan.zero == 3
                                                                        else 1.0)
    step_s = compute_s + tp_comm_s + pp_comm_s + bubble_s + dp_comm_s

    memory = rank_memory(model, plan, stage_bounds=bounds)
    total = sum(memory.values())
    fits = total <= cluster.memory_bytes
    reason = "" if fits else (f"needs {total / 1e9:.1f} GB per device, more than "
                              f"{cluster.memory_bytes / 1e9:.1f} GB")
    tokens = model.global_batch * T
    peak = step_s * cluster.n_devices * cluster.flops_per_s
    return PlanEstimate(plan, memory, total, fits, compute_s, tp_comm_s, pp_comm_s, bubble_s,
                        dp_comm_s, step_s, tokens / step_s, model.flops_per_step / peak,
                        model.hardware_flops_per_step / peak, tuple(bounds), reason)


def rank_memory(model: ModelSpec, plan: Plan, stage: int | None = None,
                stage_bounds=None, as_run: bool = False) -> dict[str, float]:
    """Bytes per device of pipeline stage `stage` of `plan` (None: the most loaded stage), by
    part: "parameters", "gradients", "optimizer" (its ZeRO training state) and "activations"
    (what its in-flight micro-batches keep for the backward pass: 1F1B, so stage s keeps
    min(pp - s, m); full recomputation keeps each layer's input plus one layer rebuilt at a
    time). stage_bounds: the stages' blocks [lo, hi) (default: plans.pipeline's even split).

    as_run=False - the planner's approximations, what `estimate` uses: the embeddings and the
    head are spread over the layers (a stage holds N L_s / L parameters) and every parameter
    is split over tp (Megatron also splits the vocabulary); the head's and the loss's caches
    and the backward pass's temporaries are left out.
    as_run=True - what this course's programs hold (compared with measured runs by
    perf.memory.compare_memory):
    - parameters as placed: stage 0 holds the embeddings, the last stage the final LayerNorm
      and the head (plans.pipeline.stage_param_names); tensor parallelism splits the matrices
      and biases plans.tensor.shard_axis names and replicates the rest - LayerNorms, the
      row-parallel biases, embeddings and head (no vocabulary-parallel embedding here);
    - activations also count, on the last stage, the head's and the loss's caches per
      in-flight micro-batch: the final LayerNorm's x_hat, output and 1/std and the
      log-probabilities, (2 d + 1 + V) values per token (per T/tp positions with sequence
      parallelism, where each rank runs the head on its slice);
    - a fifth part, "backward": the working set of the backward pass through one layer,
      estimated as one layer's activations without recomputation
      (costmodel.activation_bytes_per_layer): that layer's backward makes a gradient of
      about the size of each array the layer keeps. An approximation, not a derivation: it
      leaves out the gradients made so far, the logits a caller still holds, the token arrays
      and ZeRO-3's gathered pieces (compare_memory states its measured error).
    Parameters, gradients and optimizer state are bytes_per_value each (mixed_precision:
    costmodel.zero_state_bytes_per_rank's 16 bytes per parameter)."""
    dp, pp, m = plan.dp, plan.pp, plan.microbatches
    if model.global_batch % (dp * m):
        raise ValueError(f"plan: expected dp*microbatches to divide global_batch="
                         f"{model.global_batch}, got dp={dp}, microbatches={m}")
    bounds = list(stage_layers(model.n_layers, pp) if stage_bounds is None else stage_bounds)
    if len(bounds) != pp:
        raise ValueError(f"stage_bounds: expected {pp} stages' [lo, hi), got {len(bounds)}")
    stages = range(pp) if stage is None else [stage]
    if stage is not None and not 0 <= stage < pp:
        raise ValueError(f"stage: expected 0 <= stage < pp={pp}, got {stage}")
    memories = [_stage_memory(model, plan, bounds, k, as_run) for k in stages]
    return max(memories, key=lambda mem: sum(mem.values()))


def _stage_params(model: ModelSpec, plan: Plan, bounds: list, stage: int,
                  as_run: bool) -> float:
    """Parameters one device of `stage` holds (see rank_memory)."""
    layers = [hi - lo for lo, hi in bounds]
    if not as_run:
        return model.n_params * layers[stage] / (model.n_layers * plan.tp)
    config = TransformerConfig(vocab_size=model.vocab_size, d_model=model.d_model,
                               n_heads=model.n_heads, n_layers=model.n_layers,
                               d_ff=model.d_ff, max_len=model.seq_len)
    shapes = param_shapes(config)
    return sum(math.prod(shapes[name]) / (1 if shard_axis(name) is None else plan.tp)
               for name in stage_param_names(config, plan.pp, stage, layers))


def _stage_memory(model: ModelSpec, plan: Plan, bounds: list, stage: int,
                  as_run: bool) -> dict[str, float]:
    """rank_memory's parts for one stage."""
    rows = model.global_batch // (plan.dp * plan.microbatches)  # per micro-batch
    state = cm.zero_state_bytes_per_rank(_stage_params(model, plan, bounds, stage, as_run),
                                         plan.dp, plan.zero, model.bytes_per_value,
                                         model.mixed_precision)
    def per_layer(recompute: str) -> int:
        return cm.activation_bytes_per_layer(rows, model.seq_len, model.d_model, model.n_heads,
                                             model.d_ff, model.bytes_per_value, tp=plan.tp,
                                             recompute=recompute,
                                             sequence_parallel=model.sequence_parallel)

    lo, hi = bounds[stage]
    inflight = cm.pipeline_peak_microbatches("1f1b", plan.pp, stage, plan.microbatches)
    if model.recompute == "full":  # each layer's (b, T, d) input, plus one layer rebuilt
        activations = per_layer("full") * (hi - lo) * inflight + per_layer("none")
    else:  # selective: all but the attention weights
        activations = per_layer(model.recompute) * (hi - lo) * inflight
    parameters, gradients, optimizer = state.values()
    memory = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer,
              "activations": activations}
    if as_run:
        if stage == plan.pp - 1:  # the head's and the loss's caches
            split = plan.tp if model.sequence_parallel else 1
            tokens = rows * model.seq_len // split
            memory["activations"] += (inflight * tokens * (2 * model.d_model + 1
                                                            + model.vocab_size)
                                      * model.bytes_per_value)
        memory["backward"] = per_layer("none")
    return memory


def rank_plans(model: ModelSpec, cluster: Cluster, **filters
               ) -> tuple[list[PlanEstimate], list[PlanEstimate]]:
    """(plans that fit, fastest first - ties: less memory; plans that do not fit), over
    enumerate_plans(model, cluster, **filters)."""
    estimates = [estimate(model, cluster, p) for p in enumerate_plans(model, cluster, **filters)]
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: (
        e.step_s, e.memory_bytes, dataclasses.astuple(e.plan)))
    return fitting, [e for e in estimates if not e.fits]


def plan(model: ModelSpec, cluster: Cluster, top: int = 10, **filters) -> list[PlanEstimate]:
    """The `top` fastest plans that fit in memory (rank_plans also returns the rejected)."""
    require_positive_int("top", top)
    return rank_plans(model, cluster, **filters)[0][:top]


# --------------------------------------------------------------------------- heterogeneity


def _check_speeds(name: str, speeds, n: int | None = None) -> tuple[float, ...]:
    values = tuple(require_real(f"{name}[{i}]", v, positive=True) for i, v in enumerate(speeds))
    if not values or (n is not None and len(values) != n):
        raise ValueError(f"{name}: expected {n or 'at least 1'} speeds, got {len(values)}")
    return values


def balance_stages(n_layers: int, stage_speeds) -> list[tuple[int, int]]:
    """Contiguous layers [lo, hi) per stage, every stage >= 1 layer, minimising the slowest
    stage's time max_s layers_s / speed_s (exact, dynamic programming over prefixes).
    Equal speeds: plans.pipeline.stage_layers's even split (ceil(n/p) is optimal)."""
    speeds = _check_speeds("stage_speeds", stage_speeds)
    p = len(speeds)
    if require_positive_int("n_layers", n_layers) < p:
        raise ValueError(f"n_layers: expected at least {p} layers (one per stage), "
                         f"got {n_layers}")
    if len(set(speeds)) == 1:
        return stage_layers(n_layers, p)
    k = np.arange(n_layers + 1)
    empty = k[:, None] <= k[None, :]  # [i, j]: stage would hold layers [j, i), none
    best = np.where(k == 0, 0.0, np.inf)  # best[i]: min max time of layers [0, i) so far
    choice = []
    for v in speeds:
        candidates = np.maximum(best[None, :], (k[:, None] - k[None, :]) / v)
        candidates[empty] = np.inf
        choice.append(np.argmin(candidates, axis=1))
        best = candidates[k, choice[-1]]
    bounds, hi = [], n_layers
    for stage_choice in reversed(choice):
        bounds.append((int(stage_choice[hi]), hi))
        hi = bounds[-1][0]
    return bounds[::-1]


def stage_times(bounds, stage_speeds) -> list[float]:
    """Each stage's time in layer-times of a speed-1 device: (hi - lo) / speed."""
    speeds = _check_speeds("stage_speeds", stage_speeds, len(bounds))
    return [(hi - lo) / v for (lo, hi), v in zip(bounds, speeds, strict=True)]


# --------------------------------------------------------------------------- checking the model


def validate_against(measured_step_s: dict, predicted_step_s: dict) -> dict:
    """Relative error (predicted - measured) / measured of every measured key; measured
    seconds must be positive and finite, predicted ones finite."""
    missing = set(measured_step_s) - set(predicted_step_s)
    if missing:
        raise ValueError(f"predicted_step_s: expected a prediction for every measured key, "
                         f"missing {sorted(missing, key=str)}")
    for key, t in measured_step_s.items():
        require_real(f"measured_step_s[{key!r}]", t, positive=True)
        require_real(f"predicted_step_s[{key!r}]", predicted_step_s[key])
    return {key: (predicted_step_s[key] - t) / t for key, t in measured_step_s.items()}
