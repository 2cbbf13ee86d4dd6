"""``collect_stats``: one pass of a model over documents into a ``StatsSink``, alone or on several ranks.

With ``distributed=True`` inside a ``torch.distributed`` job (``torchrun``), every rank plans the same
rows, runs its share of the batches (``distributed.rank_rows``) and the sinks are all-reduced, so every
rank returns the statistics of all the documents; saving is the caller's (rank 0's) business.
"""

from __future__ import annotations

from typing import Sequence

from actlab.dist.env import current
from actlab.engine.runner import plan_rows
from actlab.errors import ActlabError
from actlab.stats.distributed import rank_rows, total_tokens
from actlab.stats.sink import StatsSink

__all__ = ["collect_stats"]


def collect_stats(model, docs: Sequence, sites: str | Sequence[str] = "resid.*,mlp.hidden.*", *,
                  batch_size: int = 8, distributed: bool = False, extra_sinks: Sequence = (),
                  progress: bool = False, **cfg) -> tuple[StatsSink, int]:
    """``(sink, tokens)``: the statistics of ``sites`` over ``docs`` and the number of tokens they cover
    (all ranks' with ``distributed``). ``cfg``: ``StatsSink`` options (``eps``, ``topk``, ...).
    ``extra_sinks`` (e.g. a ``Reservoir``) see the same batches; combining them across ranks is theirs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ActlabError(f"batch_size must be a positive integer, not {batch_size!r}")
    names = model.resolve(sites)
    sink = StatsSink({s: model.sites[s] for s in names}, **cfg)
    rows = plan_rows(model, docs)
    if distributed:
        rank = current()
        rows = rank_rows(rows, batch_size, rank.rank, rank.world_size)
    tokens = 0
    if rows:
        summary = model.run(None, names, rows=rows, sinks=[sink, *extra_sinks], batch_size=batch_size,
                            progress=progress, description="stats")
        tokens = summary.n_selected
    if distributed:
        sink.all_reduce()
        tokens = total_tokens(tokens)
    return sink, tokens
