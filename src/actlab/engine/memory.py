"""Keep freed memory for reuse: the CPU cost of fresh pages that recording and statistics pay per batch.

Why: every captured activation is a fresh tensor of megabytes. glibc serves such sizes with ``mmap`` and
hands them back to the kernel when freed (or trims the heap top), so the next batch page-faults and zeroes
the same memory again: measured here on a 12.7M Llama, 8 x 256 tokens, 12 captured sites, that was ~25%
of the forward's CPU time (docs/benchmarks.md). Raising glibc's mmap and trim thresholds (``mallopt``, the
same knobs as the ``MALLOC_*_`` environment variables) lets freed blocks be reused instead. It changes the
allocator of the whole process, so it is done once, only by the verbs that loop over many batches
(``engine.run``: record, stats, collect, profiles), never on import; ``ACTLAB_MALLOC_TUNING=off`` leaves
the allocator alone. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value: blocks below it come from the reusable heap
TRIM_THRESHOLD = 1 * 2**30  # free heap top kept before it is returned to the kernel
TOP_PAD = 64 * 2**20

_done: bool | None = None


def retain_freed_memory() -> bool:
    """Tune glibc once per process so freed activation buffers are reused; True if the allocator was tuned."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("ACTLAB_MALLOC_TUNING", "").lower() in ("off", "0", "false", "no") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _done
