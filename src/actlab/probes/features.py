"""Activations + labels as probe rows: one row per text (mean or last-token pooling) or per labelled token.

Why a module of its own: probes train from memory (``from_model``, one pass of the model over the
texts, pooled in a sink so a long text costs one row) or from a recorded store (``from_store``), and
both must give the same rows. ``groups`` keeps each row's document so splits and bootstrap intervals
resample documents, not tokens (tokens of one document are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.engine.batch import TokenBatch
from actlab.errors import ActlabError
from actlab.probes.data import LabelledSet

__all__ = ["Features", "from_model", "from_store", "from_tensors", "token_char_spans", "POOLINGS"]

POOLINGS = ("mean", "last")


@dataclass
class Features:
    """Probe rows: ``x[site]`` [n, width] float32, ``y`` [n] class indices into ``classes``, ``groups`` [n]
    document ids, ``token_ids`` [n] (token level; None for pooled rows)."""

    x: dict[str, torch.Tensor]
    y: torch.Tensor
    groups: torch.Tensor
    classes: list[str]
    level: str
    token_ids: torch.Tensor | None = None
    pooling: str | None = None
    name: str = "labels"

    def __post_init__(self) -> None:
        n = self.y.shape[0]
        for site, x in self.x.items():
            if x.ndim != 2 or x.shape[0] != n:
                raise ActlabError(f"{site}: features of shape {tuple(x.shape)} for {n} labels")
        if self.groups.shape[0] != n or (self.token_ids is not None and self.token_ids.shape[0] != n):
            raise ActlabError("probe rows: labels, documents and token ids must have one entry per row")
        counts = torch.bincount(self.y, minlength=len(self.classes))
        if len(self.classes) < 2 or int((counts > 0).sum()) < 2:
            raise ActlabError(f"{self.name}: a probe needs at least two classes with examples; "
                              f"got {dict(zip(self.classes, counts.tolist()))}")

    @property
    def sites(self) -> list[str]:
        return list(self.x)


def from_tensors(x: dict[str, torch.Tensor] | torch.Tensor, y, groups=None, *, classes: list[str] | None = None,
                 token_ids=None, level: str = "sequence", name: str = "labels") -> Features:
    """Rows given directly (tests, users' own arrays): ``x`` one tensor (site ``"x"``) or a dict of sites."""
    x = {"x": x} if isinstance(x, torch.Tensor) else x
    y = torch.as_tensor(y, dtype=torch.long)
    classes = classes or [str(c) for c in range(int(y.max()) + 1)]
    groups = torch.arange(len(y)) if groups is None else torch.as_tensor(groups, dtype=torch.long)
    tok = None if token_ids is None else torch.as_tensor(token_ids, dtype=torch.long)
    return Features({k: v.float() for k, v in x.items()}, y, groups, classes, level, tok, name=name)


# ------------------------------------------------------------------ token ↔ character alignment
def token_char_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` as the runner tokenises it (special tokens included, as
    empty spans). Fast HF tokenizers give offsets; a byte-level tokenizer (one token per byte) maps bytes to
    characters; anything else is refused rather than guessed."""
    try:
        enc = tokenizer([text], add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"][0]
        if len(offsets) == len(enc["input_ids"][0]):
            return [(int(a), int(b)) for a, b in offsets]
    except (TypeError, KeyError, NotImplementedError, ValueError):
        pass
    ids = tokenizer([text], add_special_tokens=True)["input_ids"][0]
    data = text.encode("utf-8")
    if len(ids) != len(data):
        raise ActlabError("token labels need a tokenizer that reports character offsets (a fast Hugging Face "
                          "tokenizer) or one token per byte; this one does neither: use sequence labels")
    starts = [i for i in range(len(text)) for _ in text[i].encode("utf-8")]
    return [(c, c + 1) for c in starts]


# ------------------------------------------------------------------ sinks
class _PoolSink:
    """Per-document mean (or last token) of each site, accumulated batch by batch."""

    def __init__(self, n_docs: int, pooling: str):
        self.n_docs, self.pooling = n_docs, pooling
        self.sums: dict[str, torch.Tensor] = {}
        self.last_pos = torch.full((n_docs,), -1, dtype=torch.long)
        self.counts = torch.zeros(n_docs)

    def consume(self, batch: TokenBatch) -> None:
        d = batch.doc_ids
        for site, acts in batch.acts.items():
            acc = self.sums.setdefault(site, torch.zeros(self.n_docs, acts.shape[1], dtype=torch.float64))
            if self.pooling == "mean":
                acc.index_add_(0, d, acts.double())
            else:
                later = batch.positions > self.last_pos[d]
                acc[d[later]] = acts[later].double()
        if self.pooling == "mean":
            self.counts.index_add_(0, d, torch.ones(len(d)))
        self.last_pos[d] = torch.maximum(self.last_pos[d], batch.positions)

    def rows(self) -> dict[str, torch.Tensor]:
        if self.pooling == "mean":
            return {s: (v / self.counts.clamp_min(1)[:, None]).float() for s, v in self.sums.items()}
        return {s: v.float() for s, v in self.sums.items()}


class _TokenSink:
    def __init__(self):
        self.parts: list[TokenBatch] = []

    def consume(self, batch: TokenBatch) -> None:
        self.parts.append(batch)


def _token_rows(model, data: LabelledSet, acts: dict[str, torch.Tensor], token_ids, doc_ids, positions):
    """Label each token by the span its characters fall in; special tokens (empty spans) are dropped."""
    classes = data.classes
    index = {c: k for k, c in enumerate(classes)}
    spans = [token_char_spans(model.tokenizer, t) for t in data.texts]
    keep, y = [], []
    for row, (d, p) in enumerate(zip(doc_ids.tolist(), positions.tolist())):
        start, end = spans[d][p]
        if end > start:
            keep.append(row)
            y.append(index[data.char_label(d, start, end)])
    keep_t = torch.tensor(keep, dtype=torch.long)
    return ({s: a[keep_t].float() for s, a in acts.items()}, torch.tensor(y, dtype=torch.long), doc_ids[keep_t],
            token_ids[keep_t], classes)


def from_model(model, data: LabelledSet, sites, *, pooling: str = "mean", batch_size: int = 8,
               progress: bool = False) -> Features:
    """Run ``model`` over ``data``'s texts once and return probe rows for every site of ``sites``."""
    sites = model.resolve(sites)
    if pooling not in POOLINGS:
        raise ActlabError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    options = dict(batch_size=batch_size, progress=progress, description=f"reading {data.name}")
    if data.level == "sequence":
        sink = _PoolSink(len(data.texts), pooling)
        model.run(data.texts, sites, [sink], positions="all", **options)
        index = {c: k for k, c in enumerate(data.classes)}
        y = torch.tensor([index[label] for label in data.labels], dtype=torch.long)
        return Features(sink.rows(), y, torch.arange(len(y)), data.classes, "sequence", None, pooling, data.name)
    tokens = _TokenSink()
    model.run(data.texts, sites, [tokens], positions="all", **options)
    parts = tokens.parts
    acts = {s: torch.cat([p.acts[s] for p in parts]) for s in parts[0].acts}
    x, y, groups, tok, classes = _token_rows(model, data, acts, torch.cat([p.token_ids for p in parts]),
                                             torch.cat([p.doc_ids for p in parts]),
                                             torch.cat([p.positions for p in parts]))
    return Features(x, y, groups, classes, "token", tok, None, data.name)


def from_store(store, model, data: LabelledSet, sites, *, pooling: str = "mean") -> Features:
    """The same rows from a store recorded (``actlab record``, every position) on ``data``'s texts, in order."""
    from actlab.models.model import same_model

    if store.model and not same_model(store.model, model.identity()):
        raise ActlabError(f"the store {store.path} was recorded from {store.model.get('model_name')}, not "
                          f"{model.name}: record it again with this model")
    if store.positions != "all":
        raise ActlabError(f"the store {store.path} holds positions={store.positions!r}; probes need every token: "
                          "record it with positions='all'")
    sites = list(model.resolve(sites))
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise ActlabError(f"the store {store.path} has no site {missing[0]} (it has {', '.join(store.sites)})")
    n = store.n_tokens
    batch = TokenBatch({s: store[s][0:n] for s in sites}, store["token_ids"][0:n], store["doc_ids"][0:n],
                       store["positions"][0:n])
    if int(batch.doc_ids.max()) >= len(data.texts):
        raise ActlabError(f"the store {store.path} holds more documents than the {len(data.texts)} labelled texts: "
                          "record exactly the labelled texts, in order")
    if data.level == "sequence":
        sink = _PoolSink(len(data.texts), pooling)
        sink.consume(batch)
        index = {c: k for k, c in enumerate(data.classes)}
        y = torch.tensor([index[label] for label in data.labels], dtype=torch.long)
        return Features(sink.rows(), y, torch.arange(len(y)), data.classes, "sequence", None, pooling, data.name)
    x, y, groups, tok, classes = _token_rows(model, data, batch.acts, batch.token_ids, batch.doc_ids,
                                             batch.positions)
    return Features(x, y, groups, classes, "token", tok, None, data.name)
