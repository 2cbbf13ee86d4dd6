"""The top-k merge of one all-finite float32 block, compiled: ``topk.merge_top(kept, topk.block_top(...))``.

Why: after the statistics pass has streamed a block through the caches, each of the ~20 small numpy calls
of ``block_top`` and ``select_top`` runs cold (tens of microseconds each), which made the top-k the largest
Python cost of a site. This does the same selection in one call: the k-th largest row max by a radix
select on the float bits (non-negative floats order like their bits), the candidate entries of the rows
that can hold the block's k best, their k best (ties by row, then channel), then a merge with the kept
entries by (|value| descending, doc, position, channel), kept entries first on a full tie, exactly as
``select_top``'s stable lexsort of the concatenation. Blocks with NaN (the exact path) keep the numpy code.
"""

from __future__ import annotations

import ctypes

import torch

from actlab.native import CKernel
from actlab.stats.kernel import _FLAGS, _Work

__all__ = ["merge_block_top"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

/* The kk-th largest (1 <= kk <= n) of b[0..n), by four 8-bit radix passes. */
static uint32_t kth_largest(const uint32_t *b, int64_t n, int64_t kk) {
    uint32_t prefix = 0, mask = 0;
    for (int s = 24; s >= 0; s -= 8) {
        int64_t cnt[256] = {0};
        for (int64_t i = 0; i < n; ++i)
            if ((b[i] & mask) == prefix) cnt[(b[i] >> s) & 255u] += 1;
        int d = 255;
        for (; d > 0 && kk > cnt[d]; --d) kk -= cnt[d];
        prefix |= (uint32_t)d << s;
        mask |= 255u << s;
    }
    return prefix;
}

typedef struct { double a; int64_t doc, pos, ch, idx; } entry;

/* select_top's order: |value| descending, then doc, position, channel, then place in the concatenation. */
static int before(const entry *x, const entry *y) {
    if (x->a != y->a) return x->a > y->a;
    if (x->doc != y->doc) return x->doc < y->doc;
    if (x->pos != y->pos) return x->pos < y->pos;
    if (x->ch != y->ch) return x->ch < y->ch;
    return x->idx < y->idx;
}

static int cmp(const void *p, const void *q) { return before(p, q) ? -1 : before(q, p) ? 1 : 0; }

static int64_t label(const int64_t *t, int64_t i) { return t ? t[i] : -1; }

/* The block's candidates (flat (row, channel) order) into ent; returns how many (<= k). */
static int64_t block_entries(const float *x, int64_t n, int64_t w, const float *rowmax, int64_t k, int64_t row0,
                             const int64_t *doc, const int64_t *pos, const int64_t *tok, entry *ent,
                             int64_t *rows, uint32_t *cb, int64_t *cj) {
    const uint32_t *rb = (const uint32_t *)rowmax, *xb = (const uint32_t *)x;
    int64_t kk = k < n ? k : n, above = 0, nr = 0, nc = 0;
    uint32_t t = kth_largest(rb, n, kk);
    for (int64_t i = 0; i < n; ++i) above += rb[i] > t;
    for (int64_t i = 0, ties = kk - above; i < n; ++i)
        if (rb[i] > t || (rb[i] == t && ties-- > 0)) rows[nr++] = i;
    for (int64_t j = 0; j < nr; ++j)
        for (int64_t c = 0; c < w; ++c) {
            uint32_t u = xb[rows[j] * w + c] & 0x7fffffffu;
            if (u >= t) { cb[nc] = u; cj[nc++] = j * w + c; }
        }
    uint32_t kth = nc > k ? kth_largest(cb, nc, k) : 0;
    int64_t over = 0, m = 0;
    if (nc > k) for (int64_t i = 0; i < nc; ++i) over += cb[i] > kth;
    for (int64_t i = 0, ties = k - over; i < nc; ++i) {
        if (nc > k && !(cb[i] > kth || (cb[i] == kth && ties-- > 0))) continue;
        int64_t r = rows[cj[i] / w], c = cj[i] % w, g = row0 + r;
        ent[m].a = (double)x[r * w + c];  /* the signed value for now */
        ent[m].doc = label(doc, g); ent[m].pos = label(pos, g); ent[m].ch = c; ent[m].idx = label(tok, g);
        ++m;
    }
    return m;
}

/* -1: no row max reaches floor (nothing changes); -2: the kept entries are not in order (use numpy);
   else the number of merged entries written to o* (at most k). work: see merge_block_top. */
int64_t actlab_stats_top(const float *x, int64_t n, int64_t w, const float *rowmax, int64_t k, int64_t row0,
                         const int64_t *doc, const int64_t *pos, const int64_t *tok, const double *kv,
                         const int64_t *kc, const int64_t *kd, const int64_t *kp, const int64_t *kt, int64_t nk,
                         double floor, double *ov, int64_t *oc, int64_t *od, int64_t *op, int64_t *ot, void *work) {
    float best = 0.0f;
    for (int64_t i = 0; i < n; ++i) best = rowmax[i] > best ? rowmax[i] : best;
    if ((double)best < floor) return -1;
    int64_t kk = k < n ? k : n;
    entry *ent = (entry *)work, *kept = ent + k;
    int64_t *rows = (int64_t *)(kept + nk), *cj = rows + kk, *toks = cj + kk * w;
    uint32_t *cb = (uint32_t *)(toks + k);
    for (int64_t i = 0; i < nk; ++i) {
        kept[i] = (entry){fabs(kv[i]), kd[i], kp[i], kc[i], i};
        if (i > 0 && before(&kept[i], &kept[i - 1])) return -2;
    }
    int64_t m = block_entries(x, n, w, rowmax, k, row0, doc, pos, tok, ent, rows, cb, cj);
    double *vals = (double *)cj;  /* the candidates' scratch is free again */
    for (int64_t i = 0; i < m; ++i) {
        vals[i] = ent[i].a; toks[i] = ent[i].idx;
        ent[i].a = fabs(ent[i].a); ent[i].idx = nk + i;
    }
    qsort(ent, (size_t)m, sizeof(entry), cmp);
    int64_t a = 0, b = 0, o = 0;
    for (; o < k && (a < nk || b < m); ++o) {
        int take_kept = b == m || (a < nk && before(&kept[a], &ent[b]));
        if (take_kept) {
            ov[o] = kv[a]; oc[o] = kc[a]; od[o] = kd[a]; op[o] = kp[a]; ot[o] = kt[a]; ++a;
        } else {
            int64_t i = ent[b].idx - nk;
            ov[o] = vals[i]; oc[o] = ent[b].ch; od[o] = ent[b].doc; op[o] = ent[b].pos; ot[o] = toks[i]; ++b;
        }
    }
    return o;
}
"""

_KERNEL = CKernel(
    "stats_top", _SOURCE, _FLAGS, "actlab_stats_top", ctypes.c_int64,
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p] * 8 + [ctypes.c_int64, ctypes.c_double] + [ctypes.c_void_p] * 6,
    env_switch="ACTLAB_STATS_KERNEL",
    warning="actlab.stats: the compiled top-k merge is unavailable ({reason}); using numpy (same results, slower)")

_NAMES = ("top_value", "top_channel", "top_doc", "top_position", "top_token")
_ENTRY_BYTES = 40
_MAX_CANDIDATES = 1 << 22  # beyond (a huge topk), numpy's leaner scratch
_work = _Work()


def _label_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def merge_block_top(xb: torch.Tensor, rowmax: torch.Tensor, row0: int, aux, kept: dict[str, torch.Tensor],
                    k: int, floor: float) -> dict[str, torch.Tensor] | None | bool:
    """The new kept entries, False when the block cannot change them (every row max is below ``floor``),
    or None when this cannot run here (no compiler; not float32; labels not int64 on the CPU; kept entries
    out of order): then use ``topk``'s numpy code. ``rowmax``: the block's max |x| per row, all finite."""
    lib = _KERNEL.library()
    n, w = xb.shape
    nk, kk = kept["top_value"].numel(), min(k, n)
    usable = (lib is not None and xb.dtype == rowmax.dtype == torch.float32 and kk * w <= _MAX_CANDIDATES
              and xb.is_contiguous() and rowmax.is_contiguous() and all(t.is_contiguous() for t in kept.values())
              and all(t is None or (t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous()) for t in aux))
    if not usable:
        return None
    work = _work.get(_ENTRY_BYTES * (k + nk) + 8 * (kk + kk * w + k) + 4 * kk * w)
    out = {"top_value": torch.empty(k, dtype=torch.float64)}
    out.update(zip(_NAMES[1:], torch.empty(4, k, dtype=torch.int64)))
    got = lib.actlab_stats_top(xb.data_ptr(), n, w, rowmax.data_ptr(), k, row0, *(_label_ptr(t) for t in aux),
                               *(kept[name].data_ptr() for name in _NAMES), nk, floor,
                               *(out[name].data_ptr() for name in _NAMES), work.data_ptr())
    if got == -1:
        return False
    if got < 0:
        return None
    return out if got == k else {name: t[:got] for name, t in out.items()}
