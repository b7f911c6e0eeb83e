"""Chapter 5: measuring the NumPy model's training step (used by the notebook and benchmarks).

Every figure here depends on the machine and on whatever else runs on it: report ratios
measured in one run, and never assert on them in tests.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time

from threadpoolctl import threadpool_limits

from tfcourse import data, threaded, train
from tfcourse.allocator import keep_freed_memory
from tfcourse.nn import model
from tfcourse.nn.optim import adamw_init


def lm_setup(config_name: str, dtype: str = "float32", n_batches: int = 4):
    """(config, settings, params, batches) of a preset on the bundled corpus."""
    corpus = train.load_corpus()
    config = model.preset(config_name, corpus.vocab.size, dtype=dtype)
    settings = train.TRAIN_PRESETS[config_name]
    params = model.init_params(config, 0)
    batches = [data.lm_batch(corpus.ids, settings.batch_size, settings.seq_len, 0, s)
               for s in range(n_batches)]
    return config, settings, params, batches


class _Trainer:
    """One preset's training state on the bundled corpus; step() runs forward + backward +
    AdamW on the next batch (split over `batch_threads` threads, see tfcourse.threaded) and
    returns its loss. The caller sets BLAS threads and times around step()."""

    def __init__(self, config_name: str, dtype: str = "float32", batch_threads: int = 1):
        self.config, self.settings, self.params, self.batches = lm_setup(config_name, dtype)
        self.opt_state = adamw_init(self.params)
        self.batch_threads, self.i = batch_threads, 0

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        loss, grads = threaded.loss_and_grads(self.params, x, y, self.config, self.batch_threads)
        self.params, self.opt_state, _ = train.optimizer_update(
            self.params, grads, self.opt_state, self.settings, self.i)
        self.i += 1
        return loss


def time_train_step(config_name: str, threads: int, steps: int = 10, warmup: int = 3,
                    dtype: str = "float32", split: str = "blas") -> dict:
    """Median seconds of forward + backward + AdamW over `steps` after `warmup` steps, using
    `threads` threads either as BLAS threads (split="blas": one model step, BLAS threads its
    matmuls) or as batch threads with one BLAS thread each (split="batch": see
    tfcourse.threaded). Also returns the first step's loss (for cross-checks).

    Calls keep_freed_memory() first (process-wide: see tfcourse.allocator)."""
    if split not in ("blas", "batch"):
        raise ValueError(f"split: expected 'blas' or 'batch', got {split!r}")
    keep_freed_memory()
    blas_threads, batch_threads = (threads, 1) if split == "blas" else (1, threads)
    trainer = _Trainer(config_name, dtype, batch_threads)
    times, losses = [], []
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for _ in range(warmup + steps):
            start = time.perf_counter()
            losses.append(trainer.step())
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "first_loss": losses[0],
            "tokens_per_step": trainer.settings.batch_size * trainer.settings.seq_len,
            "config": trainer.config, "seq_len": trainer.settings.seq_len}


def profile_train_step(config_name: str, threads: int = 1, steps: int = 3) -> dict[str, float]:
    """Share of the training step's time spent in each function of the package (by cProfile's
    own time), summed over `steps` steps after one warm-up step; {function name: fraction}."""
    keep_freed_memory()
    trainer = _Trainer(config_name)
    profiler = cProfile.Profile()
    with threadpool_limits(limits=threads, user_api="blas"):
        trainer.step()  # warm-up
        profiler.enable()
        for _ in range(steps):
            trainer.step()
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    own = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.items():
        name = function if "tfcourse" in filename else "numpy and Python internals"
        own[name] = own.get(name, 0.0) + tottime
    total = sum(own.values())
    return {name: seconds / total for name, seconds in own.items()}


def page_faults_per_step(config_name: str, keep_freed: bool, steps: int = 3) -> dict:
    """Minor page faults and kernel (system) seconds per training step of a preset, one BLAS
    thread, with or without keep_freed_memory(). Runs in a fresh Python process: the malloc
    settings are process-wide and cannot be undone. Returns {"faults", "system_s", "step_s"}."""
    code = ("import json, sys; from tfcourse.perf.measure import _faults_here; "
            "print(json.dumps(_faults_here(sys.argv[1], sys.argv[2] == 'keep', int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, config_name,
                          "keep" if keep_freed else "default", str(steps)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def _faults_here(config_name: str, keep_freed: bool, steps: int) -> dict:
    if keep_freed:
        keep_freed_memory()
    trainer = _Trainer(config_name)
    with threadpool_limits(limits=1, user_api="blas"):
        trainer.step(), trainer.step()  # warm-up
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            trainer.step()
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    return {"faults": (after.ru_minflt - before.ru_minflt) / steps,
            "system_s": (after.ru_stime - before.ru_stime) / steps, "step_s": elapsed / steps}
