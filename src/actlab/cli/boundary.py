"""The command line's one error boundary: every command runs inside ``friendly``.

* A problem with the user's input or environment (an ``ActlabError``, a path that is missing, a
  folder where a file belongs, no permission, a full disk, a file that is not UTF-8 or not JSON, out
  of memory) is one red line, ``error: what is wrong; what to do``, and exit code 2.
* Anything else is a bug in actlab: one line saying so, with the path of a log file holding the full
  traceback (``$ACTLAB_LOG_DIR``, else ``$XDG_STATE_HOME/actlab/logs``, else ``~/.cache/actlab/logs``,
  else the temp folder), and exit code 1.
* Ctrl-C is exit 130 and a note that finished work is kept. Warnings print as one yellow line.

Messages are printed without markup (a path with brackets prints as it is) and never wrapped.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

import click
import typer
from rich.console import Console
from rich.markup import escape

from actlab.errors import ActlabError

PASS_THROUGH = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)
console = Console()
err_console = Console(stderr=True)
MAX_LOGS = 50

_OS_REASONS = {
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EISDIR: ("is a folder, where a file is expected", "give a file path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EACCES: ("permission denied", "choose a path you may read or write, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may read or write, or change its permissions"),
    errno.EROFS: ("the file system is read-only", "write somewhere else"),
    errno.ENOSPC: ("no space left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write somewhere else"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EPIPE: ("the output was closed before the command finished", "read the whole output"),
}


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the indentation after them) folded into single spaces."""
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _os_message(exc: OSError) -> str | None:
    known = _OS_REASONS.get(exc.errno)
    where = exc.filename if exc.filename is not None else None
    if known is None and where is None:
        return None  # an OSError with neither a path nor a known cause: treat it as internal
    reason, fix = known or (exc.strerror or type(exc).__name__, "check the path and its permissions")
    target = f"{where} → {exc.filename2}" if where is not None and exc.filename2 is not None else where
    return f"{target}: {reason}; {fix}" if target is not None else f"{reason}; {fix}"


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception the user caused (their input, files or machine), else None."""
    if isinstance(exc, ActlabError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        byte = exc.object[exc.start:exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
        return f"a file is not valid UTF-8 (byte 0x{byte} at offset {exc.start}: {exc.reason}); re-encode it as UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"a file is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix or re-create it"
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ("out of memory; use a smaller --batch-size or --max-tokens, or a smaller --dtype such as bfloat16 "
                "(or free memory and run again)")
    return None


# ------------------------------------------------------------------ crash logs
def log_dirs() -> Iterator[Path]:
    """Where crash logs go, in order of preference (the first one that can be written is used)."""
    for env, sub in (("ACTLAB_LOG_DIR", ()), ("XDG_STATE_HOME", ("actlab", "logs"))):
        if os.environ.get(env):
            yield Path(os.environ[env], *sub)
    yield Path.home() / ".cache" / "actlab" / "logs"
    yield Path(tempfile.gettempdir()) / "actlab-logs"


def _log_text(exc: BaseException) -> str:
    from actlab import __version__

    versions = [f"actlab {__version__}", f"python {platform.python_version()}", platform.platform()]
    for name in ("torch", "transformers", "safetensors"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
    lines = [f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}", f"command: {' '.join(sys.argv)}",
             f"versions: {', '.join(versions)}", ""]
    return "\n".join(lines) + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def write_crash_log(exc: BaseException) -> Path | None:
    """The full traceback of ``exc`` in a new log file; its path (None if no folder could be written)."""
    text = _log_text(exc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in log_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}-{time.perf_counter_ns() % 10**6:06d}.log"
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        old = sorted(folder.glob("crash-*.log"))[:-MAX_LOGS]
        for stale in old:
            stale.unlink(missing_ok=True)
        return path
    return None


# ------------------------------------------------------------------ the boundary
def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(one_line(str(message)))}", soft_wrap=True, highlight=False)


def fail(exc: Exception) -> None:
    """Print ``exc`` as one line and exit: 2 for the user's problems, 1 (with a crash log) for bugs."""
    message = user_message(exc)
    if message is not None:
        err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    log = write_crash_log(exc)
    where = f"the full traceback is in {log}" if log is not None else "no log folder could be written"
    summary = one_line(f"{type(exc).__name__}: {exc}")[:300]
    err_console.print(f"[bold red]internal error[/] (a bug in actlab, not in your input): {escape(summary)}; "
                      f"{escape(where)}; please report it with that file", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


def friendly(fn: Callable) -> Callable:
    """Run a command inside the error boundary (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Model config.*")
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except PASS_THROUGH:  # a command's own exit (``store verify`` exits 1 on damage), usage errors
                raise
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]: finished work is kept; run the same command again to resume")
                raise typer.Exit(130)
            except Exception as exc:  # noqa: BLE001 - this is the boundary
                fail(exc)

    return wrapper
