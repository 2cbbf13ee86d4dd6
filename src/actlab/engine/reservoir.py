"""A fixed-size uniform sample of tokens, aligned across sites: the memory-bounded input of fits.

Analyses that need samples rather than moments (lenses, linearity, quantiles) read a
Reservoir: every token gets a pseudo-random key and the ``capacity`` tokens with the smallest keys
are kept, which is a uniform sample without replacement that never grows and merges exactly. All
sites keep the same tokens, so row j of ``resid.3`` and of ``resid.4`` is the same token.

A token's key is a hash of ``(seed, doc_id, position)``, not a draw from a stream, so the sample is
a function of the set of tokens seen: the same whatever the batch size, the order of the batches,
the shards they were merged from or the ranks that saw them. Kept tokens are ordered by
(doc_id, position, key), so equal samples are equal tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from actlab.engine.batch import TokenBatch

_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent and uniform."""
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    return z ^ (z >> np.uint64(31))


def token_keys(seed: int, doc_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2**63)``, uniform and independent across distinct (doc_id, position) pairs."""
    with np.errstate(over="ignore"):
        s = _mix(np.array([seed], dtype=np.int64).view(np.uint64) * _GOLDEN + _GOLDEN)
        d = doc_ids.to(torch.int64).numpy().view(np.uint64)
        p = positions.to(torch.int64).numpy().view(np.uint64)
        z = _mix(_mix(s ^ d) + p * _GOLDEN)
    return torch.from_numpy((z >> np.uint64(1)).view(np.int64).copy())


def canonical_order(keys: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Indices sorting tokens by (doc_id, position, key)."""
    return torch.from_numpy(np.lexsort((keys.numpy(), positions.numpy(), doc_ids.numpy())))


def smallest_keys(keys: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest keys (ties by doc_id, then position), in canonical order."""
    best = torch.from_numpy(np.lexsort((positions.numpy(), doc_ids.numpy(), keys.numpy()))[:k])
    return best[canonical_order(keys[best], doc_ids[best], positions[best])]


class Reservoir:
    """Sink keeping a uniform sample of at most ``capacity`` tokens (float32, on CPU)."""

    def __init__(self, capacity: int = 4096, seed: int = 0):
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.keys = torch.empty(0, dtype=torch.int64)
        self.acts: dict[str, torch.Tensor] = {}
        self.token_ids = torch.empty(0, dtype=torch.long)
        self.doc_ids = torch.empty(0, dtype=torch.long)
        self.positions = torch.empty(0, dtype=torch.long)
        self.seen = 0

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def consume(self, batch: TokenBatch) -> None:
        n = batch.n_tokens
        if n == 0:
            return
        self.seen += n
        keys = token_keys(self.seed, batch.doc_ids, batch.positions)
        take = torch.arange(n)
        if len(self) >= self.capacity:  # only tokens that can displace a kept one matter
            take = take[keys <= self.keys.max()]
            if take.numel() == 0:
                return
        self._merge(
            keys[take],
            {s: a[take].float() for s, a in batch.acts.items()},
            batch.token_ids[take], batch.doc_ids[take], batch.positions[take],
        )

    def _merge(self, keys, acts, token_ids, doc_ids, positions) -> None:
        all_docs = torch.cat([self.doc_ids, doc_ids.to(torch.long)])
        all_pos = torch.cat([self.positions, positions.to(torch.long)])
        all_keys = torch.cat([self.keys, keys])
        keep = smallest_keys(all_keys, all_docs, all_pos, self.capacity)
        self.keys = all_keys[keep]
        for site, new in acts.items():
            old = self.acts.get(site, new.new_empty((0, new.shape[1])))
            self.acts[site] = torch.cat([old, new])[keep]
        self.token_ids = torch.cat([self.token_ids, token_ids.to(torch.long)])[keep]
        self.doc_ids = all_docs[keep]
        self.positions = all_pos[keep]

    def merge(self, other: "Reservoir") -> "Reservoir":
        """Combine two reservoirs of disjoint data: the result is a uniform sample of the union (with the
        same seed, exactly the sample one reservoir fed both would hold)."""
        self.seen += other.seen
        self._merge(other.keys, other.acts, other.token_ids, other.doc_ids, other.positions)
        return self

    def __getitem__(self, site: str) -> torch.Tensor:
        return self.acts[site]
