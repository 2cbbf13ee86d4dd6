"""Fixed, mergeable value binning: a signed-log ("symlog") grid read straight off float bits.

Layout of a value histogram with ``M = octaves * bins_per_octave`` magnitude bins per sign
(``n_bins = 2 * M + 4``), in increasing value order::

    0            x <= -hi                       (negative overflow, includes -inf)
    1 .. M       -hi < x <= -lo                 (negative magnitudes, most negative first)
    M + 1        -lo < x < lo                   (the "center" bin: zeros and tiny values)
    M + 2 .. 2M+1  lo <= x < hi                 (positive magnitudes)
    2M + 2       x >= hi                        (positive overflow, includes +inf)
    2M + 3       NaN

``lo`` and ``hi`` are powers of two. Inside each octave ``[2**e, 2**(e+1))`` there are
``bins_per_octave`` equal-width bins with edges ``2**e * (1 + j / bins_per_octave)``: this is
exactly "exponent plus the top mantissa bits" of an IEEE float, so a value's bin is found with
one integer shift of its bit pattern (no log, no search), and the edges are identical for
float32 and float64 input. Because the edges never move, merging two histograms is an exact
element-wise sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actlab.errors import ActlabError

# (bits in the exponent, exponent bias, mantissa bits, integer dtype of the same width)
_FLOAT_LAYOUT = {
    torch.float32: (8, 127, 23, torch.int32),
    torch.float64: (11, 1023, 52, torch.int64),
}


_FOLD_MAPS: dict[tuple[int, int, int], dict[torch.dtype, torch.Tensor]] = {}


@dataclass(frozen=True)
class SymlogBinning:
    """The fixed value grid of a histogram; see the module docstring for the bin layout."""

    lo_exp: int = -20  # lo = 2**lo_exp: magnitudes below it go to the center bin
    hi_exp: int = 20  # hi = 2**hi_exp: magnitudes at or above it go to an overflow bin
    bins_per_octave: int = 4

    @classmethod
    def from_range(cls, hist_range, bins_per_octave: int) -> "SymlogBinning":
        """Build from magnitudes ``(lo, hi)``, rounded outward to powers of two."""
        try:
            lo, hi = (float(v) for v in hist_range)
        except (TypeError, ValueError):
            raise ActlabError(
                f"hist_range must be two magnitudes (lo, hi) such as (1e-6, 1e6), got {hist_range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ActlabError(
                f"hist_range must satisfy 0 < lo < hi (finite magnitudes), got {hist_range!r}; "
                "for example hist_range=(1e-6, 1e6)"
            )
        m, e = math.frexp(lo)  # lo = m * 2**e with 0.5 <= m < 1
        lo_exp = e - 1  # floor(log2(lo))
        m, e = math.frexp(hi)
        hi_exp = e - 1 if m == 0.5 else e  # ceil(log2(hi))
        bpo = bins_per_octave
        if not isinstance(bpo, int) or isinstance(bpo, bool) or bpo < 1 or bpo > 64 or bpo & (bpo - 1):
            raise ActlabError(
                f"bins_per_octave must be a power of two between 1 and 64, got {bins_per_octave!r}"
            )
        if lo_exp < -126 or hi_exp > 128:
            raise ActlabError(
                f"hist_range {hist_range!r} is outside the float32 range; use magnitudes between "
                "2**-126 (~1.2e-38) and 2**128 (~3.4e38)"
            )
        return cls(lo_exp=lo_exp, hi_exp=hi_exp, bins_per_octave=bpo)

    # -- geometry -----------------------------------------------------------------------
    @property
    def lo(self) -> float:
        return 2.0**self.lo_exp

    @property
    def hi(self) -> float:
        return 2.0**self.hi_exp

    @property
    def n_mag(self) -> int:
        """Magnitude bins per sign (``M``)."""
        return (self.hi_exp - self.lo_exp) * self.bins_per_octave

    @property
    def n_bins(self) -> int:
        return 2 * self.n_mag + 4

    @property
    def center_bin(self) -> int:
        return self.n_mag + 1

    @property
    def nan_bin(self) -> int:
        return 2 * self.n_mag + 3

    def edges(self) -> torch.Tensor:
        """float64 ``[n_bins]`` ascending edges of the ``n_bins - 1`` non-NaN bins (``-inf`` .. ``+inf``).

        Bin ``i`` (for ``i < nan_bin``) spans ``edges[i]`` to ``edges[i + 1]``: positive bins are
        ``[left, right)``, negative bins ``(left, right]`` (each includes its edge nearer zero),
        the center bin is ``(-lo, lo)`` and the overflow bins are ``[-inf, -hi]`` and ``[hi, +inf]``.
        """
        bpo = self.bins_per_octave
        pos = [
            2.0**e * (1.0 + j / bpo) for e in range(self.lo_exp, self.hi_exp) for j in range(bpo)
        ]
        pos.append(self.hi)
        inf = float("inf")
        return torch.tensor([-inf] + [-v for v in reversed(pos)] + pos + [inf], dtype=torch.float64)

    def centers(self) -> torch.Tensor:
        """A representative value per non-NaN bin (geometric mid-point; 0 for the center bin,
        +-hi for the overflow bins), handy for plotting and quantile estimates."""
        e = self.edges()
        lo, hi = e[:-1].abs(), e[1:].abs()
        mid = torch.sqrt(lo * hi) * torch.sign(e[:-1] + e[1:])
        mid[0], mid[-1] = -self.hi, self.hi
        mid[self.center_bin] = 0.0
        return mid

    # -- raw keys -------------------------------------------------------------------------
    def raw_shift(self, dtype: torch.dtype) -> tuple[int, int, int]:
        """(right shift, offset, number of raw keys) for ``dtype`` bit patterns."""
        exp_bits, _bias, mant_bits, _ = _FLOAT_LAYOUT[dtype]
        m = self.bins_per_octave.bit_length() - 1
        half = 1 << (exp_bits + m)
        return mant_bits - m, half, 2 * half

    def fold_map(self, dtype: torch.dtype) -> torch.Tensor:
        """int64 ``[n_raw]``: bin index of every raw key (sign, exponent, top mantissa bits). Cached per
        grid and dtype for the process (every site of every sink shares it: building it is 0.5 ms)."""
        cache = _FOLD_MAPS.setdefault((self.lo_exp, self.hi_exp, self.bins_per_octave), {})
        if dtype not in cache:
            exp_bits, bias, _mant_bits, _ = _FLOAT_LAYOUT[dtype]
            m = self.bins_per_octave.bit_length() - 1
            _, half, n_raw = self.raw_shift(dtype)
            r = torch.arange(n_raw, dtype=torch.int64)
            neg = r < half
            mk = r % half
            big_e = mk >> m
            j = mk & (self.bins_per_octave - 1)
            M = self.n_mag
            rel = (big_e - bias - self.lo_exp) * self.bins_per_octave + j
            rel = torch.where(big_e == 0, torch.full_like(rel, -1), rel)  # zero / subnormal
            special = big_e == (1 << exp_bits) - 1
            rel = torch.where(special, torch.full_like(rel, M), rel)  # inf (and NaN, fixed below)
            c = rel.clamp(-1, M)
            idx = torch.where(neg, M - c, M + 2 + c)
            if m > 0:
                idx = torch.where(special & (j != 0), torch.full_like(idx, self.nan_bin), idx)
            cache[dtype] = idx
        return cache[dtype]

    def raw_counts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Counts of raw keys of a contiguous float32/float64 tensor (every element counted once).

        The key is the bit pattern shifted right so that only sign, exponent and the top
        ``log2(bins_per_octave)`` mantissa bits remain; an arithmetic shift makes negative
        numbers negative, so adding ``half`` maps keys onto ``[0, n_raw)`` (negatives first).
        """
        shift, half, n_raw = self.raw_shift(x.dtype)
        int_dtype = _FLOAT_LAYOUT[x.dtype][3]
        bits = x.reshape(-1).view(int_dtype)
        if out is None:
            key = torch.bitwise_right_shift(bits, shift)
        else:  # reuse a same-sized work buffer (``out`` may have x's float dtype)
            key = torch.bitwise_right_shift(bits, shift, out=out.reshape(-1).view(int_dtype))
        key.add_(half)
        return torch.bincount(key, minlength=n_raw)

    def fold(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fold raw-key counts into int64 ``[n_bins]`` histogram counts."""
        out = torch.zeros(self.n_bins, dtype=torch.int64, device=raw.device)
        return out.index_add_(0, self.fold_map(dtype).to(raw.device), raw.to(torch.int64))

    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        """int64 ``[n_bins]`` counts of every element of ``x`` (float32 or float64)."""
        x = x.contiguous()
        return self.fold(self.raw_counts(x), x.dtype)

    def bin_of(self, values: torch.Tensor) -> torch.Tensor:
        """Bin index of each value (slow, element-wise reference; used in tests and tools)."""
        v = values.to(torch.float64).reshape(-1)
        out = torch.empty(v.shape, dtype=torch.int64)
        for i, x in enumerate(v.tolist()):
            out[i] = self._bin_of_scalar(x)
        return out.view(values.shape)

    def _bin_of_scalar(self, x: float) -> int:
        M = self.n_mag
        if math.isnan(x):
            return self.nan_bin
        a = abs(x)
        if a < self.lo:
            return self.center_bin
        if a >= self.hi:
            return 2 * M + 2 if x > 0 else 0
        mant, e = math.frexp(a)  # a = mant * 2**e, 0.5 <= mant < 1
        e -= 1
        j = int((mant * 2.0 - 1.0) * self.bins_per_octave)  # exact: power-of-two scaling
        rel = (e - self.lo_exp) * self.bins_per_octave + j
        return M + 2 + rel if x > 0 else M - rel


def sparsity_edges(n_bins: int) -> torch.Tensor:
    """float64 ``[n_bins + 1]`` edges of the per-token sparsity histogram on ``[0, 1]``."""
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
