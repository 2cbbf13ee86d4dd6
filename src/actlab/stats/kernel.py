"""One compiled pass over a float32 block: everything ``update.fast_block`` needs, read once from memory.

Why: the torch fast path walks each tile about 17 times (shifted sums, extrema, |x|, indicators, histogram
keys and a ``bincount`` that alone is half the time), which made streaming statistics cost 1.19x a forward.
This kernel reads each value once (a tile's column sums first, then the rest while the tile is in cache):
per-column sums in float64 around the tile's own mean (so a block's result depends on the block alone),
extrema, zero and ``|x| < eps`` counts, per-row small counts and max ``|x|``, and the histogram's raw keys
(sign, exponent and top mantissa bits: the same integer shift as ``SymlogBinning.raw_counts``). Integer
results are exactly the torch path's; the moments are more precise (float64 sums instead of float32).

Plain C compiled on first use with the system compiler into a per-user cache and called through ``ctypes``
(as ``actlab.sparse.kernel``); when it cannot be built the torch path runs, with one warning.
``ACTLAB_STATS_KERNEL=off`` forces the torch path.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from actlab.native import CKernel

__all__ = ["block_pass", "kernel_available"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* Returns 1 (outputs undefined) as soon as a non-finite value is seen, else 0. Tiles of `tr` rows.
   scratch: 4 * w doubles; hist: 4 * 2 * half int32 (sub-histograms; n * w < 2**31). */
int actlab_stats_block(const float *restrict x, int64_t n, int64_t w, int64_t tr, float eps, int32_t shift,
                       int32_t half, double *restrict mean, double *restrict m2, float *restrict mx,
                       float *restrict mn, int64_t *restrict zeros, int64_t *restrict small,
                       int64_t *restrict small_row, float *restrict rowmax, int64_t *restrict raw,
                       double *restrict scratch, int32_t *restrict hist) {
    double *restrict tsum = scratch, *restrict tsq = scratch + w, *restrict tmean = scratch + 2 * w;
    int32_t *restrict zc = (int32_t *)(scratch + 3 * w), *restrict sc = zc + w;  /* w doubles = 2w int32 */
    int64_t done = 0, n_raw = 2 * (int64_t)half;
    int32_t *restrict h0 = hist, *restrict h1 = hist + n_raw, *restrict h2 = hist + 2 * n_raw,
            *restrict h3 = hist + 3 * n_raw;
    for (int64_t i = 0; i < 4 * n_raw; ++i) hist[i] = 0;
    for (int64_t c = 0; c < w; ++c) { mean[c] = 0.0; m2[c] = 0.0; mx[c] = x[c]; mn[c] = x[c];  /* n >= 1 */
                                      zeros[c] = 0; small[c] = 0; }
    for (int64_t r0 = 0; r0 < n; r0 += tr) {
        int64_t m = r0 + tr < n ? tr : n - r0;
        const float *restrict xt = x + r0 * w;
        for (int64_t c = 0; c < w; ++c) { tsum[c] = 0.0; zc[c] = 0; sc[c] = 0; }
        for (int64_t i = 0; i < m; ++i) {
            const float *restrict row = xt + i * w;
            for (int64_t c = 0; c < w; ++c) tsum[c] += (double)row[c];
        }
        for (int64_t c = 0; c < w; ++c) { tmean[c] = tsum[c] / (double)m; tsum[c] = 0.0; tsq[c] = 0.0; }
        for (int64_t i = 0; i < m; ++i) {
            const float *restrict row = xt + i * w;
            const int32_t *restrict bits = (const int32_t *)row;
            int32_t bad = 0, srow = 0;
            float amax = 0.0f;
            for (int64_t c = 0; c < w; ++c) {
                float v = row[c], a = fabsf(v);
                bad |= (bits[c] & 0x7f800000) == 0x7f800000;
                double d = (double)v - tmean[c];
                tsum[c] += d;
                tsq[c] += d * d;
                mx[c] = v > mx[c] ? v : mx[c];
                mn[c] = v < mn[c] ? v : mn[c];
                amax = fmaxf(a, amax);
                zc[c] += v == 0.0f;
                sc[c] += a < eps;
            }
            for (int64_t c = 0; c < w; ++c) srow += fabsf(row[c]) < eps;
            if (bad) return 1;
            int64_t c = 0;  /* four interleaved sub-histograms: neighbours often share a bin */
            for (; c + 4 <= w; c += 4) {
                h0[(bits[c] >> shift) + half] += 1; h1[(bits[c + 1] >> shift) + half] += 1;
                h2[(bits[c + 2] >> shift) + half] += 1; h3[(bits[c + 3] >> shift) + half] += 1;
            }
            for (; c < w; ++c) h0[(bits[c] >> shift) + half] += 1;
            small_row[r0 + i] = srow;
            rowmax[r0 + i] = amax;
        }
        /* fold the tile's (m, mean, M2) into the block's: Chan's formula in float64 */
        double nb = (double)done, nt = (double)m, frac = nt / (nb + nt);
        for (int64_t c = 0; c < w; ++c) {
            double mt = tmean[c] + tsum[c] / nt;
            double m2t = tsq[c] - tsum[c] * tsum[c] / nt;
            m2t = m2t > 0.0 ? m2t : 0.0;
            double delta = mt - mean[c];
            mean[c] += delta * frac;
            m2[c] += m2t + delta * delta * nb * frac;
            zeros[c] += zc[c];
            small[c] += sc[c];
        }
        done += m;
    }
    for (int64_t i = 0; i < n_raw; ++i) raw[i] += (int64_t)h0[i] + h1[i] + h2[i] + h3[i];
    return 0;
}
"""

_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only")
_TILE_ELEMS = 1 << 15  # 128 KiB of float32 per tile: stays in L2 between the two passes
_KERNEL = CKernel(
    "stats_block", _SOURCE, _FLAGS, "actlab_stats_block", ctypes.c_int,
    [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_float] + [ctypes.c_int32] * 2 + [ctypes.c_void_p] * 11,
    env_switch="ACTLAB_STATS_KERNEL",
    warning="actlab.stats: the compiled statistics pass is unavailable ({reason}); using the torch path (same results, slower)")
_library = _KERNEL.library


def kernel_available() -> bool:
    return _KERNEL.available()


def _reset_for_tests() -> None:
    _KERNEL.reset()



class _Buffers(threading.local):
    def __init__(self):
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


_buffers = _Buffers()


def block_pass(xb: torch.Tensor, eps_w: float, shift: int, half: int, n_raw: int) -> dict | None:
    """The kernel's results for a contiguous float32 block ``[n, w]``, or None (holds NaN/inf, or no kernel).
    The per-column and per-row tensors are fresh; ``raw`` counts the histogram keys."""
    lib = _library()
    if lib is None or xb.dtype != torch.float32 or not xb.is_contiguous():
        return None
    n, w = xb.shape
    f64, i64 = torch.float64, torch.int64
    out = {"mean": torch.empty(w, dtype=f64), "m2": torch.empty(w, dtype=f64),
           "max": torch.empty(w, dtype=torch.float32), "min": torch.empty(w, dtype=torch.float32),
           "zeros": torch.empty(w, dtype=i64), "small": torch.empty(w, dtype=i64),
           "small_row": torch.empty(n, dtype=i64), "rowmax": torch.empty(n, dtype=torch.float32),
           "raw": torch.zeros(n_raw, dtype=i64)}
    scratch = _buffers.get("scratch", f64, 4 * w)
    tr = max(1, min(n, _TILE_ELEMS // w))
    bad = lib.actlab_stats_block(
        xb.data_ptr(), n, w, tr, ctypes.c_float(eps_w), shift, half,
        *(out[k].data_ptr() for k in ("mean", "m2", "max", "min", "zeros", "small", "small_row", "rowmax", "raw")),
        scratch.data_ptr(), _buffers.get("hist", torch.int32, 4 * n_raw).data_ptr())
    return None if bad else out
