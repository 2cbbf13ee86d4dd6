"""Streaming, mergeable per-channel statistics of one activation site.

Everything kept here has a fixed size (it depends on the width and the config, never on the
number of tokens), and every field has an exact or numerically stable merge rule, so stats
computed on shards of a corpus and merged equal the stats of the whole corpus.
See docs/stats.md for the meaning and merge rule of each field.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch

from actlab.errors import ActlabError
from actlab.stats.binning import SymlogBinning, sparsity_edges

__all__ = ["ChannelStats", "DEFAULT_CONFIG"]

DEFAULT_CONFIG: dict[str, Any] = {
    "eps": 1e-3,
    "hist_range": (2.0**-20, 2.0**20),
    "bins_per_octave": 4,
    "sparsity_bins": 20,
    "topk": 32,
}

# Rows per internal block are chosen so a block holds at most this many elements: it bounds the
# temporaries whatever the batch size (one Chan merge per block).
_BLOCK_ELEMS = 1 << 21
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


_scratch = _Scratch()

# name -> (dtype, shape kind); "scalar" is 0-dim, the others are 1-D of the named length.
_FIELDS: dict[str, tuple[torch.dtype, str]] = {
    "count": (torch.int64, "scalar"),
    "nonfinite": (torch.int64, "width"),
    "mean": (torch.float64, "width"),
    "m2": (torch.float64, "width"),
    "min": (torch.float64, "width"),
    "max": (torch.float64, "width"),
    "absmax": (torch.float64, "width"),
    "zeros": (torch.int64, "width"),
    "small": (torch.int64, "width"),
    "active": (torch.int64, "width"),
    "hist": (torch.int64, "hist"),
    "sparsity_hist": (torch.int64, "sparsity"),
    "top_value": (torch.float64, "topk"),
    "top_channel": (torch.int64, "topk"),
    "top_doc": (torch.int64, "topk"),
    "top_position": (torch.int64, "topk"),
    "top_token": (torch.int64, "topk"),
}
STATE_FIELDS = tuple(_FIELDS)
_TOP_FIELDS = ("top_value", "top_channel", "top_doc", "top_position", "top_token")


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ActlabError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    return value


def _check_eps(eps) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ActlabError(f"eps must be a number such as 1e-3, got {eps!r}") from None
    if not (eps == 0.0 or 2.0**-80 <= eps <= 2.0**80):
        raise ActlabError(
            f"eps must be 0 (count exact zeros only) or between 1e-24 and 1e24, got {eps!r}"
        )
    return eps


def _select_top(fields: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the k entries of largest |value|; ties broken by (doc, position, channel) ascending,
    so the result does not depend on the order in which pieces were merged."""
    keys = (
        fields["top_channel"].numpy(),
        fields["top_position"].numpy(),
        fields["top_doc"].numpy(),
        -np.abs(fields["top_value"].numpy()),
    )
    order = torch.from_numpy(np.lexsort(keys)[:k])
    return {name: t[order] for name, t in fields.items()}


class ChannelStats:
    """Streaming statistics of one site: ``update`` with ``[n, width]`` activations, ``merge``
    with another instance of the same config, read the properties.

    Per channel: count of finite values, mean and M2 (float64, Chan's parallel merge), min, max,
    abs-max, count of exact zeros, of ``|x| < eps`` ("small"), of ``|x| >= eps`` ("active"),
    and of non-finite values. Per site: a fixed symlog value histogram (``hist``), a histogram
    over tokens of the fraction of channels with ``|x| < eps`` (``sparsity_hist``), and the
    ``topk`` largest-``|x|`` entries with their channel, doc id, position and token id.

    Args:
        width: number of channels.
        eps: threshold of "small" / "active" (compared in the activation's working precision:
            float32 for 16/32-bit input, float64 for float64 input). 0 means only exact zeros
            are small.
        hist_range: magnitudes ``(lo, hi)`` of the value histogram, rounded outward to powers
            of two; ``|x| < lo`` falls in the center bin, ``|x| >= hi`` in an overflow bin.
        bins_per_octave: histogram resolution (power of two, 1..64).
        sparsity_bins: number of equal bins on [0, 1] of the per-token sparsity histogram.
        topk: how many largest-|x| entries to keep (0 disables).
    """

    def __init__(
        self,
        width: int,
        *,
        eps: float = DEFAULT_CONFIG["eps"],
        hist_range=DEFAULT_CONFIG["hist_range"],
        bins_per_octave: int = DEFAULT_CONFIG["bins_per_octave"],
        sparsity_bins: int = DEFAULT_CONFIG["sparsity_bins"],
        topk: int = DEFAULT_CONFIG["topk"],
    ):
        self.width = _check_int("width", width, 1, 1 << 30)
        self.eps = _check_eps(eps)
        self.binning = SymlogBinning.from_range(hist_range, bins_per_octave)
        self.sparsity_bins = _check_int("sparsity_bins", sparsity_bins, 1, 100_000)
        self.topk = _check_int("topk", topk, 0, 1_000_000)
        w = self.width
        i64, f64 = torch.int64, torch.float64
        self.count = 0
        self.nonfinite = torch.zeros(w, dtype=i64)
        self._mean = torch.zeros(w, dtype=f64)
        self.m2 = torch.zeros(w, dtype=f64)
        self.min = torch.full((w,), math.inf, dtype=f64)
        self.max = torch.full((w,), -math.inf, dtype=f64)
        self.absmax = torch.zeros(w, dtype=f64)
        self.zeros = torch.zeros(w, dtype=i64)
        self.small = torch.zeros(w, dtype=i64)
        self.active = torch.zeros(w, dtype=i64)
        self.hist = torch.zeros(self.binning.n_bins, dtype=i64)
        self.sparsity_hist = torch.zeros(self.sparsity_bins, dtype=i64)
        self.top: dict[str, torch.Tensor] = {
            name: torch.zeros(0, dtype=_FIELDS[name][0]) for name in _TOP_FIELDS
        }
        self._top_floor = -math.inf  # |value| of the k-th kept entry once k are kept
        self._small_consts: dict[torch.dtype, tuple[float, float] | None] = {}

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict[str, Any]:
        """The JSON-able config; ``ChannelStats(**config)`` rebuilds an empty twin."""
        return {
            "width": self.width,
            "eps": self.eps,
            "hist_range": [self.binning.lo, self.binning.hi],
            "bins_per_octave": self.binning.bins_per_octave,
            "sparsity_bins": self.sparsity_bins,
            "topk": self.topk,
        }

    def _shape_of(self, kind: str, n_top: int) -> tuple[int, ...]:
        return {
            "scalar": (),
            "width": (self.width,),
            "hist": (self.binning.n_bins,),
            "sparsity": (self.sparsity_bins,),
            "topk": (n_top,),
        }[kind]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All state as tensors (fresh copies; keys are ``STATE_FIELDS``)."""
        state = {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "nonfinite": self.nonfinite,
            "mean": self._mean,
            "m2": self.m2,
            "min": self.min,
            "max": self.max,
            "absmax": self.absmax,
            "zeros": self.zeros,
            "small": self.small,
            "active": self.active,
            "hist": self.hist,
            "sparsity_hist": self.sparsity_hist,
            **self.top,
        }
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any], *, where: str = "state"
    ) -> "ChannelStats":
        """Rebuild from ``state_dict()`` and ``config()``; raises ActlabError on any mismatch."""
        if not isinstance(config, dict):
            raise ActlabError(f"{where}: the stats config must be a JSON object, got {config!r}")
        unknown = set(config) - {"width", "eps", "hist_range", "bins_per_octave", "sparsity_bins", "topk"}
        if unknown or "width" not in config:
            raise ActlabError(
                f"{where}: bad stats config {config!r} (needs 'width'; unknown keys: {sorted(unknown)})"
            )
        try:
            self = cls(**config)
        except ActlabError as e:
            raise ActlabError(f"{where}: bad stats config: {e}") from None
        missing = [k for k in _FIELDS if k not in state]
        if missing:
            raise ActlabError(f"{where}: missing stats tensors {missing}; the file is incomplete or corrupt")
        n_top = state["top_value"].shape[0] if state["top_value"].dim() == 1 else -1
        if not 0 <= n_top <= self.topk:
            raise ActlabError(f"{where}: top_value holds {n_top} entries but topk is {self.topk}")
        for name, (dtype, kind) in _FIELDS.items():
            t = state[name]
            shape = self._shape_of(kind, n_top)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ActlabError(
                    f"{where}: stats tensor {name!r} should be {dtype} {shape}, got {got}; "
                    "the file is corrupt or was written by an incompatible actlab"
                )
        self.count = int(state["count"])
        if self.count < 0:
            raise ActlabError(f"{where}: negative token count {self.count}; the file is corrupt")
        self.nonfinite = state["nonfinite"].clone()
        self._mean = state["mean"].clone()
        self.m2 = state["m2"].clone()
        self.min = state["min"].clone()
        self.max = state["max"].clone()
        self.absmax = state["absmax"].clone()
        self.zeros = state["zeros"].clone()
        self.small = state["small"].clone()
        self.active = state["active"].clone()
        self.hist = state["hist"].clone()
        self.sparsity_hist = state["sparsity_hist"].clone()
        self.top = {name: state[name].clone() for name in _TOP_FIELDS}
        self._refresh_top_floor()
        return self

    def copy(self) -> "ChannelStats":
        return ChannelStats.from_state_dict(self.state_dict(), self.config())

    # ------------------------------------------------------------------ derived values
    @property
    def n_finite(self) -> torch.Tensor:
        """int64 ``[width]``: values per channel that entered mean/var (finite ones)."""
        return self.count - self.nonfinite

    @property
    def mean(self) -> torch.Tensor:
        """float64 ``[width]`` mean of the finite values (NaN for a channel with none)."""
        n = self.n_finite
        return torch.where(n > 0, self._mean, torch.full_like(self._mean, math.nan))

    @property
    def var(self) -> torch.Tensor:
        """float64 ``[width]`` population variance ``M2 / n`` (NaN when n == 0)."""
        n = self.n_finite.to(torch.float64)
        return torch.where(n > 0, self.m2 / n.clamp(min=1), torch.full_like(self.m2, math.nan))

    @property
    def var_unbiased(self) -> torch.Tensor:
        """float64 ``[width]`` sample variance ``M2 / (n - 1)`` (NaN when n < 2)."""
        n = self.n_finite.to(torch.float64)
        return torch.where(n > 1, self.m2 / (n - 1).clamp(min=1), torch.full_like(self.m2, math.nan))

    @property
    def std(self) -> torch.Tensor:
        """float64 ``[width]`` population standard deviation ``sqrt(var)``."""
        return self.var.sqrt()

    def _frac(self, counts: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            return torch.full(counts.shape, math.nan, dtype=torch.float64)
        return counts.to(torch.float64) / self.count

    @property
    def zero_frac(self) -> torch.Tensor:
        """Fraction of tokens where the channel is exactly 0."""
        return self._frac(self.zeros)

    @property
    def small_frac(self) -> torch.Tensor:
        """Fraction of tokens where ``|x| < eps``."""
        return self._frac(self.small)

    @property
    def active_frac(self) -> torch.Tensor:
        """Fraction of tokens where ``|x| >= eps`` (``1 - small_frac`` unless NaNs were seen)."""
        return self._frac(self.active)

    @property
    def nonfinite_frac(self) -> torch.Tensor:
        return self._frac(self.nonfinite)

    @property
    def dead(self) -> torch.Tensor:
        """bool ``[width]``: channels never active (``|x| >= eps`` on no token seen)."""
        return self.active == 0

    @property
    def hist_edges(self) -> torch.Tensor:
        """float64 edges of the value histogram's non-NaN bins (see ``SymlogBinning``)."""
        return self.binning.edges()

    @property
    def sparsity_edges(self) -> torch.Tensor:
        return sparsity_edges(self.sparsity_bins)

    def top_entries(self) -> list[dict[str, Any]]:
        """The kept top-k entries, largest ``|value|`` first, as plain dicts."""
        cols = {k: v.tolist() for k, v in self.top.items()}
        return [
            {
                "value": cols["top_value"][i],
                "channel": cols["top_channel"][i],
                "doc_id": cols["top_doc"][i],
                "position": cols["top_position"][i],
                "token_id": cols["top_token"][i],
            }
            for i in range(len(cols["top_value"]))
        ]

    # ------------------------------------------------------------------ update
    def update(
        self,
        x: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> None:
        """Add ``x`` (``[n, width]``, any float dtype) to the stats.

        ``doc_ids``, ``positions``, ``token_ids`` (``[n]`` integers, optional: -1 when absent)
        only label the top-k entries. Work is done in blocks of at most 2**21 values (walked in
        cache-sized tiles) with vectorised torch ops; nothing of ``x`` is kept except the
        top-k entries.
        """
        if not isinstance(x, torch.Tensor):
            raise ActlabError(f"activations must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() > 2 and math.prod(x.shape[1:]) == self.width:
            x = x.reshape(x.shape[0], self.width)
        if x.dim() != 2 or x.shape[1] != self.width:
            raise ActlabError(
                f"activations of shape {tuple(x.shape)} do not match this site's width "
                f"{self.width}; expected [n_tokens, {self.width}]"
            )
        n = x.shape[0]
        aux = []
        for name, t in (("doc_ids", doc_ids), ("positions", positions), ("token_ids", token_ids)):
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
        if n == 0:
            return
        x = x.detach().cpu()
        if x.is_complex() or x.dtype == torch.bool:
            raise ActlabError(f"activations must be real numbers, got dtype {x.dtype}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        rows = max(1, _BLOCK_ELEMS // self.width)
        for start in range(0, n, rows):
            block = x[start : start + rows]
            if block.dtype != work or not block.is_contiguous():
                # float16/bfloat16 -> float32 is exact
                block = _scratch.get("in", work, tuple(block.shape)).copy_(block)
            if not self._update_block_fast(block, start, aux):
                self._update_block_exact(block, start, aux)

    def _small_const(self, dtype: torch.dtype) -> tuple[float, float] | None:
        """(c, B) such that ``clamp(c - B*|x|, 0, 1)`` is exactly the indicator ``|x| < eps``
        in ``dtype``: B is a power of two scaling eps to ~2**40, so any positive gap
        ``eps - |x|`` (at least one ulp of eps) becomes >= 1 and the sign is exact."""
        if dtype not in self._small_consts:
            eps_t = torch.tensor(self.eps, dtype=dtype)
            eps_w = float(eps_t)
            if eps_w == 0.0:
                self._small_consts[dtype] = None
            else:
                e = math.frexp(eps_w)[1] - 1
                big = 2.0 ** (40 - e)
                self._small_consts[dtype] = (eps_w * big, big)
        return self._small_consts[dtype]

    def _update_block_fast(self, xb: torch.Tensor, row0: int, aux) -> bool:
        """All-finite fast path; returns False (changing nothing) if the block holds
        NaN/inf (or values whose squares overflow), for the exact path to handle.

        The block is walked in cache-sized tiles (~_TILE_ELEMS values): every element-wise
        pass after the first then reads the tile from cache instead of memory. Per-tile
        partial results go into small preallocated stacks, reduced once per block.
        """
        n, w = xb.shape
        dt = xb.dtype
        # Shifted sums: d = x - ref with ref the running mean (or the block's own mean for the
        # first block), so a large common offset cannot cancel catastrophically. Each tile is
        # summed in the input precision; tiles and blocks are combined in float64.
        if self.count > 0:
            ref = self._mean.to(dt)
        else:
            ref = xb.sum(0).div_(n)
            if not bool(torch.isfinite(ref).all()):
                return False
        tr = max(1, min(n, _TILE_ELEMS // w))
        nt = -(-n // tr)
        stacks = _scratch.get("stacks", dt, (6 * nt, w))
        s1_t, s2_t, max_t, min_t, nz_t, sc_t = stacks.view(6, nt, w).unbind(0)
        small_tok, rowmax = _scratch.get("rows", dt, (2, n)).unbind(0)
        buf = _scratch.get("a", dt, (tr, w))
        abuf = _scratch.get("b", dt, (tr, w))
        consts = self._small_const(dt)
        shift, half, n_raw = self.binning.raw_shift(dt)
        int_dt = torch.int32 if dt == torch.float32 else torch.int64
        raw = torch.zeros(n_raw, dtype=torch.int64)
        for i in range(nt):
            r0 = i * tr
            xt = xb[r0 : r0 + tr]
            m = xt.shape[0]
            bt, at = buf[:m], abuf[:m]
            torch.sub(xt, ref, out=bt)
            torch.sum(bt, 0, out=s1_t[i])
            bt.mul_(bt)
            torch.sum(bt, 0, out=s2_t[i])
            torch.amax(xt, 0, out=max_t[i])
            torch.amin(xt, 0, out=min_t[i])
            torch.abs(xt, out=at)
            if self.topk:
                torch.amax(at, 1, out=rowmax[r0 : r0 + m])
            torch.sum(torch.sign(at, out=bt), 0, out=nz_t[i])
            if consts is not None:
                # exact 0/1 indicator of |x| < eps (see _small_const)
                torch.add(consts[0], at, alpha=-consts[1], out=bt).clamp_(0.0, 1.0)
                torch.sum(bt, 0, out=sc_t[i])
                torch.sum(bt, 1, out=small_tok[r0 : r0 + m])
            # histogram keys: sign, exponent and top mantissa bits of each value
            key = torch.bitwise_right_shift(xt.view(int_dt), shift, out=bt.view(int_dt)).view(-1)
            raw += torch.bincount(key.add_(half), minlength=n_raw)
        f64 = torch.float64
        s2 = s2_t.sum(0, dtype=f64)
        if not bool(torch.isfinite(s2).all()):
            return False
        s1 = s1_t.sum(0, dtype=f64)
        mean_b = ref.to(f64) + s1 / n
        m2_b = (s2 - s1 * s1 / n).clamp_(min=0.0)
        bmax = max_t.amax(0).to(f64)
        bmin = min_t.amin(0).to(f64)
        if consts is None:
            small_ch = torch.zeros(w, dtype=torch.int64)
            small_tok = torch.zeros(n, dtype=torch.int64)
        else:
            small_ch = sc_t.sum(0, dtype=f64).to(torch.int64)
            small_tok = small_tok.to(torch.int64)

        self._merge_moments(n, mean_b, m2_b)
        self.count += n
        self.max = torch.maximum(self.max, bmax)
        self.min = torch.minimum(self.min, bmin)
        self.absmax = torch.maximum(self.absmax, torch.maximum(bmax.abs(), bmin.abs()))
        self.zeros += n - nz_t.sum(0, dtype=f64).to(torch.int64)
        self.small += small_ch
        self.active += n - small_ch
        self.hist += self.binning.fold(raw, dt)
        self._add_sparsity(small_tok)
        if self.topk:
            self._add_top(xb, rowmax, row0, aux)
        return True

    def _update_block_exact(self, xb: torch.Tensor, row0: int, aux) -> None:
        """Slow float64 path with explicit masks, for blocks holding NaN or +-inf (or huge
        values): mean/var over the finite values only, NaN ignored by min/max/top-k."""
        n, w = xb.shape
        x = xb.to(torch.float64)
        fin = torch.isfinite(x)
        nan = torch.isnan(x)
        n_fin = fin.sum(0)
        zero = torch.zeros((), dtype=torch.float64)
        xf = torch.where(fin, x, zero)
        nb = n_fin.to(torch.float64)
        mean_b = torch.where(nb > 0, xf.sum(0) / nb.clamp(min=1), zero)
        m2_b = torch.where(fin, x - mean_b, zero).square().sum(0)
        a = x.abs()
        # eps as rounded to the input's precision, exactly as the fast path compares it
        eps_w = float(torch.tensor(self.eps, dtype=xb.dtype))
        small_m = a < eps_w
        active_m = a >= eps_w
        self._merge_moments(nb, mean_b, m2_b)
        self.count += n
        self.nonfinite += n - n_fin
        inf = torch.tensor(math.inf, dtype=torch.float64)
        self.max = torch.maximum(self.max, torch.where(nan, -inf, x).amax(0))
        self.min = torch.minimum(self.min, torch.where(nan, inf, x).amin(0))
        self.absmax = torch.maximum(self.absmax, torch.where(nan, zero, a).amax(0))
        self.zeros += (x == 0).sum(0)
        self.small += small_m.sum(0)
        self.active += active_m.sum(0)
        n_nan = int(nan.sum())
        hist = self.binning.histogram(torch.where(nan, zero, x))
        hist[self.binning.center_bin] -= n_nan
        hist[self.binning.nan_bin] += n_nan
        self.hist += hist.cpu()
        self._add_sparsity(small_m.sum(1))
        self._add_top(x, torch.where(nan, -torch.ones((), dtype=torch.float64), a).amax(1), row0, aux)

    def _merge_moments(self, n_b, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. parallel update of (n, mean, M2), per channel, in float64."""
        n_a = self.n_finite.to(torch.float64)
        n = n_a + n_b
        frac = torch.where(n > 0, n_b / n.clamp(min=1), torch.zeros_like(n))
        delta = mean_b.cpu() - self._mean
        self._mean = self._mean + delta * frac
        self.m2 = self.m2 + m2_b.cpu() + delta * delta * n_a * frac

    def _add_sparsity(self, small_tok: torch.Tensor) -> None:
        b = self.sparsity_bins
        idx = (small_tok.to(torch.int64) * b).div_(self.width, rounding_mode="floor").clamp_(max=b - 1)
        self.sparsity_hist += torch.bincount(idx.cpu(), minlength=b)

    def _add_top(self, xb: torch.Tensor, rowmax: torch.Tensor, row0: int, aux) -> None:
        """Top-k of |x| in the block (``rowmax``: max |x| of each row, NaN as -1), then merge
        with the kept entries.

        Order: larger |x| first, ties by earlier row (rows are in doc, position order) then
        lower channel. The block's k best entries lie in the k best rows by that order of
        their max (any other entry is preceded by the max entry of each of those rows), and
        all are >= the k-th largest row max; so only a few candidates are ever sorted, and
        ties are broken the same way whatever the chunking.
        """
        k = self.topk
        if k == 0:
            return
        n, w = xb.shape
        if float(rowmax.max()) < self._top_floor:
            return  # nothing here can enter the kept top-k
        kk = min(k, n)
        t_row = torch.topk(rowmax, kk).values[-1]
        above = torch.nonzero(rowmax > t_row).view(-1)
        ties = torch.nonzero(rowmax == t_row).view(-1)[: kk - above.numel()]
        rows = torch.cat([above, ties]).sort().values
        cand = xb[rows].abs().reshape(-1)  # row-major: (row, channel) order
        if not bool(torch.isfinite(cand).all()):
            cand = torch.where(torch.isnan(cand), -1.0, cand)  # NaN never enters the top-k
        sel = torch.nonzero(cand >= max(float(t_row), 0.0)).view(-1)
        vals = cand[sel]
        if sel.numel() > k:
            kth = torch.topk(vals, k).values[-1]
            top = sel[vals > kth]
            sel = torch.cat([top, sel[vals == kth][: k - top.numel()]]).sort().values
        flat = sel
        r = rows[flat // w]
        ch = flat % w
        g = (r + row0).cpu()
        fields = {
            "top_value": xb[r, ch].to(torch.float64).cpu(),
            "top_channel": ch.to(torch.int64).cpu(),
        }
        for name, t in zip(("top_doc", "top_position", "top_token"), aux):
            fields[name] = (
                torch.full((g.numel(),), -1, dtype=torch.int64)
                if t is None
                else t[g.to(t.device)].to(torch.int64).cpu()
            )
        merged = {name: torch.cat([self.top[name], fields[name]]) for name in _TOP_FIELDS}
        self.top = _select_top(merged, k)
        self._refresh_top_floor()

    def _refresh_top_floor(self) -> None:
        tv = self.top["top_value"]
        self._top_floor = float(tv[-1].abs()) if self.topk and tv.numel() >= self.topk else -math.inf

    # ------------------------------------------------------------------ merge
    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Fold ``other`` (same config) into ``self``; exact for counts, histograms, min/max
        and top-k, Chan's formula for mean/M2. Returns ``self``."""
        if not isinstance(other, ChannelStats):
            raise ActlabError(f"can only merge ChannelStats with ChannelStats, got {type(other).__name__}")
        if other.config() != self.config():
            raise ActlabError(
                f"cannot merge stats with different configs: {self.config()} vs {other.config()}; "
                "compute both with the same width, eps, histogram and topk settings"
            )
        if other is self:
            other = other.copy()
        self._merge_moments(other.n_finite.to(torch.float64), other._mean, other.m2)
        self.count += other.count
        self.nonfinite += other.nonfinite
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.absmax = torch.maximum(self.absmax, other.absmax)
        self.zeros += other.zeros
        self.small += other.small
        self.active += other.active
        self.hist += other.hist
        self.sparsity_hist += other.sparsity_hist
        if self.topk:
            merged = {name: torch.cat([self.top[name], other.top[name]]) for name in _TOP_FIELDS}
            self.top = _select_top(merged, self.topk)
            self._refresh_top_floor()
        return self

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        """Small per-site scalars (plain Python numbers) for a table."""
        n = self.n_finite.to(torch.float64)
        tot = float(n.sum())
        out: dict[str, Any] = {"tokens": self.count, "width": self.width}
        if tot > 0:
            # pooled over every finite value of the site (exact from per-channel moments)
            mu = float((self._mean * n).sum() / tot)
            var = max(float((self.m2 + n * (self._mean - mu) ** 2).sum() / tot), 0.0)
            out["mean"] = mu
            out["std"] = math.sqrt(var)
            out["rms"] = math.sqrt(var + mu * mu)
        else:
            out["mean"] = out["std"] = out["rms"] = math.nan
        has = self.count > 0
        out["min"] = float(self.min.min()) if has else math.nan
        out["max"] = float(self.max.max()) if has else math.nan
        out["absmax"] = float(self.absmax.max()) if has else math.nan
        out["absmax_channel"] = int(self.absmax.argmax()) if has else -1
        med = float(self.absmax.median()) if has else math.nan
        out["absmax_over_median"] = out["absmax"] / med if has and med > 0 else math.nan
        cells = self.count * self.width
        out["zero_frac"] = float(self.zeros.sum()) / cells if cells else math.nan
        out["small_frac"] = float(self.small.sum()) / cells if cells else math.nan
        out["dead_channels"] = int(self.dead.sum()) if has else 0
        out["dead_frac"] = out["dead_channels"] / self.width if has else math.nan
        out["nonfinite"] = int(self.nonfinite.sum())
        return out

    def __repr__(self) -> str:
        return f"ChannelStats(width={self.width}, tokens={self.count}, eps={self.eps})"
