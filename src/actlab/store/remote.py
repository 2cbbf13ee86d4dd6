"""Stores behind fsspec URLs (``memory://``, ``file://``, ``s3://``, ...): a path object and a shard reader.

Why a path object: the store's code walks its folder with a handful of ``pathlib`` calls (``/``,
``iterdir``, ``is_file``, ``stat().st_size``, ``unlink``, ``read_text``), so ``FsPath`` answers exactly
those through an fsspec filesystem and the rest of the store runs unchanged; a plain path stays a
``pathlib.Path`` and keeps the local rules (flock, fsync, rename). ``RemoteTensors`` reads a
safetensors file by byte ranges (the header, then only the rows asked for), with every header number
checked against the object's real size, as safetensors does for a local file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from actlab.errors import ActlabError

__all__ = ["FsPath", "RemoteTensors", "as_path", "is_url"]

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def is_url(value) -> bool:
    return isinstance(value, str) and "://" in value


def as_path(value) -> "Path | FsPath":
    """A ``pathlib.Path`` for a local path, an ``FsPath`` for an fsspec URL (or an ``FsPath`` as is)."""
    if isinstance(value, (Path, FsPath)):
        return value
    if is_url(value):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(value)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its driver (s3fs, gcsfs, ...) missing
            raise ActlabError(f"cannot open the store URL {value!r}: {' '.join(str(e).split())[:200]}") from None
        return FsPath(fs, path.rstrip("/") or "/")
    return Path(value)


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class FsPath:
    """A path on an fsspec filesystem, with the part of ``pathlib.Path``'s interface the store uses."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    # names
    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "FsPath":
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        return FsPath(self.fs, head or "/")

    def __truediv__(self, name: str) -> "FsPath":
        return FsPath(self.fs, f"{self.path.rstrip('/')}/{name}")

    def with_name(self, name: str) -> "FsPath":
        return self.parent / name

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"FsPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FsPath) and (self.fs, self.path) == (other.fs, other.path)

    def __hash__(self) -> int:
        return hash(self.path)

    def __lt__(self, other: "FsPath") -> bool:
        return self.path < other.path

    # queries: each one asks the filesystem afresh. Object-store drivers (s3fs, gcsfs, adlfs) answer from
    # a directory listing they cached, which lacks what other processes (the other ranks, a writer still
    # at work) wrote since, and still shows what they removed; one request per question is the price.
    def _fresh(self) -> str:
        self.fs.invalidate_cache(self.path)
        return self.path

    def exists(self) -> bool:
        return self.fs.exists(self._fresh())

    def is_file(self) -> bool:
        return self.fs.isfile(self._fresh())

    def is_dir(self) -> bool:
        return self.fs.isdir(self._fresh())

    def is_symlink(self) -> bool:
        return False  # object stores have no links; fsspec's local filesystem resolves them itself

    def resolve(self) -> "FsPath":
        return self

    def stat(self) -> _Stat:
        return _Stat(int(self.fs.size(self._fresh())))

    def iterdir(self):
        if not self.fs.isdir(self._fresh()):  # a listing must show what other writers added
            return iter(())
        names = sorted(p.rstrip("/") for p in self.fs.ls(self.path, detail=False))
        return iter([FsPath(self.fs, p) for p in names if p.rstrip("/") != self.path.rstrip("/")])

    # changes
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_atomic(self, data: bytes, tmp: "FsPath") -> None:
        """The whole object under its final name, or nothing there: written under ``tmp``, then moved
        (a rename on local and in-memory filesystems; a server-side copy on object stores, where an
        object appears only once complete)."""
        try:
            self.fs.pipe_file(tmp.path, data)
            self.fs.mv(tmp.path, self.path)
        finally:
            if self.fs.exists(tmp.path):
                self.fs.rm_file(tmp.path)


class _Slice:
    def __init__(self, owner: "RemoteTensors", key: str):
        self.owner, self.key = owner, key
        self.info = owner._header[key]

    def get_shape(self) -> list[int]:
        return list(self.info["shape"])

    def get_dtype(self) -> str:
        return self.info["dtype"]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        shape = self.get_shape()
        n = shape[0] if shape else 1
        a, b, step = rows.indices(n)
        if step != 1:
            raise ValueError("only contiguous row ranges are read from a remote shard")
        b = max(a, b)
        row_bytes = math.prod(shape[1:]) * _DTYPES[self.get_dtype()].itemsize
        start = self.owner._data + self.info["data_offsets"][0]
        data = self.owner.path.read_bytes(start + a * row_bytes, start + b * row_bytes) if b > a else b""
        t = torch.frombuffer(bytearray(data), dtype=_DTYPES[self.get_dtype()]) if data else \
            torch.empty(0, dtype=_DTYPES[self.get_dtype()])
        return t.reshape([b - a, *shape[1:]])


class RemoteTensors:
    """``safe_open``'s interface over a safetensors object read by ranges; ValueError for a broken header."""

    def __init__(self, path: FsPath):
        self.path = path
        size = path.stat().st_size
        if size < 8:
            raise ValueError(f"{size} bytes is too short for a safetensors file")
        n = int.from_bytes(path.read_bytes(0, 8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"the header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(path.read_bytes(8, 8 + n))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        self._meta = header.pop("__metadata__", None)
        self._data = 8 + n
        self._header = header
        _check_layout(header, size - self._data)

    def __enter__(self) -> "RemoteTensors":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return sorted(self._header)

    def metadata(self) -> dict | None:
        return self._meta

    def get_slice(self, key: str) -> _Slice:
        if key not in self._header:
            raise KeyError(key)
        return _Slice(self, key)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.get_slice(key)[:]


def _check_layout(header: dict, data_size: int) -> None:
    """Every tensor's bytes lie inside the data block, match its shape and dtype, and do not overlap."""
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise ValueError(f"tensor {key!r} has no dtype this store uses")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {key!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"tensor {key!r} has offsets {offsets!r} outside the {data_size}-byte data block")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[info["dtype"]].itemsize:
            raise ValueError(f"tensor {key!r}: {offsets[1] - offsets[0]} bytes for shape {shape}")
        spans.append(offsets)
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError("two tensors share bytes")

