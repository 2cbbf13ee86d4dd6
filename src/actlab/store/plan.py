"""The shard plan of a recording: rows cut into shards, and the manifest header that describes them.

A plan depends only on the model, the documents and the parameters, never on the machine or the
moment, so every process that plans the same call gets the same shards (``plan_sha256`` proves it):
that is what lets a killed run resume, and several workers write disjoint shards of one store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

import actlab
from actlab.engine import runner
from actlab.engine.batching import LongDocs, Positions, Row, selection_mask
from actlab.engine.config import Config
from actlab.errors import ActlabError
from actlab.store.manifest import (
    FORMAT_NAME, FORMAT_VERSION, INDEX_KEYS, dtype_name, positions_to_json, shard_name, torch_dtype,
)

DEFAULT_SHARD_BYTES = 256 * 2**20  # target shard size when shard_tokens is not given
_COUNT_CHUNK = 1024


@dataclass
class RecordConfig(Config):
    """What a store holds and how it is cut: everything the plan (and so the files) depends on.

    ``positions``: which tokens of each row are stored ("all", "last", or a (start, stop) span);
    ``shard_tokens``: tokens per shard (default: shards of about ``DEFAULT_SHARD_BYTES``, or the
    store's own value when resuming); ``max_tokens``: a budget (the last row is cut to fit);
    ``dtype``: the storage dtype (default: the model's); ``max_length`` / ``long_docs``: how
    documents are split into rows (default: the model's context; "chunk").
    """

    positions: Positions = "all"
    shard_tokens: int | None = None
    max_tokens: int | None = None
    dtype: str | torch.dtype | None = None
    max_length: int | None = None
    long_docs: LongDocs = "chunk"

    def __post_init__(self) -> None:
        if isinstance(self.positions, list):
            self.positions = tuple(self.positions)
        super().__post_init__()

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ActlabError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            raise ActlabError(f"shard_tokens must be at least 1, not {self.shard_tokens}")


@dataclass
class ShardPlan:
    """One shard: the rows it runs and where its tokens sit in the store."""

    index: int
    rows: list[Row]
    row_start: int  # index of the first row in the plan
    n_tokens: int  # selected tokens (what the shard stores)
    token_offset: int  # global index of the shard's first token


@dataclass
class RecordPlan:
    """What a recording writes where: the model, the shards and the manifest header.

    Made by ``plan_record``; ``write_shard(plan, i)`` writes one shard, ``finalise_record(plan)``
    lists them all. ``header`` is the manifest without its shard list and time stamps.
    """

    model: Any
    out: Path
    sites: list[str]
    positions: Positions
    shards: list[ShardPlan]
    header: dict

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.header["sites"])

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.header["dtype"])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def n_tokens(self) -> int:
        return int(self.header["plan"]["n_tokens"])

    @property
    def plan_sha256(self) -> str:
        return self.header["plan"]["plan_sha256"]

    def expected_entry(self, index: int) -> dict:
        """The fields of shard ``index``'s manifest entry that the plan decides (a listed entry that
        says otherwise was edited)."""
        s = self.shards[index]
        return {"file": shard_name(index), "n_tokens": s.n_tokens, "token_offset": s.token_offset,
                "rows": [s.row_start, s.row_start + len(s.rows)], "doc_ids": [s.rows[0].doc_id, s.rows[-1].doc_id]}

    def __repr__(self) -> str:
        return f"RecordPlan({str(self.out)!r}, shards={self.n_shards}, tokens={self.n_tokens}, sites={self.sites})"


# ------------------------------------------------------------------ cutting rows into shards
def _selected_counts(rows: list[Row], positions: Positions) -> list[int]:
    """Tokens each row sends to the sinks, computed with the runner's own selection rule."""
    counts: list[int] = []
    for i in range(0, len(rows), _COUNT_CHUNK):
        chunk = rows[i : i + _COUNT_CHUNK]
        width = max(len(r.ids) for r in chunk)
        counts.extend(int(c) for c in selection_mask(chunk, width, positions).sum(1).tolist())
    return counts


def _trim(row: Row, keep: int, positions: Positions) -> Row:
    """Cut a row's ids so exactly ``keep`` of its selected tokens remain (selections are contiguous)."""
    sel = selection_mask([row], len(row.ids), positions)[0]
    first = int(sel.nonzero()[0, 0])
    trimmed = Row(row.doc_id, row.start, row.ids[: first + keep], row.doc_length)
    if int(selection_mask([trimmed], len(trimmed.ids), positions).sum()) != keep:  # pragma: no cover - defensive
        raise ActlabError(f"cannot cut a row to {keep} tokens with positions={positions!r}; drop max_tokens")
    return trimmed


def _hash_rows(digest, rows: Iterable[Row]) -> None:
    for r in rows:
        digest.update(np.array([r.doc_id, r.start, r.doc_length, len(r.ids)], dtype="<i8").tobytes())
        digest.update(np.asarray(r.ids, dtype="<i8").tobytes())


def _keep_rows(rows: list[Row], positions: Positions, max_tokens: int | None) -> list[tuple[Row, int]]:
    """Rows that store at least one token, cut so the total is at most ``max_tokens``."""
    kept: list[tuple[Row, int]] = []
    total = 0
    for row, count in zip(rows, _selected_counts(rows, positions)):
        if count == 0:
            continue  # nothing of this row is stored: do not spend a forward pass on it
        if max_tokens is not None:
            if total >= max_tokens:
                break
            if total + count > max_tokens:
                count = max_tokens - total
                row = _trim(row, count, positions)
        kept.append((row, count))
        total += count
    if not kept:
        raise ActlabError(f"positions={positions!r} selects no token of these documents: nothing to record")
    return kept


def _cut_shards(kept: list[tuple[Row, int]], shard_tokens: int) -> list[ShardPlan]:
    """Group rows into shards at row boundaries: a shard closes once it holds ``shard_tokens``."""
    shards: list[ShardPlan] = []
    current: list[Row] = []
    cur_tokens = row_start = offset = 0
    for k, (row, count) in enumerate(kept):
        current.append(row)
        cur_tokens += count
        if cur_tokens >= shard_tokens or k == len(kept) - 1:
            shards.append(ShardPlan(len(shards), current, row_start, cur_tokens, offset))
            offset += cur_tokens
            row_start = k + 1
            current, cur_tokens = [], 0
    return shards


def _plan_digest(params: dict, input_sha256: str, shards: list[ShardPlan]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(input_sha256.encode())
    for shard in shards:
        digest.update(np.array([shard.index, shard.row_start, len(shard.rows), shard.n_tokens], dtype="<i8").tobytes())
        _hash_rows(digest, shard.rows)
    return digest.hexdigest()


# ------------------------------------------------------------------ the plan
def default_shard_tokens(widths: dict[str, int], store_dtype: str, old: dict | None) -> int:
    """The store's own value when resuming, else shards of about ``DEFAULT_SHARD_BYTES``."""
    if old is not None and isinstance(old["plan"].get("shard_tokens"), int):
        return old["plan"]["shard_tokens"]
    per_token = sum(widths.values()) * torch_dtype(store_dtype).itemsize + 8 * len(INDEX_KEYS)
    return max(1, DEFAULT_SHARD_BYTES // per_token)


def resolve_sites(model, sites: str | Sequence[str], config: RecordConfig) -> tuple[list[str], str]:
    """Site names and the storage dtype's name: checked before the directory is touched."""
    return model.resolve(sites), dtype_name(config.dtype if config.dtype is not None else model.dtype)


def make_plan(model, docs: Sequence, site_names: list[str], store_dtype: str, out: Path, config: RecordConfig,
              old: dict | None) -> RecordPlan:
    """Tokenize, cut into shards and describe; ``old`` is the manifest already in ``out`` (or None)."""
    widths = {s: int(model.sites[s]) for s in site_names}
    positions, max_tokens = config.positions, config.max_tokens
    shard_tokens = config.shard_tokens
    if shard_tokens is None:
        shard_tokens = default_shard_tokens(widths, store_dtype, old)
    resolved_max_length = int(config.max_length or model.max_length)
    rows = runner.plan_rows(model, docs, max_length=resolved_max_length, long_docs=config.long_docs)
    params = {"positions": positions_to_json(positions), "max_length": resolved_max_length,
              "long_docs": config.long_docs, "max_tokens": max_tokens, "shard_tokens": shard_tokens}
    digest = hashlib.sha256()
    _hash_rows(digest, rows)
    input_sha256 = digest.hexdigest()
    kept = _keep_rows(rows, positions, max_tokens)
    del rows
    shards = _cut_shards(kept, shard_tokens)
    n_tokens = sum(count for _, count in kept)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "actlab_version": actlab.__version__,
        "model": model.identity(),
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "sites": widths,
        "dtype": store_dtype,
        "positions": positions_to_json(positions),
        "shapes": {**{s: [n_tokens, w] for s, w in widths.items()}, **{k: [n_tokens] for k in INDEX_KEYS}},
        "n_documents": len({row.doc_id for row, _ in kept}),
        "plan": {
            "n_shards": len(shards),
            "n_tokens": n_tokens,
            "n_rows": len(kept),
            "n_documents_input": len(docs),
            **{k: params[k] for k in ("max_length", "long_docs", "max_tokens", "shard_tokens")},
            "input_sha256": input_sha256,
            "plan_sha256": _plan_digest(params, input_sha256, shards),
        },
    }
    return RecordPlan(model, out, site_names, positions, shards, header)
