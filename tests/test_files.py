"""Atomic writes: a failure mid-write leaves the previous file intact; what is not a regular
file is never replaced; modes are the usual ones."""

import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest

from tfcourse.files import check_writable, write_atomic, write_json_atomic


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


# ------------------------------------------------- what is not a regular file is never replaced
# (issue 17: `--json` naming a device, a pipe or a socket used to be replaced by a JSON file)


def _fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _socket(tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return path


def _device(tmp_path):
    """A character device like /dev/null (1, 3), made where only this test writes."""
    path = tmp_path / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


@pytest.mark.parametrize("make, kind, test", [
    (_fifo, "named pipe", stat.S_ISFIFO),
    (_socket, "socket", stat.S_ISSOCK),
    (_device, "character device", stat.S_ISCHR),
])
def test_a_special_file_is_refused_and_left_alone(tmp_path, make, kind, test):
    path = make(tmp_path)
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"--json: expected a regular file \(or a new "
                                         rf"file's name\), got the {kind}.* '{where}'"):
        check_writable("--json", path)
    with pytest.raises(ValueError, match=rf"path: expected a regular file .* the {kind}"):
        write_json_atomic(path, {"v": 1})
    # through a link too
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ValueError, match=rf"--json: .* the {kind}.* '{where}' \(where the "
                                         rf"link '{re.escape(str(link))}' points\)"):
        check_writable("--json", link)
    with pytest.raises(ValueError, match=kind):
        write_atomic(link, b"{}")
    assert test(path.lstat().st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["link", path.name])


def test_dev_null_is_refused_at_the_door():
    """As root, `--json /dev/null` used to replace /dev/null itself (only checked here: no
    write to /dev/null is ever tried by the tests)."""
    with pytest.raises(ValueError, match="--json: .* got the character device '/dev/null'"):
        check_writable("--json", "/dev/null")


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="path: expected a file path, got the folder"):
        write_atomic(tmp_path, b"{}")
    assert tmp_path.is_dir()


def test_the_trainer_refuses_a_pipe_before_training(tmp_path, monkeypatch, capsys):
    from tfcourse import train

    monkeypatch.setattr(train, "keep_freed_memory", lambda: None)  # not this test process's
    monkeypatch.setattr(train, "train_lm", lambda *a, **k: pytest.fail("training started"))
    pipe = _fifo(tmp_path)
    assert train.main(["--steps", "2", "--progress", "none", "--json", str(pipe)]) == 2
    assert "error: --json: expected a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(pipe.lstat().st_mode)


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    """Choice (documented in tfcourse/files.py): a link's target is written, like `>` does."""
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "r.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "latest.json"
    link.symlink_to(Path("runs") / "r.json")  # relative, as links usually are
    assert check_writable("--json", link) == link
    write_json_atomic(link, {"v": 2})
    assert link.is_symlink() and os.readlink(link) == str(Path("runs") / "r.json")
    assert json.loads(target.read_text()) == {"v": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r.json"]  # no temp left
    # a link to a file not written yet: the file is made where the link points
    dangling = tmp_path / "next.json"
    dangling.symlink_to(tmp_path / "runs" / "next.json")
    write_atomic(dangling, b"{}")
    assert dangling.is_symlink() and (tmp_path / "runs" / "next.json").read_bytes() == b"{}"


def test_a_loop_of_links_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ValueError, match="--json: "):
        check_writable("--json", a)
    with pytest.raises(ValueError, match="path: "):
        write_atomic(a, b"{}")
    assert a.is_symlink() and b.is_symlink()


@pytest.fixture
def umask():
    """Set the process's umask for one test; the previous one is restored."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_a_new_file_gets_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    path = write_json_atomic(tmp_path / "r.json", {"v": 1})
    assert stat.S_IMODE(path.stat().st_mode) == expected


def test_an_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "shared.json"
    path.write_text("{}")
    path.chmod(0o664)
    write_json_atomic(path, {"v": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert json.loads(path.read_text()) == {"v": 1}


# ------------------------------------------------- names too long for the file system (issue 17)
# `--json $(python -c "print('a'*300)").json` was a traceback: OSError 36, File name too long


def _name_max(folder) -> int:
    return os.pathconf(folder, "PC_NAME_MAX")


def test_a_file_name_longer_than_the_file_system_allows_is_named(tmp_path):
    long_name = "a" * 300 + ".json"
    limit = _name_max(tmp_path)
    assert len(long_name) > limit  # 255 on every common Linux file system
    message = rf"--json: expected names of at most {limit} bytes .* got a name of 305 bytes"
    with pytest.raises(ValueError, match=message):
        check_writable("--json", tmp_path / long_name)
    with pytest.raises(ValueError, match=r"^path: expected names of at most"):
        write_json_atomic(tmp_path / long_name, {})
    assert list(tmp_path.iterdir()) == []


def test_a_folder_name_longer_than_the_file_system_allows_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--checkpoint: expected names of at most \d+ bytes"
                                         r".* got a name of 400 bytes"):
        check_writable("--checkpoint", tmp_path / ("b" * 400) / "c.npz")


def test_a_path_longer_than_the_system_allows_is_named(tmp_path):
    deep = tmp_path.joinpath(*["c" * 200] * 30, "r.json")  # every name fits, the path not
    with pytest.raises(ValueError, match=r"--json: expected a path of at most \d+ bytes"):
        check_writable("--json", deep)


def test_the_longest_allowed_name_is_written(tmp_path):
    """The temporary file beside it must not need a longer name than the file itself."""
    name = "a" * (_name_max(tmp_path) - len(".json")) + ".json"
    check_writable("--json", tmp_path / name)
    write_json_atomic(tmp_path / name, {"v": 1})
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert json.loads((tmp_path / name).read_text()) == {"v": 1}
