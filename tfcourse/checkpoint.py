"""Saving and resuming training: parameters, optimiser state and metadata in one .npz file.

Entries of the archive (written with np.savez, uncompressed):

    param/<name>              one per parameter, e.g. "param/blocks.0.attn.w_q"
    opt/<name>                one per optimiser-state array, e.g. "opt/step", "opt/m.tok_emb"
    __meta__                  0-d unicode array holding a JSON object (step, config, seed, ...)
    __tfcourse_checkpoint__   the format version, 1

The file is written atomically (see `files.write_atomic`): a crash during a save leaves the
previous checkpoint intact. Loading uses allow_pickle=False, so a checkpoint can only contain
arrays and JSON, never pickled Python objects that would run code when loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from tfcourse.files import check_path_lengths, write_atomic
from tfcourse.nn.validate import require_same_keys

FORMAT_KEY = "__tfcourse_checkpoint__"
FORMAT_VERSION = 1
META_KEY = "__meta__"
PARAM_PREFIX = "param/"
OPT_PREFIX = "opt/"


def _check_arrays(name: str, arrays, allow_empty: bool) -> dict:
    """Return `arrays` as {str: ndarray}, rejecting object arrays (they would need pickle)."""
    if not isinstance(arrays, dict) or (not arrays and not allow_empty):
        wanted = "a dict of arrays" if allow_empty else "a non-empty dict of arrays"
        found = f"{len(arrays)} entries" if isinstance(arrays, dict) else type(arrays).__name__
        raise ValueError(f"{name}: expected {wanted}, got {found}")
    checked = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: expected non-empty string names, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise ValueError(f"{name}[{key!r}]: expected a numeric array, got dtype {arr.dtype}")
        checked[key] = arr
    return checked


def _meta_to_json(meta) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected a dict (or None), got {type(meta).__name__}")
    try:
        return json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta: expected JSON-serialisable values, got {err}") from None


def save_checkpoint(path: str | os.PathLike, params, opt_state=None, meta=None) -> Path:
    """Write params, optimiser state and metadata to `path` (one .npz file), atomically.

    params, opt_state: flat dicts {name: ndarray}; opt_state may be None. meta: a dict of
    JSON-serialisable values such as {"step": 1200, "config": {...}, "seed": 0}; note that
    JSON turns tuples into lists. Values and dtypes round-trip exactly. Returns the path.
    """
    params = _check_arrays("params", params, allow_empty=False)
    entries = {PARAM_PREFIX + name: a for name, a in params.items()}
    if opt_state is not None:
        opt_state = _check_arrays("opt_state", opt_state, allow_empty=True)
        entries.update({OPT_PREFIX + name: a for name, a in opt_state.items()})
    entries[META_KEY] = np.array(_meta_to_json(meta))
    entries[FORMAT_KEY] = np.array(FORMAT_VERSION, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **entries)
    return write_atomic(path, buffer.getvalue())


def _check_sizes(path: Path) -> None:
    """Every array in the .npz must hold the bytes its header declares: a damaged or crafted
    header declaring a huge shape would otherwise make np.load allocate it (MemoryError)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
                declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size - member.tell():
                    raise ValueError(f"{info.filename} declares {declared:,d} bytes of data, "
                                     f"the file holds {info.file_size - member.tell():,d}")


def _read_npz(path: Path) -> dict | None:
    """All entries of the .npz at `path`, or None if it holds a single .npy array instead."""
    try:
        if zipfile.is_zipfile(path):
            _check_sizes(path)
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return None
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"path: {str(path)!r} is truncated or corrupt, or not an .npz file ({err})"
        ) from None


def _split_entries(path: Path, entries: dict) -> tuple[dict, dict, str]:
    """Sort checkpoint entries into (params, opt_state, meta JSON text)."""
    params, opt_state, meta_json = {}, {}, None
    for key, arr in entries.items():
        if key.startswith(PARAM_PREFIX):
            params[key.removeprefix(PARAM_PREFIX)] = arr
        elif key.startswith(OPT_PREFIX):
            opt_state[key.removeprefix(OPT_PREFIX)] = arr
        elif key == META_KEY and arr.shape == () and arr.dtype.kind == "U":
            meta_json = str(arr)
        elif key != FORMAT_KEY:
            raise ValueError(f"path: {str(path)!r} is truncated or corrupt (unexpected {key!r})")
    if not params or meta_json is None:
        raise ValueError(f"path: {str(path)!r} is truncated or corrupt (no parameters or meta)")
    return params, opt_state, meta_json


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """Read a checkpoint written by `save_checkpoint`; returns (params, opt_state, meta).

    opt_state is None if the checkpoint holds no optimiser state; meta is {} if none was
    saved. Raises ValueError naming `path` if the file is missing, truncated or corrupt, not
    a tfcourse checkpoint, or of an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no checkpoint file at {str(path)!r}")
    entries = _read_npz(path)
    if entries is None or FORMAT_KEY not in entries:
        raise ValueError(f"path: {str(path)!r} is not a tfcourse checkpoint (no {FORMAT_KEY!r})")
    version = entries[FORMAT_KEY]
    if version.shape != () or version.dtype.kind not in "iu" or version != FORMAT_VERSION:
        raise ValueError(
            f"path: {str(path)!r} has checkpoint format version {version}, expected "
            f"{FORMAT_VERSION} (written by a different version of tfcourse?)"
        )
    params, opt_state, meta_json = _split_entries(path, entries)
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"path: {str(path)!r} is truncated or corrupt (meta: {err})") from None
    return params, opt_state or None, meta


def check_matches(loaded_params, expected_params) -> None:
    """Check that loaded parameters have the names, shapes and dtypes of expected_params.

    Use it when resuming: expected_params are freshly initialised from the config, so a
    checkpoint written with a different model size or dtype is refused with a message that
    lists every mismatch instead of failing somewhere inside the forward pass.
    """
    require_same_keys("loaded_params", loaded_params, expected_params, "expected_params")
    problems = []
    for name, want in expected_params.items():
        got, want = np.asarray(loaded_params[name]), np.asarray(want)
        if got.shape != want.shape:
            problems.append(f"{name!r} has shape {got.shape} instead of {want.shape}")
        if got.dtype != want.dtype:
            problems.append(f"{name!r} has dtype {got.dtype} instead of {want.dtype}")
    if problems:
        raise ValueError(
            "loaded_params: expected the shapes and dtypes of expected_params, got "
            + "; ".join(problems)
        )


# --------------------------------------------------------------------------- checkpoint folders
#
# A training run's checkpoints, for any number of ranks and any layout (chapter 12's fault
# tolerance section):
#
#     DIR/step-00000040/shard-00001-of-00004.npz   rank 1's pieces of the global arrays
#     DIR/step-00000040/MANIFEST.json              written last, by rank 0: step, losses,
#                                                  settings, every shard's size and sha256
#
# A piece is a block of one global array - a parameter "param/<name>" or optimiser state
# "opt/<name>" ("opt/step", "opt/m.<name>", ...) - stored under "<name>@<index>", where the
# index says which block ("0:16,8:16"; "" for the whole array). Every element of every array
# is written by exactly one rank, so a checkpoint does not depend on the layout that wrote it:
# a reader assembles the global arrays and takes its own part (plans.placement). A step folder
# without a manifest is an interrupted save and is never read; the previous one stays usable.

MANIFEST = "MANIFEST.json"
STEP_PREFIX = "step-"
FOLDER_FORMAT = 2
NO_PIECES = "(none)"  # the placeholder entry of a shard without parameter pieces


def step_folder(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"{STEP_PREFIX}{step:08d}"


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.npz"


def index_text(index: tuple[slice, ...] | None) -> str:
    """"0:16,8:16" for a block of an array, "" for all of it."""
    return "" if index is None else ",".join(f"{s.start}:{s.stop}" for s in index)


def index_from_text(text: str, shape: tuple) -> tuple[slice, ...]:
    if text == "":
        return tuple(slice(0, n) for n in shape)
    bounds = [part.split(":") for part in text.split(",")]
    return tuple(slice(int(lo), int(hi)) for lo, hi in bounds)


def check_checkpoint_folder(name: str, folder: str | os.PathLike) -> Path:
    """A folder checkpoints can be saved in: an existing writable folder, or a new one in an
    existing writable folder. ValueError naming `name` otherwise."""
    folder = Path(folder)
    check_path_lengths(name, folder / step_folder(".", 0) / shard_name(0, 1))
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{name}: expected a folder for checkpoints, got the file "
                             f"{str(folder)!r}")
        place = folder
    else:
        place = folder.parent
        if not place.is_dir():
            raise ValueError(f"{name}: folder {str(place)!r} does not exist")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: folder {str(place)!r} is not writable")
    return folder


def write_shard(folder: Path, rank: int, world_size: int, pieces: dict, meta: dict) -> dict:
    """Write one rank's pieces {("param" | "opt", name, index text): array} into step folder
    `folder` (created if needed), durably (fsync, atomic rename); returns its manifest entry
    {"file", "bytes", "sha256"}."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {"param": {}, "opt": {}}
    for (kind, name, index), array in pieces.items():
        entries[kind][f"{name}@{index}"] = array
    path = folder / shard_name(rank, world_size)
    save_checkpoint(path, entries["param"] or {NO_PIECES: np.zeros(0)}, entries["opt"], meta)
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: dict, keep: int | None = None) -> Path:
    """Complete the step folder's checkpoint: write MANIFEST.json last (after every shard is
    durable), atomically, then fsync the folder. With `keep`, delete all but the newest
    `keep` complete checkpoints of the parent folder (and interrupted ones older than this)."""
    _fsync_folder(folder)
    path = write_atomic(folder / MANIFEST, json.dumps(
        {"format": FOLDER_FORMAT, **manifest}, indent=1, sort_keys=True).encode())
    _fsync_folder(folder)
    if keep is not None:
        complete = complete_steps(folder.parent)
        for old in [p for p in folder.parent.glob(f"{STEP_PREFIX}*")
                    if p.is_dir() and p.name < folder.name]:
            if old not in complete[-keep:]:
                shutil.rmtree(old, ignore_errors=True)
    return path


def complete_steps(folder: str | os.PathLike) -> list[Path]:
    """The step folders of `folder` that hold a manifest, oldest first."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / MANIFEST).is_file())


def latest_checkpoint(folder: str | os.PathLike) -> Path:
    """The newest complete step folder of a checkpoint folder (or `folder` itself if it is a
    step folder with a manifest). ValueError naming `folder` if there is none."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return folder
    if not folder.is_dir():
        raise ValueError(f"folder: no checkpoint folder at {str(folder)!r}")
    steps = complete_steps(folder)
    if not steps:
        raise ValueError(f"folder: {str(folder)!r} holds no complete checkpoint (no step "
                         f"folder with a {MANIFEST}: was every save interrupted?)")
    return steps[-1]


def read_manifest(step: Path) -> dict:
    try:
        manifest = json.loads((step / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"folder: {str(step)!r} has an unreadable {MANIFEST} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FOLDER_FORMAT:
        raise ValueError(f"folder: {str(step)!r} has checkpoint format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else '?'}, "
                         f"expected {FOLDER_FORMAT}")
    return manifest


def verify(step: Path, manifest: dict) -> list[str]:
    """Problems with the step folder's shards against its manifest ([] = all verified)."""
    problems = []
    for shard in manifest["shards"]:
        path = step / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
            continue
        data = path.read_bytes()
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            problems.append(f"{shard['file']}: size or sha256 differs from the manifest")
    return problems


def read_distributed(folder: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(params, opt_state, manifest) of the newest complete checkpoint in `folder`: every
    shard verified against the manifest's sha256, the global arrays assembled from the
    pieces, every element present exactly once. ValueError naming `folder` otherwise."""
    step = latest_checkpoint(folder)
    manifest = read_manifest(step)
    problems = verify(step, manifest)
    if problems:
        raise ValueError(f"folder: {str(step)!r} fails verification: {'; '.join(problems)}")
    arrays, filled = {}, {}
    for shard in manifest["shards"]:
        params, opt_state, _ = load_checkpoint(step / shard["file"])
        for kind, pieces in (("param", params), ("opt", opt_state or {})):
            for key, piece in pieces.items():
                if key == NO_PIECES:
                    continue
                name, _, text = key.rpartition("@")
                spec = manifest["arrays"].get(f"{kind}/{name}")
                if spec is None:
                    raise ValueError(f"folder: {shard['file']} holds {kind}/{name}, which the "
                                     f"manifest does not list")
                full = arrays.setdefault((kind, name), np.empty(spec["shape"], spec["dtype"]))
                count = filled.setdefault((kind, name), np.zeros(full.shape, np.int8))
                index = index_from_text(text, full.shape)
                if piece.dtype != full.dtype or piece.shape != full[index].shape:
                    raise ValueError(
                        f"folder: {shard['file']}: {kind}/{name} is {piece.dtype} in the shard, "
                        f"{full.dtype} in the manifest (piece {piece.shape} at [{text}] of "
                        f"{full.shape})")
                full[index] = piece
                count[index] += 1
    for key in manifest["arrays"]:
        kind, name = key.split("/", 1)
        if (kind, name) not in filled or not (filled[kind, name] == 1).all():
            raise ValueError(f"folder: {str(step)!r} does not cover {key} exactly once")
    params = {name: a for (kind, name), a in arrays.items() if kind == "param"}
    opt_state = {name: a for (kind, name), a in arrays.items() if kind == "opt"}
    return params, opt_state, manifest


def describe(folder: str | os.PathLike) -> str:
    """What `python -m tfcourse.checkpoint inspect DIR` prints: every complete checkpoint's
    step, layout, settings and shards with their checksums, verified."""
    folder = Path(folder)
    steps = [folder] if (folder / MANIFEST).is_file() else complete_steps(folder)
    if not steps:
        latest_checkpoint(folder)  # raises the right message
    lines = []
    for step in steps:
        manifest = read_manifest(step)
        problems = verify(step, manifest)
        lines.append(f"{step}: step {manifest['step']}, written by {manifest['layout']}")
        lines.append(f"  settings: {json.dumps(manifest['settings'], sort_keys=True)}")
        if "loss_scale" in manifest:  # fp16 mixed precision's dynamic loss scaling
            lines.append(f"  loss scale: {json.dumps(manifest['loss_scale'], sort_keys=True)}")
        for shard in manifest["shards"]:
            lines.append(f"  {shard['file']}  {shard['bytes']:>10,d} bytes  "
                         f"sha256 {shard['sha256'][:16]}...")
        lines.append("  verified: every shard matches its checksum" if not problems
                     else "  NOT verified: " + "; ".join(problems))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tfcourse.checkpoint",
                                     description="Inspect a checkpoint folder.")
    parser.add_argument("command", choices=["inspect"])
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        print(describe(args.folder))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
