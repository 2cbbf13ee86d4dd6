"""A fixed-size uniform sample of tokens, aligned across sites: the memory-bounded input of fits.

Analyses that need samples rather than moments (lenses, linearity, quantiles) read a
Reservoir: every token gets a random key and the ``capacity`` tokens with the smallest keys are
kept, which is a uniform sample without replacement that never grows and merges exactly. All
sites keep the same tokens, so row j of ``resid.3`` and of ``resid.4`` is the same token.
"""

from __future__ import annotations

import torch

from actlab.engine.batch import TokenBatch


class Reservoir:
    """Sink keeping a uniform sample of at most ``capacity`` tokens (float32, on CPU)."""

    def __init__(self, capacity: int = 4096, seed: int = 0):
        self.capacity = int(capacity)
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
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
        keys = torch.rand(n, generator=self.generator)
        take = torch.arange(n)
        if len(self) >= self.capacity:  # only tokens that can displace a kept one matter
            take = take[keys < self.keys.max()]
            if take.numel() == 0:
                return
        self._merge(
            keys[take],
            {s: a[take].float() for s, a in batch.acts.items()},
            batch.token_ids[take], batch.doc_ids[take], batch.positions[take],
        )

    def _merge(self, keys, acts, token_ids, doc_ids, positions) -> None:
        all_keys = torch.cat([self.keys, keys])
        keep = torch.argsort(all_keys)[: self.capacity]
        keep, _ = torch.sort(keep)  # keep arrival order for readability
        self.keys = all_keys[keep]
        for site, new in acts.items():
            old = self.acts.get(site, new.new_empty((0, new.shape[1])))
            self.acts[site] = torch.cat([old, new])[keep]
        self.token_ids = torch.cat([self.token_ids, token_ids])[keep]
        self.doc_ids = torch.cat([self.doc_ids, doc_ids])[keep]
        self.positions = torch.cat([self.positions, positions])[keep]

    def merge(self, other: "Reservoir") -> None:
        """Combine two reservoirs of disjoint data: the result is a uniform sample of the union."""
        self.seen += other.seen
        self._merge(other.keys, other.acts, other.token_ids, other.doc_ids, other.positions)

    def __getitem__(self, site: str) -> torch.Tensor:
        return self.acts[site]
