"""File-level helpers for the store: temp names, checksums, durable JSON and tensors, the directory lock.

Each helper takes a ``pathlib.Path`` (the local disk: fsync, rename, flock) or an ``FsPath`` (an
fsspec URL: the object written whole under a temp name, then moved; no lock), see store/remote.py.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

from actlab.errors import ActlabError
from actlab.files import open_tensors, save_tensors, to_jsonable, write_json
from actlab.store.remote import FsPath, RemoteTensors

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def tmp_path_for(path: Path) -> Path:
    """Hidden temp name next to ``path`` (same directory, so os.replace is atomic; the pid keeps
    two writers of one file apart)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def is_tmp_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def confined(directory: Path, name: str) -> Path:
    """``directory / name`` for a bare file name whose path, links resolved, stays inside ``directory``.

    ActlabError for anything else (a path, ``..``, an absolute name, a link to a file elsewhere): a
    store never reads or writes outside its folder, whatever its manifest says."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ActlabError(f"{str(name)[:80]!r} is not a bare file name inside the store {directory}")
    path = directory / name
    if path.is_symlink() and path.resolve().parent != directory.resolve():
        raise ActlabError(f"{path} is a link to {path.resolve()}, outside the store; a store only reads its own files")
    return path


def _sha256_written(path: Path) -> str:
    """sha256 of a file this process just wrote, hashed straight from the page cache (mmap, no copy).
    Only for our own files: a mapped file that someone truncates meanwhile would be a SIGBUS, so files
    of a store being checked are read in chunks (``sha256_file``)."""
    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


def _drop_from_page_cache(path: Path) -> None:
    """Tell the kernel it may drop the (clean, fsynced) cached pages of a shard just written.

    Why: a recording writes far more than it will read back soon, and on Linux a file that only grows
    the page cache costs ~2.4 ms of kernel CPU a MB to write (measured here: 39 ms for a 16 MB file
    against 3 ms when its pages come back free), about 10% of a forward of the benchmark model. The
    bytes are on disk; a later read just comes from the disk. No-op where ``posix_fadvise`` is missing."""
    if not hasattr(os, "posix_fadvise"):  # pragma: no cover - macOS, Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_file(path: Path | FsPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path | FsPath, data: dict) -> None:
    """The store's JSON files (manifest, shard markers): hidden temp name, fsync, rename."""
    if isinstance(path, FsPath):  # the same bytes as write_json's
        path.write_atomic((json.dumps(to_jsonable(data), indent=2) + "\n").encode("utf-8"), tmp_path_for(path))
        return
    write_json(path, data, tmp=tmp_path_for(path), durable=True)


def write_tensors(path: Path | FsPath, tensors: dict, metadata: dict[str, str]) -> tuple[int, str]:
    """A safetensors file written atomically (and durably on the local disk); returns (bytes, sha256).

    Elsewhere the file is serialised in memory (safetensors' own ``save``, the same bytes as
    ``save_file``) and hashed from those bytes, so it is read back from nowhere."""
    if isinstance(path, FsPath):
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        path.write_atomic(data, tmp_path_for(path))
        return len(data), hashlib.sha256(data).hexdigest()
    save_tensors(path, tensors, None, metadata, tmp=tmp_path_for(path), durable=True)
    size, digest = path.stat().st_size, _sha256_written(path)
    _drop_from_page_cache(path)
    return size, digest


def open_shard(path: Path | FsPath):
    """A lazy safetensors handle (``keys``, ``metadata``, ``get_slice``, ``get_tensor``), local or remote."""
    return RemoteTensors(path) if isinstance(path, FsPath) else open_tensors(path)


class DirLock:
    """A non-blocking flock on the store directory itself: exclusive for whoever plans or finalises
    a store (or records it whole), shared for the workers writing its shards.

    The kernel drops it when the process dies (kill -9 included), so a stale lock never blocks a
    resume. On systems without fcntl it does nothing.
    """

    def __init__(self, directory: Path | FsPath, *, shared: bool = False):
        self.directory = directory
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        if isinstance(self.directory, FsPath):  # fsspec backends have no locks: see docs/store.md
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ActlabError(
                f"another process or thread is recording into {self.directory}; wait for it to finish or stop it first"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
