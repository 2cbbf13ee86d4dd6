"""Writing one shard: run the model over the shard's rows, save the file, then mark it done."""

from __future__ import annotations

import json
from typing import Callable

import torch

from actlab.engine import runner
from actlab.engine.batch import TokenBatch
from actlab.errors import ActlabError
from actlab.files import save_tensors
from actlab.store._files import sha256_file, tmp_path_for
from actlab.store.directory import write_marker
from actlab.store.manifest import FORMAT_NAME, FORMAT_VERSION, INDEX_KEYS, shard_name
from actlab.store.plan import RecordPlan, ShardPlan


class ShardBuffer:
    """Preallocated tensors for exactly one shard; the runner's batches are copied in as they come."""

    def __init__(self, n_tokens: int, widths: dict[str, int], dtype: torch.dtype):
        self.n_tokens = n_tokens
        self.acts = {s: torch.empty(n_tokens, w, dtype=dtype) for s, w in widths.items()}
        self.index = {k: torch.empty(n_tokens, dtype=torch.int64) for k in INDEX_KEYS}
        self.filled = 0

    def consume(self, batch: TokenBatch) -> None:
        a, b = self.filled, self.filled + batch.n_tokens
        if b > self.n_tokens:
            raise ActlabError(f"internal error: a shard got more tokens than planned ({b} > {self.n_tokens})")
        for site, t in self.acts.items():
            t[a:b] = batch.acts[site]
        self.index["token_ids"][a:b] = batch.token_ids
        self.index["doc_ids"][a:b] = batch.doc_ids
        self.index["positions"][a:b] = batch.positions
        self.filled = b

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.acts, **self.index}


def _shard_metadata(plan: RecordPlan, shard: ShardPlan) -> dict[str, str]:
    # One metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make byte-identical reruns impossible.
    return {
        FORMAT_NAME: json.dumps({
            "format_version": FORMAT_VERSION,
            "shard": shard.index,
            "token_offset": shard.token_offset,
            "n_tokens": shard.n_tokens,
            "config_hash": plan.header["model"].get("config_hash"),
            "dtype": plan.header["dtype"],
        }, sort_keys=True)
    }


def _fill(plan: RecordPlan, shard: ShardPlan, batch_size: int,
          on_batch: Callable[[int], None] | None) -> ShardBuffer:
    buf = ShardBuffer(shard.n_tokens, plan.widths, plan.dtype)
    runner.run(
        plan.model,
        sites=plan.sites,
        sinks=[buf],
        rows=shard.rows,
        positions=plan.positions,
        batch_size=batch_size,
        progress=False,
        on_batch=None if on_batch is None else (lambda _rows, batch: on_batch(batch.n_tokens)),
    )
    if buf.filled != shard.n_tokens:
        raise ActlabError(f"internal error: shard {shard.index} got {buf.filled} tokens, planned {shard.n_tokens}")
    return buf


def record_shard(plan: RecordPlan, shard: ShardPlan, batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> dict:
    """Record ``shard`` into its file (temp file, fsync, rename), then write its completion marker.

    Returns the shard's manifest entry. Only one shard's tensors are in memory at a time.
    """
    buf = _fill(plan, shard, batch_size, on_batch)
    path = plan.out / shard_name(shard.index)
    save_tensors(path, buf.tensors(), None, _shard_metadata(plan, shard), tmp=tmp_path_for(path), durable=True)
    doc_ids = buf.index["doc_ids"]
    entry = {
        "index": shard.index,
        "file": path.name,
        "n_tokens": shard.n_tokens,
        "token_offset": shard.token_offset,
        "rows": [shard.row_start, shard.row_start + len(shard.rows)],
        "doc_ids": [int(doc_ids[0]), int(doc_ids[-1])],
        "batch_size": batch_size,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    write_marker(plan.out, plan.plan_sha256, entry)
    return entry
