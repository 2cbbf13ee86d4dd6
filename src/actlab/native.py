"""Plain C kernels compiled on first use and loaded through ``ctypes``: one builder for every kernel.

Why one module: the sparse matrix-vector kernel (``sparse.kernel``) and the statistics pass
(``stats.kernel``) need the same things — a per-user cache keyed by source, flags, compiler and CPU (a
``-march=native`` library built on another CPU is not reused), a temp-folder fallback for a read-only
home, an atomic install, an environment switch that forces the fallback, and one warning when the
kernel cannot be had. No torch headers: a build takes about a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["CKernel"]

_OFF = ("0", "off", "no", "false")


def cache_dir() -> Path:
    root = os.environ.get("ACTLAB_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "actlab" / "kernels"


def _cpu() -> str:
    """What ``-march=native`` depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


@dataclass
class CKernel:
    """One C function ``symbol`` in ``source``, built with ``flags`` into ``{name}_{hash}.so`` on first use.

    ``library()`` returns the loaded library, or None when it cannot be built or ``env_switch`` is set to
    off, and then warns once with ``warning`` (a template with ``{reason}``); ``warn_when_off`` also announces
    the forced fallback.
    """

    name: str
    source: str
    flags: Sequence[str]
    symbol: str
    restype: type
    argtypes: Sequence[type]
    env_switch: str
    warning: str  # e.g. "the kernel is unavailable ({reason}); using torch"
    warn_when_off: bool = False
    _state: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _build(self) -> ctypes.CDLL:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc / gcc) on PATH")
        key = hashlib.sha256((self.source + " ".join(self.flags) + compiler + _cpu()).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.name}_{key}.so"
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only home: build in the temp folder instead
                target = Path(tempfile.gettempdir()) / f"actlab-kernels-{getattr(os, 'getuid', lambda: 0)()}" / target.name
                target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(self.source)
                done = subprocess.run([compiler, *self.flags, str(src), "-o", str(out), "-lm"],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:]}")
                os.replace(out, target)
        lib = ctypes.CDLL(str(target))
        fn = getattr(lib, self.symbol)
        fn.restype, fn.argtypes = self.restype, list(self.argtypes)
        return lib

    def library(self) -> ctypes.CDLL | None:
        with self._lock:
            state = self._state
            if "lib" not in state and "error" not in state:
                if os.environ.get(self.env_switch, "").lower() in _OFF:
                    state["error"] = f"{self.env_switch}=off"
                    announce = self.warn_when_off
                else:
                    try:
                        state["lib"] = self._build()
                    except Exception as exc:  # any build or load failure means: use the fallback
                        state["error"] = str(exc) or type(exc).__name__
                    announce = "error" in state
                if announce:
                    warnings.warn(self.warning.format(reason=state["error"]), RuntimeWarning, stacklevel=3)
            return state.get("lib")

    def available(self) -> bool:
        """True when the kernel is built and loaded (builds it on first call; warns once if it cannot)."""
        return self.library() is not None

    def reset(self) -> None:
        """Forget the library and the error (tests)."""
        with self._lock:
            self._state.clear()
