"""Tests for tfcourse.checkpoint: exact round trips, clear errors, atomic saves."""

import numpy as np
import pytest

from tfcourse.checkpoint import check_matches, load_checkpoint, save_checkpoint


def example_params():
    rng = np.random.default_rng(0)
    return {
        "tok_emb": rng.standard_normal((5, 4)).astype(np.float32),
        "blocks.0.attn.w_q": rng.standard_normal((4, 4)),  # float64
        "ln_f.gamma": np.ones(4, dtype=np.float32),
    }


def example_opt_state(params):
    state = {"step": np.array(7, dtype=np.int64)}
    state.update({f"m.{name}": p * 0.5 for name, p in params.items()})
    return state


def assert_same_arrays(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name])


def test_round_trip_is_exact(tmp_path):
    params = example_params()
    opt_state = example_opt_state(params)
    meta = {"step": 7, "seed": 3, "config": {"d_model": 4, "lr": 3e-4, "name": "tiny"}}
    path = save_checkpoint(tmp_path / "ckpt.npz", params, opt_state, meta)
    assert path == tmp_path / "ckpt.npz"

    loaded_params, loaded_state, loaded_meta = load_checkpoint(path)
    assert_same_arrays(loaded_params, params)
    assert_same_arrays(loaded_state, opt_state)
    assert loaded_state["step"].shape == () and loaded_state["step"] == 7
    assert loaded_meta == meta
    check_matches(loaded_params, params)


def test_params_only_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "p.npz", example_params())
    params, opt_state, meta = load_checkpoint(str(path))
    assert_same_arrays(params, example_params())
    assert opt_state is None and meta == {}


def test_truncated_file_is_reported(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", example_params(), meta={"step": 1})
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"path: '.*cut.npz' is truncated or corrupt"):
        load_checkpoint(cut)


@pytest.mark.parametrize("content", [b"", bytes(np.random.default_rng(1).integers(0, 256, 300))])
def test_garbage_file_is_reported(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="path: .* is truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_npz_and_npy_are_refused(tmp_path):
    np.savez(tmp_path / "other.npz", w=np.ones(3))
    with pytest.raises(ValueError, match="path: .*other.npz' is not a tfcourse checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="not a tfcourse checkpoint"):
        load_checkpoint(tmp_path / "single.npy")


def test_unknown_format_version_is_refused(tmp_path):
    np.savez(
        tmp_path / "future.npz",
        **{"param/w": np.ones(2), "__meta__": np.array("{}"), "__tfcourse_checkpoint__": 2},
    )
    with pytest.raises(ValueError, match="path: .* has checkpoint format version 2, expected 1"):
        load_checkpoint(tmp_path / "future.npz")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ValueError, match="path: no checkpoint file at .*nope.npz"):
        load_checkpoint(tmp_path / "nope.npz")


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.npz", example_params(), meta={"step": 1})

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("tfcourse.files.os.replace", crash)
    newer = {name: p + 1 for name, p in example_params().items()}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, newer, meta={"step": 2})
    params, _, meta = load_checkpoint(path)
    assert meta == {"step": 1}
    assert_same_arrays(params, example_params())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # no temp files left


def test_save_validates_its_arguments(tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(ValueError, match="params: expected a non-empty dict of arrays"):
        save_checkpoint(path, {})
    with pytest.raises(ValueError, match=r"params\['w'\]: expected a numeric array, got dtype"):
        save_checkpoint(path, {"w": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="opt_state: expected a dict of arrays, got list"):
        save_checkpoint(path, example_params(), opt_state=[1])
    with pytest.raises(ValueError, match="meta: expected JSON-serialisable values"):
        save_checkpoint(path, example_params(), meta={"loss": float("nan")})
    with pytest.raises(ValueError, match="meta: expected a dict"):
        save_checkpoint(path, example_params(), meta="step 3")
    assert list(tmp_path.iterdir()) == []


def test_check_matches_lists_every_problem():
    expected = example_params()
    renamed = {**expected, "ln_f.beta": expected["ln_f.gamma"]}
    del renamed["ln_f.gamma"]
    with pytest.raises(
        ValueError,
        match=r"loaded_params: expected the names of expected_params, "
        r"got missing \['ln_f.gamma'\] and extra \['ln_f.beta'\]",
    ):
        check_matches(renamed, expected)

    loaded = {**expected, "tok_emb": np.zeros((6, 4), np.float32), "ln_f.gamma": np.ones(4)}
    with pytest.raises(ValueError) as info:
        check_matches(loaded, expected)
    message = str(info.value)
    assert message.startswith("loaded_params: expected the shapes and dtypes of expected_params")
    assert "'tok_emb' has shape (6, 4) instead of (5, 4)" in message
    assert "'ln_f.gamma' has dtype float64 instead of float32" in message


# --------------------------------------------------------------------------- checkpoint folders


def test_a_header_declaring_a_huge_array_is_refused_before_any_allocation(tmp_path):
    """A damaged (or crafted) header declaring 800 GB must not reach np.load's allocation."""
    import io
    import zipfile

    path = save_checkpoint(tmp_path / "c.npz", example_params(), None, {"step": 1})
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("param/huge.npy", header.getvalue())
    with pytest.raises(ValueError, match="declares 800,000,000,000 bytes"):
        load_checkpoint(path)


def _write_pieces(folder, rank, world, pieces, step=1):
    from tfcourse import checkpoint

    return checkpoint.write_shard(checkpoint.step_folder(folder, step), rank, world, pieces,
                                  {"rank": rank})


def _manifest(shards, arrays, step=1):
    return {"step": step, "losses": [1.0], "settings": {}, "layout": {"program": "test"},
            "shards": shards, "arrays": arrays}


def test_pieces_from_several_ranks_assemble_the_global_arrays(tmp_path):
    from tfcourse import checkpoint

    w = np.arange(24.0).reshape(4, 6)
    step = np.array(3, dtype=np.int64)
    shards = [  # rank 0: the left half of w and the step; rank 1: the right half
        _write_pieces(tmp_path, 0, 2, {("param", "w", "0:4,0:3"): w[:, :3],
                                       ("opt", "step", ""): step}),
        _write_pieces(tmp_path, 1, 2, {("param", "w", "0:4,3:6"): w[:, 3:]})]
    arrays = {"param/w": {"shape": [4, 6], "dtype": "float64"},
              "opt/step": {"shape": [], "dtype": "int64"}}
    checkpoint.write_manifest(checkpoint.step_folder(tmp_path, 1), _manifest(shards, arrays))
    params, opt_state, manifest = checkpoint.read_distributed(tmp_path)
    np.testing.assert_array_equal(params["w"], w)
    assert opt_state["step"] == 3 and manifest["step"] == 1
    assert "verified: every shard matches its checksum" in checkpoint.describe(tmp_path)


def test_a_gap_or_an_overlap_between_pieces_is_refused(tmp_path):
    from tfcourse import checkpoint

    w = np.ones((2, 4))
    shards = [_write_pieces(tmp_path, 0, 1, {("param", "w", "0:2,0:3"): w[:, :3]})]
    checkpoint.write_manifest(checkpoint.step_folder(tmp_path, 1),
                              _manifest(shards, {"param/w": {"shape": [2, 4],
                                                             "dtype": "float64"}}))
    with pytest.raises(ValueError, match="does not cover param/w exactly once"):
        checkpoint.read_distributed(tmp_path)


def test_only_complete_checkpoints_count_and_keep_prunes_the_oldest(tmp_path):
    from tfcourse import checkpoint

    arrays = {"param/w": {"shape": [2], "dtype": "float64"}}
    for step in (1, 2, 3):
        shard = _write_pieces(tmp_path, 0, 1, {("param", "w", ""): np.full(2, float(step))}, step)
        checkpoint.write_manifest(checkpoint.step_folder(tmp_path, step),
                                  _manifest([shard], arrays, step), keep=2)
    _write_pieces(tmp_path, 0, 1, {("param", "w", ""): np.zeros(2)}, 4)  # no manifest
    assert [p.name for p in checkpoint.complete_steps(tmp_path)] == ["step-00000002",
                                                                   "step-00000003"]
    assert not checkpoint.step_folder(tmp_path, 1).exists()
    params, _, manifest = checkpoint.read_distributed(tmp_path)
    assert manifest["step"] == 3 and params["w"].tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        checkpoint.latest_checkpoint(tmp_path / "step-00000004")
