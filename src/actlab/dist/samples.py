"""A ``Reservoir`` combined across ranks: the uniform sample of all the ranks' tokens, on every rank.

Keys are hashes of (seed, doc_id, position) (``engine.reservoir``), so the union's sample is decided
from the keys alone: the ranks gather their kept keys and labels (small), every rank picks the same
``capacity`` smallest, and the activations of the kept rows travel once, in one sum per site where each
rank adds its own rows into a buffer of ``-0.0`` (the additive identity of IEEE floats, so the sum is
exact, signed zeros and all). The result equals the reservoir one process would hold, bit for bit.
"""

from __future__ import annotations

import torch

from actlab.dist.merge import all_gather_varlen, all_sum, world
from actlab.engine.reservoir import Reservoir, smallest_keys

__all__ = ["all_reduce_reservoir"]


def all_reduce_reservoir(res: Reservoir, widths: dict[str, int]) -> Reservoir:
    """Make ``res`` the sample of every rank's tokens (in place; returns it). ``widths``: ``{site: width}``
    of every site the ranks keep (a rank that saw no token has no tensors to tell them)."""
    if world() == 1:
        return res
    labels = torch.stack([res.keys, res.doc_ids, res.positions, res.token_ids], 1)
    pieces = all_gather_varlen(labels)
    owner = torch.cat([torch.full((p.shape[0],), r, dtype=torch.int64) for r, p in enumerate(pieces)])
    local = torch.cat([torch.arange(p.shape[0]) for p in pieces])
    table = torch.cat(pieces)
    keep = smallest_keys(table[:, 0], table[:, 1], table[:, 2], res.capacity)
    me = torch.distributed.get_rank()
    mine = owner[keep] == me
    acts = {}
    for site, width in widths.items():
        buf = torch.full((keep.numel(), width), -0.0, dtype=torch.float32)
        if mine.any():
            buf[mine] = res.acts[site][local[keep][mine]]
        acts[site] = all_sum(buf)
    res.keys, res.doc_ids, res.positions, res.token_ids = (table[keep, j].clone() for j in range(4))
    res.acts = acts
    res.seen = int(all_sum(torch.tensor([res.seen], dtype=torch.int64)))
    return res
