"""The texts that make SAE latents fire: top-activating contexts per latent, and which latents to show.

A small reader for docs and the command line (``actlab sae latents``); the feature browser builds
its pages on a streaming pass of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from actlab.errors import ActlabError
from actlab.sae.model import SparseAutoencoder
from actlab.sae.splice import attach, latent_site

__all__ = ["Context", "latent_contexts"]


@dataclass
class Context:
    """One firing of a latent: its activation, the document and the token, and the text around it."""

    value: float
    doc: int
    position: int
    token: str
    before: str
    after: str


def latent_contexts(model, sae: SparseAutoencoder, site: str, texts: Sequence[str], *, latents: Sequence[int] | None = None,
                    top: int = 5, window: int = 12, show: int = 8, batch_size: int = 16) -> dict:
    """For each latent (default: ``show`` latents spread over the firing-rate range, from the often-firing to
    the rare), its ``top`` largest activations on ``texts`` with ``window`` tokens of context before and
    a few after. Returns ``{"latents": {latent: {"rate": firing rate, "contexts": [Context, ...]}}, "tokens": n}``."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ActlabError("latent_contexts needs at least one non-empty text")
    name = latent_site(site)
    values, where, fires, ids, count = None, None, torch.zeros(sae.n_latents), [], 0
    with attach(model, sae, site):
        for start in range(0, len(texts), batch_size):
            batch = model.collect(texts[start:start + batch_size], [name], positions="all", batch_size=batch_size)
            z = batch.acts[name].float()
            fires += (z > 0).sum(0)
            ids.append(torch.stack([batch.doc_ids + start, batch.positions, batch.token_ids], 1))
            vals, rows = z.topk(min(top, z.shape[0]), dim=0)  # [top, n_latents]
            rows = rows + count
            values = vals if values is None else torch.cat([values, vals])
            where = rows if where is None else torch.cat([where, rows])
            keep = values.topk(min(top, values.shape[0]), dim=0).indices
            values, where = values.gather(0, keep), where.gather(0, keep)
            count += z.shape[0]
    table = torch.cat(ids)
    rate = fires / max(count, 1)
    chosen = list(latents) if latents is not None else _spread(rate, show)
    tokens_of = _token_texts(model, texts, table)
    out = {}
    for latent in chosen:
        if not 0 <= int(latent) < sae.n_latents:
            raise ActlabError(f"latent {latent} is out of range: the SAE has {sae.n_latents} latents")
        contexts = []
        for v, row in zip(values[:, latent].tolist(), where[:, latent].tolist()):
            if v > 0:
                contexts.append(tokens_of(int(row), v, window))
        out[int(latent)] = {"rate": float(rate[latent]), "contexts": contexts}
    return {"latents": out, "tokens": count}


def _spread(rate: torch.Tensor, show: int) -> list[int]:
    """Latents at evenly spaced ranks of the firing rate among those that fire."""
    alive = torch.nonzero(rate > 0).view(-1)
    if not alive.numel():
        return []
    order = alive[rate[alive].argsort(descending=True)]
    picks = torch.linspace(0, order.numel() - 1, min(show, order.numel())).round().long()
    return order[picks].tolist()


def _token_texts(model, texts: Sequence[str], table: torch.Tensor):
    """A function (row, value, window) -> Context that decodes the tokens around a recorded row."""
    tok = model.tokenizer

    def context(row: int, value: float, window: int) -> Context:
        doc, pos = int(table[row, 0]), int(table[row, 1])
        same = (table[:, 0] == doc)
        doc_rows = torch.nonzero(same).view(-1)
        first = int(doc_rows[0])
        ids = table[first:first + doc_rows.numel(), 2].tolist()
        at = pos - int(table[first, 1])
        return Context(value, doc, pos, tok.decode([ids[at]]), tok.decode(ids[max(0, at - window):at]),
                       tok.decode(ids[at + 1:at + 1 + max(2, window // 3)]))

    return context
