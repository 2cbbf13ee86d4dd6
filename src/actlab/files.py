"""The one way actlab writes and reads its files: safetensors for tensors, JSON for everything else.

Every safetensors file of actlab is written here and every JSON result goes through
``to_jsonable``, so there is one place that decides atomicity (temp file in the same folder,
then rename), durability (fsync, for the store's resume guarantee) and how a float that is not
finite is written (``null``). ``save_tensors`` tags a file with a ``format`` and actlab's version,
so a file of the wrong kind, a damaged file or a file from another tool is a clear error instead
of a stack trace from deep inside safetensors; formats that own their metadata (the store's
shards, stats files, the genre classifier) pass ``fmt=None`` and get exactly the metadata given.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from actlab.errors import ActlabError

__all__ = ["load_tensors", "open_tensors", "save_tensors", "to_jsonable", "write_json", "replace_durably"]


# ------------------------------------------------------------------ atomic replace
def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """fsync a fully written temp file, then rename it over ``final`` and fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _commit(tmp: Path, final: Path, durable: bool) -> None:
    if durable:
        replace_durably(tmp, final)
    else:
        os.replace(tmp, final)


def _default_tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


# ------------------------------------------------------------------ safetensors
def save_tensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    fmt: str | None,
    metadata: dict[str, str],
    *,
    tmp: Path | None = None,
    durable: bool = False,
) -> Path:
    """Atomically write ``tensors`` with string ``metadata``; returns the path.

    With ``fmt`` the header is tagged ``format=fmt`` plus the actlab version (what ``load_tensors``
    checks); ``fmt=None`` writes ``metadata`` exactly as given. ``tmp`` names the temp file
    (default ``<name>.tmp``; it is removed if the write fails) and ``durable=True`` fsyncs the
    file and its folder around the rename, so a crash never leaves a partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt is not None:
        from actlab import __version__

        metadata = {"format": fmt, "actlab_version": __version__, **metadata}
    tmp = Path(tmp) if tmp is not None else _default_tmp(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit(tmp, path, durable)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def open_tensors(path: str | Path):
    """A lazy handle on a safetensors file (``keys()``, ``metadata()``, ``get_tensor``, ``get_slice``).

    Use it as a context manager. Errors are safetensors' own, for the caller to word: a reader
    knows best what a broken file means to its user.
    """
    return safe_open(str(path), framework="pt")


def load_tensors(path: str | Path, fmt: str, what: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by ``save_tensors``; ``what`` names the kind of file in error messages."""
    path = Path(path)
    if not path.is_file():
        raise ActlabError(f"{what} file '{path}' does not exist{'; ' + hint if hint else ''}")
    try:
        with open_tensors(path) as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ActlabError(f"'{path}' is not a readable {what} file ({exc}); was it written by actlab?") from None
    if metadata.get("format") != fmt:
        raise ActlabError(f"'{path}' is not an actlab {what} file (format: {metadata.get('format')!r})")
    # loaded tensors can sit at unaligned addresses; a copy makes kernels (and results) identical to the originals
    return {k: v.clone() for k, v in tensors.items()}, metadata


# ------------------------------------------------------------------ JSON
def to_jsonable(value: Any) -> Any:
    """Plain JSON types, recursively: numpy/torch numbers and arrays become Python ones, NaN/inf become None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if np is not None and isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if np is not None and isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, bool) or isinstance(value, int) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) or (np is not None and isinstance(value, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return str(value)


def write_json(path: str | Path, data: Any, indent: int = 2, *, tmp: Path | None = None, durable: bool = False) -> Path:
    """Write ``to_jsonable(data)`` as indented JSON plus a newline, atomically (see ``save_tensors``
    for ``tmp`` and ``durable``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else _default_tmp(path)
    try:
        tmp.write_text(json.dumps(to_jsonable(data), indent=indent) + "\n", encoding="utf-8")
        _commit(tmp, path, durable)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
