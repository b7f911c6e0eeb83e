"""Chapter 4: serial training of the language model - the reference every parallel mode matches.

    python -m tfcourse.train --config tiny --steps 200 --seed 0 --json out.json
    python -m tfcourse.train --config tiny --steps 200 --text my_book.txt

The batch at step s is drawn from a generator seeded with (seed, s), so a run resumed from a
checkpoint, and every data-parallel rank slicing the same global batch, sees exactly the
batches of an uninterrupted serial run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from tfcourse import seq2seq
from tfcourse.checkpoint import check_matches, load_checkpoint, save_checkpoint
from tfcourse.data import (
    CharCorpus,
    Seq2SeqData,
    lm_batch,
    seq2seq_batch,
    unigram_cross_entropy,
    zen_of_python,
)
from tfcourse.files import write_json_atomic
from tfcourse.model import PRESETS, TransformerConfig, init_params, loss_and_grads, preset
from tfcourse.optim import adamw_init, adamw_step, clip_grad_norm
from tfcourse.seq2seq import Seq2SeqConfig


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the batch is the *global* batch (all ranks together)."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr towards 0 at `steps`."""
    warmup = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    progress = step / max(settings.steps, 1)
    return settings.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


TRAIN_PRESETS = {
    "tiny": TrainSettings(steps=200, batch_size=16, seq_len=32, lr=1e-2),
    "small": TrainSettings(steps=50, batch_size=16, seq_len=128, lr=1e-3),
}


def load_corpus(text_path: str | None = None) -> CharCorpus:
    """The learner's own text file, or the Zen of Python (bundled with every Python)."""
    return CharCorpus.from_file(text_path) if text_path else CharCorpus.from_text(zen_of_python())


def optimizer_update(params: dict, grads: dict, opt_state: dict, settings: TrainSettings,
                     step: int, norm: float | None = None):
    """Clip the global gradient norm, then one AdamW step at the learning rate of `step`.

    Returns (params, opt_state, gradient norm before clipping). `norm`: the norm of the full
    gradient when `grads` is only a ZeRO shard of it (chapter 6).

    Data-parallel training calls this on every rank with the same averaged grads, which keeps
    the replicas identical.
    """
    grads, norm = clip_grad_norm(grads, settings.clip, norm)
    params, opt_state = adamw_step(params, grads, opt_state, learning_rate(step, settings),
                                   weight_decay=settings.weight_decay)
    return params, opt_state, norm


class Progress:
    """Progress report: an ipywidgets bar in a notebook, a rewritten line in a terminal, and
    plain lines (about ten per run) when output goes to a file or a pipe."""

    def __init__(self, total: int, mode: str = "auto", stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.mode = _detect_mode(self.stream) if mode == "auto" else mode
        self.every = max(1, total // 10)
        self.bar = None
        if self.mode == "widget":
            import ipywidgets
            from IPython.display import display

            self.bar = ipywidgets.FloatProgress(min=0, max=total, description="training")
            display(self.bar)

    def update(self, step: int, loss: float) -> None:
        done = step + 1
        if self.mode == "widget":
            self.bar.value = done
            self.bar.description = f"loss {loss:.3f}"
        elif self.mode == "tty":
            self.stream.write(f"\rstep {done}/{self.total}  loss {loss:.4f}")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "lines" and (done % self.every == 0 or done == self.total):
            self.stream.write(f"step {done:5d}/{self.total}  loss {loss:.4f}\n")
            self.stream.flush()


def _detect_mode(stream) -> str:
    if "ipykernel" in sys.modules:
        return "widget"
    return "tty" if hasattr(stream, "isatty") and stream.isatty() else "lines"


def train_lm(config: TransformerConfig, corpus: CharCorpus, settings: TrainSettings,
             checkpoint_path: str | None = None, checkpoint_every: int = 0,
             resume_from: str | None = None, progress: str = "auto") -> dict:
    """Train from scratch (or resume) and return a JSON-ready summary with `losses` per step."""
    if settings.seq_len > config.max_len:
        raise ValueError(f"seq_len: expected at most max_len={config.max_len}, "
                         f"got {settings.seq_len}")
    params = init_params(config, settings.seed)
    opt_state = adamw_init(params)
    losses: list[float] = []
    start_step = 0
    if resume_from:
        params_loaded, opt_state, meta = load_checkpoint(resume_from)
        check_matches(params_loaded, params)
        params, start_step, losses = params_loaded, int(meta["step"]), list(meta["losses"])
    bar = Progress(settings.steps, progress)
    start = time.perf_counter()
    for step in range(start_step, settings.steps):
        x, y = lm_batch(corpus.ids, settings.batch_size, settings.seq_len, settings.seed, step)
        loss, grads = loss_and_grads(params, x, y, config)
        params, opt_state, _ = optimizer_update(params, grads, opt_state, settings, step)
        losses.append(loss)
        bar.update(step, loss)
        if checkpoint_path and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_path, params, opt_state,
                            {"step": step + 1, "losses": losses, "config": config.to_dict(),
                             "settings": dataclasses.asdict(settings)})
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
    }


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--text", default=None, help="train on this text file (default: Zen)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write results here")
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="save to this .npz")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N")
    parser.add_argument("--resume", default=None, metavar="PATH", help="resume from this .npz")
    parser.add_argument("--progress", default="auto", choices=["auto", "lines", "tty", "none"])
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The preset's TrainSettings with any command-line overrides applied."""
    if args.config not in TRAIN_PRESETS:
        raise ValueError(f"config: expected one of {sorted(TRAIN_PRESETS)}, got {args.config!r}")
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                 "lr": args.lr}
    return dataclasses.replace(TRAIN_PRESETS[args.config], seed=args.seed,
                               **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(settings, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, "
                                 f"got {getattr(settings, name)}")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ValueError(f"--json: folder of {args.json!r} does not exist")
        corpus = load_corpus(args.text)
        config = preset(args.config, corpus.vocab.size, dtype=args.dtype)
        result = train_lm(config, corpus, settings, args.checkpoint, args.checkpoint_every,
                          args.resume, args.progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.pop("params")
    losses = result["losses"]
    print(f"final loss {losses[-1]:.4f} (unigram baseline {result['unigram_baseline']:.4f}), "
          f"{result['tokens_per_s']:.0f} tokens/s")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
