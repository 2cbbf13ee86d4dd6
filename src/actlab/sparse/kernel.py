"""The activation-sparse matrix-vector kernel: ``y = sum_{j kept} x_j * W_t[j, :]`` over input-major weights.

A decode step multiplies one activation vector per sequence by each weight matrix. When most input
channels are (or are set to) zero, only the kept rows of the transposed weight ``W_t = W.T``
(``[in, out]``, each input channel's weights contiguous) need to be read: the work and the memory
traffic fall with the sparsity. The kernel fuses the threshold (channel j is kept where
``|x_j| > threshold_j``), the gather of the kept channels and the multiply-accumulate of their rows,
eight rows per pass over the output, the output split into column tiles (one per thread when
``threads > 1``, OpenMP).

It is plain C, compiled on first use with the system's C compiler (``cc -O3 -march=native
-fopenmp``) into a per-user cache and called through ``ctypes`` on the tensors' memory: no torch
headers, so it builds in about a second (a ``torch.utils.cpp_extension`` build of the same loop
compiles the torch headers and takes a minute on this project's machines). When it cannot be built
(no compiler, another platform) ``sparse_matvec`` announces it in one warning and falls back to
dense torch with the same zeros, which gives the same numbers up to summation order.
``ACTLAB_SPARSE_KERNEL=off`` forces the fallback.
"""

from __future__ import annotations

import ctypes

import torch

from actlab.errors import ActlabError
from actlab.native import CKernel

__all__ = ["kernel_available", "sparse_matvec", "input_major", "kept_fraction"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void rows_into(const float *restrict wt, int64_t n_out, const int32_t *idx, const float *val, int64_t n,
                      float *restrict y, int64_t c0, int64_t c1) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const float *r0 = wt + (int64_t)idx[k] * n_out, *r1 = wt + (int64_t)idx[k + 1] * n_out;
        const float *r2 = wt + (int64_t)idx[k + 2] * n_out, *r3 = wt + (int64_t)idx[k + 3] * n_out;
        const float *r4 = wt + (int64_t)idx[k + 4] * n_out, *r5 = wt + (int64_t)idx[k + 5] * n_out;
        const float *r6 = wt + (int64_t)idx[k + 6] * n_out, *r7 = wt + (int64_t)idx[k + 7] * n_out;
        const float a0 = val[k], a1 = val[k + 1], a2 = val[k + 2], a3 = val[k + 3];
        const float a4 = val[k + 4], a5 = val[k + 5], a6 = val[k + 6], a7 = val[k + 7];
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c)
            y[c] += (a0 * r0[c] + a1 * r1[c]) + (a2 * r2[c] + a3 * r3[c]) + (a4 * r4[c] + a5 * r5[c])
                  + (a6 * r6[c] + a7 * r7[c]);
    }
    for (; k + 4 <= n; k += 4) {
        const float *r0 = wt + (int64_t)idx[k] * n_out, *r1 = wt + (int64_t)idx[k + 1] * n_out;
        const float *r2 = wt + (int64_t)idx[k + 2] * n_out, *r3 = wt + (int64_t)idx[k + 3] * n_out;
        const float a0 = val[k], a1 = val[k + 1], a2 = val[k + 2], a3 = val[k + 3];
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c) y[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
    }
    for (; k < n; ++k) {
        const float *r = wt + (int64_t)idx[k] * n_out;
        const float a = val[k];
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c) y[c] += a * r[c];
    }
}

/* y[b, :] = bias + sum over j with |x[b, j]| > thr[j] of x[b, j] * wt[j, :]; returns the number of kept channels.
   idx / val are caller scratch of n_in entries; thr and bias may be NULL. */
int64_t actlab_sparse_matvec(const float *x, const float *wt, const float *thr, const float *bias, float *y,
                             int64_t n_rows, int64_t n_in, int64_t n_out, int32_t *idx, float *val,
                             int64_t tile, int64_t threads) {
    int64_t kept = 0;
    for (int64_t b = 0; b < n_rows; ++b) {
        const float *xb = x + b * n_in;
        float *yb = y + b * n_out;
        int64_t n = 0;
        for (int64_t j = 0; j < n_in; ++j) {
            const float v = xb[j];
            if (fabsf(v) > (thr ? thr[j] : 0.0f)) { idx[n] = (int32_t)j; val[n] = v; ++n; }
        }
        kept += n;
        for (int64_t c = 0; c < n_out; ++c) yb[c] = bias ? bias[c] : 0.0f;
        int64_t n_tiles = (n_out + tile - 1) / tile;
        #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t t = 0; t < n_tiles; ++t) {
            int64_t c0 = t * tile, c1 = c0 + tile < n_out ? c0 + tile : n_out;
            rows_into(wt, n_out, idx, val, n, yb, c0, c1);
        }
    }
    return kept;
}
"""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
TILE = 2048  # output columns per tile: 8 KiB of y, eight 8 KiB row segments per pass
_KERNEL = CKernel(
    "sparse_matvec", _SOURCE, _FLAGS, "actlab_sparse_matvec", ctypes.c_int64,
    [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2,
    env_switch="ACTLAB_SPARSE_KERNEL", warn_when_off=True,
    warning="actlab.sparse: the compiled sparse kernel is unavailable ({reason}); using dense torch with the same zeros")
_library = _KERNEL.library


def kernel_available() -> bool:
    """True when the compiled kernel is built and loaded (builds it on first call; warns once if it cannot)."""
    return _KERNEL.available()


def _reset_for_tests() -> None:
    _KERNEL.reset()



def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` weight (nn.Linear's orientation, as ``model.anatomy`` gives it) as the kernel's
    contiguous float32 ``[in, out]``: done once, at load."""
    if weight.ndim != 2:
        raise ActlabError(f"a weight matrix is 2-D [out, in], not shape {tuple(weight.shape)}")
    return weight.detach().to("cpu", torch.float32).T.contiguous()


def _dense(x, wt, threshold, bias):
    keep = x.abs() > (threshold if threshold is not None else 0.0)
    y = torch.where(keep, x, torch.zeros_like(x)) @ wt
    return (y + bias if bias is not None else y), int(keep.sum())


def _check(x, wt, threshold, bias) -> None:
    if wt.ndim != 2 or wt.dtype != torch.float32 or wt.device.type != "cpu" or not wt.is_contiguous():
        raise ActlabError("the sparse kernel takes contiguous float32 CPU weights [in, out]: prepare them once "
                          "with actlab.sparse.kernel.input_major(weight)")
    if x.ndim != 2 or x.shape[1] != wt.shape[0]:
        raise ActlabError(f"sparse_matvec: x must be [rows, {wt.shape[0]}] for weights {tuple(wt.shape)}, "
                          f"not {tuple(x.shape)}")
    for name, t, n in (("threshold", threshold, wt.shape[0]), ("bias", bias, wt.shape[1])):
        if t is not None and (t.shape != (n,) or t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ActlabError(f"sparse_matvec: {name} must be a float32 CPU vector of {n}, not "
                              f"{tuple(t.shape)} {t.dtype}")


def sparse_matvec(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, *, threads: int = 1, count: list | None = None) -> torch.Tensor:
    """``x [rows, in] -> [rows, out]``: each row times ``wt`` (``[in, out]``, from ``input_major``) over the
    channels with ``|x_j| > threshold_j`` (every nonzero channel when ``threshold`` is None), plus ``bias``.

    Equals ``where(|x| > threshold, x, 0) @ wt + bias`` up to float32 summation order. ``count``, a list,
    gets the number of kept (row, channel) pairs appended. Falls back to that dense expression, with one
    warning, when the compiled kernel is unavailable.
    """
    _check(x, wt, threshold, bias)
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu":
        y, kept = _dense(x.to(wt.dtype), wt, threshold, bias)
    else:
        x = x.contiguous()
        rows, n_in, n_out = x.shape[0], wt.shape[0], wt.shape[1]
        y = torch.empty(rows, n_out, dtype=torch.float32)
        idx = torch.empty(n_in, dtype=torch.int32)
        val = torch.empty(n_in, dtype=torch.float32)
        ptr = (lambda t: t.data_ptr() if t is not None else None)  # noqa: E731
        tile = TILE if threads <= 1 else max(16, -(-(-(-n_out // threads)) // 16) * 16)
        kept = lib.actlab_sparse_matvec(ptr(x), ptr(wt), ptr(threshold), ptr(bias), ptr(y), rows, n_in, n_out,
                                        ptr(idx), ptr(val), tile, max(1, int(threads)))
    if count is not None:
        count.append(int(kept))
    return y


def kept_fraction(x: torch.Tensor, threshold: torch.Tensor | None) -> float:
    """The fraction of entries of ``x`` the kernel would keep (``|x_j| > threshold_j``)."""
    return float((x.abs() > (threshold if threshold is not None else 0.0)).float().mean())
