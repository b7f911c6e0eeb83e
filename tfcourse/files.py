"""Writing results so that a crash never leaves a half-written file behind.

An output path names a regular file, or a file not written yet. What else may sit there is
refused with a ValueError, never replaced: a folder, a device (`/dev/null`, as root, would
otherwise become a JSON file), a named pipe or a socket. A symbolic link is followed: its
target is written (and must itself be a regular file or not exist yet), the link stays a link
- as the shell's `>` and `open(path, "w")` do. A new file gets the usual mode (0o666 less the
umask, e.g. 0o644); a file that existed keeps its mode. The replacement is a new file (an
atomic rename), so another hard link to the old file keeps the old content. A name longer
than the file system allows (NAME_MAX, 255 bytes on common Linux file systems) or a path
longer than PATH_MAX is refused with a ValueError too, before anything is tried.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

FILE_KINDS = (  # (test of st_mode, what to call it in a message)
    (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"),
)


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _limit(path: Path, which: str, default: int) -> int:
    """os.pathconf's `which` ("PC_NAME_MAX", "PC_PATH_MAX") of the file system `path` is
    on, read at its nearest existing folder; `default` where the system cannot say."""
    folder = _folder_of(path)
    while not os.path.isdir(folder) and folder != folder.parent:  # isdir never raises
        folder = folder.parent
    try:
        return os.pathconf(folder, which)
    except (OSError, ValueError):
        return default


def _shown(part: str) -> str:
    return part if len(part) <= 40 else f"{part[:24]}...{part[-12:]}"


def check_path_lengths(name: str, path: Path) -> None:
    """ValueError naming `name` if a file or folder name in `path`, or `path` itself, is
    longer than the file system allows (which the system would report as OSError 36, "File
    name too long")."""
    name_max = _limit(path, "PC_NAME_MAX", 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ValueError(f"{name}: expected names of at most {name_max} bytes (the file "
                             f"system's limit), got a name of {size} bytes: {_shown(part)!r}")
    path_max = _limit(path, "PC_PATH_MAX", 4096)  # counts the terminating NUL
    size = len(os.fsencode(path))
    if size >= path_max:
        raise ValueError(f"{name}: expected a path of at most {path_max - 1} bytes (the "
                         f"system's limit), got {size} bytes: {_shown(str(path))!r}")


TEMP_NAME_EXTRA = len("." + "." + "12345678" + ".tmp")  # mkstemp's 8 random characters


def _temp_prefix(path: Path) -> str:
    """".NAME." for the temporary file beside `path`, with NAME cut short if the temporary
    file's name would otherwise be longer than the file system allows."""
    room = _limit(path, "PC_NAME_MAX", 255) - TEMP_NAME_EXTRA
    short = path.name
    while short and len(os.fsencode(short)) > room:
        short = short[:-1]
    return f".{short}."


def _temp_file_in(name: str, folder: Path, path: Path) -> tuple[int, str]:
    """A new temporary file beside `path` (same folder, so the final rename is atomic)."""
    try:
        return tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=".tmp")
    except OSError as err:  # no permission, read-only file system, ...
        if err.errno == errno.ENAMETOOLONG:  # a path a few bytes short of PATH_MAX
            raise ValueError(f"{name}: expected a shorter path: no temporary file fits beside "
                             f"{_shown(str(path))!r} ({err.strerror})") from None
        raise ValueError(
            f"{name}: folder {str(folder)!r} is not writable (for {str(path)!r}: "
            f"{err.strerror or err})"
        ) from None


def _kind(mode: int) -> str:
    return next((kind for test, kind in FILE_KINDS if test(mode)), "special file")


def _target(name: str, path: Path) -> tuple[Path, int | None]:
    """The file that writing to `path` replaces - `path`, or the file a symbolic link there
    points to - and the mode it keeps (None: a new file). Raises ValueError naming `name` if
    that is not a regular file, if its folder does not exist, or if a name is too long."""
    check_path_lengths(name, path)
    target = path
    if os.path.islink(path):  # never raises (Path.is_symlink does, for a too-long name)
        try:
            target = Path(os.path.realpath(path, strict=False))
        except (OSError, RuntimeError) as err:  # a loop of links
            raise ValueError(f"{name}: expected a regular file or a link to one, got the "
                             f"symbolic link {str(path)!r} that leads nowhere ({err})") from None
    via = f" (where the link {str(path)!r} points)" if target != path else ""
    try:
        status = target.lstat()
    except FileNotFoundError:
        status = None
    except OSError as err:  # e.g. a link loop (ELOOP), a file in the way of a folder name
        raise ValueError(f"{name}: cannot write {str(target)!r}{via}: "
                         f"{err.strerror or err}") from None
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise ValueError(f"{name}: expected a file path, got the folder {str(target)!r}{via}")
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{name}: expected a regular file (or a new file's name), got the "
                         f"{_kind(status.st_mode)} {str(target)!r}{via}; it is never "
                         f"replaced")
    folder = _folder_of(target)
    if not folder.is_dir():
        raise ValueError(f"{name}: folder {str(folder)!r} does not exist (for "
                         f"{str(path)!r}{via})")
    return target, None if status is None else stat.S_IMODE(status.st_mode)


def _umask() -> int:
    """This process's umask, read without changing it where /proc says it (os.umask can only
    be read by setting it, which other threads creating files at that moment would feel)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(name: str, path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can later be written to `path`; returns the Path.

    Raises ValueError naming `name` (e.g. "--json") if `path` (or the file a symbolic link
    there points to) exists but is not a regular file - a folder, a device, a named pipe, a
    socket - if its folder does not exist, or if that folder is not writable (tried by
    creating and removing a temporary file, which also catches read-only file systems and
    running as root). Programs call it on their output paths first, so a bad path fails in
    a second instead of after a long run.
    """
    path = Path(path)
    target, _ = _target(name, path)
    fd, tmp = _temp_file_in(name, _folder_of(target), target)
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return path


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename.

    Readers see either the old file or the complete new one, never a partial write. A new
    file gets mode 0o666 less the umask, an existing one keeps its mode; a symbolic link's
    target is written. Raises ValueError naming `path` if something other than a regular
    file is there (see the module's docstring), or if the folder does not exist or is not
    writable.
    """
    path = Path(path)
    target, mode = _target("path", path)
    fd, tmp = _temp_file_in("path", _folder_of(target), target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask() if mode is None else mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
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
