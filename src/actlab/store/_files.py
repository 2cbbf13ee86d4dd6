"""File-level helpers for the store: atomic writes, checksums, the writer lock."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from actlab.errors import ActlabError

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def tmp_path_for(path: Path) -> Path:
    """Hidden temp name next to ``path`` (same directory, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def is_tmp_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def finish_atomic(tmp: Path, final: Path) -> None:
    """fsync a fully written temp file, then rename it over ``final`` and fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        finish_atomic(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class DirLock:
    """An exclusive, non-blocking flock on the store directory itself.

    The kernel drops it when the process dies (kill -9 included), so a stale lock never blocks a
    resume. On systems without fcntl it does nothing.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ActlabError(
                f"another process is recording into {self.directory}; wait for it to finish or stop it first"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
