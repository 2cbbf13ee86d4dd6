"""The top-k largest-|x| entries of a site: candidates from one block, and the merge rule.

The order is total and does not depend on how the tokens were chunked or merged: larger |x|
first, ties by (doc, position, channel) ascending.
"""

from __future__ import annotations

import numpy as np
import torch

TOP_FIELDS = ("top_value", "top_channel", "top_doc", "top_position", "top_token")


def select_top(fields: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the k entries of largest |value|; ties broken by (doc, position, channel) ascending,
    so the result does not depend on the order in which pieces were merged."""
    keys = (
        fields["top_channel"].numpy(),
        fields["top_position"].numpy(),
        fields["top_doc"].numpy(),
        -np.abs(fields["top_value"].numpy()),
    )
    order = torch.from_numpy(np.lexsort(keys)[:k])
    return {name: t[order] for name, t in fields.items()}


def block_top(xb: torch.Tensor, rowmax: torch.Tensor, row0: int, aux, k: int) -> dict[str, torch.Tensor]:
    """The block's k best entries (``rowmax``: max |x| of each row, NaN as -1), labelled.

    Order: larger |x| first, ties by earlier row (rows are in doc, position order) then
    lower channel. The block's k best entries lie in the k best rows by that order of
    their max (any other entry is preceded by the max entry of each of those rows), and
    all are >= the k-th largest row max; so only a few candidates are ever sorted, and
    ties are broken the same way whatever the chunking.
    """
    n, w = xb.shape
    kk = min(k, n)
    t_row = torch.topk(rowmax, kk).values[-1]
    above = torch.nonzero(rowmax > t_row).view(-1)
    ties = torch.nonzero(rowmax == t_row).view(-1)[: kk - above.numel()]
    rows = torch.cat([above, ties]).sort().values
    cand = xb[rows].abs().reshape(-1)  # row-major: (row, channel) order
    if not bool(torch.isfinite(cand).all()):
        cand = torch.where(torch.isnan(cand), -1.0, cand)  # NaN never enters the top-k
    sel = torch.nonzero(cand >= max(float(t_row), 0.0)).view(-1)
    vals = cand[sel]
    if sel.numel() > k:
        kth = torch.topk(vals, k).values[-1]
        top = sel[vals > kth]
        sel = torch.cat([top, sel[vals == kth][: k - top.numel()]]).sort().values
    r = rows[sel // w]
    ch = sel % w
    g = (r + row0).cpu()
    fields = {
        "top_value": xb[r, ch].to(torch.float64).cpu(),
        "top_channel": ch.to(torch.int64).cpu(),
    }
    for name, t in zip(("top_doc", "top_position", "top_token"), aux):
        fields[name] = (
            torch.full((g.numel(),), -1, dtype=torch.int64)
            if t is None
            else t[g.to(t.device)].to(torch.int64).cpu()
        )
    return fields
