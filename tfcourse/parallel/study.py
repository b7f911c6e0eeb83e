"""Chapter 12: one harness that runs every parallel layout of the same model and global batch
and measures them the same way.

    python -m tfcourse.parallel.study --config tiny --layers 4 --steps 10 [--json out.json]

It runs no MPI itself: each layout is a real `mpiexec -n N` job started through
`tfcourse.course.launch.run_mpi` (with a timeout), of chapter 6's and 7's programs or of the hybrid
program (data parallelism over pipelines or tensor-parallel groups). Every program reports,
per rank, its training-state bytes and its seconds per step split into compute,
communication and waiting (see program.StepTimes); this module turns those into one table:

    throughput (tokens/s), speed-up and efficiency against the 1-rank run, the share of a
    step spent communicating or waiting, memory per rank, and the final loss - which must be
    the serial run's, or the layout changed the model's quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from tfcourse.course.launch import run_mpi
from tfcourse.files import check_writable, write_json_atomic
from tfcourse.nn.model import PRESETS, TransformerConfig
from tfcourse.nn.validate import require_positive_int, require_real
from tfcourse.perf.costmodel import fit_ring_links
from tfcourse.perf.hardware import cores_available
from tfcourse.perf.planner import Cluster, ModelSpec, Plan, PlanEstimate, estimate, validate_against

PROGRAMS = {"dp": "tfcourse.parallel.data_parallel", "tp": "tfcourse.parallel.tensor_parallel",
            "pp": "tfcourse.parallel.pipeline_parallel", "hybrid": "tfcourse.parallel.hybrid"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run's ranks are used: dp replicas, each split into pp stages or tp shards."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str | None = None  # pipelines only: "gpipe" or "1f1b"

    @property
    def ranks(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        if self.ranks == 1:
            return "1 rank"
        parts = [f"{kind.upper()} {n}" for kind, n in
                 (("dp", self.dp), ("tp", self.tp), ("pp", self.pp)) if n > 1]
        name = " x ".join(parts)
        return f"{name} {self.schedule.upper()}" if self.schedule else name

    def command(self, microbatches: int) -> tuple[str, list[str]]:
        """(module, its layout flags): a single-kind layout runs its own chapter's program."""
        kinds = sum(n > 1 for n in (self.dp, self.tp, self.pp))
        if kinds > 1:
            args = ["--dp", str(self.dp), "--tp", str(self.tp), "--pp", str(self.pp)]
            if self.pp > 1:
                args += ["--microbatches", str(microbatches), "--schedule", self.schedule]
            return PROGRAMS["hybrid"], args
        if self.pp > 1:
            return PROGRAMS["pp"], ["--microbatches", str(microbatches),
                                    "--schedule", self.schedule]
        if self.tp > 1:
            return PROGRAMS["tp"], ["--split-waiting"]
        return PROGRAMS["dp"], ["--split-waiting"]


def default_layouts(max_ranks: int = 4, n_heads: int = 4) -> list[Layout]:
    """The layouts that fit `max_ranks`: 1 rank, DP, TP (when it divides n_heads) and PP
    (both schedules) on 2 and on `max_ranks` ranks, and with 4 ranks DP x PP and DP x TP."""
    require_positive_int("max_ranks", max_ranks)
    require_positive_int("n_heads", n_heads)
    sizes = sorted({n for n in (2, max_ranks) if 2 <= n <= max_ranks})
    layouts = [Layout()]
    for n in sizes:
        layouts += [Layout(dp=n)] + ([Layout(tp=n)] if n_heads % n == 0 else [])
        layouts += [Layout(pp=n, schedule=s) for s in ("gpipe", "1f1b")]
    if max_ranks >= 4:
        layouts += [Layout(dp=2, pp=2, schedule="1f1b")]
        layouts += [Layout(dp=2, tp=2)] if n_heads % 2 == 0 else []
    return layouts


def run_layout(layout: Layout, training_args: list[str], microbatches: int = 4,
               timeout: float = 300.0) -> dict:
    """Run one layout through the launcher; returns its program's JSON result."""
    module, layout_args = layout.command(microbatches)
    return run_mpi(module, [*training_args, *layout_args], n_ranks=layout.ranks,
                   timeout=timeout).result


def run_study(layouts: list[Layout], training_args: list[str], microbatches: int = 4,
              timeout: float = 300.0) -> dict[str, dict]:
    """Every layout's result, by name, run one after another (never two jobs at once: they
    would share the same cores and distort each other's timings). The first layout, the
    baseline, runs again at the end: "repeat_step_seconds" (see baseline_seconds)."""
    results = {layout.name: {"layout": dataclasses.asdict(layout),
                             **run_layout(layout, training_args, microbatches, timeout)}
               for layout in layouts}
    if layouts:
        again = run_layout(layouts[0], training_args, microbatches, timeout)
        results[layouts[0].name]["repeat_step_seconds"] = again["step_seconds"]
    return results


def median_step_seconds(result: dict) -> float:
    """Median step time, leaving out the first (warm-up) step when there are others."""
    return _median_after_warmup(result["step_seconds"])


def _median_after_warmup(steps: list[float]) -> float:  # the first step warms up
    return float(np.median(steps[1:] if len(steps) > 1 else steps))


def baseline_seconds(result: dict) -> float:
    """The baseline's step time: the faster of its two runs (first and last of the study) when
    repeated. Every speed-up divides by it: a busy moment in one run must not inflate them all."""
    runs = [median_step_seconds(result)]
    if "repeat_step_seconds" in result:
        runs.append(_median_after_warmup(result["repeat_step_seconds"]))
    return min(runs)


def summarise(results: dict[str, dict], baseline: str = "1 rank") -> list[dict]:
    """One row per layout: ranks, step seconds, tokens/s, speed-up and efficiency against
    `baseline`, communication + waiting share of a step (mean over ranks), the largest
    training state on any rank, the final loss and its largest relative difference from the
    baseline's loss curve."""
    if baseline not in results:
        raise ValueError(f"baseline: expected one of {sorted(results)}, got {baseline!r}")
    base = results[baseline]
    base_seconds, base_losses = baseline_seconds(base), np.array(base["losses"])
    rows = []
    for name, result in results.items():
        settings = result["settings"]
        seconds = base_seconds if name == baseline else median_step_seconds(result)
        losses = np.array(result["losses"])
        if losses.shape != base_losses.shape:
            raise ValueError(f"results[{name!r}]: expected {base_losses.size} losses like the "
                             f"baseline, got {losses.size}")
        ranks = result["world_size"]
        parts = result["seconds_per_step_per_rank"]
        share = np.mean([(p["communication"] + p["waiting"]) / sum(p.values()) for p in parts])
        rows.append({
            "layout": name,
            "ranks": ranks,
            "step_seconds": seconds,
            "tokens_per_s": settings["batch_size"] * settings["seq_len"] / seconds,
            "speedup": base_seconds / seconds,
            "efficiency": base_seconds / seconds / ranks,
            "comm_share": float(share),
            "max_state_bytes": max(sum(m.values()) for m in result["memory_bytes"]),
            "final_loss": float(losses[-1]),
            "max_loss_rel_diff": float(np.max(np.abs(losses - base_losses) / base_losses)),
        })
    return rows


# --------------------------------------------------------------------------- prediction


def model_spec(result: dict) -> ModelSpec:
    """The planner's description of the model and global batch a study result trained."""
    settings = result["settings"]
    return ModelSpec.from_config(TransformerConfig(**result["config"]), settings["seq_len"],
                                 settings["batch_size"])


def calibrated_efficiency(spec: ModelSpec, one_rank_step_seconds: float,
                          flops_per_s: float) -> float:
    """The planner's efficiency u for this machine: the fraction of `flops_per_s` (one core's
    measured matmul peak) that the 1-rank run reached - the one number the prediction takes
    from a training measurement."""
    require_real("one_rank_step_seconds", one_rank_step_seconds, positive=True)
    require_real("flops_per_s", flops_per_s, positive=True)
    return spec.flops_per_step / (one_rank_step_seconds * flops_per_s)


def measure_links(max_bytes: int = 16 * 2**20, timeout: float = 120.0) -> tuple[float, float]:
    """(alpha seconds per message, beta seconds per byte) between two ranks of this machine:
    chapter 6's fit (costmodel.fit_ring_links) to 2-rank ring all-reduces of 1 KiB up to
    max_bytes. alpha is a ring step's cost from Python, not the wire latency of MPI alone."""
    bench = run_mpi("tfcourse.parallel.comm", ["--bench", "--max-bytes", str(max_bytes)],
                    n_ranks=2, timeout=timeout).result
    return fit_ring_links(bench["sizes_bytes"], bench["seconds"]["ring"], 2)


def this_machine(ranks: int, cores: int, flops_per_s: float, efficiency: float, alpha: float,
                 beta: float, memory_bytes: float, share_cores: bool = True) -> Cluster:
    """This machine as the planner sees a cluster: `ranks` devices in one node, linked by
    shared memory (latency alpha s, beta s/byte, fitted in chapter 6), each a core running
    one BLAS thread at flops_per_s x efficiency. With `share_cores`, ranks beyond the cores split
    them: each runs at cores/ranks of a core (the term a GPU cluster never needs)."""
    require_positive_int("cores", cores)
    speed = flops_per_s * (min(1.0, cores / ranks) if share_cores else 1.0)
    return Cluster(n_devices=ranks, devices_per_node=ranks, memory_bytes=memory_bytes,
                   flops_per_s=speed, intra_alpha=alpha, intra_bandwidth=1.0 / beta,
                   inter_alpha=alpha, inter_bandwidth=1.0 / beta, efficiency=efficiency)


def predict(layout: Layout, spec: ModelSpec, cluster: Cluster, microbatches: int = 4
            ) -> PlanEstimate:
    """The planner's estimate of one study layout (ZeRO-0; pipelines use `microbatches`)."""
    m = microbatches if layout.pp > 1 else 1
    return estimate(spec, cluster, Plan(layout.dp, layout.tp, layout.pp, m, 0))


def compare_with_planner(results: dict[str, dict], flops_per_s: float, alpha: float,
                         beta: float, cores: int, memory_bytes: float,
                         microbatches: int = 4, baseline: str = "1 rank") -> list[dict]:
    """Per layout: measured median step seconds, the planner's prediction for this machine
    (utilisation calibrated on `baseline`; ranks share `cores`), its relative error, and the
    prediction that ignores the shared cores."""
    spec = model_spec(results[baseline])
    u = calibrated_efficiency(spec, baseline_seconds(results[baseline]), flops_per_s)
    rows = []
    for name, result in results.items():
        layout = Layout(**result["layout"])
        shared, naive = (predict(layout, spec, this_machine(
            layout.ranks, cores, flops_per_s, u, alpha, beta, memory_bytes, share_cores),
            microbatches) for share_cores in (True, False))
        measured = baseline_seconds(result) if name == baseline else median_step_seconds(result)
        rows.append({"layout": name, "ranks": layout.ranks, "measured": measured,
                     "predicted": shared.step_s, "predicted_ignoring_cores": naive.step_s})
    errors = validate_against({r["layout"]: r["measured"] for r in rows},
                              {r["layout"]: r["predicted"] for r in rows})
    return [{**r, "error": errors[r["layout"]]} for r in rows]


def format_comparison(rows: list[dict], mark: str = "", cores: int | None = None) -> str:
    """compare_with_planner's rows as text, in milliseconds (measured values after `mark`);
    with `cores`, rows with more ranks than cores are marked as oversubscribed."""
    lines = [f"{'layout':17s} {'measured':>9s} {'predicted':>10s} {'error':>7s} "
             f"{'ignoring cores':>15s}"]
    for r in rows:
        cells = [(r["measured"] * 1e3, ".1f", 9), (r["predicted"] * 1e3, ".1f", 10),
                 (100 * r["error"], ".0f", 6),
                 (r["predicted_ignoring_cores"] * 1e3, ".1f", 15)]
        text = [f"{mark}{value:{spec}}".rjust(width) for value, spec, width in cells]
        lines.append(f"{r['layout']:17s} {text[0]} {text[1]} {text[2]}% {text[3]}"
                     + _oversubscribed(r["ranks"], cores))
    return "\n".join(lines + _oversubscribed_note(rows, cores))


def _oversubscribed(ranks: int, cores: int | None) -> str:
    return "  *" if cores is not None and ranks > cores else ""


def _oversubscribed_note(rows: list[dict], cores: int | None) -> list[str]:
    return [] if cores is None or all(r["ranks"] <= cores for r in rows) else [
        f"* oversubscribed: more ranks than this machine's {cores} cores - a correctness run; "
        f"its times are not this machine's parallel speed"]


def format_table(rows: list[dict], mark: str = "", cores: int | None = None) -> str:
    """The summary as aligned text. Measured values (times and what is computed from them,
    and rounding-level loss differences, which vary with the CPU's BLAS kernels) are prefixed
    with `mark` - the notebooks use "~", which their tests mask. With `cores`, rows with more
    ranks than cores are marked as oversubscribed."""
    def measured(value: float, spec: str, width: int) -> str:
        return f"{mark}{value:{spec}}".rjust(width)

    header = (f"{'layout':16s} {'ranks':>5s} {'ms/step':>8s} {'tokens/s':>9s} {'speed-up':>8s} "
              f"{'effic.':>6s} {'comm+wait':>9s} {'KiB/rank':>8s} {'loss':>7s} {'vs 1 rank':>9s}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['layout']:16s} {r['ranks']:5d} "
                     f"{measured(r['step_seconds'] * 1e3, '.2f', 8)} "
                     f"{measured(r['tokens_per_s'], '.0f', 9)} "
                     f"{measured(r['speedup'], '.2f', 8)} {measured(r['efficiency'], '.2f', 6)} "
                     f"{measured(r['comm_share'] * 100, '.0f', 8)}% "
                     f"{r['max_state_bytes'] / 1024:8.1f} {r['final_loss']:7.4f} "
                     f"{measured(r['max_loss_rel_diff'], '.1e', 9)}"
                     + _oversubscribed(r["ranks"], cores))
    return "\n".join(lines + _oversubscribed_note(rows, cores))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.parallel.study",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="blocks (>= the most stages)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--max-ranks", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser.parse_args(argv)


def training_arguments(args: argparse.Namespace) -> list[str]:
    """The flags every layout's program gets, so they all train the same model."""
    flags = ["--config", args.config, "--layers", str(args.layers), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--dtype", args.dtype]
    return flags + (["--seq-len", str(args.seq_len)] if args.seq_len is not None else [])


def check_study_args(args: argparse.Namespace) -> None:
    """Everything the study can check before its first job: a bad value found after every
    layout has run would lose the whole study (ValueError naming the option)."""
    for name in ("layers", "steps", "batch_size", "microbatches", "max_ranks"):
        require_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.seq_len is not None:
        require_positive_int("--seq-len", args.seq_len)
    require_real("--timeout", args.timeout, positive=True)
    if args.config not in PRESETS:
        raise ValueError(f"--config: expected one of {sorted(PRESETS)}, got {args.config!r}")
    if args.json:
        check_writable("--json", args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_study_args(args)
        n_heads = PRESETS[args.config]["n_heads"]
        results = run_study(default_layouts(args.max_ranks, n_heads), training_arguments(args),
                            args.microbatches, args.timeout)
        print(format_table(summarise(results), cores=cores_available()))
        if args.json:
            write_json_atomic(args.json, results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
