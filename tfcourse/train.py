"""Chapter 4: serial training of the language model - the reference every parallel mode matches.

    python -m tfcourse.train --config tiny --steps 200 --seed 0 --json out.json
    python -m tfcourse.train --config tiny --steps 200 --text my_book.txt
    python -m tfcourse.train --config tiny --steps 60 --experts 4 --top-k 2   # mixture of experts

The batch at step s is drawn from a generator seeded with (seed, s), so a run resumed from a
checkpoint, and every data-parallel rank slicing the same global batch, sees exactly the
batches of an uninterrupted serial run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from tfcourse.allocator import keep_freed_memory
from tfcourse.checkpoint import (
    check_checkpoint_folder,
    check_matches,
    complete_steps,
    latest_checkpoint,
    read_distributed,
    read_manifest,
    step_folder,
    write_manifest,
    write_shard,
)
from tfcourse.data import (
    MARKOV_CORPORA,
    CharCorpus,
    Seq2SeqData,
    lm_batch,
    markov_corpus,
    seq2seq_batch,
    unigram_cross_entropy,
    zen_of_python,
)
from tfcourse.files import check_writable, write_json_atomic
from tfcourse.nn import seq2seq
from tfcourse.nn.layers import cross_entropy_forward
from tfcourse.nn.model import (
    MOE_DEFAULTS,
    PRESETS,
    RECOMPUTE,
    TransformerConfig,
    forward,
    init_params,
    loss_and_grads,
    param_shapes,
    preset,
    require_recompute,
)
from tfcourse.nn.optim import (
    adamw_init,
    adamw_step,
    clip_grad_norm,
    loss_scale_init,
    loss_scale_update,
)
from tfcourse.nn.precision import PRECISIONS, decode, encode, require_precision
from tfcourse.nn.seq2seq import Seq2SeqConfig
from tfcourse.nn.validate import (
    require_nonnegative_int,
    require_nonnegative_real,
    require_positive_int,
    require_real,
)

# How each setting is checked; the CLIs reuse it with the flag's name ("--steps").
SETTING_CHECKS = {
    "steps": require_positive_int,
    "batch_size": require_positive_int,
    "seq_len": require_positive_int,
    "lr": functools.partial(require_real, positive=True),
    "warmup_steps": require_nonnegative_int,
    "weight_decay": require_nonnegative_real,
    "clip": functools.partial(require_real, positive=True),
    "seed": require_nonnegative_int,
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the batch is the *global* batch (all ranks together).

    Every field is checked on creation (and by dataclasses.replace), so a bad value fails
    here with its name rather than steps later inside NumPy."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name, check in SETTING_CHECKS.items():
            check(name, getattr(self, name))


def check_fits(config: TransformerConfig, settings: TrainSettings) -> None:
    """The training windows must fit the model's position table, and one step's logits (a
    lower bound on its memory: the activations come on top) this machine's memory."""
    if settings.seq_len > config.max_len:
        raise ValueError(f"seq_len: expected at most max_len={config.max_len}, "
                         f"got {settings.seq_len}")
    logits = (settings.batch_size * settings.seq_len * config.vocab_size
              * np.dtype(config.dtype).itemsize)
    memory = _physical_memory()
    if memory and logits > memory:
        raise ValueError(f"batch_size: a step of {settings.batch_size} x {settings.seq_len} "
                         f"tokens needs at least {logits / 2**30:,.0f} GiB for its logits alone, "
                         f"more than this machine's {memory / 2**30:,.0f} GiB: use a smaller "
                         f"batch")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this system
        return None


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr towards 0 at `steps`."""
    warmup = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    progress = step / max(settings.steps, 1)
    return settings.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


TRAIN_PRESETS = {
    "tiny": TrainSettings(steps=200, batch_size=16, seq_len=32, lr=1e-2),
    "small": TrainSettings(steps=50, batch_size=16, seq_len=128, lr=1e-3),
    "medium": TrainSettings(steps=50, batch_size=8, seq_len=256, lr=1e-3),
}


CORPORA = ("zen", *sorted(MARKOV_CORPORA))


def load_corpus(text_path: str | None = None, name: str = "zen") -> CharCorpus:
    """The learner's own text file, or a named corpus: "zen", the Zen of Python (bundled
    with every Python, 856 characters: small enough to memorise), or "markov", a generated
    language whose entropy is known (data.markov_corpus: its training text)."""
    if text_path:
        return CharCorpus.from_file(text_path)
    if name not in CORPORA:
        raise ValueError(f"--corpus: expected one of {list(CORPORA)}, got {name!r}")
    return CharCorpus.from_text(zen_of_python()) if name == "zen" else markov_corpus(name)


def optimizer_update(params: dict, grads: dict, opt_state: dict, settings: TrainSettings,
                     step: int, norm: float | None = None):
    """Clip the global gradient norm, then one AdamW step at the learning rate of `step`.

    Returns (params, opt_state, gradient norm before clipping). `norm`: the norm of the full
    gradient when `grads` is only a ZeRO shard of it (chapter 6).

    Data-parallel training calls this on every rank with the same averaged grads, which keeps
    the replicas identical.
    """
    # TrainSettings checked clip and weight decay once; the gradients come from the model
    grads, norm = clip_grad_norm(grads, settings.clip, norm, check=False)
    params, opt_state = adamw_step(params, grads, opt_state, learning_rate(step, settings),
                                   weight_decay=settings.weight_decay, check=False)
    return params, opt_state, norm


def half_weights(master: dict, precision: str) -> tuple[dict, dict]:
    """Mixed precision's model weights: (the 16-bit copy of the float32 master weights, 2
    bytes a value; the same values as float32 arrays, for NumPy's float32 BLAS - NumPy has no
    16-bit one, so this float32 copy stands in for the tensor core reading 16-bit weights)."""
    weights16 = {name: encode(p, precision) for name, p in master.items()}
    return weights16, {name: decode(w, precision) for name, w in weights16.items()}


def mixed_precision_update(master: dict, grads: dict, opt_state: dict, loss_scale: dict | None,
                           settings: TrainSettings, step: int, precision: str):
    """The optimiser step of mixed precision (Micikevicius et al. 2018).

    grads: the model's gradients at the current loss scale. They are stored in 16 bits, then
    turned back into float32 and divided by the scale; AdamW updates the float32 master
    weights with them. fp16 (loss_scale: optim.loss_scale_init's state): gradients with an
    inf or NaN skip the step and halve the scale (optim.loss_scale_update). bf16 has float32's
    range and needs no scaling (loss_scale None): an inf there means training diverged.
    Returns (master, opt_state, loss_scale, the 16-bit gradients, whether the step was taken).
    """
    grads16 = {name: encode(g, precision) for name, g in grads.items()}
    unscale = np.float32(1.0 / (loss_scale["scale"] if loss_scale else 1.0))
    unscaled = {name: decode(g, precision) * unscale for name, g in grads16.items()}
    finite = all(np.isfinite(g).all() for g in unscaled.values())
    if loss_scale is not None:
        loss_scale, apply = loss_scale_update(loss_scale, finite)
    elif not finite:
        raise FloatingPointError(f"gradients: expected finite {precision} values at step "
                                 f"{step}, got inf or NaN (training diverged: lower --lr, "
                                 f"now {settings.lr})")
    else:
        apply = True
    if apply:
        master, opt_state, _ = optimizer_update(master, unscaled, opt_state, settings, step)
    return master, opt_state, loss_scale, grads16, apply


class Progress:
    """Progress report: an ipywidgets bar in a notebook, a rewritten line in a terminal, and
    plain lines (about ten per run) when output goes to a file or a pipe."""

    def __init__(self, total: int, mode: str = "auto", stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.mode = _detect_mode(self.stream) if mode == "auto" else mode
        self.every = max(1, total // 10)
        # A widget update is two messages on the kernel's output channel: at every step of a
        # long run they flood it (nbval then lost the cell's end); a hundred updates look the same.
        self.widget_every = max(1, total // 100)
        self.bar = None
        if self.mode == "widget":
            import ipywidgets
            from IPython.display import display

            self.bar = ipywidgets.FloatProgress(min=0, max=total, description="training")
            display(self.bar)

    def update(self, step: int, loss: float, held_out: float | None = None) -> None:
        """Report step `step` (0-based) and its loss; `held_out`: this step's held-out loss,
        shown in the plain lines and the terminal (evaluation steps only)."""
        done = step + 1
        shown = "" if held_out is None else f"  held-out {held_out:.4f}"
        if self.mode == "widget" and (done % self.widget_every == 0 or done == self.total):
            self.bar.value = done
            self.bar.description = f"loss {loss:.3f}"
        elif self.mode == "tty":
            self.stream.write(f"\rstep {done}/{self.total}  loss {loss:.4f}{shown}")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "lines" and (done % self.every == 0 or done == self.total or shown):
            self.stream.write(f"step {done:5d}/{self.total}  loss {loss:.4f}{shown}\n")
            self.stream.flush()


def _detect_mode(stream) -> str:
    if "ipykernel" in sys.modules:
        return "widget"
    return "tty" if hasattr(stream, "isatty") and stream.isatty() else "lines"


LR_RULES = ("constant", "linear", "sqrt")


def scaled_lr(lr: float, base_batch: int, batch: int, rule: str) -> float:
    """The learning rate for `batch` when `lr` suits `base_batch`: "constant" keeps it,
    "linear" multiplies it by batch / base_batch (Goyal et al. 2017, with warm-up: the
    update of k small batches, taken at once), "sqrt" by sqrt(batch / base_batch) (the
    gradient noise falls as 1/sqrt(batch); Krizhevsky 2014, Hoffer et al. 2017)."""
    if rule not in LR_RULES:
        raise ValueError(f"rule: expected one of {list(LR_RULES)}, got {rule!r}")
    ratio = require_positive_int("batch", batch) / require_positive_int("base_batch",
                                                                          base_batch)
    return lr * {"constant": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


HELD_OUT_SEED = 2**31 - 1  # the evaluation windows' seed: the same windows for every run
HELD_OUT_WINDOWS = 64


def held_out_loss(params: dict, ids, config: TransformerConfig, seq_len: int,
                  windows: int = HELD_OUT_WINDOWS) -> float:
    """Mean next-token cross-entropy (nats per token) of the model on `windows` fixed windows
    of seq_len tokens of held-out `ids` - the same windows for every run, whatever its seed,
    batch or layout, so held-out losses of different runs compare. The forward pass only; a
    mixture of experts' load-balancing loss is not part of it."""
    x, y = lm_batch(ids, windows, seq_len, HELD_OUT_SEED, 0)
    logits = forward(params, x, dataclasses.replace(config, dropout=0.0))
    return float(cross_entropy_forward(logits, y)[0])


def held_out_text(result: dict) -> str:
    """"; held-out loss X after step S" for a result that evaluated, else "" (the progress
    display's last word: the serial trainer's and every program's summary line)."""
    losses = result.get("held_out_losses")
    return f"; held-out loss {losses[-1][1]:.4f} after step {losses[-1][0]}" if losses else ""


def evaluate_now(done: int, steps: int, every: int) -> bool:
    """Evaluate after step `done` (1-based): every `every` steps and after the last (0: never)."""
    return every > 0 and (done % every == 0 or done == steps)


def train_lm(config: TransformerConfig, corpus: CharCorpus, settings: TrainSettings,
             checkpoint: str | None = None, checkpoint_every: int = 0,
             resume_from: str | None = None, progress: str = "auto", keep: int = 2,
             held_out=None, eval_every: int = 0, staleness: int = 0) -> dict:
    """Train from scratch (or resume) and return a JSON-ready summary with `losses` per step.

    checkpoint: a folder; the final state is always saved there, and with checkpoint_every
    also every that many steps, keeping the newest `keep` (see checkpoint_now).
    resume_from: a checkpoint folder written by any training program, any layout.
    fp16 adds `loss_scales` (the scale of each step this call ran), `skipped_steps` (of
    those) and `loss_scale` (the final state, saved with every checkpoint and resumed).
    A mixture of experts (config.n_experts > 0) adds `routing`: for each step this call ran,
    {block: {"tokens_per_expert", "routed", "dropped", "capacity", "aux_loss"}} (`routing_record`);
    its `losses` include the weighted load-balancing loss (model.loss_and_grads).
    held_out (token ids) with eval_every > 0 adds `held_out_losses`, [[step, loss], ...]:
    held_out_loss every eval_every steps and after the last (of the float32 master weights
    under mixed precision).
    staleness k > 0 simulates asynchronous data parallelism deterministically: the update of
    step t applies the gradients computed at step t - k, on the parameters of k updates
    before (the first k steps compute and wait); float32 only, and not resumable."""
    check_fits(config, settings)
    eval_every = require_nonnegative_int("eval_every", eval_every)
    staleness = require_nonnegative_int("staleness", staleness)
    if staleness and (config.precision != "fp32" or resume_from or checkpoint):
        raise ValueError("staleness: the asynchronous simulation trains in fp32 from scratch "
                         f"without checkpoints, got precision {config.precision!r}, "
                         f"resume_from {resume_from!r}, checkpoint {checkpoint!r}")
    in_flight = collections.deque()
    if eval_every and held_out is None:
        raise ValueError("held_out: expected held-out token ids to evaluate every "
                         f"{eval_every} steps, got None")
    evaluations = []
    params = init_params(config, settings.seed)
    opt_state = adamw_init(params)
    losses: list[float] = []
    loss_scale = loss_scale_init() if config.precision == "fp16" else None
    scales, skipped, routing = [], 0, []
    start_step = 0
    if resume_from:
        params, opt_state, start_step, losses, loss_scale = load_resume_state(
            resume_from, params, config, settings)
    bar = Progress(settings.steps, progress)
    start = time.perf_counter()
    for step in range(start_step, settings.steps):
        x, y = lm_batch(corpus.ids, settings.batch_size, settings.seq_len, settings.seed, step)
        if config.precision == "fp32":
            loss, grads, step_routing = loss_and_grads(params, x, y, config, return_routing=True)
            in_flight.append(grads)  # staleness k: applied k steps later
            if len(in_flight) > staleness:
                params, opt_state, _ = optimizer_update(params, in_flight.popleft(), opt_state,
                                                        settings, step)
        else:  # the float32 master weights stay in params; the model runs on a 16-bit copy
            scale = loss_scale["scale"] if loss_scale else 1.0
            scales += [scale] if loss_scale else []
            loss, grads, step_routing = loss_and_grads(
                half_weights(params, config.precision)[1], x, y, config, loss_scale=scale,
                return_routing=True)
            params, opt_state, loss_scale, _, applied = mixed_precision_update(
                params, grads, opt_state, loss_scale, settings, step, config.precision)
            skipped += not applied
        losses.append(loss)
        if step_routing:
            routing.append(routing_record(step_routing))
        shown = None
        if evaluate_now(step + 1, settings.steps, eval_every):
            shown = held_out_loss(params, held_out, config, settings.seq_len)
            evaluations.append([step + 1, shown])
        bar.update(step, loss, shown)
        if checkpoint and checkpoint_now(step + 1, settings.steps, checkpoint_every):
            save_whole(checkpoint, params, opt_state, checkpoint_manifest(
                step + 1, losses, config, settings, {"program": "tfcourse.train"}, [],
                loss_scale), keep)
    seconds = time.perf_counter() - start
    steps_run = settings.steps - start_step
    return {
        "losses": losses,
        "tokens_per_s": steps_run * settings.batch_size * settings.seq_len / max(seconds, 1e-9),
        "seconds": seconds,
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "unigram_baseline": unigram_cross_entropy(corpus.ids, corpus.vocab.size),
        "params": params,
        **({"loss_scales": scales, "skipped_steps": skipped, "loss_scale": loss_scale}
           if loss_scale else {}),
        **({"routing": routing} if config.n_experts else {}),
        **({"held_out_losses": evaluations} if eval_every else {}),
    }


def routing_record(routing: dict) -> dict:
    """One step's routing statistics, JSON-ready: {block: {"tokens_per_expert" (processed),
    "routed" (chosen, before the capacity cut), "dropped" (choices), "capacity" (slots per
    expert), "aux_loss" (unweighted)}} from model.moe_routing's Routing tuples."""
    return {piece: {"tokens_per_expert": r.tokens_per_expert.tolist(),
                    "routed": r.routed.tolist(), "dropped": r.dropped,
                    "capacity": r.capacity, "aux_loss": r.aux_loss}
            for piece, r in routing.items()}


def save_whole(folder: str, params: dict, opt_state: dict, manifest: dict, keep: int) -> None:
    """One process's whole state as a one-shard checkpoint (the serial trainer's). A failed
    write (a full disk) is a ValueError naming --checkpoint; the last complete checkpoint is
    never touched before the new one is complete."""
    step = step_folder(folder, manifest["step"])
    pieces = {**{("param", n, ""): a for n, a in params.items()},
              **{("opt", n, ""): a for n, a in opt_state.items()}}
    try:
        shard = write_shard(step, 0, 1, pieces, {"rank": 0, "step": manifest["step"]})
        write_manifest(step, {**manifest, "shards": [shard]}, keep)
    except OSError as err:
        raise ValueError(f"--checkpoint: saving step {manifest['step']} in {folder!r} failed "
                         f"({err.strerror or err}); the previous complete checkpoint there is "
                         f"unchanged") from None


def checkpoint_now(done: int, steps: int, every: int) -> bool:
    """Save after `done` steps? Always after the last one; also every `every` steps (0: never)."""
    return done == steps or bool(every) and done % every == 0


def checkpoint_manifest(step: int, losses: list, config: TransformerConfig,
                        settings: TrainSettings, layout: dict, shards: list[dict],
                        loss_scale: dict | None = None) -> dict:
    """The manifest of a checkpoint after `step` steps (tfcourse.checkpoint): what was trained,
    how, by which layout, and the global arrays that the shards' pieces make up. fp16 also
    saves dynamic loss scaling's state (`loss_scale`, optim.loss_scale_init's dict): the scale
    and its counters decide which later steps are skipped, so an exact resume needs them."""
    if (config.precision == "fp16") != (loss_scale is not None):
        raise ValueError(f"loss_scale: expected the loss-scale state with precision fp16 and "
                         f"None otherwise, got {loss_scale!r} with {config.precision}")
    dtype = np.dtype(config.dtype).name
    arrays = {"opt/step": {"shape": [], "dtype": "int64"}}
    for name, shape in param_shapes(config).items():
        for key in (f"param/{name}", f"opt/m.{name}", f"opt/v.{name}"):
            arrays[key] = {"shape": list(shape), "dtype": dtype}
    return {"step": step, "losses": list(losses), "config": config.to_dict(),
            "settings": dataclasses.asdict(settings), "layout": layout, "shards": shards,
            "arrays": arrays, **({"loss_scale": dict(loss_scale)} if loss_scale else {})}


def check_resume(folder: str, config: TransformerConfig, settings: TrainSettings) -> dict:
    """The manifest of the checkpoint --resume continues from, if that run can continue as
    this one: the same model and the same settings. A changed seed, learning rate or batch
    would silently train something else, and so would a changed --steps (the learning rate's
    cosine decay spans the run's steps), so each is refused, naming every difference. Any
    layout may resume any other's checkpoint."""
    try:
        manifest = read_manifest(latest_checkpoint(folder))
    except ValueError as err:
        raise ValueError(f"--resume: {str(err).removeprefix('folder: ')}") from None
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"--resume: the checkpoint in {folder!r} has step {step!r} in its "
                         f"manifest, expected an integer >= 0")
    saved_config = manifest.get("config")
    model = _same_numbers(saved_config) if isinstance(saved_config, dict) else None
    asked = _same_numbers(config.to_dict())
    if model and model["precision"] != asked["precision"]:
        # the same weights could continue in another precision, but then the run would be
        # neither uninterrupted run: a resume here is always exact, so it is refused
        flags = f"--precision {model['precision']}" + (
            f" --dtype {model.get('dtype')}" if model.get("dtype") != asked["dtype"] else "")
        raise ValueError(f"--resume: the checkpoint in {folder!r} was trained with --precision "
                         f"{model['precision']}, this run asks for --precision "
                         f"{asked['precision']}: resume it with {flags}, or start a new run")
    if model != asked:
        raise ValueError(f"--resume: the checkpoint in {folder!r} is of another model "
                         f"({manifest.get('config')}), expected {config.to_dict()}")
    saved, wanted = manifest.get("settings", {}), dataclasses.asdict(settings)
    changed = [f"{name} {saved.get(name)!r} -> {wanted[name]!r}" for name in wanted
               if saved.get(name) != wanted[name]]
    if changed:
        raise ValueError(f"--resume: this run changes the checkpoint's settings ("
                         f"{', '.join(changed)}); resume with the settings it was written with, "
                         f"or start a new run")
    if step >= settings.steps:
        raise ValueError(f"--resume: the checkpoint in {folder!r} is at step {step}, "
                         f"the run's last: there is nothing left to train")
    saved_loss_scale(manifest, folder, config)
    return manifest


def saved_loss_scale(manifest: dict, folder: str, config: TransformerConfig) -> dict | None:
    """fp16's loss-scale state from a checkpoint's manifest (None in fp32 and bf16), checked:
    a ValueError naming --resume if it is missing (a checkpoint written before they saved it)
    or malformed."""
    if config.precision != "fp16":
        return None
    entry = manifest.get("loss_scale")
    if entry is None:
        raise ValueError(f"--resume: the checkpoint in {folder!r} holds no fp16 loss scale "
                         f"(written by a version that did not save it), so the run cannot "
                         f"continue exactly: start a new run without --resume")
    fields = entry if isinstance(entry, dict) else {}
    scale, good, skipped = (fields.get(key) for key in ("scale", "good_steps", "skipped_in_a_row"))
    if not (_is_number(scale) and math.isfinite(scale) and scale > 0
            and all(_is_number(c) and isinstance(c, int) and c >= 0 for c in (good, skipped))):
        raise ValueError(f"--resume: the checkpoint in {folder!r} has loss scale {entry!r} in "
                         f"its manifest, expected {{'scale': a positive number, 'good_steps' "
                         f"and 'skipped_in_a_row': integers >= 0}}")
    return {"scale": float(scale), "good_steps": good, "skipped_in_a_row": skipped}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_numbers(config: dict) -> dict:
    """A config without the fields that change how a step is computed but not its numbers
    (recomputing activations or not): a run may resume another's checkpoint across them."""
    return {"precision": "fp32", **MOE_DEFAULTS,  # manifests older than these fields
            **{name: value for name, value in config.items() if name != "recompute"}}


class Resumed(NamedTuple):
    """What a run continues from: the global arrays, the steps done, their losses, and fp16's
    loss-scale state (None in fp32 and bf16)."""

    params: dict
    opt_state: dict
    step: int
    losses: list
    loss_scale: dict | None


def load_resume_state(folder: str, fresh_params: dict, config: TransformerConfig,
                      settings: TrainSettings) -> Resumed:
    """The global arrays of the newest checkpoint in `folder` (check_resume first), its step,
    losses and loss scale. Every problem is a ValueError naming --resume: a missing,
    corrupt or foreign folder, another model's shapes or dtype (`fresh_params` are the
    expected ones), or NaN/inf in the saved arrays (a run that had diverged)."""
    manifest = check_resume(folder, config, settings)
    try:
        params, opt_state, manifest = read_distributed(folder)
        check_matches(params, fresh_params)
    except ValueError as err:
        raise ValueError(f"--resume: {str(err).removeprefix('folder: ')}") from None
    expected = set(adamw_init(fresh_params))
    if set(opt_state) != expected:
        raise ValueError(f"--resume: {folder!r} holds optimiser state {sorted(opt_state)[:4]}..., "
                         f"expected AdamW's {sorted(expected)[:4]}...")
    for kind, arrays in (("parameter", params), ("optimiser state", opt_state)):
        for name, value in arrays.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"--resume: {folder!r} holds NaN or infinite values in "
                                 f"{kind} {name!r} (saved after training diverged?)")
    return Resumed(params, opt_state, manifest["step"], manifest["losses"],
                   saved_loss_scale(manifest, folder, config))


def train_seq2seq(config: Seq2SeqConfig, train_data: Seq2SeqData, settings: TrainSettings,
                  progress: str = "auto") -> dict:
    """Train the encoder-decoder model on a toy task; returns `losses` and the `params`."""
    params = seq2seq.init_params(config, settings.seed)
    opt_state = adamw_init(params)
    losses = []
    bar = Progress(settings.steps, progress)
    for step in range(settings.steps):
        src, tgt_in, tgt_out, _ = seq2seq_batch(train_data, settings.batch_size, settings.seed,
                                                step)
        loss, grads = seq2seq.loss_and_grads(params, src, tgt_in, tgt_out, config)
        params, opt_state, _ = optimizer_update(params, grads, opt_state, settings, step)
        losses.append(loss)
        bar.update(step, loss)
    return {"losses": losses, "params": params}


def add_training_arguments(parser: argparse.ArgumentParser, threads: bool = False) -> None:
    """The options every training program shares (serial and each parallel mode), so they
    mean the same everywhere; `settings_from_args` turns them into TrainSettings."""
    parser.add_argument("--config", default="tiny", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (all ranks)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="float64 by default; float32 with --precision bf16|fp16")
    parser.add_argument("--precision", default="fp32", metavar="|".join(PRECISIONS),
                        help="mixed precision: 16-bit weights, activations and gradients in "
                             "every matmul, float32 master weights and optimiser state; fp16 "
                             "with dynamic loss scaling (tfcourse.train and data_parallel)")
    parser.add_argument("--text", default=None, help="train on this text file (default: Zen)")
    parser.add_argument("--corpus", default=None, metavar="|".join(CORPORA),
                        help="a named corpus: zen (the default) or markov (generated, with a "
                             "known entropy floor)")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="held-out loss every N steps and after the last (0: never)")
    parser.add_argument("--held-out-fraction", type=float, default=0.1, metavar="F",
                        help="with --eval-every, the last F of --text or zen is held out "
                             "(markov has a held-out text of its own)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's n_layers")
    parser.add_argument("--recompute", default="none", metavar="|".join(RECOMPUTE),
                        help="activation recomputation: keep every activation (none), all but "
                             "the attention weights (selective), or only each block's input "
                             "(full); the same losses, less memory, more compute")
    parser.add_argument("--experts", type=int, default=None, metavar="E",
                        help="mixture of experts: E expert FFNs in every --moe-every-th block "
                             "(tfcourse.train; default: dense)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help=f"experts per token, 1..E (default {MOE_DEFAULTS['top_k']}: "
                             f"Switch; 2: GShard)")
    parser.add_argument("--capacity-factor", type=float, default=None, metavar="C",
                        help=f"slots per expert = ceil(C tokens K / E); the tokens past them "
                             f"are dropped (default {MOE_DEFAULTS['capacity_factor']})")
    parser.add_argument("--moe-every", type=int, default=None, metavar="N",
                        help=f"experts in blocks N-1, 2N-1, ...: 1 all, 2 every other "
                             f"(default {MOE_DEFAULTS['moe_every']})")
    parser.add_argument("--aux-loss-weight", type=float, default=None, metavar="A",
                        help=f"weight of the load-balancing loss (default "
                             f"{MOE_DEFAULTS['aux_loss_weight']})")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="save checkpoints in this folder (always after the last step)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="also save every N steps")
    parser.add_argument("--keep", type=int, default=2, metavar="K",
                        help="keep the newest K checkpoints")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from the newest checkpoint in DIR (written by any layout)")
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    parser.add_argument("--json", default=None, metavar="PATH", help="write results here")
    parser.add_argument("--progress", default="auto", choices=["auto", "lines", "tty", "none"])
    parser.add_argument("--staleness", type=int, default=0, metavar="K",
                        help="simulate asynchronous data parallelism: apply each step's "
                             "gradients K steps late (0: synchronous)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The preset's TrainSettings with any command-line overrides applied.

    Used by every training CLI (serial and parallel); a bad override is a ValueError naming
    its flag, e.g. "--steps: expected a positive integer, got 0"."""
    if args.config not in TRAIN_PRESETS:
        raise ValueError(f"config: expected one of {sorted(TRAIN_PRESETS)}, got {args.config!r}")
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                 "lr": args.lr, "seed": args.seed}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name, value in overrides.items():
        SETTING_CHECKS[name]("--" + name.replace("_", "-"), value)
    return dataclasses.replace(TRAIN_PRESETS[args.config], **overrides)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What a checked training command line decides: the text, the model and the settings."""

    corpus: CharCorpus
    config: TransformerConfig
    settings: TrainSettings
    held_out: np.ndarray | None = None  # token ids to evaluate on (--eval-every)
    eval_every: int = 0


MOE_OPTIONS = {"top_k": "--top-k", "capacity_factor": "--capacity-factor",
               "moe_every": "--moe-every", "aux_loss_weight": "--aux-loss-weight"}


def moe_arguments(args: argparse.Namespace, supported: bool, n_layers: int) -> dict:
    """The config fields of --experts and its options, checked; {} for a dense model. A
    ValueError names the option: a program that does not train experts (`supported` False)
    refuses --experts; the other options need --experts; E >= 1, K in 1..E, C > 0,
    N in 1..n_layers, A >= 0."""
    given = {field: getattr(args, field, None) for field in ("n_experts", *MOE_OPTIONS)}
    given["n_experts"] = getattr(args, "experts", None)
    if given["n_experts"] is None:
        for field, flag in MOE_OPTIONS.items():
            if given[field] is not None:
                raise ValueError(f"{flag}: an option of the mixture of experts, expected "
                                 f"with --experts E, got {flag} {given[field]} without it")
        return {}
    if not supported:
        raise ValueError(f"--experts: this program trains dense models only (mixture of "
                         f"experts: python -m tfcourse.train), got --experts "
                         f"{given['n_experts']}")
    n_experts = require_positive_int("--experts", given["n_experts"])
    fields = {**MOE_DEFAULTS, "n_experts": n_experts,
              **{field: value for field, value in given.items() if value is not None}}
    if not 1 <= require_positive_int("--top-k", fields["top_k"]) <= n_experts:
        raise ValueError(f"--top-k: expected an integer in 1..{n_experts} (--experts), got "
                         f"{fields['top_k']}")
    require_real("--capacity-factor", fields["capacity_factor"], positive=True)
    if not 1 <= require_positive_int("--moe-every", fields["moe_every"]) <= n_layers:
        raise ValueError(f"--moe-every: expected at most the {n_layers} layers (else no block "
                         f"has experts), got {fields['moe_every']}")
    require_nonnegative_real("--aux-loss-weight", fields["aux_loss_weight"])
    return fields


def training_setup(args: argparse.Namespace, precisions: tuple[str, ...] = ("fp32",),
                   moe_supported: bool = False, **config_overrides) -> TrainingSetup:
    """Settings, corpus (--text) and model config of a training CLI, all checked.

    Shared by the serial and the parallel programs; `config_overrides` such as n_layers
    change the preset; `precisions`: the --precision values the program implements;
    `moe_supported`: whether it trains a mixture of experts (--experts; else refused).
    Touches no output file and needs no MPI."""
    settings = settings_from_args(args)
    if args.layers is not None:
        config_overrides["n_layers"] = require_positive_int("--layers", args.layers)
    config_overrides.update(moe_arguments(args, moe_supported, config_overrides.get(
        "n_layers", PRESETS[args.config]["n_layers"])))
    config_overrides["recompute"] = require_recompute("--recompute", args.recompute)
    precision = require_precision("--precision", args.precision)
    if precision not in precisions:
        raise ValueError(f"--precision: this program trains in {' or '.join(precisions)} "
                         f"(mixed precision: tfcourse.train and data_parallel), got "
                         f"{precision!r}")
    dtype = args.dtype or ("float64" if precision == "fp32" else "float32")
    if precision != "fp32" and dtype != "float32":
        raise ValueError(f"--dtype: mixed precision keeps float32 master weights, expected "
                         f"float32 with --precision {precision}, got {dtype}")
    name = getattr(args, "corpus", None)
    if name is not None and args.text:
        raise ValueError(f"--corpus: expected either --text or --corpus, got --text "
                         f"{args.text!r} and --corpus {name!r}")
    corpus = load_corpus(args.text, name or "zen")
    corpus, held_out, eval_every = held_out_split(args, corpus, name, settings.seq_len)
    config = preset(args.config, corpus.vocab.size, dtype=dtype, precision=precision,
                    **config_overrides)
    check_fits(config, settings)
    if len(corpus.ids) < settings.seq_len + 1:
        raise ValueError(f"--text: expected at least seq_len + 1 = {settings.seq_len + 1} "
                         f"characters to cut training windows from, got {len(corpus.ids)}")
    check_checkpoint_args(args, config, settings)
    return TrainingSetup(corpus, config, settings, held_out, eval_every)


def held_out_split(args: argparse.Namespace, corpus: CharCorpus, name: str | None,
                   seq_len: int) -> tuple[CharCorpus, np.ndarray | None, int]:
    """(training corpus, held-out ids or None, evaluation interval) for --eval-every: the
    markov corpus's own held-out text, or the last --held-out-fraction of the text (the
    rest is trained on). Without --eval-every the corpus is unchanged."""
    every = getattr(args, "eval_every", 0)
    if not every:
        return corpus, None, 0
    every = require_positive_int("--eval-every", every)
    if name in MARKOV_CORPORA:
        return corpus, markov_corpus(name, "held-out").ids, every
    fraction = require_real("--held-out-fraction", args.held_out_fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"--held-out-fraction: expected a fraction in (0, 1), got {fraction}")
    cut = len(corpus.text) - round(fraction * len(corpus.text))
    if min(cut, len(corpus.text) - cut) < seq_len + 1:
        raise ValueError(f"--held-out-fraction: expected both parts of the {len(corpus.text)} "
                         f"characters to hold seq_len + 1 = {seq_len + 1}, got "
                         f"{cut} and {len(corpus.text) - cut} with {fraction}")
    kept = CharCorpus(corpus.text[:cut], corpus.vocab, corpus.ids[:cut])
    return kept, corpus.ids[cut:], every


def check_checkpoint_args(args: argparse.Namespace, config: TransformerConfig,
                          settings: TrainSettings) -> None:
    """--checkpoint, --checkpoint-every, --keep, --resume (and --json against --text): all
    checked before the first step, so nothing a learner saved is lost or overwritten."""
    require_nonnegative_int("--checkpoint-every", args.checkpoint_every)
    require_positive_int("--keep", args.keep)
    if args.checkpoint:
        check_checkpoint_folder("--checkpoint", args.checkpoint)
        resuming_there = args.resume and _same_file(args.checkpoint, args.resume)
        if complete_steps(args.checkpoint) and not resuming_there:
            raise ValueError(f"--checkpoint: {args.checkpoint!r} holds another run's "
                             f"checkpoints, which saving would prune: choose a new folder, or "
                             f"--resume from it")
    if args.resume:
        check_resume(args.resume, config, settings)
    json_path = getattr(args, "json", None)
    if json_path and args.text and _same_file(json_path, args.text):
        raise ValueError(f"--json: {json_path!r} is the --text file: writing the result there "
                         f"would replace your text")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def check_cli_paths(args: argparse.Namespace) -> None:
    """The --json file must be writable before training starts (training_setup checked the
    checkpoint options)."""
    if args.json:
        check_writable("--json", args.json)


def run_cli(args: argparse.Namespace) -> dict:
    """Check the arguments, train, print the final loss; returns the JSON-ready result."""
    setup = training_setup(args, PRECISIONS, moe_supported=True)
    check_cli_paths(args)
    result = train_lm(setup.config, setup.corpus, setup.settings, args.checkpoint,
                      args.checkpoint_every, args.resume, args.progress, args.keep,
                      setup.held_out, setup.eval_every,
                      require_nonnegative_int("--staleness", args.staleness))
    result.pop("params")
    losses = result["losses"]
    print(f"final loss {losses[-1]:.4f} (unigram baseline {result['unigram_baseline']:.4f}), "
          f"{result['tokens_per_s']:.0f} tokens/s"
          + (f", {result['skipped_steps']} step(s) skipped by loss scaling"
             if "skipped_steps" in result else "") + held_out_text(result))
    for piece, stats in (result.get("routing") or [{}])[-1].items():
        print(f"{piece}: tokens per expert {stats['tokens_per_expert']} (routed "
              f"{stats['routed']}, capacity {stats['capacity']}), {stats['dropped']} dropped, "
              f"load-balancing loss {stats['aux_loss']:.4f} (last step)")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # a command-line run owns its process (see tfcourse.allocator)
    try:
        result = run_cli(args)
        if args.json:
            write_json_atomic(args.json, result)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
