"""Bad inputs, through the public API and every command line: each one must fail fast with a
clear error that names the argument - never a bare traceback from inside NumPy, never a
hang, never a half-written output file.

Three tables: in-process calls (the ValueError's text, raised from tfcourse's own code),
`python -m tfcourse.train` (exit status 2, "error: ..." on stderr, no traceback), and every
MPI program under real mpiexec through tfcourse.course.launch.run_mpi (MPIJobError carrying the
ranks' stderr). Every command-line case writes --json into a folder of its own and checks
that nothing - not even a temporary file - is left there. The time to each clean error is
recorded; `test_summary` (last) prints how many inputs were tried and the longest time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tfcourse import checkpoint, data, files, train
from tfcourse.course import launch
from tfcourse.course.launch import MPIJobError, MPITimeoutError, run_mpi
from tfcourse.nn import attention, model, optim, seq2seq
from tfcourse.parallel.plans import batches, pipeline, sequence, tensor
from tfcourse.perf import costmodel, planner

CORPUS = train.load_corpus()
TINY = model.preset("tiny", CORPUS.vocab.size)
PARAMS = model.init_params(TINY, seed=0)
TOKENS = np.zeros((2, 8), dtype=np.int64)
CLI_TIMEOUT = 30  # seconds; a case that needs longer has hung or trained before checking
FAST = 8.0  # seconds: a clean error must come long before the default run would finish

TIMINGS: dict[str, float] = {}  # case id -> seconds to the clean error (command lines)
TRIED: set[str] = set()  # every case id run, in-process ones included


# --------------------------------------------------------------------------- helpers


def with_param(name: str, change) -> dict:
    """A copy of PARAMS with params[name] replaced by change(params[name])."""
    return {**PARAMS, name: change(PARAMS[name].copy())}


def poisoned(value: float):
    def change(array):
        array.flat[3] = value
        return array
    return change


CLI_SETTINGS = train.TRAIN_PRESETS["tiny"]  # what `python -m tfcourse.train` trains
SHORT = train.TrainSettings(steps=2)  # the in-process cases' settings


def train_checkpoint(folder: Path, params: dict | None = None, settings=CLI_SETTINGS,
                     step: int = 1, name: str = "ckpt") -> str:
    """A checkpoint folder as train_lm writes it after `step` steps of `settings`,
    optionally with other params."""
    params = PARAMS if params is None else params
    fresh_state = optim.adamw_init({k: np.zeros_like(v) for k, v in params.items()})
    manifest = train.checkpoint_manifest(step, [3.0], TINY, settings, {"program": "test"}, [])
    train.save_whole(str(folder / name), params, fresh_state, manifest, keep=5)
    return str(folder / name)


def foreign_checkpoint(folder: Path) -> str:
    """A folder that looks like a checkpoint but was written by another format version."""
    step = checkpoint.step_folder(folder / "other", 1)
    step.mkdir(parents=True)
    (step / checkpoint.MANIFEST).write_text('{"format": 1, "step": 1}')
    return str(folder / "other")


def nan_checkpoint(folder: Path, settings=CLI_SETTINGS) -> str:
    return train_checkpoint(folder, with_param("blocks.1.ffn.w2", poisoned(np.nan)), settings)


def float32_checkpoint(folder: Path, settings=CLI_SETTINGS) -> str:
    return train_checkpoint(folder, {k: v.astype(np.float32) for k, v in PARAMS.items()},
                            settings)


def corrupt_checkpoint(folder: Path) -> str:
    """A checkpoint folder whose newest manifest is not JSON."""
    step = checkpoint.step_folder(folder / "bad", 1)
    step.mkdir(parents=True)
    (step / checkpoint.MANIFEST).write_bytes(b"\x00 not json")
    return str(folder / "bad")


def corrupt_file(folder: Path, name: str = "bad.npz") -> str:
    path = folder / name
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    return str(path)


def text_file(folder: Path, text: str, name: str = "book.txt") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in; root ignores permissions, so use /sys then."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder available (root, and /sys is writable)")


def zero_width_mha_params() -> dict:
    """Multi-head attention parameters of width d_model = 0 (every array empty)."""
    return {name: np.zeros((0, 0) if name.startswith("w_") else (0,))
            for name in attention.MHA_PARAM_NAMES}


def assert_not_from_numpy(info: pytest.ExceptionInfo) -> None:
    """The error must be raised by tfcourse's own checks, not deep inside NumPy."""
    raised_in = str(info.traceback[-1].path)
    assert "tfcourse" in raised_in and "numpy" not in raised_in, raised_in


# --------------------------------------------------------------------------- in-process API


def case(case_id: str, match: str, call):
    return pytest.param(call, match, id=case_id)


IN_PROCESS = [
    # model: tokens (ints by construction, so wrong dtype / shape / range)
    case("forward-float-token-ids", r"tokens: expected integer token ids, got dtype float64",
         lambda tmp: model.forward(PARAMS, TOKENS.astype(float), TINY)),
    case("forward-1d-tokens", r"tokens: expected a non-empty \(B, T\) array, got shape \(8,\)",
         lambda tmp: model.forward(PARAMS, TOKENS[0], TINY)),
    case("forward-empty-batch", r"tokens: expected a non-empty \(B, T\) array",
         lambda tmp: model.forward(PARAMS, TOKENS[:0], TINY)),
    case("forward-id-out-of-vocab", rf"tokens: expected ids in \[0, {TINY.vocab_size}\)",
         lambda tmp: model.forward(PARAMS, TOKENS + TINY.vocab_size, TINY)),
    case("forward-negative-id", r"tokens: expected ids in \[0, \d+\).*got -1",
         lambda tmp: model.forward(PARAMS, TOKENS - 1, TINY)),
    case("forward-too-long", r"tokens: sequence length 33 exceeds max_len=32",
         lambda tmp: model.forward(PARAMS, np.zeros((1, 33), dtype=np.int64), TINY)),
    case("loss-targets-wrong-shape", r"targets: expected shape \(2, 8\) \(of tokens\)",
         lambda tmp: model.loss_and_grads(PARAMS, TOKENS, TOKENS[:, :4], TINY)),
    case("loss-float-targets", r"targets: expected integer token ids",
         lambda tmp: model.loss_and_grads(PARAMS, TOKENS, TOKENS.astype(np.float32), TINY)),
    # model: parameters (dtype, shape, names, NaN/inf)
    case("forward-int-params", r"params\['tok_emb'\]: expected dtype float64 \(config.dtype\)",
         lambda tmp: model.forward({k: v.astype(np.int64) for k, v in PARAMS.items()},
                                   TOKENS, TINY)),
    case("forward-float32-params-float64-config", r"expected dtype float64.*got float32",
         lambda tmp: model.forward({k: v.astype(np.float32) for k, v in PARAMS.items()},
                                   TOKENS, TINY)),
    case("forward-nan-in-params", r"params\['blocks.0.attn.w_q'\]: expected finite values",
         lambda tmp: model.forward(with_param("blocks.0.attn.w_q", poisoned(np.nan)),
                                   TOKENS, TINY)),
    case("loss-inf-in-params", r"params\['head.b'\]: expected finite values, got inf",
         lambda tmp: model.loss_and_grads(with_param("head.b", poisoned(np.inf)), TOKENS,
                                          TOKENS, TINY)),
    case("forward-missing-param", r"params: missing \['head.b'\]",
         lambda tmp: model.forward({k: v for k, v in PARAMS.items() if k != "head.b"},
                                   TOKENS, TINY)),
    case("forward-wrong-param-shape", r"params\['tok_emb'\]: expected shape \(\d+, 32\)",
         lambda tmp: model.forward(with_param("tok_emb", lambda a: a[:, :16]), TOKENS, TINY)),
    case("generate-negative-temperature", r"temperature: expected >= 0",
         lambda tmp: model.generate(PARAMS, [1, 2], 3, TINY, temperature=-1.0)),
    case("generate-nan-temperature", r"temperature: expected a finite real number",
         lambda tmp: model.generate(PARAMS, [1, 2], 3, TINY, temperature=float("nan"))),
    case("generate-negative-n-new", r"n_new: expected a non-negative integer, got -2",
         lambda tmp: model.generate(PARAMS, [1, 2], -2, TINY)),
    case("generate-float-prompt", r"prompt: expected integer token ids",
         lambda tmp: model.generate(PARAMS, [1.5, 2.0], 3, TINY)),
    case("generate-empty-prompt", r"prompt: expected a non-empty",
         lambda tmp: model.generate(PARAMS, np.array([], dtype=np.int64), 3, TINY)),
    # model: configuration (zero / negative / non-dividing sizes, unknown names)
    case("config-zero-heads", r"n_heads: expected a positive integer, got 0",
         lambda tmp: model.TransformerConfig(vocab_size=10, n_heads=0)),
    case("config-zero-d-model", r"d_model: expected a positive integer, got 0",
         lambda tmp: model.TransformerConfig(vocab_size=10, d_model=0)),
    case("config-heads-do-not-divide", r"d_model: expected a multiple of n_heads=4, got 30",
         lambda tmp: model.TransformerConfig(vocab_size=10, d_model=30)),
    case("config-negative-max-len", r"max_len: expected a positive integer, got -1",
         lambda tmp: model.TransformerConfig(vocab_size=10, max_len=-1)),
    case("config-float-layers", r"n_layers: expected a positive integer, got 2.0",
         lambda tmp: model.TransformerConfig(vocab_size=10, n_layers=2.0)),
    case("config-unknown-dtype", r"dtype: expected one of \('float32', 'float64'\)",
         lambda tmp: model.TransformerConfig(vocab_size=10, dtype="float16")),
    case("config-unknown-preset",
         r"config: expected one of \['medium', 'small', 'tiny'\], got 'huge'",
         lambda tmp: model.preset("huge", 10)),
    # issue 17: a NaN init_std made NaN weights, later blamed on "training diverged"
    case("config-nan-init-std", r"init_std: expected a positive finite number, got nan",
         lambda tmp: model.TransformerConfig(vocab_size=10, init_std=float("nan"))),
    case("config-zero-init-std", r"init_std: expected a positive finite number, got 0",
         lambda tmp: model.TransformerConfig(vocab_size=10, init_std=0)),
    case("config-str-init-std", r"init_std: expected a positive finite number, got '0.02'",
         lambda tmp: model.TransformerConfig(vocab_size=10, init_std="0.02")),
    case("seq2seq-config-inf-init-std", r"init_std: expected a positive finite number, got inf",
         lambda tmp: seq2seq.Seq2SeqConfig(vocab_size=10, init_std=float("inf"))),
    # issue 17: init_params(cfg, 1.5) failed deep inside NumPy's SeedSequence
    case("init-params-float-seed", r"seed: expected a non-negative integer, got 1.5",
         lambda tmp: model.init_params(TINY, 1.5)),
    case("init-params-negative-seed", r"seed: expected a non-negative integer, got -1",
         lambda tmp: model.init_params(TINY, -1)),
    case("init-params-none-seed", r"seed: expected a non-negative integer, got None",
         lambda tmp: model.init_params(TINY, None)),
    # training settings and train_lm (incl. --resume problems)
    case("settings-zero-steps", r"steps: expected a positive integer, got 0",
         lambda tmp: train.TrainSettings(steps=0)),
    case("settings-negative-batch", r"batch_size: expected a positive integer, got -3",
         lambda tmp: train.TrainSettings(batch_size=-3)),
    case("settings-zero-seq-len", r"seq_len: expected a positive integer, got 0",
         lambda tmp: train.TrainSettings(seq_len=0)),
    case("settings-nan-lr", r"lr: expected a positive finite number, got nan",
         lambda tmp: train.TrainSettings(lr=float("nan"))),
    case("settings-negative-seed", r"seed: expected a non-negative integer, got -1",
         lambda tmp: train.TrainSettings(seed=-1)),
    case("train-seq-len-over-max-len", r"seq_len: expected at most max_len=32, got 64",
         lambda tmp: train.train_lm(TINY, CORPUS, train.TrainSettings(steps=1, seq_len=64),
                                    progress="none")),
    case("train-resume-missing", r"--resume: no checkpoint folder at '.*nope'",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, resume_from=str(tmp / "nope"),
                                    progress="none")),
    case("train-resume-corrupt", r"--resume: '.*bad/step-00000001' has an unreadable "
         r"MANIFEST.json",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, resume_from=corrupt_checkpoint(tmp),
                                    progress="none")),
    case("train-resume-nan", r"--resume: .* NaN or infinite values in parameter "
         r"'blocks.1.ffn.w2'",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, progress="none",
                                    resume_from=nan_checkpoint(tmp, SHORT))),
    case("train-resume-other-dtype", r"--resume: .*param/tok_emb is float32 in the shard, "
         r"float64 in the manifest",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, progress="none",
                                    resume_from=float32_checkpoint(tmp, SHORT))),
    case("train-resume-foreign", r"--resume: '.*other/step-00000001' has checkpoint format 1, "
         r"expected 2",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, resume_from=foreign_checkpoint(tmp),
                                    progress="none")),
    case("train-resume-bad-step", r"--resume: .* has step -3 in its manifest, expected an "
         r"integer >= 0",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, progress="none",
                                    resume_from=train_checkpoint(tmp, settings=SHORT, step=-3))),
    case("train-resume-past-steps", r"--resume: the checkpoint .* is at step 5, the run's "
         r"last: there is nothing left to train",
         lambda tmp: train.train_lm(TINY, CORPUS, SHORT, progress="none",
                                    resume_from=train_checkpoint(tmp, settings=SHORT, step=5))),
    case("train-resume-changed-lr", r"--resume: this run changes the checkpoint's settings "
         r"\(lr 0.003 -> 0.5\)",
         lambda tmp: train.train_lm(TINY, CORPUS, dataclasses.replace(SHORT, lr=0.5),
                                    progress="none",
                                    resume_from=train_checkpoint(tmp, settings=SHORT))),
    # attention (NaN/inf in activations, shapes, dtypes)
    case("softmax-nan", r"x: expected finite values or -inf, got nan at index \(0, 1\)",
         lambda tmp: attention.softmax(np.array([[0.0, np.nan]]))),
    case("softmax-strings", r"x: expected a real numeric array, got dtype <U1",
         lambda tmp: attention.softmax(np.array(["a", "b"]))),
    case("sdpa-nan-query", r"q: expected finite values, got nan",
         lambda tmp: attention.sdpa_forward(np.full((1, 2, 4), np.nan), np.ones((1, 3, 4)),
                                            np.ones((1, 3, 4)))),
    case("sdpa-key-width", r"k: expected last dim 4 \(d_k of q\), got shape \(1, 3, 5\)",
         lambda tmp: attention.sdpa_forward(np.ones((1, 2, 4)), np.ones((1, 3, 5)),
                                            np.ones((1, 3, 4)))),
    case("sdpa-int-mask", r"mask: expected a bool array",
         lambda tmp: attention.sdpa_forward(np.ones((2, 4)), np.ones((3, 4)), np.ones((3, 4)),
                                            mask=np.ones((2, 3), dtype=int))),
    case("mha-inf-activations", r"x_q: expected finite values, got inf",
         lambda tmp: attention.mha_forward(
             np.full((1, 2, 8), np.inf), np.ones((1, 2, 8)),
             attention.init_mha_params(8, 2, np.random.default_rng(0)), 2)),
    case("mha-zero-heads", r"n_heads: expected a positive integer, got 0",
         lambda tmp: attention.mha_forward(
             np.ones((1, 2, 8)), np.ones((1, 2, 8)),
             attention.init_mha_params(8, 2, np.random.default_rng(0)), 0)),
    case("causal-mask-zero", r"n: expected a positive integer, got 0",
         lambda tmp: attention.causal_mask(0)),
    # issue 17: empty axes and d_k = 0 gave NumPy reduction errors or ZeroDivisionError
    case("softmax-empty", r"x: expected at least one entry along axis -1, got shape \(0,\)",
         lambda tmp: attention.softmax(np.zeros(0))),
    case("softmax-empty-axis-0", r"x: expected at least one entry along axis 0, got shape "
         r"\(0, 3\)", lambda tmp: attention.softmax(np.zeros((0, 3)), axis=0)),
    case("softmax-axis-out-of-range", r"axis: expected an axis of x \(an integer in "
         r"\[-1, 1\)\), got 1 for shape \(3,\)",
         lambda tmp: attention.softmax(np.zeros(3), axis=1)),
    case("sdpa-zero-length-sequence", r"q: expected at least one query position along axis "
         r"-2, got shape \(0, 4\)",
         lambda tmp: attention.scaled_dot_product_attention(np.ones((0, 4)), np.ones((0, 4)),
                                                            np.ones((0, 4)))),
    case("sdpa-zero-keys", r"k: expected at least one key position along axis -2, got shape "
         r"\(1, 0, 4\)",
         lambda tmp: attention.sdpa_forward(np.ones((1, 2, 4)), np.ones((1, 0, 4)),
                                            np.ones((1, 0, 4)))),
    case("sdpa-zero-d-k", r"q: expected at least one feature \(d_k\) along axis -1, got "
         r"shape \(3, 0\)",
         lambda tmp: attention.scaled_dot_product_attention(np.ones((3, 0)), np.ones((3, 0)),
                                                            np.ones((3, 2)))),
    case("mha-zero-length-sequence", r"x_q: expected at least one query position along axis "
         r"1, got shape \(1, 0, 8\)",
         lambda tmp: attention.mha_forward(
             np.ones((1, 0, 8)), np.ones((1, 0, 8)),
             attention.init_mha_params(8, 2, np.random.default_rng(0)), 2)),
    case("mha-zero-length-memory", r"x_kv: expected at least one key position along axis 1",
         lambda tmp: attention.mha_forward(
             np.ones((1, 2, 8)), np.ones((1, 0, 8)),
             attention.init_mha_params(8, 2, np.random.default_rng(0)), 2)),
    case("mha-zero-d-model", r"w_q: expected at least one row \(d_model\) along axis 0, got "
         r"shape \(0, 0\)",
         lambda tmp: attention.mha_forward(np.ones((1, 2, 0)), np.ones((1, 2, 0)),
                                           zero_width_mha_params(), 2)),
    # data
    case("lm-batch-zero-seq-len", r"seq_len: expected a positive integer, got 0",
         lambda tmp: data.lm_batch(CORPUS.ids, 2, 0, 0, 0)),
    case("lm-batch-zero-batch", r"batch_size: expected a positive integer, got 0",
         lambda tmp: data.lm_batch(CORPUS.ids, 0, 8, 0, 0)),
    case("lm-batch-float-ids", r"ids: expected integers, got dtype float64",
         lambda tmp: data.lm_batch(CORPUS.ids.astype(float), 2, 8, 0, 0)),
    case("corpus-empty-text", r"text: expected a non-empty string, got ''",
         lambda tmp: data.CharCorpus.from_text("")),
    case("corpus-missing-file", r"path: no text file at '.*missing.txt'",
         lambda tmp: data.CharCorpus.from_file(tmp / "missing.txt")),
    # optimiser, checkpoints, files, launcher
    case("clip-zero-max-norm", r"max_norm: expected a positive finite number, got 0",
         lambda tmp: optim.clip_grad_norm({"w": np.ones(3)}, 0)),
    case("adamw-grads-missing-key", r"grads: expected the names of params, got missing",
         lambda tmp: optim.adamw_step(PARAMS, {}, optim.adamw_init(PARAMS), 1e-3)),
    case("checkpoint-missing", r"path: no checkpoint file at",
         lambda tmp: checkpoint.load_checkpoint(tmp / "nope.npz")),
    case("checkpoint-corrupt", r"path: '.*bad.npz' is truncated or corrupt",
         lambda tmp: checkpoint.load_checkpoint(corrupt_file(tmp))),
    case("json-nan", r"obj: expected finite numbers only",
         lambda tmp: files.write_json_atomic(tmp / "r.json", {"loss": float("nan")})),
    case("json-missing-folder", r"path: folder '.*missing' does not exist",
         lambda tmp: files.write_json_atomic(tmp / "missing" / "r.json", {})),
    case("json-path-is-a-folder", r"--json: expected a file path, got the folder",
         lambda tmp: files.check_writable("--json", tmp)),
    case("run-mpi-zero-ranks", r"n_ranks: expected a positive integer, got 0",
         lambda tmp: run_mpi("tfcourse.hello", n_ranks=0)),
    case("run-mpi-zero-timeout", r"timeout: expected a positive number of seconds, got 0",
         lambda tmp: run_mpi("tfcourse.hello", n_ranks=1, timeout=0)),
    # partitioning for the parallel chapters (world sizes that do not divide)
    case("tp-heads-not-divisible", r"world_size: 3 ranks cannot split n_heads=4 evenly",
         lambda tmp: tensor.check_world_size(TINY, 3)),
    case("pp-fewer-layers-than-ranks", r"n_layers: expected at least world_size=3 blocks",
         lambda tmp: pipeline.stage_layers(2, 3)),
    case("pp-zero-microbatches", r"microbatches: expected a positive integer, got 0",
         lambda tmp: pipeline.microbatch_rows(16, 0)),
    case("pp-interleaved-uneven-chunks", r"n_layers: .*expected a multiple of 6, got 8",
         lambda tmp: pipeline.chunk_layers(8, 3, 2)),
    case("pp-interleaved-microbatches", r"microbatches: .*expected a multiple of 4, got 6",
         lambda tmp: pipeline.schedule("interleaved", 4, 0, 6, 2)),
    case("pp-virtual-stages-for-zb-h1", r"virtual_stages: .*got 2 for 'zb-h1'",
         lambda tmp: costmodel.pipeline_bubble_fraction(4, 8, "zb-h1", 2)),
    case("sp-sequence-shorter-than-ranks", r"seq_len: expected at least world_size=4",
         lambda tmp: sequence.sequence_chunks(3, 4)),
    case("dp-batch-smaller-than-ranks", r"batch_size: expected at least world_size=4 rows",
         lambda tmp: batches.batch_rows(3, 0, 4)),
    # issue 17: a NaN timing made the run-time choice depend on the dict's key order
    case("choose-fastest-nan-first", r"measured\[1\]\[0\]: expected a finite real number, "
         r"got nan", lambda tmp: pipeline.choose_fastest({1: [float("nan")], 2: [1.0]})),
    case("choose-fastest-nan-last", r"measured\[1\]\[0\]: expected a finite real number, "
         r"got nan", lambda tmp: pipeline.choose_fastest({2: [1.0], 1: [float("nan")]})),
    # cost model and planner (issue 17: -0.33 bubbles, divisions by zero, 1.5 micro-batches)
    case("bubble-zero-stages", r"p: expected a positive integer, got 0",
         lambda tmp: costmodel.pipeline_bubble_fraction(0, 4)),
    case("bubble-zero-microbatches", r"m: expected a positive integer, got 0",
         lambda tmp: costmodel.pipeline_bubble_fraction(4, 0)),
    case("bubble-float-microbatches", r"m: expected a positive integer, got 2.5",
         lambda tmp: costmodel.pipeline_bubble_fraction(4, 2.5)),
    case("ring-allreduce-zero-ranks", r"p: expected a positive integer, got 0",
         lambda tmp: costmodel.ring_allreduce_time(1e6, 0, 1e-5, 1e-9)),
    case("ring-allreduce-negative-bytes", r"n_bytes: expected a non-negative finite number, "
         r"got -1.0", lambda tmp: costmodel.ring_allreduce_time(-1.0, 4, 1e-5, 1e-9)),
    case("ring-allreduce-negative-alpha", r"alpha: expected a non-negative finite number, "
         r"got -1e-05", lambda tmp: costmodel.ring_allreduce_time(1e6, 4, -1e-5, 1e-9)),
    case("ring-allreduce-nan-beta", r"beta: expected a non-negative finite number, got nan",
         lambda tmp: costmodel.ring_allreduce_time(1e6, 4, 1e-5, float("nan"))),
    case("allreduce-bytes-zero-ranks", r"p: expected a positive integer, got 0",
         lambda tmp: costmodel.allreduce_bytes(1e6, 0)),
    case("plan-float-microbatches", r"microbatches: expected a positive integer, got 1.5",
         lambda tmp: planner.Plan(8, 8, 16, 1.5)),
    case("plan-zero-microbatches", r"microbatches: expected a positive integer, got 0",
         lambda tmp: planner.Plan(1, 1, 1, 0)),
    case("plan-float-dp", r"dp: expected a positive integer, got 2.0",
         lambda tmp: planner.Plan(2.0, 1, 1, 1)),
    case("plan-zero-stage-4", r"zero: expected a ZeRO stage 0, 1, 2 or 3, got 4",
         lambda tmp: planner.Plan(2, 1, 1, 1, zero=4)),
    case("validate-against-zero-measured", r"measured_step_s\['a'\]: expected a positive "
         r"finite number, got 0", lambda tmp: planner.validate_against({"a": 0}, {"a": 1})),
    case("validate-against-nan-measured", r"measured_step_s\['a'\]: expected a positive "
         r"finite number, got nan",
         lambda tmp: planner.validate_against({"a": float("nan")}, {"a": 1})),
]


@pytest.mark.parametrize("call, match", IN_PROCESS)
def test_in_process_bad_input_is_a_named_value_error(call, match, tmp_path, request):
    TRIED.add(request.node.callspec.id)
    with pytest.raises(ValueError, match=match) as info:
        call(tmp_path)
    assert_not_from_numpy(info)


# ------------------------------------------------------------------ python -m tfcourse.train


def train_case(case_id: str, args, match: str, json: str = "out"):
    """args: a list, or a function of the case's folder returning the list. json: where
    --json points, relative to the case folder ("out": an existing, empty folder)."""
    return pytest.param(args, match, json, id=case_id)


TRAIN_CASES = [
    train_case("steps-zero", ["--steps", "0"], r"--steps: expected a positive integer, got 0"),
    train_case("steps-negative", ["--steps", "-5"], r"--steps: expected a positive integer"),
    train_case("batch-size-zero", ["--batch-size", "0"], r"--batch-size: expected a positive"),
    train_case("seq-len-zero", ["--seq-len", "0"], r"--seq-len: expected a positive integer"),
    train_case("seq-len-over-max-len", ["--seq-len", "64"],
               r"seq_len: expected at most max_len=32, got 64"),
    train_case("lr-zero", ["--lr", "0"], r"--lr: expected a positive finite number, got 0"),
    train_case("lr-nan", ["--lr", "nan"], r"--lr: expected a positive finite number, got nan"),
    train_case("seed-negative", ["--seed", "-1"], r"--seed: expected a non-negative integer"),
    train_case("unknown-config", ["--config", "huge"], r"config: expected one of"),
    train_case("unknown-recompute", ["--recompute", "half"],
               r"--recompute: expected one of \['none', 'selective', 'full'\], got 'half'"),
    train_case("unknown-dtype", ["--dtype", "float16"], r"argument --dtype: invalid choice"),
    train_case("steps-not-a-number", ["--steps", "ten"], r"argument --steps: invalid int"),
    train_case("checkpoint-every-negative", ["--checkpoint-every", "-1"],
               r"--checkpoint-every: expected a non-negative integer, got -1"),
    train_case("checkpoint-missing-folder",
               lambda d: ["--checkpoint", str(d / "missing" / "ck"), "--checkpoint-every",
                          "1"], r"--checkpoint: folder '.*missing' does not exist"),
    train_case("checkpoint-is-a-file", lambda d: ["--checkpoint", text_file(d, "mine")],
               r"--checkpoint: expected a folder for checkpoints, got the file"),
    train_case("checkpoint-keep-zero", ["--keep", "0"], r"--keep: expected a positive integer"),
    train_case("checkpoint-name-too-long", lambda d: ["--checkpoint", str(d / ("c" * 300))],
               r"--checkpoint: expected names of at most \d+ bytes"),
    train_case("batch-size-huge", ["--batch-size", "1000000000"],
               r"batch_size: a step of 1000000000 x 32 tokens needs at least .* GiB for its "
               r"logits alone, more than this machine's"),
    train_case("checkpoint-of-another-run", lambda d: ["--checkpoint", train_checkpoint(d)],
               r"--checkpoint: .* holds another run's checkpoints"),
    train_case("resume-missing", lambda d: ["--resume", str(d / "nope")],
               r"--resume: no checkpoint folder at"),
    train_case("resume-corrupt", lambda d: ["--resume", corrupt_checkpoint(d)],
               r"--resume: .* has an unreadable MANIFEST.json"),
    train_case("resume-nan-checkpoint", lambda d: ["--resume", nan_checkpoint(d)],
               r"--resume: .* NaN or infinite values in parameter 'blocks.1.ffn.w2'"),
    train_case("resume-other-model", lambda d: ["--resume", float32_checkpoint(d)],
               r"--resume: .*param/tok_emb is float32 in the shard, float64 in the manifest"),
    train_case("resume-other-seed", lambda d: ["--resume", train_checkpoint(d), "--seed", "4"],
               r"--resume: this run changes the checkpoint's settings \(seed 0 -> 4\)"),
    train_case("text-missing", lambda d: ["--text", str(d / "missing.txt")],
               r"path: no text file at '.*missing.txt'"),
    train_case("text-empty", lambda d: ["--text", text_file(d, "")], r"path: '.*' is empty"),
    train_case("staleness-negative", lambda d: ["--staleness", "-2"],
               r"--staleness: expected a non-negative integer, got -2"),
    train_case("eval-every-negative", lambda d: ["--eval-every", "-1"],
               r"--eval-every: expected a positive integer, got -1"),
    train_case("held-out-fraction-one", lambda d: ["--eval-every", "5",
                                                    "--held-out-fraction", "1"],
               r"--held-out-fraction: expected a fraction in \(0, 1\), got 1"),
    train_case("held-out-fraction-too-small", lambda d: ["--eval-every", "5",
                                                          "--held-out-fraction", "0.01"],
               r"--held-out-fraction: expected both parts of the 856 characters to hold "
               r"seq_len \+ 1 = 33, got 847 and 9 with 0.01"),
    train_case("corpus-unknown", lambda d: ["--corpus", "wiki"],
               r"--corpus: expected one of \['zen', 'markov'\], got 'wiki'"),
    train_case("corpus-and-text", lambda d: ["--corpus", "markov", "--text", text_file(d, "ab")],
               r"--corpus: expected either --text or --corpus, got --text '.*' and --corpus "
               r"'markov'"),
    train_case("text-shorter-than-window", lambda d: ["--text", text_file(d, "abc")],
               r"--text: expected at least seq_len \+ 1 = 33 characters.*got 3"),
    train_case("json-missing-folder", [], r"--json: folder '.*missing' does not exist",
               json="missing/result.json"),
    train_case("json-is-a-folder", [], r"--json: expected a file path, got the folder",
               json="."),
    train_case("json-unwritable-folder", [], r"--json: folder '.*' is not writable",
               json="UNWRITABLE"),
    # issue 17: a 300-character file name was an OSError 36 traceback (name too long)
    train_case("json-name-too-long", [], r"--json: expected names of at most \d+ bytes.* got "
               r"a name of 305 bytes", json="a" * 300 + ".json"),
]


def json_target(folder: Path, json: str, tmp_path: Path) -> Path:
    if json == "UNWRITABLE":
        return unwritable_folder(tmp_path) / "result.json"
    return folder / json if json != "out" else folder / "out" / "result.json"


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_nothing_written(json_path: Path, before: list[str]) -> None:
    """No result, no leftover temporary file: the folder is exactly as it was."""
    if os.path.isdir(json_path):  # --json pointed at a folder: it must be untouched
        assert entries(json_path) == before
        return
    assert not os.path.lexists(json_path)
    assert entries(json_path.parent) == before, "a temporary or partial file was left"


def command_line_case(kind: str, request, args, json, tmp_path):
    """(case id, arguments, --json path, what its folder held before) of a command-line
    case; the case is counted as tried."""
    case_id = request.node.callspec.id
    TRIED.add(f"{kind}/{case_id}")
    (tmp_path / "out").mkdir()
    args = args(tmp_path) if callable(args) else args
    json_path = json_target(tmp_path, json, tmp_path)
    target_folder = json_path if os.path.isdir(json_path) else json_path.parent
    return case_id, args, json_path, entries(target_folder)


@pytest.mark.parametrize("args, match, json", TRAIN_CASES)
def test_train_cli_bad_input_is_a_clean_error(args, match, json, tmp_path, request):
    case_id, args, json_path, before = command_line_case("train", request, args, json, tmp_path)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tfcourse.train", "--progress", "none", *args,
         "--json", str(json_path)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )
    TIMINGS[f"train/{case_id}"] = elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(match, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < FAST, f"took {elapsed:.1f} s: the check must come before training"
    assert_nothing_written(json_path, before)


# --------------------------------------------------------------------------- the MPI programs

DP = "tfcourse.parallel.data_parallel"
TP = "tfcourse.parallel.tensor_parallel"
PP = "tfcourse.parallel.pipeline_parallel"
SP = "tfcourse.parallel.sequence_parallel"
HYBRID = "tfcourse.parallel.hybrid"
EP = "tfcourse.parallel.expert_parallel"
TASKS = "tfcourse.parallel.task_parallel"
COMM = "tfcourse.parallel.comm"
HELLO = "tfcourse.hello"


def mpi_case(case_id: str, module: str, n_ranks: int, args, match: str, json: str = "out"):
    return pytest.param(module, n_ranks, args, match, json, id=case_id)


MPI_CASES = [
    # data parallel
    mpi_case("dp-steps-zero", DP, 2, ["--steps", "0"], r"--steps: expected a positive integer"),
    mpi_case("dp-batch-size-zero", DP, 2, ["--batch-size", "0"],
             r"--batch-size: expected a positive integer, got 0"),
    mpi_case("dp-batch-smaller-than-world", DP, 3, ["--steps", "2", "--batch-size", "2"],
             r"batch_size: expected at least world_size=3 rows"),
    mpi_case("dp-seq-len-zero", DP, 2, ["--seq-len", "0"], r"--seq-len: expected a positive"),
    mpi_case("dp-seq-len-over-max-len", DP, 2, ["--steps", "2", "--seq-len", "64"],
             r"seq_len: expected at most max_len=32, got 64"),
    mpi_case("dp-threads-zero", DP, 2, ["--steps", "2", "--threads", "0"],
             r"--threads: expected a positive integer, got 0"),
    mpi_case("dp-bucket-mb-zero", DP, 2, ["--steps", "2", "--bucket-mb", "0"],
             r"--bucket-mb: expected a positive finite number"),
    mpi_case("dp-lr-negative", DP, 2, ["--steps", "2", "--lr", "-1"], r"--lr: expected a posit"),
    mpi_case("dp-unknown-zero-stage", DP, 2, ["--zero", "4"], r"argument --zero: invalid choice"),
    mpi_case("dp-unknown-allreduce", DP, 2, ["--allreduce", "tree"],
             r"argument --allreduce: invalid choice: 'tree'"),
    mpi_case("dp-zero-3-with-the-ring", DP, 2, ["--zero", "3", "--allreduce", "ring"],
             r"--allreduce: ZeRO-3 all-reduces nothing .* expected the default 'mpi', got 'ring'"),
    mpi_case("dp-unknown-config", DP, 2, ["--config", "huge"],
             r"config: expected one of \['medium', 'small', 'tiny'\], got 'huge'"),
    mpi_case("dp-eval-every-negative", DP, 2, ["--eval-every", "-3"],
             r"--eval-every: expected a positive integer, got -3"),
    mpi_case("dp-corpus-unknown", DP, 2, ["--corpus", "wiki"],
             r"--corpus: expected one of \['zen', 'markov'\], got 'wiki'"),
    mpi_case("dp-text-missing", DP, 2, lambda d: ["--text", str(d / "missing.txt")],
             r"path: no text file at"),
    mpi_case("dp-json-missing-folder", DP, 2, ["--steps", "1000"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    mpi_case("dp-json-unwritable-folder", DP, 2, ["--steps", "1000"],
             r"--json: folder '.*' is not writable", json="UNWRITABLE"),
    # tensor parallel
    mpi_case("tp-heads-not-divisible", TP, 3, ["--steps", "2"],
             r"world_size: 3 ranks cannot split n_heads=4 evenly"),
    mpi_case("tp-steps-zero", TP, 2, ["--steps", "0"], r"--steps: expected a positive integer"),
    mpi_case("tp-sequence-parallel-uneven-sequence", TP, 4,
             ["--sequence-parallel", "--seq-len", "30"],
             r"--sequence-parallel: --seq-len must split evenly over the 4 rank\(s\), got 30"),
    mpi_case("tp-unknown-recompute", TP, 2, ["--recompute", "some"],
             r"--recompute: expected one of \['none', 'selective', 'full'\], got 'some'"),
    mpi_case("tp-batch-size-negative", TP, 2, ["--batch-size", "-2"], r"--batch-size: expect"),
    mpi_case("tp-threads-zero", TP, 2, ["--steps", "2", "--threads", "0"], r"--threads: exp"),
    mpi_case("tp-json-missing-folder", TP, 2, ["--steps", "1000"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    # hybrid (chapter 12)
    mpi_case("hybrid-grid-not-world-size", HYBRID, 2, ["--dp", "2", "--pp", "2"],
             r"--dp/--pp/--tp: expected dp \* pp \* tp = the 2 MPI rank\(s\), got 2 \* 2 \* 1"),
    mpi_case("hybrid-3d-grid-not-world-size", HYBRID, 4, ["--dp", "2", "--pp", "2", "--tp", "2"],
             r"--dp/--pp/--tp: expected dp \* pp \* tp = the 4 MPI rank\(s\), got 2 \* 2 \* 2"),
    mpi_case("hybrid-tp-not-dividing-heads", HYBRID, 3, ["--pp", "1", "--tp", "3"],
             r"3 ranks cannot split n_heads=4"),
    mpi_case("hybrid-dp-zero", HYBRID, 2, ["--dp", "0"], r"--dp: expected a positive integer"),
    mpi_case("hybrid-sequence-parallel-without-tp", HYBRID, 2, ["--dp", "2", "--sequence-parallel"],
             r"--sequence-parallel: splits the sequence inside a tensor-parallel group, so it "
             r"needs --tp > 1"),
    mpi_case("hybrid-sequence-parallel-uneven-sequence", HYBRID, 4,
             ["--pp", "2", "--tp", "2", "--sequence-parallel", "--seq-len", "31"],
             r"--sequence-parallel: --seq-len must split evenly over --tp 2, got 31"),
    mpi_case("hybrid-interleaved", HYBRID, 4, ["--pp", "2", "--tp", "2", "--schedule",
                                               "interleaved"],
             r"argument --schedule: invalid choice: 'interleaved'"),
    mpi_case("hybrid-replica-rows-fewer-than-microbatches", HYBRID, 4,
             ["--dp", "2", "--pp", "2", "--layers", "2", "--batch-size", "4",
              "--microbatches", "4"], r"batch_size: expected at least microbatches=4 rows"),
    # pipeline parallel
    mpi_case("pp-fewer-layers-than-ranks", PP, 2, ["--steps", "2", "--layers", "1"],
             r"n_layers: expected at least world_size=2 blocks.*n_layers=1"),
    mpi_case("pp-layers-zero", PP, 2, ["--layers", "0"], r"--layers: expected a positive"),
    mpi_case("pp-microbatches-zero", PP, 2, ["--microbatches", "0"],
             r"--microbatches: expected a positive integer, got 0"),
    mpi_case("pp-more-microbatches-than-rows", PP, 2, ["--steps", "2", "--microbatches", "20"],
             r"batch_size: expected at least microbatches=20 rows"),
    mpi_case("pp-microbatches-not-a-number", PP, 2, ["--microbatches", "many"],
             r"--microbatches: expected a positive integer or 'auto', got 'many'"),
    mpi_case("pp-stage-layers-wrong-sum", PP, 2, ["--layers", "4", "--stage-layers", "2,1"],
             r"--stage-layers: expected 2 block counts \(one per stage\) adding up to "
             r"n_layers=4, got \[2, 1\]"),
    mpi_case("pp-stage-layers-zero", PP, 2, ["--layers", "4", "--stage-layers", "4,0"],
             r"--stage-layers: expected a positive integer, got 0"),
    mpi_case("pp-slowdown-wrong-count", PP, 2, ["--layers", "4", "--slowdown", "1,2,3"],
             r"--slowdown: expected 2 factors >= 1 \(one per rank\), got \[1.0, 2.0, 3.0\]"),
    mpi_case("pp-slowdown-below-one", PP, 2, ["--layers", "4", "--slowdown", "1,0.5"],
             r"--slowdown: expected 2 factors >= 1"),
    mpi_case("pp-unknown-schedule", PP, 2, ["--schedule", "zigzag"],
             r"argument --schedule: invalid choice: 'zigzag'"),
    mpi_case("pp-interleaved-one-virtual-stage", PP, 2,
             ["--schedule", "interleaved", "--virtual-stages", "1"],
             r"--schedule interleaved --virtual-stages 1 .*virtual_stages: expected 2 to 16 "
             r"for 'interleaved'.*got 1"),
    mpi_case("pp-virtual-stages-with-1f1b", PP, 2,
             ["--schedule", "1f1b", "--virtual-stages", "2"],
             r"--schedule 1f1b --virtual-stages 2 .*and 1 for the other schedules, got 2 for "
             r"'1f1b'"),
    mpi_case("pp-virtual-stages-zero", PP, 2, ["--schedule", "interleaved", "--virtual-stages",
                                               "0"], r"--virtual-stages: expected a positive"),
    mpi_case("pp-interleaved-layers-not-divisible", PP, 2,
             ["--schedule", "interleaved", "--virtual-stages", "2", "--layers", "6"],
             r"--layers 6 with --virtual-stages 2: .*2 stages x 2 virtual stages = 4 equal "
             r"chunks, expected a multiple of 4, got 6"),
    mpi_case("pp-interleaved-microbatches-not-multiple", PP, 3,
             ["--schedule", "interleaved", "--virtual-stages", "2", "--layers", "6",
              "--microbatches", "4"],
             r"--microbatches 4 on 3 stages: .*expected a multiple of 3, got 4"),
    mpi_case("pp-interleaved-auto-microbatches", PP, 2,
             ["--schedule", "interleaved", "--virtual-stages", "2", "--microbatches", "auto"],
             r"--schedule interleaved: expected a number of --microbatches"),
    mpi_case("pp-interleaved-stage-layers", PP, 2,
             ["--schedule", "interleaved", "--virtual-stages", "2", "--layers", "4",
              "--stage-layers", "3,1"],
             r"--schedule interleaved: expected .*no --stage-layers"),
    mpi_case("pp-steps-zero", PP, 2, ["--steps", "0"], r"--steps: expected a positive integer"),
    mpi_case("pp-seq-len-zero", PP, 2, ["--seq-len", "0"], r"--seq-len: expected a positive"),
    mpi_case("pp-json-missing-folder", PP, 2, ["--steps", "1000"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    # expert parallel
    mpi_case("ep-experts-not-divisible", EP, 3, ["--experts", "4"],
             r"--experts: .*expected a multiple of the 3 ranks, got 4"),
    mpi_case("ep-no-experts", EP, 2, [], r"--experts: expert parallelism trains a mixture of "
             r"experts, expected --experts E"),
    mpi_case("ep-top-k-without-experts", EP, 2, ["--top-k", "2"],
             r"--top-k: an option of the mixture of experts, expected with --experts E"),
    mpi_case("ep-top-k-over-experts", EP, 2, ["--experts", "2", "--top-k", "3"],
             r"--top-k: expected an integer in 1..2 \(--experts\), got 3"),
    mpi_case("ep-capacity-factor-zero", EP, 2, ["--experts", "2", "--capacity-factor", "0"],
             r"--capacity-factor: expected a positive"),
    mpi_case("ep-precision-bf16", EP, 2, ["--experts", "2", "--precision", "bf16"],
             r"--precision"),
    # sequence parallel
    mpi_case("sp-seq-len-zero", SP, 2, ["--seq-len", "0"], r"--seq-len: expected a positive"),
    mpi_case("sp-sequence-shorter-than-ranks", SP, 2, ["--seq-len", "1"],
             r"seq_len: expected at least world_size=2 positions.*seq_len=1"),
    mpi_case("sp-zigzag-needs-2p", SP, 2, ["--seq-len", "3", "--zigzag"],
             r"seq_len: expected at least 2 \* world_size=4 positions"),
    mpi_case("sp-heads-zero", SP, 2, ["--seq-len", "8", "--heads", "0"], r"--heads: expected"),
    mpi_case("sp-d-head-zero", SP, 2, ["--seq-len", "8", "--d-head", "0"], r"--d-head: exp"),
    mpi_case("sp-batch-negative", SP, 2, ["--seq-len", "8", "--batch", "-1"], r"--batch: exp"),
    mpi_case("sp-seq-len-missing", SP, 2, [], r"the following arguments are required: --seq-len"),
    mpi_case("sp-json-missing-folder", SP, 2, ["--seq-len", "8"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    # context-parallel training (sequence_parallel --train)
    mpi_case("cp-ulysses-ranks-not-dividing-heads", SP, 3, ["--train", "--method", "ulysses"],
             r"--method ulysses: splits the heads over the ranks, expected a number of ranks "
             r"dividing n_heads=4, got 3"),
    mpi_case("cp-ulysses-uneven-sequence", SP, 2,
             ["--train", "--method", "ulysses", "--seq-len", "31"],
             r"--seq-len: --method ulysses splits every sequence evenly over the 2 rank\(s\), "
             r"expected a multiple of 2, got 31"),
    mpi_case("cp-ring-sequence-not-in-2p-chunks", SP, 3, ["--train", "--method", "ring"],
             r"--seq-len: --method ring cuts every sequence into 2 x 3 equal zig-zag chunks, "
             r"expected a multiple of 6, got 32"),
    mpi_case("cp-ring-odd-sequence", SP, 2, ["--train", "--method", "ring", "--seq-len", "30"],
             r"expected a multiple of 4, got 30"),
    mpi_case("cp-unknown-method", SP, 2, ["--train", "--method", "tree"],
             r"argument --method: invalid choice: 'tree'"),
    # task parallel
    mpi_case("tasks-fail-task-out-of-range", TASKS, 2, ["--fail-task", "99"],
             r"--fail-task: expected a task id in \[0, 6\), got 99"),
    mpi_case("tasks-fail-task-negative", TASKS, 2, ["--fail-task", "-1"], r"--fail-task: exp"),
    mpi_case("tasks-steps-zero", TASKS, 2, ["--steps", "0"], r"--steps: expected a positive"),
    mpi_case("tasks-lrs-not-numbers", TASKS, 2, ["--lrs", "0.01,fast"],
             r"--lrs: expected comma-separated float values, got 'fast'"),
    mpi_case("tasks-lr-zero", TASKS, 2, ["--lrs", "0.01,0"], r"--lrs: expected a positive"),
    mpi_case("tasks-seed-negative", TASKS, 2, ["--seeds", "0,-1"], r"--seeds: expected a non"),
    mpi_case("tasks-cost-zero", TASKS, 2, ["--mode", "imbalance", "--costs", "3,0"],
             r"--costs: expected a positive integer, got 0"),
    mpi_case("tasks-unknown-mode", TASKS, 2, ["--mode", "map"], r"argument --mode: invalid"),
    mpi_case("tasks-static-graph", TASKS, 2, ["--mode", "graph", "--scheduler", "static"],
             r"--scheduler: 'static' cannot run a task graph"),
    mpi_case("tasks-json-missing-folder", TASKS, 2, ["--steps", "200"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    # comm, hello
    mpi_case("comm-repeats-zero", COMM, 2, ["--bench", "--repeats", "0"], r"--repeats: exp"),
    mpi_case("comm-max-bytes-tiny", COMM, 2, ["--bench", "--max-bytes", "10"],
             r"--max-bytes: expected at least 1024"),
    mpi_case("comm-no-mode", COMM, 2, [], r"one of the arguments --check --bench is required"),
    mpi_case("comm-json-missing-folder", COMM, 2, ["--check"],
             r"--json: folder '.*missing' does not exist", json="missing/result.json"),
    mpi_case("hello-raise-rank-out-of-range", HELLO, 2, ["--raise-on-rank", "7"],
             r"--raise-on-rank: expected a rank in \[0, 2\), got 7"),
    mpi_case("hello-kill-rank-negative", HELLO, 2, ["--kill-on-rank", "-1"],
             r"--kill-on-rank: expected a rank in \[0, 2\), got -1"),
    mpi_case("hello-json-is-a-folder", HELLO, 2, [], r"--json: expected a file path",
             json="."),
]


@pytest.mark.mpi
@pytest.mark.parametrize("module, n_ranks, args, match, json", MPI_CASES)
def test_mpi_program_bad_input_is_a_clean_error(module, n_ranks, args, match, json, tmp_path,
                                                request):
    case_id, args, json_path, before = command_line_case("mpi", request, args, json, tmp_path)
    start = time.perf_counter()
    with pytest.raises(MPIJobError) as info:
        run_mpi(module, [*args, "--json", str(json_path)], n_ranks=n_ranks,
                timeout=CLI_TIMEOUT, json_result=False)
    TIMINGS[f"mpi/{case_id}"] = elapsed = time.perf_counter() - start
    assert not isinstance(info.value, MPITimeoutError), "a bad argument must not hang the job"
    message = str(info.value)
    assert re.search(match, message), message
    assert info.value.returncode == 2  # the program's own exit, on every rank
    assert "Traceback" not in info.value.stderr, info.value.stderr
    assert elapsed < FAST, f"took {elapsed:.1f} s: ranks must check before training"
    assert_nothing_written(json_path, before)


def test_launcher_repeats_the_programs_error_first():
    """The line after the command in MPIJobError is the program's own "error: ..." line."""
    note = launch.failed_ranks_note("", "error: --steps: expected a positive integer\n"
                                        "Abort(2) on node 1 (rank 1 in comm 0): ...\n")
    assert note == "the program stopped on bad input: --steps: expected a positive integer"


# --------------------------------------------------------------------------- summary


def test_summary():
    """Printed with `pytest -s`: the closing note's numbers."""
    if not TIMINGS:
        pytest.skip("run the whole file to get the summary")
    slowest = max(TIMINGS, key=TIMINGS.get)
    print(f"\n{len(TRIED)} bad inputs tried ({len(TIMINGS)} through a command line); longest "
          f"time to a clean error: {TIMINGS[slowest]:.2f} s ({slowest})")
    assert len(TRIED) >= 40
    assert TIMINGS[slowest] < FAST


@pytest.mark.parametrize("module", [DP, TP, PP])
def test_a_diverging_parallel_run_stops_with_one_clean_message(module):
    """--lr 1e300 (issue 17): every rank sees the same non-finite loss and all stop with one
    "error:" line naming --lr, exit status 2, no traceback."""
    with pytest.raises(MPIJobError) as info:
        run_mpi(module, ["--steps", "5", "--lr", "1e300"], n_ranks=2, timeout=60)
    err = info.value.stderr
    assert info.value.returncode == 2, err
    assert err.count("error: loss: expected a finite value") == 1, err
    assert "lower --lr, now 1e+300" in err and "Traceback" not in err, err
