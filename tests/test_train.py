"""Serial training: it learns, it is deterministic, it resumes exactly, its CLI is sound."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from tfcourse import data, train
from tfcourse.nn.model import preset

CORPUS = train.load_corpus()
TINY = preset("tiny", CORPUS.vocab.size)


def run(settings, **kwargs):
    return train.train_lm(TINY, CORPUS, settings, progress="none", **kwargs)


@pytest.mark.slow
def test_lm_learns_well_below_the_unigram_baseline():
    result = run(train.TRAIN_PRESETS["tiny"])
    baseline = result["unigram_baseline"]
    assert baseline == pytest.approx(data.unigram_cross_entropy(CORPUS.ids, CORPUS.vocab.size))
    assert np.mean(result["losses"][-10:]) < 0.6 * baseline
    assert result["losses"][0] == pytest.approx(np.log(CORPUS.vocab.size), rel=0.05)


# The encoder-decoder's end-to-end check (800 steps on "reverse", 100 % exact match on 500
# held-out strings) is notebooks/04_transformer.ipynb's, compared by nbval on every run.


def test_same_seed_gives_bitwise_identical_losses():
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=15)
    assert run(settings)["losses"] == run(settings)["losses"]
    assert run(settings)["losses"] != run(dataclasses.replace(settings, seed=1))["losses"]


def test_resume_after_interruption_reproduces_the_uninterrupted_curve(tmp_path, monkeypatch):
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=30)
    uninterrupted = run(settings)["losses"]
    checkpoint = tmp_path / "ckpt"

    real_update = train.Progress.update

    def crash_at_step_25(self, step, loss, held_out=None):
        if step == 25:
            raise KeyboardInterrupt("simulated crash")
        real_update(self, step, loss, held_out)

    monkeypatch.setattr(train.Progress, "update", crash_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        run(settings, checkpoint=str(checkpoint), checkpoint_every=10)
    monkeypatch.setattr(train.Progress, "update", real_update)
    assert [p.name for p in sorted(checkpoint.iterdir())] == ["step-00000010", "step-00000020"]
    resumed = run(settings, resume_from=str(checkpoint))  # restarts from step 20
    assert resumed["losses"] == uninterrupted


def test_the_final_state_is_always_saved(tmp_path):
    """--checkpoint without --checkpoint-every saved nothing; 25 steps every 10 never saved
    the last 5."""
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=25)
    run(settings, checkpoint=str(tmp_path / "a"))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["step-00000025"]
    run(settings, checkpoint=str(tmp_path / "b"), checkpoint_every=10, keep=5)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000025"]


def test_keep_prunes_all_but_the_newest_complete_checkpoints(tmp_path):
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=8)
    run(settings, checkpoint=str(tmp_path / "c"), checkpoint_every=2, keep=2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step-00000006", "step-00000008"]


@pytest.mark.parametrize("flag, value, named", [
    ("--seed", "7", "seed 0 -> 7"), ("--lr", "0.5", "lr 0.01 -> 0.5"),
    ("--batch-size", "8", "batch_size 16 -> 8"), ("--steps", "9", "steps 6 -> 9"),
])
def test_resume_refuses_changed_settings_naming_them(tmp_path, capsys, flag, value, named):
    folder = str(tmp_path / "ck")
    assert train.main(["--steps", "6", "--checkpoint-every", "3", "--checkpoint", folder,
                       "--progress", "none"]) == 0
    assert train.main(["--steps", "6", "--progress", "none", "--resume", folder,
                       flag, value]) == 2
    err = capsys.readouterr().err
    assert "--resume: this run changes the checkpoint's settings" in err and named in err


def test_outputs_never_replace_the_inputs_or_another_run(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("a learner's own text, long enough to cut windows from. " * 4)
    assert train.main(["--steps", "2", "--progress", "none", "--seq-len", "8",
                       "--text", str(book), "--json", str(book)]) == 2
    assert "--json" in capsys.readouterr().err and book.read_text().startswith("a learner's")
    folder = str(tmp_path / "ck")
    assert train.main(["--steps", "2", "--progress", "none", "--checkpoint", folder]) == 0
    assert train.main(["--steps", "3", "--progress", "none", "--checkpoint", folder]) == 2
    assert "holds another run's checkpoints" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000002"]


def test_learning_rate_warms_up_then_decays():
    s = train.TrainSettings(steps=100, lr=1.0, warmup_steps=10)
    lrs = [train.learning_rate(step, s) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(np.cos(np.pi * 0.09) / 2 + 0.5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 0.001


def test_cli_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tfcourse.train", "--config", "tiny", "--steps", "5",
         "--seed", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 5 and result["tokens_per_s"] > 0
    assert result["config"]["d_model"] == TINY.d_model and result["settings"]["seed"] == 3
    assert proc.stdout.count("step ") == 5  # not a TTY: plain lines, one per step here
    expected = run(dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=5, seed=3))["losses"]
    assert result["losses"] == expected


@pytest.mark.parametrize("args, match", [
    (["--config", "huge"], "config: expected one of"),
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--json", "/nonexistent-folder/out.json"], "--json: folder"),
    (["--text", "/nonexistent-file.txt"], "path"),
    (["--seq-len", "64"], "seq_len: expected at most max_len=32"),
])
def test_cli_bad_arguments_give_clear_errors(args, match, capsys):
    assert train.main(["--steps", "2", "--progress", "none", *args]) == 2
    assert match in capsys.readouterr().err


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    import shutil

    folder = tmp_path / "ck"
    args = ["--steps", "4", "--progress", "none"]
    assert train.main([*args, "--checkpoint", str(folder), "--checkpoint-every", "2"]) == 0
    shutil.rmtree(folder / "step-00000004")  # resume from step 2, corrupted:
    shard = next((folder / "step-00000002").glob("shard-*.npz"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    assert train.main([*args, "--resume", str(folder)]) == 2
    assert "fails verification" in capsys.readouterr().err
    (folder / "step-00000002" / "MANIFEST.json").unlink()  # as if the save was interrupted
    assert train.main([*args, "--resume", str(folder)]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_the_notebook_progress_bar_updates_about_a_hundred_times_whatever_the_steps():
    """Each widget update is kernel output; one per step flooded nbval's output channel."""
    pytest.importorskip("ipywidgets")
    from tfcourse.train import Progress

    bar = Progress(800, mode="widget")
    values = []
    for step in range(800):
        bar.update(step, 1.0)
        values.append(bar.bar.value)
    assert len(set(values) - {0}) == 100 and values[-1] == 800
    short = Progress(7, mode="widget")
    for step in range(7):
        short.update(step, 1.0)
        assert short.bar.value == step + 1


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    import errno

    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=4)
    folder = tmp_path / "ck"
    real_write = train.write_shard

    def full_after_the_first(step_folder, *args):
        if step_folder.name != "step-00000002":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(step_folder, *args)

    monkeypatch.setattr(train, "write_shard", full_after_the_first)
    with pytest.raises(ValueError, match=r"--checkpoint: saving step 4 in .* failed \(No space "
                                         r"left on device\); the previous complete checkpoint"):
        run(settings, checkpoint=str(folder), checkpoint_every=2)
    from tfcourse import checkpoint
    assert checkpoint.latest_checkpoint(folder).name == "step-00000002"
