"""Streaming, mergeable per-channel statistics of one activation site.

Everything kept here has a fixed size (it depends on the width and the config, never on the
number of tokens), and every field has an exact or numerically stable merge rule, so stats
computed on shards of a corpus and merged equal the stats of the whole corpus.
See docs/stats.md for the meaning and merge rule of each field.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from actlab.errors import ActlabError
from actlab.stats.binning import SymlogBinning, sparsity_edges
from actlab.stats.state import FIELDS, PLAIN_FIELDS, STATE_FIELDS, check_config, check_eps, check_int, check_state
from actlab.stats.topk import TOP_FIELDS, block_top, merge_top, select_top
from actlab.stats.topk_kernel import merge_block_top
from actlab.stats.update import BLOCK_ELEMS, BlockStats, exact_block, fast_block, scratch, token_labels

__all__ = ["ChannelStats", "DEFAULT_CONFIG", "STATE_FIELDS"]

DEFAULT_CONFIG: dict[str, Any] = {
    "eps": 1e-3,
    "hist_range": (2.0**-20, 2.0**20),
    "bins_per_octave": 4,
    "sparsity_bins": 20,
    "topk": 32,
}

def _fraction(counter: str, doc: str) -> property:
    """A float64 ``[width]`` property: the counter ``counter`` over the tokens seen (NaN before any)."""
    return property(lambda self: self._frac(getattr(self, counter)), doc=doc)


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
        self.width = check_int("width", width, 1, 1 << 30)
        self.eps = check_eps(eps)
        self.binning = SymlogBinning.from_range(hist_range, bins_per_octave)
        self.sparsity_bins = check_int("sparsity_bins", sparsity_bins, 1, 100_000)
        self.topk = check_int("topk", topk, 0, 1_000_000)
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
            name: torch.zeros(0, dtype=FIELDS[name][0]) for name in TOP_FIELDS
        }
        self._top_floor = -math.inf  # |value| of the k-th kept entry once k are kept
        self._all_finite = True  # no non-finite value seen: every channel's n_finite is count

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

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {"scalar": (), "width": (self.width,), "hist": (self.binning.n_bins,), "sparsity": (self.sparsity_bins,)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All state as tensors (fresh copies; keys are ``STATE_FIELDS``)."""
        state = {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": self._mean,
            **{name: getattr(self, name) for name in PLAIN_FIELDS},
            **self.top,
        }
        return {k: state[k].detach().clone().contiguous() for k in STATE_FIELDS}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any], *, where: str = "state"
    ) -> "ChannelStats":
        """Rebuild from ``state_dict()`` and ``config()``; raises ActlabError on any mismatch."""
        check_config(config, where)
        try:
            self = cls(**config)
        except ActlabError as e:
            raise ActlabError(f"{where}: bad stats config: {e}") from None
        check_state(state, self._shapes(), self.topk, where)
        self.count = int(state["count"])
        self._mean = state["mean"].clone()
        for name in PLAIN_FIELDS:
            setattr(self, name, state[name].clone())
        self.top = {name: state[name].clone() for name in TOP_FIELDS}
        self._refresh_top_floor()
        self._all_finite = not bool(self.nonfinite.any())
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

    zero_frac = _fraction("zeros", "Fraction of tokens where the channel is exactly 0.")
    small_frac = _fraction("small", "Fraction of tokens where ``|x| < eps``.")
    active_frac = _fraction("active", "Fraction of tokens where ``|x| >= eps`` (``1 - small_frac`` unless NaNs were seen).")
    nonfinite_frac = _fraction("nonfinite", "Fraction of tokens where the channel is NaN or +-inf.")

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
        only label the top-k entries. Work is done in blocks of at most 2**21 values, by the
        compiled single pass (``stats.kernel``, float32) or vectorised torch ops over cache-sized
        tiles; nothing of ``x`` is kept except the top-k entries.
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
        aux = token_labels(n, doc_ids=doc_ids, positions=positions, token_ids=token_ids)
        if n == 0:
            return
        x = x.detach().cpu()
        if x.is_complex() or x.dtype == torch.bool:
            raise ActlabError(f"activations must be real numbers, got dtype {x.dtype}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        rows = max(1, BLOCK_ELEMS // self.width)
        for start in range(0, n, rows):
            block = x[start : start + rows]
            if block.dtype != work or not block.is_contiguous():
                # float16/bfloat16 -> float32 is exact
                block = scratch.get("in", work, tuple(block.shape)).copy_(block)
            if not self._update_block_fast(block, start, aux):
                self._update_block_exact(block, start, aux)

    def _update_block_fast(self, xb: torch.Tensor, row0: int, aux) -> bool:
        """All-finite fast path; returns False (changing nothing) if the block holds
        NaN/inf (or values whose squares overflow), for the exact path to handle."""
        # with no non-finite value seen, every channel holds count values: the compiled pass folds in place
        site = (self._mean, self.m2, self.max, self.min, self.absmax, self.zeros, self.small, self.active,
                self.count) if self._all_finite else None
        block = fast_block(xb, self.eps, self.binning, bool(self.topk), (self.hist, self.sparsity_hist), site)
        if block is None:
            return False
        self._fold(block, row0, aux)
        return True

    def _update_block_exact(self, xb: torch.Tensor, row0: int, aux) -> None:
        """Slow float64 path with explicit masks, for blocks holding NaN or +-inf (or huge values)."""
        self._fold(exact_block(xb, self.eps, self.binning), row0, aux)

    def _fold(self, b: BlockStats, row0: int, aux) -> None:
        """Add one block of activations: its counters, its sparsity per row, its top-k candidates."""
        if b.merged:
            self._mean, self.m2, self.max, self.min, self.absmax = b.mean, b.m2, b.max, b.min, b.absmax
            self.count += b.n
        else:
            self._add_counts(b)
        if b.small_per_row is not None:
            self._add_sparsity(b.small_per_row)
        if b.rowmax is not None:
            self._add_top(b.values, b.rowmax, row0, aux)

    def _add_counts(self, b: BlockStats) -> None:
        """What every fold shares: Chan's merge of the moments, then counts, extrema, counters, histogram."""
        self._merge_moments(b.n_finite, b.mean, b.m2)
        self.count += b.n
        if b.nonfinite is not None:
            self.nonfinite += b.nonfinite
            self._all_finite = self._all_finite and not bool(b.nonfinite.any())
        self.max = torch.maximum(self.max, b.max)
        self.min = torch.minimum(self.min, b.min)
        self.absmax = torch.maximum(self.absmax, b.absmax)
        self.zeros += b.zeros
        self.small += b.small
        self.active += b.active
        if b.hist is not None:
            self.hist += b.hist

    def _merge_moments(self, n_b, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. parallel update of (n, mean, M2), per channel, in float64."""
        if isinstance(n_b, int) and self._all_finite:
            # every channel has n_a = count values and gets n_b > 0 more: scalar weights, four ops
            n_a = self.count
            frac = n_b / (n_a + n_b)
            delta = mean_b.cpu() - self._mean
            self._mean = torch.add(self._mean, delta, alpha=frac)
            self.m2 = torch.add(self.m2, m2_b.cpu()).addcmul_(delta, delta, value=n_a * frac)
            return
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
        """Merge the block's top-k candidates (see ``topk.block_top``) with the kept entries."""
        k = self.topk
        if k == 0:
            return
        top = merge_block_top(xb, rowmax, row0, aux, self.top, k, self._top_floor)  # compiled, when it can
        if top is False:
            return  # nothing here can enter the kept top-k
        if top is None:
            if float(rowmax.max()) < self._top_floor:
                return
            top = merge_top(self.top, block_top(xb, rowmax, row0, aux, k), k)
        self.top = top
        self._refresh_top_floor()

    def _refresh_top_floor(self) -> None:
        tv = self.top["top_value"]
        self._top_floor = abs(float(tv[-1])) if self.topk and tv.numel() >= self.topk else -math.inf

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
        self._add_counts(BlockStats(
            n=other.count, n_finite=other.n_finite.to(torch.float64), mean=other._mean, m2=other.m2,
            max=other.max, min=other.min, absmax=other.absmax, zeros=other.zeros, small=other.small,
            active=other.active, nonfinite=other.nonfinite, hist=other.hist,
        ))
        self.sparsity_hist += other.sparsity_hist
        if self.topk:
            merged = {name: torch.cat([self.top[name], other.top[name]]) for name in TOP_FIELDS}
            self.top = select_top(merged, self.topk)
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
