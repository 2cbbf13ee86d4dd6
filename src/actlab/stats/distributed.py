"""Statistics over several processes: each rank reduces its share of the batches, then the ranks' states
are combined so every rank holds the statistics of all the tokens.

Which tokens a rank reduces: rank r runs batches r, r + W, ... of the single-process plan (the same
rows, the same padding), so every token's activations are bit-identical to a single-process run. A
block's statistics depend on the block alone (see ``update.fast_block``), so the ranks' states are
folds of the same per-block pieces as the single-process state, in another order.

How they combine (``all_reduce``): every rank gathers every rank's full state (fixed-size tensors; the
top-k lists padded to the longest) and folds them **in rank order**, ``state_0.merge(state_1)...``,
with ``ChannelStats.merge`` itself. So the result is identical on every rank and bit-identical to
merging the per-rank sinks in rank order in one process; counts, histograms, extrema and top-k equal
the single-process streaming result exactly, and the float64 mean and M2 equal it to float64 rounding
of a different fold order (a few ulps per merge; the tests check 1e-9 relative).
"""

from __future__ import annotations

import torch

from actlab.dist.merge import all_gather_fixed, all_gather_varlen, all_sum, world
from actlab.errors import ActlabError
from actlab.stats.channel import ChannelStats
from actlab.stats.state import FIELDS
from actlab.stats.topk import TOP_FIELDS

__all__ = ["all_reduce_stats", "rank_rows"]

_FIXED = [name for name in FIELDS if name not in TOP_FIELDS]
_F64 = [name for name in _FIXED if FIELDS[name][0] == torch.float64]
_I64 = [name for name in _FIXED if FIELDS[name][0] == torch.int64]
_TOP_INT = [name for name in TOP_FIELDS if name != "top_value"]


def _pack(stats: dict[str, ChannelStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One float64 and one int64 vector of every site's fixed-size fields (the top-k lengths last), and
    the top-k entries of every site concatenated (values; the int fields as [n, 4])."""
    states = [st.state_dict() for st in stats.values()]
    f64 = torch.cat([s[name].reshape(-1) for s in states for name in _F64])
    lengths = [s["top_value"].shape[0] for s in states]
    i64 = torch.cat([s[name].reshape(-1) for s in states for name in _I64] + [torch.tensor(lengths)])
    top_v = torch.cat([s["top_value"] for s in states])
    top_i = torch.cat([torch.stack([s[name] for name in _TOP_INT], 1) for s in states])
    return f64, i64, top_v, top_i


def _unpack(template: dict[str, ChannelStats], f64: torch.Tensor, i64: torch.Tensor, top_v: torch.Tensor,
            top_i: torch.Tensor) -> dict[str, ChannelStats]:
    lengths = i64[-len(template):].tolist()
    out, fo, io, to = {}, 0, 0, 0
    for (site, st), n_top in zip(template.items(), lengths):
        shapes = st._shapes()
        state = {}
        for name, buf, off in [(name, f64, "f") for name in _F64] + [(name, i64, "i") for name in _I64]:
            shape = shapes[FIELDS[name][1]]
            size = int(torch.Size(shape).numel())
            start = fo if off == "f" else io
            state[name] = buf[start:start + size].reshape(shape).clone()
            if off == "f":
                fo += size
            else:
                io += size
        state["top_value"] = top_v[to:to + n_top].clone()
        for j, name in enumerate(_TOP_INT):
            state[name] = top_i[to:to + n_top, j].clone()
        to += n_top
        out[site] = ChannelStats.from_state_dict(state, st.config(), where=f"rank state of site {site!r}")
    return out


def all_reduce_stats(stats: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
    """Every rank's ``{site: ChannelStats}`` folded in rank order (see the module docstring); the input
    itself in one process. Every rank must hold the same sites, widths and config."""
    if world() == 1:
        return stats
    shape = torch.tensor([len(stats), sum(st.width for st in stats.values()), hash_config(stats)])
    shapes = all_gather_fixed(shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ActlabError("the ranks hold statistics of different sites, widths or settings; give every rank "
                          "the same sites and options (sites_widths=..., eps=..., topk=...)")
    f64, i64, top_v, top_i = _pack(stats)
    parts = zip(all_gather_fixed(f64), all_gather_fixed(i64), all_gather_varlen(top_v), all_gather_varlen(top_i))
    merged = None
    for piece in parts:
        rank_stats = _unpack(stats, *piece)
        if merged is None:
            merged = rank_stats
        else:
            for site, st in merged.items():
                st.merge(rank_stats[site])
    return merged


def hash_config(stats: dict[str, ChannelStats]) -> int:
    """A small deterministic fingerprint of the sites, widths and configs (to refuse mismatched ranks)."""
    text = repr([(site, sorted(st.config().items())) for site, st in stats.items()])
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) % (1 << 61)
    return value


def rank_rows(rows: list, batch_size: int, rank: int, world_size: int) -> list:
    """This rank's rows: those of batches ``rank, rank + world, ...`` of the single-process plan, so each
    batch (and every token's activations) is exactly the one a single process would run."""
    mine = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        if b % world_size == rank:
            mine.extend(rows[start:start + batch_size])
    return mine


def total_tokens(n: int) -> int:
    """Sum of ``n`` over ranks."""
    return int(all_sum(torch.tensor([n], dtype=torch.int64)))
