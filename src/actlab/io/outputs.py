"""Checking where results will be written, before any long computation starts.

``check_output_file`` (a file path: not a directory, its folder writable) and ``check_output_dir``
(a folder of results: not a file, writable, and either new, empty, or one this kind of command
wrote before, recognised by a ``marker`` file in it). Writability is tested by creating and removing
a probe file, which is what counts (permissions, read-only mounts, root's exemptions alike); nothing
is left behind and no folder is created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from actlab.errors import ActlabError


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (where the first write would happen)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_writable(folder: Path, target: Path, option: str) -> None:
    if not folder.is_dir():
        raise ActlabError(f"cannot write {target}: {folder} is a file, not a folder; choose another {option} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".actlab-write-check-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ActlabError(f"cannot write into {folder} ({reason}); choose a folder you can write to for {option}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` can be written as a file: it is not a folder and its folder (or the nearest existing one
    above it, which the writer will create folders in) accepts new files. An existing file is replaced."""
    p = Path(path)
    if str(path).strip() == "":
        raise ActlabError(f"{option} is empty: give a file path")
    if p.is_dir():
        raise ActlabError(f"{p} is a folder; {option} needs a file path, e.g. {p / ('result' + (p.suffix or '.safetensors'))}")
    _check_writable(_existing_ancestor(p), p, option)
    return p


def check_output_dir(path: str | os.PathLike, markers: str | Sequence[str] = (), *, option: str = "--out",
                     what: str = "results") -> Path:
    """``path`` can receive a folder of results: it is not a file, it is writable, and if it already
    holds files, one of ``markers`` is among them (a folder this kind of command wrote before), so a
    typo never scatters results into, or replaces files of, an unrelated folder."""
    p = Path(path)
    if str(path).strip() == "":
        raise ActlabError(f"{option} is empty: give a folder path")
    if p.exists() and not p.is_dir():
        raise ActlabError(f"{p} is a file; {option} needs a folder for the {what} (a new or empty one)")
    if not p.exists():
        _check_writable(_existing_ancestor(p), p, option)
        return p
    names = [markers] if isinstance(markers, str) else list(markers)
    found = sorted(e.name for e in p.iterdir())
    if found and names and not any((p / m).exists() for m in names):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ActlabError(f"{p} already holds other files ({shown}) and no {' or '.join(names)}: it is not a folder of "
                          f"actlab {what}; choose a new or empty folder for {option}")
    _check_writable(p, p, option)
    return p
