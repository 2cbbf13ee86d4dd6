"""The top-k largest-|x| entries of a site: candidates from one block, and the merge rule.

The order is total and does not depend on how the tokens were chunked or merged: larger |x|
first, ties by (doc, position, channel) ascending.
"""

from __future__ import annotations

import numpy as np
import torch

TOP_FIELDS = ("top_value", "top_channel", "top_doc", "top_position", "top_token")


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else t


def select_top(fields: dict[str, torch.Tensor | np.ndarray], k: int) -> dict[str, torch.Tensor]:
    """Keep the k entries of largest |value|; ties broken by (doc, position, channel) ascending,
    so the result does not depend on the order in which pieces were merged. (numpy throughout: a
    handful of tiny arrays, where torch's per-call overhead would be most of the cost.)"""
    arrays = {name: _np(t) for name, t in fields.items()}
    keys = (arrays["top_channel"], arrays["top_position"], arrays["top_doc"], -np.abs(arrays["top_value"]))
    order = np.lexsort(keys)[:k]
    return {name: torch.from_numpy(a[order]) for name, a in arrays.items()}


def merge_top(kept: dict[str, torch.Tensor], new: dict[str, np.ndarray], k: int) -> dict[str, torch.Tensor]:
    """``select_top`` of the kept entries and a block's candidates (``block_top``)."""
    return select_top({name: np.concatenate([kept[name].numpy(), new[name]]) for name in TOP_FIELDS}, k)


def block_top(xb: torch.Tensor, rowmax: torch.Tensor, row0: int, aux, k: int) -> dict[str, np.ndarray]:
    """The block's k best entries (``rowmax``: max |x| of each row, NaN as -1), labelled (numpy arrays).

    Order: larger |x| first, ties by earlier row (rows are in doc, position order) then
    lower channel. The block's k best entries lie in the k best rows by that order of
    their max (any other entry is preceded by the max entry of each of those rows), and
    all are >= the k-th largest row max; so only a few candidates are ever sorted, and
    ties are broken the same way whatever the chunking. (numpy on the CPU tensors' memory:
    a dozen small steps, where torch's per-call overhead was most of the cost.)
    """
    n, w = xb.shape
    kk = min(k, n)
    rm = rowmax.numpy()
    t_row = float(np.partition(rm, n - kk)[n - kk])  # the kk-th largest row max
    above = np.flatnonzero(rm > t_row)
    ties = np.flatnonzero(rm == t_row)[: kk - above.size]
    rows = np.sort(np.concatenate([above, ties]))
    xn = xb.numpy()
    cand = np.abs(xn[rows]).reshape(-1)  # row-major: (row, channel) order
    if not np.isfinite(cand).all():
        cand = np.where(np.isnan(cand), -1.0, cand)  # NaN never enters the top-k
    sel = np.flatnonzero(cand >= max(t_row, 0.0))
    vals = cand[sel]
    if sel.size > k:
        kth = np.partition(vals, vals.size - k)[vals.size - k]  # the k-th largest
        top = sel[vals > kth]
        sel = np.sort(np.concatenate([top, sel[vals == kth][: k - top.size]]))
    r = rows[sel // w]
    ch = sel % w
    g = r + row0
    fields = {"top_value": xn[r, ch].astype(np.float64), "top_channel": ch.astype(np.int64)}
    for name, t in zip(("top_doc", "top_position", "top_token"), aux):
        if t is None:
            fields[name] = np.full(g.size, -1, dtype=np.int64)
        elif t.device.type == "cpu":
            fields[name] = t.numpy()[g].astype(np.int64)
        else:
            fields[name] = t[torch.from_numpy(g).to(t.device)].to(torch.int64).cpu().numpy()
    return fields
