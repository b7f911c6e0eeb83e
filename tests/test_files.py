"""Atomic writes: a failure mid-write leaves the previous file intact."""

import json

import pytest

from tfcourse.files import write_atomic, write_json_atomic


def test_json_round_trip(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"losses": [1.0, 0.5]})
    assert json.loads(path.read_text()) == {"losses": [1.0, 0.5]}


def test_failed_serialisation_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"v": float("nan")})  # NaN is not valid JSON
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    write_atomic(path, b"old")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("tfcourse.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_atomic(tmp_path / "nope" / "x.json", b"{}")
