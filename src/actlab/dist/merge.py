"""Cross-rank reductions of tensors with the tensor collectives only (no pickled objects cross the wire).

Why a module of its own: statistics, reservoirs and SAE training all need the same few moves — sum or
min/max a tensor over ranks, gather every rank's copy of a fixed-size tensor, or gather tensors whose
length differs per rank (a top-k list, a reservoir) — and each must be the identity in one process, so
the single-process code path is literally the world-size-1 case. Gathers return the ranks' pieces in
rank order, which is what makes an ordered fold (rank 0, then 1, ...) identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from actlab.dist.env import is_distributed

__all__ = ["all_sum", "all_min", "all_max", "all_gather_fixed", "all_gather_varlen", "broadcast_", "world"]


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy on the device the backend moves (CUDA for NCCL, CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return t.detach().to(torch.device("cuda", torch.cuda.current_device())).contiguous().clone()
    return t.detach().cpu().contiguous().clone()


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return t
    buf = _wire(t)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; ``t`` itself in one process). Exact for integers; for
    floats the backend's order, identical on every rank."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_min(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MIN)


def all_max(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def all_gather_fixed(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
    if not is_distributed():
        return [t]
    buf = _wire(t)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def all_gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t``, whose first dimension may differ per rank (the rest must agree), in rank order:
    the lengths are gathered first, then every piece padded to the longest and trimmed back."""
    if not is_distributed():
        return [t]
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    lengths = [int(v) for v in all_gather_fixed(n)]
    longest = max(lengths)
    if longest == 0:
        return [t[:0] for _ in lengths]
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    return [piece[:length] for piece, length in zip(all_gather_fixed(padded), lengths)]


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy (nothing to do in one process)."""
    if is_distributed():
        buf = _wire(t)
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device))
    return t
