"""Writing one shard: run the model over the shard's rows, save the file, then mark it done."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from actlab.engine import runner
from actlab.engine.batch import TokenBatch
from actlab.errors import ActlabError
from actlab.store._files import write_tensors
from actlab.store.directory import write_marker
from actlab.store.manifest import FORMAT_NAME, FORMAT_VERSION, INDEX_KEYS, shard_name
from actlab.store.plan import RecordPlan, ShardPlan


class ShardBuffer:
    """The tensors of exactly one shard; the runner's batches are copied in as they come.

    Why the two shortcuts: a freshly allocated shard buffer costs a page fault per 4 KiB on first
    touch (65,000 for a 256 MiB shard), so ``reuse`` hands over the buffer of a shard already written
    (the first rows of its tensors are used); and a shard made of a single batch whose tensors are
    already CPU, contiguous and of the storage dtype keeps those tensors (they are the runner's own
    copies of the selected tokens, never views of the model's activations), without any copy.
    """

    def __init__(self, n_tokens: int, widths: dict[str, int], dtype: torch.dtype, reuse: "ShardBuffer | None" = None):
        self.n_tokens, self.widths, self.dtype = n_tokens, widths, dtype
        self.acts: dict[str, torch.Tensor] = {}
        self.index: dict[str, torch.Tensor] = {}
        self.filled = 0
        self._reuse = reuse
        self._base: dict[str, torch.Tensor] = {}  # full-size tensors; acts and index are their first rows

    def _allocate(self) -> None:
        n, old = self.n_tokens, self._reuse
        if old is not None and old.dtype == self.dtype and old.widths == self.widths and old.capacity >= n:
            self._base = old._base
        else:
            self._base = {**{s: torch.empty(n, w, dtype=self.dtype) for s, w in self.widths.items()},
                          **{k: torch.empty(n, dtype=torch.int64) for k in INDEX_KEYS}}
        self.acts = {s: self._base[s][:n] for s in self.widths}
        self.index = {k: self._base[k][:n] for k in INDEX_KEYS}
        self._reuse = None

    @property
    def capacity(self) -> int:
        """Rows of the full-size tensors behind this buffer (what a later shard may reuse)."""
        return min((int(t.shape[0]) for t in self._base.values()), default=0)

    def _adopt(self, batch: TokenBatch) -> bool:
        """Keep a whole-shard batch's own tensors when they already are what the file stores."""
        acts = [batch.acts[s] for s in self.widths]
        index = [batch.token_ids, batch.doc_ids, batch.positions]
        if not all(t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and t.shape[0] == self.n_tokens
                   for t in acts + index):
            return False
        if any(t.dtype != self.dtype for t in acts) or any(t.dtype != torch.int64 for t in index):
            return False
        self.acts = dict(zip(self.widths, acts))
        self.index = dict(zip(INDEX_KEYS, index))
        self._base = {**self.acts, **self.index}
        self.filled = self.n_tokens
        return True

    def consume(self, batch: TokenBatch) -> None:
        a, b = self.filled, self.filled + batch.n_tokens
        if b > self.n_tokens:
            raise ActlabError(f"internal error: a shard got more tokens than planned ({b} > {self.n_tokens})")
        if a == 0 and b == self.n_tokens and self._adopt(batch):
            return
        if not self.acts:
            self._allocate()
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


def fill_shard(plan: RecordPlan, shard: ShardPlan, batch_size: int,
               on_batch: Callable[[int], None] | None = None, reuse: ShardBuffer | None = None) -> ShardBuffer:
    """Run the model over the shard's rows into a buffer of exactly its tokens.

    The runner hands the activations over where the model computed them (``device=None``): the one
    copy is the buffer's own (device to CPU and the storage dtype in one step), not a CPU copy first."""
    buf = ShardBuffer(shard.n_tokens, plan.widths, plan.dtype, reuse)
    runner.run(
        plan.model,
        sites=plan.sites,
        sinks=[buf],
        rows=shard.rows,
        positions=plan.positions,
        batch_size=batch_size,
        device=None,
        progress=False,
        on_batch=None if on_batch is None else (lambda _rows, batch: on_batch(batch.n_tokens)),
    )
    if buf.filled != shard.n_tokens:
        raise ActlabError(f"internal error: shard {shard.index} got {buf.filled} tokens, planned {shard.n_tokens}")
    return buf


def save_shard(plan: RecordPlan, shard: ShardPlan, buf: ShardBuffer, batch_size: int, mark: bool = True) -> dict:
    """Write a filled shard (temp file, fsync, rename; a whole object on other fsspec backends), then its
    completion marker (``mark=False``: a sole writer lists the shard in the manifest at once instead).
    Returns the shard's manifest entry."""
    path = plan.out / shard_name(shard.index)
    size, digest = write_tensors(path, buf.tensors(), _shard_metadata(plan, shard))
    doc_ids = buf.index["doc_ids"]
    entry = {
        "index": shard.index,
        "file": path.name,
        "n_tokens": shard.n_tokens,
        "token_offset": shard.token_offset,
        "rows": [shard.row_start, shard.row_start + len(shard.rows)],
        "doc_ids": [int(doc_ids[0]), int(doc_ids[-1])],
        "batch_size": batch_size,
        "bytes": size,
        "sha256": digest,
    }
    if mark:
        write_marker(plan.out, plan.plan_sha256, entry)
    return entry


def record_shard(plan: RecordPlan, shard: ShardPlan, batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> dict:
    """Record ``shard`` into its file, then write its completion marker; returns its manifest entry."""
    return save_shard(plan, shard, fill_shard(plan, shard, batch_size, on_batch), batch_size)


class ShardPipeline:
    """Fill the next shard while the previous one is written: the model runs in the calling thread, the
    serialisation, checksum and fsync of the last filled shard in one writer thread.

    At most one write is pending (``submit`` waits for the previous one first), so memory holds two
    shard buffers at most and shards are written, and ``done(entry, marked)`` called, in submission
    order; ``mark()`` says, just before each write, whether that shard gets a completion marker
    (default: always). A failed
    write is raised by the next ``submit`` or by ``close``; on leaving the block the pending write is
    finished (a killed process leaves only a temp file, which the next ``record`` deletes).
    """

    def __init__(self, plan: RecordPlan, batch_size: int, done: Callable[[dict, bool], None],
                 mark: Callable[[], bool] | None = None):
        self.plan, self.batch_size, self.done, self.mark = plan, batch_size, done, mark
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actlab-shard-writer")
        self._pending: Future | None = None
        self._writing: ShardBuffer | None = None  # the buffer of the pending write
        self._free: ShardBuffer | None = None  # a written shard's buffer, for the next fill

    def _write(self, shard: ShardPlan, buf: ShardBuffer) -> None:
        marked = True if self.mark is None else self.mark()
        self.done(save_shard(self.plan, shard, buf, self.batch_size, marked), marked)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
            self._free, self._writing = self._writing, None

    def submit(self, shard: ShardPlan, on_batch: Callable[[int], None] | None = None) -> None:
        buf = fill_shard(self.plan, shard, self.batch_size, on_batch, self._free)
        self._free = None
        self._wait()
        self._writing = buf
        self._pending = self._pool.submit(self._write, shard, buf)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "ShardPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
