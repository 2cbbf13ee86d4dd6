"""One compiled pass over a float32 block: everything ``update.fast_block`` needs, each value read once.

Why: the torch fast path walks each tile about 17 times (shifted sums, extrema, |x|, indicators, histogram
keys and a ``bincount`` that alone is half the time). This kernel reads each value once, row by row, and
per value does a few vector instructions and one scalar histogram increment: per-column sums in float64 of
``x - x_first`` (the tile's first row: a function of the tile alone, and by Samuelson's inequality every
value lies within sqrt(m - 1) standard deviations of the tile's mean, so cancellation costs at most a factor
m of float64 precision), extrema, zero and ``|x| < eps`` counts, max ``|x|`` per row, the per-row sparsity
histogram, and the value histogram. Its keys are the sign, exponent and top mantissa bits of each value (the
integer shift of ``SymlogBinning.raw_counts``) clamped to the grid's range, counted in up to 16 interleaved
sub-histograms (neighbours often share a bin) and folded onto the bins with ``SymlogBinning.fold_map``.
For a site that has seen no NaN/inf it also folds the block into the site's state (Chan's formula; each
small torch op after a pass that streamed megabytes through the caches costs tens of microseconds).
Integer results are exactly the torch path's; the moments are more precise (float64 sums).

Plain C compiled on first use with the system compiler into a per-user cache and called through ``ctypes``
(as ``actlab.sparse.kernel``); when it cannot be built the torch path runs, with one warning.
``ACTLAB_STATS_KERNEL=off`` forces the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import struct
import threading
from dataclasses import dataclass

import torch

from actlab.native import CKernel
from actlab.stats.binning import SymlogBinning

__all__ = ["block_pass", "kernel_available"]

_SOURCE = r"""
#include <stdint.h>

/* One row: float64 sums of x - shift, extrema, zero and small counts, max |x| (as bits: for non-NaN floats
   their order is |x|'s) and each value's histogram slot, its key (exponent and top mantissa bits, clamped to
   the grid, complemented for negative values) plus its column's lane offset. Returns the small count. */
static inline int32_t row_pass(const float *restrict row, int64_t w, const double *restrict shiftd,
                               double *restrict s1, double *restrict s2, float *restrict mx, float *restrict mn,
                               int32_t *restrict zc, int32_t *restrict sc, int32_t *restrict slot,
                               const int32_t *restrict laneoff, uint32_t eps_bits, int32_t shift, int32_t key_lo,
                               int32_t key_hi, uint32_t *restrict amax_out) {
    const uint32_t *restrict bits = (const uint32_t *)row;
    int32_t srow = 0;
    uint32_t amax = 0;
    for (int64_t c = 0; c < w; ++c) {
        float v = row[c];
        double d = (double)v - shiftd[c];
        uint32_t u = bits[c], ua = u & 0x7fffffffu;
        int32_t is_small = ua < eps_bits;
        s1[c] += d;
        s2[c] += d * d;
        mx[c] = v > mx[c] ? v : mx[c];
        mn[c] = v < mn[c] ? v : mn[c];
        amax = ua > amax ? ua : amax;
        zc[c] += ua == 0;
        sc[c] += is_small;
        srow += is_small;
    }
    for (int64_t c = 0; c < w; ++c) {  /* apart: fewer live vector registers, a little faster */
        uint32_t u = bits[c];
        int32_t key = (int32_t)((u & 0x7fffffffu) >> shift);
        key = key < key_lo ? key_lo : key;
        key = key > key_hi ? key_hi : key;
        slot[c] = (key ^ ((int32_t)u >> 31)) + laneoff[c];
    }
    *amax_out = amax;
    return srow;
}

static inline void scatter(const int32_t *restrict slot, int64_t w, int32_t *restrict sub) {
    int64_t c = 0;
    for (; c + 8 <= w; c += 8) {
        sub[slot[c]] += 1; sub[slot[c + 1]] += 1; sub[slot[c + 2]] += 1; sub[slot[c + 3]] += 1;
        sub[slot[c + 4]] += 1; sub[slot[c + 5]] += 1; sub[slot[c + 6]] += 1; sub[slot[c + 7]] += 1;
    }
    for (; c < w; ++c) sub[slot[c]] += 1;
}

/* The tile's (m, mean, M2) into the block's (Chan's formula); 1 if a sum is not finite (NaN / inf seen). */
static inline int fold_tile(int64_t w, int64_t done, int64_t m, const double *restrict shiftd,
                            const double *restrict s1, const double *restrict s2, int32_t *restrict zc,
                            int32_t *restrict sc, double *restrict mean, double *restrict m2,
                            int64_t *restrict zeros, int64_t *restrict small) {
    double nb = (double)done, nt = (double)m, frac = nt / (nb + nt);
    int bad = 0;
    for (int64_t c = 0; c < w; ++c) {
        bad |= !(s1[c] - s1[c] == 0.0) | !(s2[c] - s2[c] == 0.0);
        double mt = shiftd[c] + s1[c] / nt, m2t = s2[c] - s1[c] * s1[c] / nt;
        double delta = mt - mean[c];
        m2t = m2t > 0.0 ? m2t : 0.0;
        mean[c] += delta * frac;
        m2[c] += m2t + delta * delta * nb * frac;
        zeros[c] += zc[c];
        small[c] += sc[c];
        zc[c] = 0;
        sc[c] = 0;
    }
    return bad;
}

/* The block's results into the site's, in place of the block's (mean, m2, extrema; Chan's formula with the
   site's n_a = count values in every channel) and into the site's counters. */
static void fold_into_site(int64_t w, int64_t n, int64_t count, double *restrict mean, double *restrict m2,
                           double *restrict bmax, double *restrict bmin, double *restrict absmax,
                           const int64_t *restrict zeros, const int64_t *restrict small,
                           const int64_t *restrict active, double *const *restrict site, int64_t *const *restrict cnt) {
    const double *s_mean = site[0], *s_m2 = site[1], *s_max = site[2], *s_min = site[3], *s_abs = site[4];
    double frac = (double)n / ((double)count + (double)n), cw = (double)count * frac;
    for (int64_t c = 0; c < w; ++c) {
        double delta = mean[c] - s_mean[c];
        mean[c] = s_mean[c] + frac * delta;
        m2[c] = (s_m2[c] + m2[c]) + cw * delta * delta;
        bmax[c] = s_max[c] > bmax[c] ? s_max[c] : bmax[c];
        bmin[c] = s_min[c] < bmin[c] ? s_min[c] : bmin[c];
        absmax[c] = s_abs[c] > absmax[c] ? s_abs[c] : absmax[c];
        cnt[0][c] += zeros[c];
        cnt[1][c] += small[c];
        cnt[2][c] += active[c];
    }
}

/* Returns 1 (outputs undefined, hist and sparsity untouched) when the block holds NaN or inf, else 0 after
   adding the block's value histogram to hist and its per-row sparsity histogram to sparsity; with site (the
   site's mean, m2, max, min, absmax; all its channels hold count values) and cnt (its zeros, small, active),
   the outputs are then the site's new values and its counters are added to.
   work: 3w doubles, 2w floats, 4w + n int32, then the lanes' sub-histograms, lanes * 2 * (key_hi + 1) int32. */
int actlab_stats_block(const float *restrict x, int64_t n, int64_t w, int64_t tr, uint32_t eps_bits, int32_t shift,
                       int32_t key_lo, int32_t key_hi, int32_t lanes, int64_t sparsity_bins,
                       double *restrict mean, double *restrict m2, double *restrict bmax, double *restrict bmin,
                       double *restrict absmax, int64_t *restrict zeros, int64_t *restrict small,
                       int64_t *restrict active, float *restrict rowmax, const int64_t *restrict bin_of,
                       int64_t *restrict hist, int64_t *restrict sparsity, double *const *site, int64_t *const *cnt,
                       int64_t count, void *restrict work) {
    double *shiftd = (double *)work, *s1 = shiftd + w, *s2 = s1 + w;
    float *mx = (float *)(s2 + w), *mn = mx + w;
    int32_t *zc = (int32_t *)(mn + w), *sc = zc + w, *laneoff = sc + w, *slot = laneoff + w, *srows = slot + w;
    int32_t *sub = srows + n;
    const int64_t span = 2 * ((int64_t)key_hi + 1), mid = key_hi + 1;
    for (int64_t l = 0; l < lanes; ++l)
        for (int64_t k = key_lo; k <= key_hi; ++k) sub[l * span + mid + k] = sub[l * span + mid - 1 - k] = 0;
    for (int64_t c = 0; c < w; ++c) {
        mean[c] = m2[c] = 0.0;
        mx[c] = mn[c] = x[c];  /* n >= 1 */
        zeros[c] = small[c] = 0;
        zc[c] = sc[c] = 0;
        laneoff[c] = (int32_t)((c % lanes) * span + mid);
    }
    for (int64_t r0 = 0; r0 < n; r0 += tr) {
        int64_t m = r0 + tr < n ? tr : n - r0;
        const float *xt = x + r0 * w;
        /* the shift is the tile's first row: every value lies within sqrt(m - 1) standard deviations of the
           tile's mean (Samuelson), so float64 sums lose at most a factor m to cancellation */
        for (int64_t c = 0; c < w; ++c) { shiftd[c] = (double)xt[c]; s1[c] = s2[c] = 0.0; }
        for (int64_t i = 0; i < m; ++i) {
            uint32_t amax;
            srows[r0 + i] = row_pass(xt + i * w, w, shiftd, s1, s2, mx, mn, zc, sc, slot, laneoff, eps_bits, shift,
                                     key_lo, key_hi, &amax);
            scatter(slot, w, sub);
            union { uint32_t u; float f; } am = {amax};
            rowmax[r0 + i] = am.f;
        }
        if (fold_tile(w, r0, m, shiftd, s1, s2, zc, sc, mean, m2, zeros, small)) return 1;
    }
    for (int64_t c = 0; c < w; ++c) {
        double hi = (double)mx[c], lo = (double)mn[c], ahi = hi < 0.0 ? -hi : hi, alo = lo < 0.0 ? -lo : lo;
        bmax[c] = hi;
        bmin[c] = lo;
        absmax[c] = ahi > alo ? ahi : alo;
        active[c] = n - small[c];
    }
    if (site) fold_into_site(w, n, count, mean, m2, bmax, bmin, absmax, zeros, small, active, site, cnt);
    for (int64_t k = -mid; k < mid; ++k) {
        if (k > -1 - key_lo && k < key_lo) continue;  /* no value has this key */
        int64_t t = 0;
        for (int64_t l = 0; l < lanes; ++l) t += sub[l * span + mid + k];
        hist[bin_of[mid + k]] += t;
    }
    for (int64_t i = 0; i < n; ++i) {
        int64_t b = (int64_t)srows[i] * sparsity_bins / w;
        sparsity[b < sparsity_bins ? b : sparsity_bins - 1] += 1;
    }
    return 0;
}
"""

# 512-bit vectors where the CPU has them: the row loop is bound by vector instructions (x86 compilers
# default to 256-bit ones even with -march=native)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math",
          *(("-mprefer-vector-width=512",) if _X86 else ()))
_TILE_ROWS = 128  # rows per tile, each summed around its first row (see the module docstring)
_SUB_HIST_SLOTS = 1 << 13  # 32 KiB of int32 sub-histograms (an L1 cache): up to 16 lanes
_KERNEL = CKernel(
    "stats_block", _SOURCE, _FLAGS, "actlab_stats_block", ctypes.c_int,
    [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_uint32] + [ctypes.c_int32] * 4 + [ctypes.c_int64]
    + [ctypes.c_void_p] * 14 + [ctypes.c_int64, ctypes.c_void_p],
    env_switch="ACTLAB_STATS_KERNEL",
    warning="actlab.stats: the compiled statistics pass is unavailable ({reason}); using the torch path (same results, slower)")
_library = _KERNEL.library


def kernel_available() -> bool:
    return _KERNEL.available()


def _reset_for_tests() -> None:
    _KERNEL.reset()


@dataclass(frozen=True)
class _Grid:
    """A binning's float32 keys as the kernel clamps them, and the bin of every clamped key."""

    shift: int
    key_lo: int  # magnitude keys below it are all in the center bin
    key_hi: int  # magnitude keys at or above it are all in an overflow bin
    bin_of: torch.Tensor  # int64 [2 * (key_hi + 1)]: bin of key k (k < 0: a negative value's) at k + key_hi + 1
    lanes: int  # sub-histograms (columns round-robin): fewer for fine grids, so that they stay in cache


@functools.lru_cache(maxsize=None)
def _grid(binning: SymlogBinning) -> _Grid:
    """Built once per grid (every site of a sink shares it)."""
    shift, half, _ = binning.raw_shift(torch.float32)
    m = binning.bins_per_octave.bit_length() - 1
    key_lo, key_hi = ((binning.lo_exp + 127) << m) - 1, (binning.hi_exp + 127) << m
    k = torch.arange(-key_hi - 1, key_hi + 1)
    # a negative value's raw key (SymlogBinning.raw_counts) is its magnitude key, a positive one's half + it
    raw = torch.where(k >= 0, half + k, -1 - k)
    lanes = max(1, min(16, _SUB_HIST_SLOTS // (2 * (key_hi - key_lo + 1))))
    return _Grid(shift, key_lo, key_hi, binning.fold_map(torch.float32)[raw].contiguous(), lanes)


@functools.lru_cache(maxsize=64)
def _eps_bits(eps: float) -> int:
    """The bits of eps rounded to float32: for finite x, ``|x| < eps`` is ``bits(|x|) < bits(eps)``."""
    return struct.unpack("<I", struct.pack("<f", float(torch.tensor(eps, dtype=torch.float32))))[0]


class _Work(threading.local):
    """A thread's scratch bytes, grown as needed and reused: no allocation (nor page faults) per block."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


_work = _Work()


def block_pass(xb: torch.Tensor, eps: float, binning: SymlogBinning, hist: torch.Tensor,
               sparsity: torch.Tensor, site: tuple | None = None) -> dict | None:
    """The kernel's per-column results (fresh tensors) and max ``|x|`` per row for a contiguous float32 block
    ``[n, w]``, having added its value histogram to ``hist`` and its sparsity histogram to ``sparsity`` (both
    int64); or None, changing nothing, when the block holds NaN/inf (or there is no kernel).

    ``site`` = (mean, m2, max, min, absmax, zeros, small, active, count) of a site whose every channel holds
    ``count`` values (float64 / int64 ``[w]``, contiguous): the block is folded into it, the returned mean,
    m2, max, min and absmax are the site's new ones (fresh) and its zeros, small and active are added to
    (``out["merged"]`` says which)."""
    lib = _library()
    if lib is None or xb.dtype != torch.float32 or not xb.is_contiguous():
        return None
    n, w = xb.shape
    g = _grid(binning)
    f64, i64 = torch.float64, torch.int64
    out = dict(zip(("mean", "m2", "max", "min", "absmax"), torch.empty(5, w, dtype=f64)))
    out.update(zip(("zeros", "small", "active"), torch.empty(3, w, dtype=i64)))
    out["rowmax"] = torch.empty(n, dtype=torch.float32)
    work = _work.get(8 * 3 * w + 4 * (6 * w + n) + 4 * g.lanes * 2 * (g.key_hi + 1))
    ptrs, count = (None, None), 0
    if site is not None and not all(t.is_contiguous() for t in site[:8]):
        site = None  # then the block's own results, for the caller to fold (see "merged")
    if site is not None:
        ptrs = ((ctypes.c_void_p * 5)(*(t.data_ptr() for t in site[:5])),
                (ctypes.c_void_p * 3)(*(t.data_ptr() for t in site[5:8])))
        count = site[8]
    bad = lib.actlab_stats_block(
        xb.data_ptr(), n, w, min(n, _TILE_ROWS), _eps_bits(eps), g.shift, g.key_lo, g.key_hi, g.lanes,
        sparsity.numel(),
        *(out[k].data_ptr() for k in ("mean", "m2", "max", "min", "absmax", "zeros", "small", "active", "rowmax")),
        g.bin_of.data_ptr(), hist.data_ptr(), sparsity.data_ptr(), *ptrs, count, work.data_ptr())
    out["merged"] = site is not None
    return None if bad else out
