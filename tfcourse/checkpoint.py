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

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tfcourse.files import write_atomic
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


def _read_npz(path: Path) -> dict | None:
    """All entries of the .npz at `path`, or None if it holds a single .npy array instead."""
    try:
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
