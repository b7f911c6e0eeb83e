"""Writing results so that a crash never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _temp_file_in(name: str, folder: Path, path: Path) -> tuple[int, str]:
    """A new temporary file beside `path` (same folder, so the final rename is atomic)."""
    try:
        return tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # no permission, read-only file system, ...
        raise ValueError(
            f"{name}: folder {str(folder)!r} is not writable (for {str(path)!r}: "
            f"{err.strerror or err})"
        ) from None


def check_writable(name: str, path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can later be written to `path`; returns the Path.

    Raises ValueError naming `name` (e.g. "--json") if `path` is an existing folder, if its
    folder does not exist, or if that folder is not writable (tried by creating and removing
    a temporary file, which also catches read-only file systems and running as root).
    Programs call it on their output paths first, so a bad path fails in a second instead of
    after a long run.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: expected a file path, got the folder {str(path)!r}")
    folder = _folder_of(path)
    if not folder.is_dir():
        raise ValueError(f"{name}: folder {str(folder)!r} does not exist (for {str(path)!r})")
    fd, tmp = _temp_file_in(name, folder, path)
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return path


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename.

    Readers see either the old file or the complete new one, never a partial write.
    Raises ValueError naming `path` if its folder does not exist or is not writable.
    """
    path = Path(path)
    folder = _folder_of(path)
    if not folder.is_dir():
        raise ValueError(f"path: folder {str(folder)!r} does not exist (for {str(path)!r})")
    if path.is_dir():
        raise ValueError(f"path: expected a file path, got the folder {str(path)!r}")
    fd, tmp = _temp_file_in("path", folder, path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Serialise `obj` as indented JSON and write it atomically (see `write_atomic`).

    NaN and infinity are not JSON: they raise a ValueError naming `obj` (typically a loss that
    diverged) and nothing is written.
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as err:
        raise ValueError(
            f"obj: expected finite numbers only (JSON has no NaN or infinity; did the loss "
            f"diverge?), got {err}"
        ) from None
    return write_atomic(path, text.encode())
