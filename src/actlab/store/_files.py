"""File-level helpers for the store: temp names, checksums, durable JSON, the directory lock."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from actlab.errors import ActlabError
from actlab.files import write_json

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """The store's JSON files (manifest, shard markers): hidden temp name, fsync, rename."""
    write_json(path, data, tmp=tmp_path_for(path), durable=True)


class DirLock:
    """A non-blocking flock on the store directory itself: exclusive for whoever plans or finalises
    a store (or records it whole), shared for the workers writing its shards.

    The kernel drops it when the process dies (kill -9 included), so a stale lock never blocks a
    resume. On systems without fcntl it does nothing.
    """

    def __init__(self, directory: Path, *, shared: bool = False):
        self.directory = directory
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
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
