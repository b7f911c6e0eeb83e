"""Checkpoints of every training program under real mpiexec: each rank writes its pieces, a
manifest completes the checkpoint, and a run resumes from it under any other layout - the
continued loss curve is the uninterrupted serial one (float64, to the layouts' rounding), and
bit for bit the uninterrupted run of the same layout. A job killed with SIGKILL resumes from
its last complete checkpoint."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from tfcourse import checkpoint, train
from tfcourse.course.launch import run_mpi
from tfcourse.nn.model import preset

pytestmark = pytest.mark.mpi
STEPS, LAYERS, BATCH = 9, 3, 6
COMMON = ["--steps", str(STEPS), "--layers", str(LAYERS), "--batch-size", str(BATCH)]


@cache
def serial_losses() -> tuple:
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS, batch_size=BATCH)
    config = preset("tiny", corpus.vocab.size, n_layers=LAYERS)
    return tuple(train.train_lm(config, corpus, settings, progress="none")["losses"])


LAYOUTS = {  # name: (module, flags, ranks)
    "serial": ("tfcourse.train", [], 1),
    "DP 4": ("tfcourse.parallel.data_parallel", [], 4),
    "DP 3 ZeRO-1": ("tfcourse.parallel.data_parallel", ["--zero", "1"], 3),
    "DP 2 ZeRO-2": ("tfcourse.parallel.data_parallel", ["--zero", "2"], 2),
    "DP 3 ZeRO-3": ("tfcourse.parallel.data_parallel", ["--zero", "3"], 3),
    "TP 2": ("tfcourse.parallel.tensor_parallel", [], 2),
    "PP 3": ("tfcourse.parallel.pipeline_parallel", ["--microbatches", "2"], 3),
    "DP 2 x PP 2": ("tfcourse.parallel.hybrid", ["--dp", "2", "--pp", "2"], 4),
    "DP 2 x TP 2": ("tfcourse.parallel.hybrid", ["--dp", "2", "--tp", "2"], 4),
    "PP 2 x TP 2": ("tfcourse.parallel.hybrid", ["--pp", "2", "--tp", "2"], 4),
    "DP 2 x PP 2 ZeRO-1": ("tfcourse.parallel.hybrid", ["--dp", "2", "--pp", "2", "--zero", "1"],
                           4),
}


def run_layout(name: str, flags: list[str]) -> list[float]:
    module, own, ranks = LAYOUTS[name]
    if module == "tfcourse.train":
        out = Path(flags[flags.index("--json") + 1]) if "--json" in flags else None
        code = train.main([*COMMON, "--progress", "none", *own, *flags])
        assert code == 0
        return json.loads(out.read_text())["losses"] if out else []
    return run_mpi(module, [*COMMON, *own, *flags], n_ranks=ranks, timeout=120).result["losses"]


@pytest.mark.parametrize("chain", [
    ["DP 4", "TP 2", "PP 3", "serial"],
    ["DP 3 ZeRO-1", "DP 2 x PP 2", "DP 2 ZeRO-2", "DP 2 x TP 2"],
    ["serial", "PP 3", "DP 4"],
    ["TP 2", "PP 2 x TP 2", "DP 3 ZeRO-3", "DP 3 ZeRO-1"],
    ["DP 2 x PP 2 ZeRO-1", "DP 2 x TP 2", "DP 2 x PP 2 ZeRO-1"],
], ids=lambda chain: " -> ".join(chain))
def test_resume_on_other_layouts_continues_the_serial_curve(tmp_path, chain):
    """Layout i resumes from layout i - 1's checkpoint after 2 i steps, trains to the end and
    checkpoints every step: the curve is the serial one all along, and so are the losses
    every manifest records."""
    previous = None
    for i, name in enumerate(chain):
        folder = tmp_path / f"ck{i}"
        json_path = tmp_path / f"r{i}.json"
        flags = ["--checkpoint", str(folder), "--checkpoint-every", "1", "--keep", str(STEPS)]
        if previous is not None:
            flags += ["--resume", str(checkpoint.step_folder(previous, 2 * i))]
        if name == "serial":
            flags += ["--json", str(json_path)]
        losses = run_layout(name, flags)
        np.testing.assert_allclose(losses, serial_losses(), rtol=1e-10, atol=0)
        manifest = checkpoint.read_manifest(checkpoint.step_folder(folder, 2 * i + 2))
        assert manifest["step"] == 2 * i + 2
        np.testing.assert_allclose(manifest["losses"], serial_losses()[:2 * i + 2], rtol=1e-10)
        assert len(manifest["shards"]) == LAYOUTS[name][2]
        previous = folder


@pytest.mark.parametrize("name", ["DP 2 ZeRO-2", "TP 2", "PP 3", "DP 2 x TP 2"])
def test_resuming_the_same_layout_is_bit_for_bit_the_uninterrupted_run(tmp_path, name):
    folder = tmp_path / "ck"
    uninterrupted = run_layout(name, ["--checkpoint", str(folder), "--checkpoint-every", "4",
                                      "--keep", "3"])
    resumed = run_layout(name, ["--resume", str(checkpoint.step_folder(folder, 4))])
    assert resumed == uninterrupted  # exactly
    report = subprocess.run([sys.executable, "-m", "tfcourse.checkpoint", "inspect",
                             str(folder)], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert report.stdout.count("verified: every shard matches its checksum") == 3


def test_a_job_killed_with_sigkill_resumes_from_its_last_complete_checkpoint(tmp_path):
    """A real kill: the launcher (and with it mpiexec and the ranks) dies mid-training; the
    folder keeps only complete checkpoints readable, and TP 2 continues the DP 2 run."""
    folder, steps = tmp_path / "ck", 150  # far more than run before the kill
    code = ("import sys; from tfcourse.course.launch import run_mpi; "
            "run_mpi('tfcourse.parallel.data_parallel', sys.argv[1:], n_ranks=2, timeout=300)")
    launcher = subprocess.Popen([sys.executable, "-c", code, "--steps", str(steps), "--layers",
                                 str(LAYERS), "--batch-size", str(BATCH), "--checkpoint",
                                 str(folder), "--checkpoint-every", "2", "--keep", "2"])
    deadline = time.monotonic() + 90
    while len(checkpoint.complete_steps(folder)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    time.sleep(0.5)  # the ranks die with their launcher (tests/test_launch_lifecycle.py)
    last = checkpoint.latest_checkpoint(folder)
    step = checkpoint.read_manifest(last)["step"]
    assert 2 <= step < steps
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=steps, batch_size=BATCH)
    config = preset("tiny", corpus.vocab.size, n_layers=LAYERS)
    # the uninterrupted run, as far as the resumed one goes below
    resumed = run_mpi("tfcourse.parallel.tensor_parallel",
                      ["--steps", str(steps), "--layers", str(LAYERS), "--batch-size",
                       str(BATCH), "--resume", str(last)], n_ranks=2, timeout=300).result
    serial = train.train_lm(config, corpus, settings, progress="none")["losses"]
    np.testing.assert_allclose(resumed["losses"], serial, rtol=1e-9, atol=0)


def test_an_interrupted_save_leaves_the_previous_checkpoint_in_use(tmp_path):
    """A rank killed mid-write leaves a step folder without a manifest (and maybe a torn
    shard): it is never read, and the previous complete checkpoint is resumed."""
    folder = tmp_path / "ck"
    run_layout("DP 2 ZeRO-2", ["--checkpoint", str(folder), "--checkpoint-every", "3",
                               "--keep", "5"])
    torn = checkpoint.step_folder(folder, STEPS)
    (torn / checkpoint.MANIFEST).unlink()
    shard = next(torn.glob("shard-*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint.latest_checkpoint(folder) == checkpoint.step_folder(folder, 6)
    resumed = run_layout("TP 2", ["--resume", str(folder)])
    np.testing.assert_allclose(resumed, serial_losses(), rtol=1e-10, atol=0)


def test_a_corrupt_shard_stops_every_rank_with_one_message(tmp_path):
    folder = tmp_path / "ck"
    run_layout("DP 2 ZeRO-2", ["--checkpoint", str(folder), "--checkpoint-every", "3"])
    shutil.rmtree(checkpoint.step_folder(folder, STEPS))  # resume from step 6, corrupted:
    shard = next(checkpoint.latest_checkpoint(folder).glob("shard-*.npz"))
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF
    shard.write_bytes(bytes(data))
    module, own, ranks = LAYOUTS["PP 3"]
    from tfcourse.course.launch import MPIJobError
    with pytest.raises(MPIJobError) as info:
        run_mpi(module, [*COMMON, *own, "--resume", str(folder)], n_ranks=ranks, timeout=60)
    assert info.value.stderr.count("fails verification") == 1, info.value.stderr  # one rank says it


DP = "tfcourse.parallel.data_parallel"
FP16 = ["--precision", "fp16", "--steps", "104", "--layers", "1", "--batch-size", "4"]


def test_fp16_data_parallel_resumes_bit_for_bit_with_its_loss_scale(tmp_path):
    """fp16 on 2 ranks, checkpointing every step: the loss scale doubles after the library's
    100 good steps. A run resumed from step 50 saves the same scale, counters, losses and
    arrays at every later step (the counters were saved and restored, not restarted)."""
    whole, again = tmp_path / "whole", tmp_path / "again"
    saving = ["--checkpoint-every", "1", "--keep", "104"]
    first = run_mpi(DP, [*FP16, "--checkpoint", str(whole), *saving], n_ranks=2,
                    timeout=180).result
    resumed = run_mpi(DP, [*FP16, "--resume", str(checkpoint.step_folder(whole, 50)),
                           "--checkpoint", str(again), *saving], n_ranks=2, timeout=180).result
    assert resumed["losses"] == first["losses"]
    assert first["loss_scale"] == {"scale": 2.0**17, "good_steps": 4, "skipped_in_a_row": 0}
    assert resumed["loss_scale"] == first["loss_scale"]
    for step in range(51, 105):
        ours, theirs = (checkpoint.read_manifest(checkpoint.step_folder(f, step))
                        for f in (again, whole))
        assert ours["loss_scale"] == theirs["loss_scale"] and ours["losses"] == theirs["losses"]
    assert checkpoint.read_manifest(checkpoint.step_folder(whole, 50))["loss_scale"] == {
        "scale": 2.0**16, "good_steps": 50, "skipped_in_a_row": 0}
    (p1, o1, _), (p2, o2, _) = (checkpoint.read_distributed(f) for f in (whole, again))
    for name in p1:
        np.testing.assert_array_equal(p2[name], p1[name])
    for name in o1:
        np.testing.assert_array_equal(o2[name], o1[name])


def test_an_fp16_checkpoint_without_its_loss_scale_stops_every_rank(tmp_path):
    """A checkpoint written before the loss scale was saved cannot continue an fp16 run
    exactly: refused before any step, with one message naming --resume."""
    from tfcourse.course.launch import MPIJobError
    folder = tmp_path / "ck"
    short = [*FP16[:2], "--steps", "3", "--layers", "1", "--batch-size", "4"]
    run_mpi(DP, [*short, "--checkpoint", str(folder), "--checkpoint-every", "1"], n_ranks=2,
            timeout=60)
    step = checkpoint.step_folder(folder, 2)
    path = step / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["loss_scale"]  # as an older version wrote it
    path.write_text(json.dumps(manifest))
    with pytest.raises(MPIJobError) as info:
        run_mpi(DP, [*short, "--resume", str(step)], n_ranks=2, timeout=60)
    assert info.value.stderr.count("holds no fp16 loss scale") == 1, info.value.stderr
    assert "start a new run without --resume" in info.value.stderr
