"""The one way actlab writes and reads its files: safetensors for tensors, JSON for everything else.

Every safetensors file of actlab is written here and every JSON result goes through
``to_jsonable``, so there is one place that decides atomicity (temp file in the same folder,
then rename), durability (fsync, for the store's resume guarantee) and how a float that is not
finite is written (``null``). ``save_tensors`` tags a file with a ``format`` and actlab's version,
so a file of the wrong kind, a damaged file or a file from another tool is a clear error instead
of a stack trace from deep inside safetensors; formats that own their metadata (the store's
shards, stats files, the genre classifier) pass ``fmt=None`` and get exactly the metadata given.

A tagged file also carries a ``checksum`` (``"sha256:<hex>"`` over its tensors and metadata, see
``content_sha256``) that ``load_tensors`` checks, so a damaged file is refused with a message
instead of giving wrong numbers; files written before the checksum existed still load.
``HeaderFields`` reads the JSON fields of such a header with checked types, so a missing or
malformed field is an ``ActlabError`` that names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from actlab.errors import ActlabError

__all__ = ["HeaderFields", "brief", "content_sha256", "load_tensors", "open_tensors", "save_tensors", "to_jsonable", "write_json",
           "replace_durably"]

CHECKSUM_KEY = "checksum"
_CHECKSUM_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


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
def content_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``"sha256:<hex>"`` of a file's content: each tensor in name order (name, dtype, shape, then its
    bytes), then the metadata without its checksum as compact JSON with sorted keys."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rest = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


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

    With ``fmt`` the header is tagged ``format=fmt`` plus the actlab version and a ``checksum`` of
    the content (what ``load_tensors`` checks); ``fmt=None`` writes ``metadata`` exactly as given. ``tmp`` names the temp file
    (default ``<name>.tmp``; it is removed if the write fails) and ``durable=True`` fsyncs the
    file and its folder around the rename, so a crash never leaves a partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt is not None:
        from actlab import __version__

        metadata = {"format": fmt, "actlab_version": __version__, **metadata}
        metadata[CHECKSUM_KEY] = content_sha256(tensors, metadata)
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
    """Read a file written by ``save_tensors``; ``what`` names the kind of file in error messages.

    Refused with an ActlabError: a missing file, one that is not safetensors, another format, and
    a file whose checksum does not match its content (``hint`` says how to make a new one)."""
    path = Path(path)
    then = f"; {hint}" if hint else ""
    if not path.is_file():
        what_is = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ActlabError(f"{what} file '{path}' {what_is}{then}")
    try:
        with open_tensors(path) as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types on truncated or garbage files
        raise ActlabError(f"'{path}' is not a readable {what} file ({brief(exc)}); was it written by actlab?") from None
    if metadata.get("format") != fmt:
        raise ActlabError(f"'{path}' is not an actlab {what} file (format: {brief(metadata.get('format'))})")
    check_checksum(path, tensors, metadata, what, then)
    # loaded tensors can sit at unaligned addresses; a copy makes kernels (and results) identical to the originals
    return {k: v.clone() for k, v in tensors.items()}, metadata


def check_checksum(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str,
                   then: str = "") -> None:
    """Refuse a file whose ``checksum`` header does not match its content; files written before the
    checksum existed have none and pass."""
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None:
        if not isinstance(stored, str) or not _CHECKSUM_RE.match(stored) or stored != content_sha256(tensors, metadata):
            raise ActlabError(f"{what} file '{path}' is damaged (checksum mismatch): re-create it{then}")


def brief(value: Any, limit: int = 120) -> str:
    """A value (or an exception) for a one-line message: its repr on one line, cut to ``limit``
    characters; a huge integer is named by its size (its repr could not even be made)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 96:
        return f"{'-' if value < 0 else ''}about 10^{int(value.bit_length() * 0.30103)}"
    try:
        text = str(value) if isinstance(value, BaseException) else repr(value)
    except ValueError:  # an int with more digits than Python converts, deep inside a list
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REQUIRED = object()
NUMBER = (int, float)  # a JSON number (never a boolean)
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


class HeaderFields:
    """Checked reads of the JSON header fields of a tagged file (``metadata`` from ``load_tensors``).

    Every problem is an ActlabError naming the file and the field: ``"intervention file 'x' is
    damaged: interventions[0] has no 'site'; re-create it"``. Numbers are never booleans.
    """

    def __init__(self, path: str | Path, what: str, metadata: dict[str, str], hint: str = ""):
        self.path, self.what, self.metadata, self.hint = Path(path), what, metadata, hint

    def damaged(self, detail: str) -> ActlabError:
        then = f"; {self.hint}" if self.hint else ""
        return ActlabError(f"{self.what} file '{self.path}' is damaged: {detail}; re-create it{then}")

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        """A plain string field of the header."""
        if key not in self.metadata:
            if default is not _REQUIRED:
                return default
            raise self.damaged(f"its header has no '{key}' field")
        return self.metadata[key]

    def number(self, key: str, kind: type = float, default: str | Any = _REQUIRED) -> int | float:
        """A plain-text numeric field (``kind`` int or float), parsed; ``default`` is the text used when it is absent."""
        try:
            return kind(self.text(key, default))
        except ValueError:
            raise self.damaged(f"its {key} is not {'an integer' if kind is int else 'a number'}") from None

    def json(self, key: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        """A header field that holds JSON, parsed and of one of ``types``."""
        raw = self.text(key, default=None if default is not _REQUIRED else _REQUIRED)
        if raw is None:
            return default
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise self.damaged(f"its '{key}' header field is not valid JSON ({brief(e)})") from None
        return self.check(value, types, f"'{key}'")

    def item(self, obj: dict, key: str, types: type | tuple[type, ...], where: str, default: Any = _REQUIRED) -> Any:
        """``obj[key]`` (``obj`` read from the header at ``where``), of one of ``types``."""
        if key not in obj:
            if default is not _REQUIRED:
                return default
            raise self.damaged(f"{where} has no '{key}'")
        return self.check(obj[key], types, f"{where}.{key}")

    def check(self, value: Any, types: type | tuple[type, ...], where: str) -> Any:
        types = types if isinstance(types, tuple) else (types,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.damaged(f"{where} should be {wanted}, not {brief(value, 40)}")
        return value


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
