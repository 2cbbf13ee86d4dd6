"""The statistics of one block of activations, ready to be folded into a ``ChannelStats``.

Two paths compute the same ``BlockStats``: a fast one for all-finite float32/float64 blocks
(tiled, in-place, reusing thread-local buffers), and an exact float64 one with explicit masks
for blocks holding NaN or inf. Keeping them apart from ``ChannelStats`` keeps the state and its
merge rules in one file and the arithmetic that feeds them in another.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch

from actlab.errors import ActlabError
from actlab.stats.binning import SymlogBinning
from actlab.stats.kernel import block_pass, kernel_available

# Rows per internal block are chosen so a block holds at most this many elements: it bounds the
# temporaries whatever the batch size (one Chan merge per block).
BLOCK_ELEMS = 1 << 21
# Inside a block the fast path works on tiles of about this many values (1 MiB of float32),
# small enough to stay in cache across its ~15 element-wise passes.
_TILE_ELEMS = 1 << 18


class _Scratch(threading.local):
    """Reusable work buffers, shared by every ChannelStats of a thread.

    Allocating fresh multi-MB tensors for every op makes the allocator hand pages back to the
    OS and fault them in again, which costs more than the arithmetic; reusing a few buffers
    keeps the footprint fixed: two tiles, per-tile partial sums, per-row vectors of a block,
    and (for float16/bfloat16 input only) one block converted to float32.
    """

    def __init__(self):
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self.bufs.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.bufs[(slot, dtype)] = buf
        return buf[:numel].view(shape)


scratch = _Scratch()


@dataclass
class BlockStats:
    """Per-channel partial statistics of ``n`` rows (moments over the finite values only): of one
    block of activations, or of a whole ``ChannelStats`` being merged."""

    n: int
    n_finite: int | torch.Tensor  # what enters Chan's merge: n (fast path) or per-channel counts
    mean: torch.Tensor
    m2: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor
    absmax: torch.Tensor
    zeros: torch.Tensor
    small: torch.Tensor
    active: torch.Tensor
    nonfinite: torch.Tensor | None
    hist: torch.Tensor | None  # None: already added to the site's (the compiled pass)
    # of a block of activations only:
    small_per_row: torch.Tensor | None = None  # channels with |x| < eps, per row (None: already binned)
    values: torch.Tensor | None = None  # the block (what top-k entries are read from)
    rowmax: torch.Tensor | None = None  # max |x| per row, NaN as -1 (None when top-k is off)
    merged: bool = False  # mean..absmax are the site's new values, its counters already added (compiled pass)


def token_labels(n: int, **labels) -> list[torch.Tensor | None]:
    """The per-token labels of the top-k entries (doc_ids, positions, token_ids), each ``[n]`` or None."""
    aux = []
    for name, t in labels.items():
        if t is None:
            aux.append(None)
            continue
        t = torch.as_tensor(t)
        if t.shape != (n,):
            raise ActlabError(
                f"{name} has shape {tuple(t.shape)} but the activations have {n} tokens; "
                f"pass one {name[:-1]} per token"
            )
        aux.append(t)
    return aux


@functools.lru_cache(maxsize=None)
def small_const(eps: float, dtype: torch.dtype) -> tuple[float, float] | None:
    """(c, B) such that ``clamp(c - B*|x|, 0, 1)`` is exactly the indicator ``|x| < eps``
    in ``dtype``: B is a power of two scaling eps to ~2**40, so any positive gap
    ``eps - |x|`` (at least one ulp of eps) becomes >= 1 and the sign is exact."""
    eps_w = float(torch.tensor(eps, dtype=dtype))
    if eps_w == 0.0:
        return None
    e = math.frexp(eps_w)[1] - 1
    big = 2.0 ** (40 - e)
    return (eps_w * big, big)


def _tile_pass(xb: torch.Tensor, consts, binning: SymlogBinning, want_rowmax: bool):
    """One pass over the block in cache-sized tiles; per-tile partial results go into small
    preallocated stacks, reduced once per block by the caller."""
    n, w = xb.shape
    dt = xb.dtype
    tr = max(1, min(n, _TILE_ELEMS // w))
    nt = -(-n // tr)
    stacks = scratch.get("stacks", dt, (7 * nt, w))
    mu_t, s1_t, s2_t, max_t, min_t, nz_t, sc_t = stacks.view(7, nt, w).unbind(0)
    small_tok, rowmax = scratch.get("rows", dt, (2, n)).unbind(0)
    buf = scratch.get("a", dt, (tr, w))
    abuf = scratch.get("b", dt, (tr, w))
    shift, half, n_raw = binning.raw_shift(dt)
    int_dt = torch.int32 if dt == torch.float32 else torch.int64
    raw = torch.zeros(n_raw, dtype=torch.int64)
    for i in range(nt):
        r0 = i * tr
        xt = xb[r0 : r0 + tr]
        m = xt.shape[0]
        bt, at = buf[:m], abuf[:m]
        # the tile's own mean is the shift: the best one, and a function of the tile alone, so a block's
        # statistics never depend on what came before it (shards and ranks fold bit-identical blocks)
        torch.sum(xt, 0, out=mu_t[i]).div_(m)
        torch.sub(xt, mu_t[i], out=bt)
        torch.sum(bt, 0, out=s1_t[i])
        bt.mul_(bt)
        torch.sum(bt, 0, out=s2_t[i])
        torch.amax(xt, 0, out=max_t[i])
        torch.amin(xt, 0, out=min_t[i])
        torch.abs(xt, out=at)
        if want_rowmax:
            torch.amax(at, 1, out=rowmax[r0 : r0 + m])
        torch.sum(torch.sign(at, out=bt), 0, out=nz_t[i])
        if consts is not None:
            # exact 0/1 indicator of |x| < eps (see small_const)
            torch.add(consts[0], at, alpha=-consts[1], out=bt).clamp_(0.0, 1.0)
            torch.sum(bt, 0, out=sc_t[i])
            torch.sum(bt, 1, out=small_tok[r0 : r0 + m])
        # histogram keys: sign, exponent and top mantissa bits of each value
        key = torch.bitwise_right_shift(xt.view(int_dt), shift, out=bt.view(int_dt)).view(-1)
        raw += torch.bincount(key.add_(half), minlength=n_raw)
    return (mu_t, s1_t, s2_t, max_t, min_t, nz_t, sc_t), small_tok, rowmax, raw, tr


def fast_block(xb: torch.Tensor, eps: float, binning: SymlogBinning, want_rowmax: bool,
               into: tuple[torch.Tensor, torch.Tensor] | None = None, site: tuple | None = None) -> BlockStats | None:
    """All-finite fast path; None if the block holds NaN/inf (or values whose squares overflow).

    Shifted sums per tile: d = x - m_t with m_t the tile's own mean, so a large common offset cannot
    cancel catastrophically. Each tile is summed in the input precision; the tiles' (mean, M2) are
    combined in float64 (the exact pooled formula). Nothing depends on earlier blocks.
    ``into`` (a site's value and sparsity histograms): the compiled pass adds the block's to them in place
    and leaves ``hist`` and ``small_per_row`` of the result None; given ``site`` too (see
    ``kernel.block_pass``) it folds the whole block into the site and returns it ``merged``.
    """
    n, w = xb.shape
    if into is not None and xb.dtype == torch.float32 and kernel_available() and all(
            t.dtype == torch.int64 and t.is_contiguous() for t in into):
        return _kernel_block(xb, eps, binning, want_rowmax, into, site)
    consts = small_const(eps, xb.dtype)
    (mu_t, s1_t, s2_t, max_t, min_t, nz_t, sc_t), small_tok, rowmax, raw, tr = _tile_pass(
        xb, consts, binning, want_rowmax)
    f64 = torch.float64
    nt = mu_t.shape[0]
    m = torch.full((nt, 1), float(tr), dtype=f64)
    m[-1] = n - tr * (nt - 1)
    s1, s2 = s1_t.to(f64), s2_t.to(f64)
    if not bool(torch.isfinite(s2).all() and torch.isfinite(mu_t).all()):
        return None
    tile_mean = mu_t.to(f64) + s1 / m
    mean = (tile_mean * m).sum(0) / n
    m2 = (s2 - s1 * s1 / m).clamp_(min=0.0).sum(0) + ((tile_mean - mean) ** 2 * m).sum(0)
    bmax = max_t.amax(0).to(f64)
    bmin = min_t.amin(0).to(f64)
    if consts is None:
        small_ch = torch.zeros(w, dtype=torch.int64)
        small_tok = torch.zeros(n, dtype=torch.int64)
    else:
        small_ch = sc_t.sum(0, dtype=f64).to(torch.int64)
        small_tok = small_tok.to(torch.int64)
    return BlockStats(
        n=n, n_finite=n, mean=mean, m2=m2,
        max=bmax, min=bmin, absmax=torch.maximum(bmax.abs(), bmin.abs()),
        zeros=n - nz_t.sum(0, dtype=f64).to(torch.int64), small=small_ch, active=n - small_ch,
        nonfinite=None, hist=binning.fold(raw, xb.dtype), small_per_row=small_tok,
        values=xb, rowmax=rowmax if want_rowmax else None,
    )


def _kernel_block(xb: torch.Tensor, eps: float, binning: SymlogBinning, want_rowmax: bool,
                  into: tuple[torch.Tensor, torch.Tensor], site: tuple | None) -> BlockStats | None:
    """The compiled single pass (``stats.kernel``): the same counts, extrema and histograms, float64 sums;
    the histograms go straight into ``into`` (and the rest into ``site``, when given)."""
    k = block_pass(xb, eps, binning, *into, site=site)
    if k is None:
        return None  # NaN / inf in the block: the exact path
    n = xb.shape[0]
    return BlockStats(
        n=n, n_finite=n, mean=k["mean"], m2=k["m2"], max=k["max"], min=k["min"], absmax=k["absmax"],
        zeros=k["zeros"], small=k["small"], active=k["active"], nonfinite=None, hist=None,
        small_per_row=None, values=xb, rowmax=k["rowmax"] if want_rowmax else None, merged=k["merged"],
    )


def exact_block(xb: torch.Tensor, eps: float, binning: SymlogBinning) -> BlockStats:
    """Slow float64 path with explicit masks, for blocks holding NaN or +-inf (or huge
    values): mean/var over the finite values only, NaN ignored by min/max/top-k."""
    n = xb.shape[0]
    x = xb.to(torch.float64)
    fin = torch.isfinite(x)
    nan = torch.isnan(x)
    n_fin = fin.sum(0)
    zero = torch.zeros((), dtype=torch.float64)
    xf = torch.where(fin, x, zero)
    nb = n_fin.to(torch.float64)
    mean_b = torch.where(nb > 0, xf.sum(0) / nb.clamp(min=1), zero)
    a = x.abs()
    # eps as rounded to the input's precision, exactly as the fast path compares it
    eps_w = float(torch.tensor(eps, dtype=xb.dtype))
    small_m = a < eps_w
    inf = torch.tensor(math.inf, dtype=torch.float64)
    n_nan = int(nan.sum())
    hist = binning.histogram(torch.where(nan, zero, x))
    hist[binning.center_bin] -= n_nan
    hist[binning.nan_bin] += n_nan
    return BlockStats(
        n=n, n_finite=nb, mean=mean_b, m2=torch.where(fin, x - mean_b, zero).square().sum(0),
        max=torch.where(nan, -inf, x).amax(0), min=torch.where(nan, inf, x).amin(0),
        absmax=torch.where(nan, zero, a).amax(0), zeros=(x == 0).sum(0), small=small_m.sum(0),
        active=(a >= eps_w).sum(0), nonfinite=n - n_fin, hist=hist.cpu(), small_per_row=small_m.sum(1),
        values=x, rowmax=torch.where(nan, -torch.ones((), dtype=torch.float64), a).amax(1),
    )
