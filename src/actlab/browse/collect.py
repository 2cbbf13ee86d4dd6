"""The browser's one streaming pass: per unit, bounded-memory structures over a corpus.

``UnitCollector`` is a sink (``model.run(docs, [site], [collector])``). Per unit it keeps the firing count
(activation > ``threshold``), the sum and maximum, an activation histogram, the top-k activating tokens
and a few samples from each activation interval, each kept token with its window of surrounding tokens
and every window token's activation. Memory is ``units × (bins + (top_k + intervals × samples) ×
window)``, independent of the corpus.

Histogram bins (why this choice): ``bins`` bins of width ``w`` over ``[0, bins · w)``, where ``w`` is
the smallest power of two with ``max < bins · w``. While streaming, ``w`` starts from the first batch
and doubles (pairs of bins merge, exactly) whenever a larger activation arrives; since every width is
a power of two, the final width depends only on the final maximum, never on the batching, and half
to all of the bins cover ``[0, max]``. The intervals of the samples are groups of ``bins /
intervals`` bins, so they merge with the bins. Everything here is exact and batching-invariant
(tested): the same corpus gives the same result at any batch size.

Windows: a token's window needs the tokens after it, which may be in the next batch, so batches are
processed one step late (a queue holds the next ``window_after`` tokens, a tail the previous
``window_before``). A window stops at its document's edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actlab.browse.kept import Kept, mix32
from actlab.engine.batch import TokenBatch
from actlab.engine.config import Config, positive_int
from actlab.errors import ActlabError

__all__ = ["BrowseConfig", "UnitCollector", "UnitData"]


@dataclass
class BrowseConfig(Config):
    """What the browser keeps per unit (saved in the site's ``data/meta.json``)."""

    top_k: int = 20
    window_before: int = 24
    window_after: int = 8
    bins: int = 64
    intervals: int = 8
    samples: int = 5
    threshold: float = 0.0
    seed: int = 0
    batch_size: int = 16

    def validate(self) -> None:
        for name in ("top_k", "bins", "intervals", "samples", "batch_size"):
            positive_int(getattr(self, name), name)
        for name in ("window_before", "window_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ActlabError(f"{name} must be a non-negative integer, not {value!r}")
        if self.bins % self.intervals or (self.bins // self.intervals) & (self.bins // self.intervals - 1):
            raise ActlabError(f"bins ({self.bins}) must be a power-of-two multiple of intervals ({self.intervals}), "
                              "e.g. bins=64, intervals=8, so intervals merge with the bins")
        if self.bins & (self.bins - 1):
            raise ActlabError(f"bins must be a power of two (e.g. 64), not {self.bins}")
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < float("inf")):
            raise ActlabError(f"threshold must be a finite number >= 0 (a unit fires above it), not {self.threshold!r}")

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass
class UnitData:
    """What the pass found, as numpy arrays indexed by the unit's position in ``units``."""

    units: np.ndarray  # [U] unit ids (columns of the site)
    n_tokens: int
    n_fire: np.ndarray  # [U] tokens with activation > threshold
    total: np.ndarray  # [U] sum of the firing activations
    max: np.ndarray  # [U] largest activation (-inf if none seen)
    bin_width: np.ndarray  # [U] 0 where the unit never fired
    counts: np.ndarray  # [U, bins] firing tokens per bin
    top: Kept  # groups = units
    samples: Kept  # groups = units × intervals (unit-major)
    config: BrowseConfig

    @property
    def density(self) -> np.ndarray:
        return self.n_fire / max(self.n_tokens, 1)


def _need_width(m: torch.Tensor, bins: int) -> torch.Tensor:
    """The smallest power of two w with m < bins · w (m > 0)."""
    w = torch.exp2(torch.floor(torch.log2(m / bins)) + 1)
    return torch.where(m >= bins * w, w * 2, torch.where(m < bins * w / 2, w / 2, w))


class UnitCollector:
    """Sink: the per-unit structures of ``units`` (columns of ``site`` in each batch), see the module doc."""

    def __init__(self, site: str, units: list[int] | np.ndarray, config: BrowseConfig | None = None):
        self.site, self.config = site, config or BrowseConfig()
        c = self.config
        self.units = torch.as_tensor(np.asarray(units, dtype=np.int64))
        n = self.units.numel()
        self.n_tokens, self.row0 = 0, 0
        self.n_fire = torch.zeros(n, dtype=torch.int64)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.max = torch.full((n,), -float("inf"))
        self.width = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, c.bins, dtype=torch.int64)
        self.top = Kept(n, c.top_k, c.window)
        self.samples = Kept(n * c.intervals, c.samples, c.window)
        self._every = bool((self.units == torch.arange(n)).all())
        self._queue: list[dict] = []
        self._tail: dict | None = None

    # ---------------------------------------------------------------- streaming
    def consume(self, batch: TokenBatch) -> None:
        z = batch.acts[self.site]
        if not (z.shape[1] == self.units.numel() and self._every):  # a subset of the columns
            z = z[:, self.units]
        z = z.float()
        if not bool(torch.isfinite(z.sum())) and not bool(torch.isfinite(z).all()):
            raise ActlabError(f"'{self.site}' has non-finite activations (NaN or inf); the browser needs finite ones")
        chunk = dict(z=z, tok=batch.token_ids.to(torch.int64), doc=batch.doc_ids.to(torch.int64),
                     pos=batch.positions.to(torch.int64), row0=self.row0)
        self.row0 += z.shape[0]
        self._queue.append(chunk)
        while len(self._queue) > 1 and sum(q["z"].shape[0] for q in self._queue[1:]) >= self.config.window_after:
            self._step()

    def finish(self) -> UnitData:
        """Process what is still queued and return the result (call once, after the run)."""
        while self._queue:
            self._step()
        t = self
        return UnitData(t.units.numpy(), t.n_tokens, t.n_fire.numpy(), t.total.numpy(), t.max.numpy(),
                        t.width.numpy(), t.counts.numpy(), t.top, t.samples, t.config)

    def _step(self) -> None:
        chunk = self._queue.pop(0)
        parts = ([self._tail] if self._tail is not None else []) + [chunk] + self._queue
        # the small per-token columns are joined; the activations stay in their parts (no big copy)
        buf = {k: torch.cat([p[k] for p in parts]) for k in ("tok", "doc", "pos")}
        starts = np.cumsum([0] + [p["z"].shape[0] for p in parts])
        buf["z"] = list(zip(starts[:-1].tolist(), [p["z"] for p in parts]))
        offset = self._tail["z"].shape[0] if self._tail is not None else 0
        self._update(chunk, buf, offset)
        keep = self.config.window_before
        joined = {k: torch.cat([p[k] for p in parts[:parts.index(chunk) + 1]]) for k in ("z", "tok", "doc", "pos")} \
            if chunk["z"].shape[0] < keep else chunk
        self._tail = {k: joined[k][joined[k].shape[0] - keep:] for k in ("z", "tok", "doc", "pos")}

    def _update(self, chunk: dict, buf: dict, offset: int) -> None:
        c, z = self.config, chunk["z"]
        self.n_tokens += z.shape[0]
        if z.shape[0] == 0:
            return
        self.max = torch.maximum(self.max, z.amax(0))
        t, u = torch.nonzero(z > c.threshold, as_tuple=True)
        v = z[t, u]
        self.n_fire += torch.bincount(u, minlength=self.n_fire.numel())
        self.total.index_add_(0, u, v.double())
        moved = self._grow_bins()
        bins = torch.clamp((v.double() / self.width[u]).floor().long(), max=c.bins - 1)
        self.counts.view(-1).index_add_(0, u * c.bins + bins, torch.ones_like(bins))
        window = self._windows(buf, offset)
        rows = chunk["row0"] + t
        # top-k: key = -activation; only entries that can beat the k-th kept one are offered
        cand = (-v.double()).numpy() <= self.top.worst()[u.numpy()]
        ti, ui = t.numpy()[cand], u.numpy()[cand]
        self.top.offer(ui, -v.double().numpy()[cand], rows.numpy()[cand], v.numpy()[cand],
                       chunk["doc"][t].numpy()[cand], chunk["pos"][t].numpy()[cand],
                       lambda idx: window(ti[idx], ui[idx]))
        # interval samples: key = hash(token row, unit id, seed), group = unit × interval
        per = c.bins // c.intervals
        group = u * c.intervals + bins // per
        key = mix32(rows * 0x9E3779B1 + self.units[u] * 0x85EBCA6B + c.seed).double()
        old_group = self._sample_groups() if moved else None
        # (after intervals merged, the kept layout changed: offer every firing once)
        cand = np.ones(key.shape[0], bool) if moved else key.numpy() <= self.samples.worst()[group.numpy()]
        ti, ui = t.numpy()[cand], u.numpy()[cand]
        self.samples.offer(group.numpy()[cand], key.numpy()[cand], rows.numpy()[cand], v.numpy()[cand],
                           chunk["doc"][t].numpy()[cand], chunk["pos"][t].numpy()[cand],
                           lambda idx: window(ti[idx], ui[idx]), old_group=old_group)

    def _grow_bins(self) -> bool:
        """Widen the bins of units whose maximum no longer fits (merging counts exactly); True if any did."""
        c = self.config
        fired = self.max > c.threshold
        need = torch.zeros_like(self.width)
        need[fired] = _need_width(self.max[fired].double(), c.bins)
        grow = need > self.width
        if not bool(grow.any()):
            return False
        shift = torch.zeros_like(self.width, dtype=torch.int64)
        had = grow & (self.width > 0)
        shift[had] = torch.round(torch.log2(need[had] / self.width[had])).long()
        idx = torch.arange(c.bins).unsqueeze(0) >> shift.unsqueeze(1)
        merged = torch.zeros_like(self.counts).scatter_add_(1, idx, self.counts)
        self.counts = merged
        self.width = torch.where(grow, need, self.width)
        return bool(had.any())

    def _sample_groups(self) -> np.ndarray:
        """[groups, cap] the interval of every kept sample under the current bin widths."""
        c = self.config
        unit = np.arange(self.samples.groups) // c.intervals
        width = self.width.numpy()[unit][:, None] * (c.bins // c.intervals)
        interval = np.minimum(np.floor(self.samples.value / np.where(width > 0, width, 1)), c.intervals - 1)
        return (unit[:, None] * c.intervals + interval.astype(np.int64)).astype(np.int64)

    def _windows(self, buf: dict, offset: int):
        """A function (token index in the chunk, unit index) -> the window's token ids and activations."""
        c = self.config
        steps = torch.arange(-c.window_before, c.window_after + 1)
        n = buf["tok"].shape[0]

        def cut(t: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            at = torch.as_tensor(t) + offset
            idx = at.unsqueeze(1) + steps
            inside = (idx >= 0) & (idx < n)
            idx_c = idx.clamp(0, n - 1)
            same = inside & (buf["doc"][idx_c] == buf["doc"][at].unsqueeze(1)) & \
                (buf["pos"][idx_c] == buf["pos"][at].unsqueeze(1) + steps)
            tok = torch.where(same, buf["tok"][idx_c], -1).to(torch.int32)
            col = torch.as_tensor(u).unsqueeze(1).expand_as(idx_c)
            act = torch.zeros(idx_c.shape)
            for start, z in buf["z"]:
                part = same & (idx_c >= start) & (idx_c < start + z.shape[0])
                act[part] = z[idx_c[part] - start, col[part]]
            return tok.numpy(), act.numpy()

        return cut
