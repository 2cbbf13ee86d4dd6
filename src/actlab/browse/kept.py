"""A bounded keeper: per group, the ``cap`` entries with the smallest (key, row), and each one's token window.

Both per-unit samples of the browser are this structure: the top-k contexts (one group per unit, key =
-activation) and the interval samples (one group per unit and activation interval, key = a hash of the
token and the unit, so the survivors are a uniform sample without replacement, a bottom-k sketch).
Why one structure: the merge rule is the same, and it is exact: the survivors of a merge are the
``cap`` best of everything ever offered, whatever the batching, because every entry that could enter
is offered and ties go to the earlier token (row). Windows are cut only for entries that enter, so
memory is ``groups × cap × window`` whatever the corpus size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["Kept", "WindowFn"]

# (candidate indices into the offered arrays) -> (token ids [E, W] int32 with -1 padding, activations [E, W] f32)
_FIELDS = ("key", "row", "value", "doc", "pos", "win_tok", "win_act")
WindowFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Kept:
    """``groups × cap`` entries sorted by (key, row) inside each group; empty slots have key +inf, row -1."""

    def __init__(self, groups: int, cap: int, width: int):
        self.groups, self.cap, self.width = groups, cap, width
        self.key = np.full((groups, cap), np.inf)
        self.row = np.full((groups, cap), -1, dtype=np.int64)
        self.value = np.zeros((groups, cap), dtype=np.float32)
        self.doc = np.full((groups, cap), -1, dtype=np.int64)
        self.pos = np.full((groups, cap), -1, dtype=np.int64)
        self.win_tok = np.full((groups, cap, width), -1, dtype=np.int32)
        self.win_act = np.zeros((groups, cap, width), dtype=np.float32)

    def worst(self) -> np.ndarray:
        """[groups] the largest kept key (+inf while a group has a free slot): a candidate must not exceed it."""
        return self.key[:, -1]

    def offer(self, group: np.ndarray, key: np.ndarray, row: np.ndarray, value: np.ndarray, doc: np.ndarray,
              pos: np.ndarray, window: WindowFn, old_group: np.ndarray | None = None) -> int:
        """Merge candidates (flat arrays) into the kept entries; ``window`` cuts the windows of those that enter.
        ``old_group`` ([groups, cap]) moves the kept entries to other groups first (an interval that merged).
        Returns how many candidates entered."""
        if old_group is None:  # only the groups that get candidates change: merge those alone
            touched = np.unique(group)
            if touched.size == 0:
                return 0
            g_live = np.broadcast_to(np.arange(touched.size)[:, None], (touched.size, self.cap))
            group = np.searchsorted(touched, group)
        else:
            touched, g_live = np.arange(self.groups), old_group
        mine = {name: getattr(self, name)[touched] for name in _FIELDS}
        live = mine["row"] >= 0
        n_old = int(live.sum())
        g = np.concatenate([g_live[live], group])
        k = np.concatenate([mine["key"][live], key])
        r = np.concatenate([mine["row"][live], row])
        order = np.lexsort((r, k, g))
        g_sorted = g[order]
        rank = np.arange(order.size) - np.searchsorted(g_sorted, g_sorted, side="left")
        keep = rank < self.cap
        src, g_kept, rank_kept = order[keep], g_sorted[keep], rank[keep]
        from_old, from_new = src < n_old, src >= n_old
        fresh = src[from_new] - n_old
        offered = {"key": key, "row": row, "value": value, "doc": doc, "pos": pos}
        for name, empty in (("key", np.inf), ("row", -1), ("value", 0), ("doc", -1), ("pos", -1)):
            arr = np.full_like(mine[name], empty)
            arr[g_kept, rank_kept] = np.concatenate([mine[name][live], offered[name]])[src]
            getattr(self, name)[touched] = arr
        new_windows = window(fresh) if fresh.size else (None, None)
        for name, new, empty in (("win_tok", new_windows[0], -1), ("win_act", new_windows[1], 0)):
            arr = np.full_like(mine[name], empty)
            arr[g_kept[from_old], rank_kept[from_old]] = mine[name][live][src[from_old]]
            if new is not None:
                arr[g_kept[from_new], rank_kept[from_new]] = new
            getattr(self, name)[touched] = arr
        return int(from_new.sum())


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 in, values in [0, 2^32)): the sampling keys, a function of the token and unit
    only, so which tokens are sampled does not depend on the batching."""
    mask = 0xFFFFFFFF
    x = x & mask
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return x ^ (x >> 16)
