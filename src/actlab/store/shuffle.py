"""Shuffled minibatches from a store, for training (sparse autoencoders, probes, transcoders).

Each epoch visits the shards in a random order and passes their rows through a bounded shuffle
buffer: a shard is loaded, a random subset of (buffer ∪ shard) large enough to bring the buffer
back to its capacity is sent out in random order, the rest stays in the buffer; at the end of the
epoch the buffer is emptied in random order. So every token comes out exactly once per epoch, the
order depends only on ``(seed, epoch)``, and the reader never holds more than the buffer, one
shard and the batch it is filling, however large the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from actlab.errors import ActlabError
from actlab.store.manifest import torch_dtype

if TYPE_CHECKING:
    from actlab.store.reader import Store

Batch = torch.Tensor | dict[str, torch.Tensor]
Maker = Callable[[int], torch.Tensor]  # rows -> an empty tensor of one key


def _positive_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ActlabError(f"{name} must be an integer of at least {lo}, got {value!r}")
    return int(value)


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return torch_dtype(dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ActlabError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    return dtype


def _check_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ActlabError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({e})") from None


class _Pool:
    """The shuffle buffer: preallocated rows of every key, of which the first ``size`` are in use."""

    def __init__(self, capacity: int, empty: dict[str, Maker]):
        self.capacity = capacity
        self.data = {key: make(capacity) for key, make in empty.items()} if capacity else {}
        self.size = 0

    def gather(self, shard: dict[str, torch.Tensor] | None, idx: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Rows ``idx`` of (pool rows, then shard rows) into ``out``: those from the pool first, then
        those from the shard (a batch is a random set of rows; one copy per row, straight into it)."""
        m = self.size
        in_pool = idx < m
        from_pool = torch.from_numpy(idx[in_pool])
        from_shard = torch.from_numpy(idx[~in_pool] - m)
        p = len(from_pool)
        for key, dst in out.items():
            if p:
                torch.index_select(self.data[key], 0, from_pool, out=dst[:p])
            if len(from_shard):
                torch.index_select(shard[key], 0, from_shard, out=dst[p:])

    def refill(self, shard: dict[str, torch.Tensor], sent: np.ndarray, kept: np.ndarray, total: int) -> None:
        """Keep the ``kept`` rows: shard rows move into the slots of the pool rows that were sent."""
        m = self.size
        new_size = min(total, self.capacity)
        free = torch.from_numpy(np.concatenate([np.sort(sent[sent < m]), np.arange(m, new_size)]))
        incoming = torch.from_numpy(kept[kept >= m] - m)
        for key, t in self.data.items():
            t.index_copy_(0, free, shard[key].index_select(0, incoming))
        self.size = new_size


class _Batcher:
    """Copies rows into one batch at a time; hands each batch out as soon as it is full.

    The last batch of an epoch is allocated for just the rows left (``remaining``), so every batch
    handed out is a whole tensor of its own, never a view into a bigger one."""

    def __init__(self, empty: dict[str, Maker], size: int, remaining: int):
        self.empty, self.size, self.remaining = empty, size, remaining
        self.batch: dict[str, torch.Tensor] | None = None
        self.rows = self.filled = 0

    def add(self, pool: _Pool, shard: dict[str, torch.Tensor] | None, sent: np.ndarray) -> Iterator[dict]:
        pos = 0
        while pos < len(sent):
            if self.batch is None:
                self.rows = max(1, min(self.size, self.remaining))
                self.batch, self.filled = {key: make(self.rows) for key, make in self.empty.items()}, 0
            take = min(self.rows - self.filled, len(sent) - pos)
            a = self.filled
            pool.gather(shard, sent[pos : pos + take], {k: t[a : a + take] for k, t in self.batch.items()})
            pos += take
            self.filled += take
            self.remaining -= take
            if self.filled == self.rows:
                yield self.take()

    def take(self) -> dict[str, torch.Tensor]:
        """The batch being filled (cut to its rows), and start a new one."""
        full = {k: t[: self.filled] for k, t in self.batch.items()} if self.filled < self.rows else self.batch
        self.batch, self.filled = None, 0
        return full


class ShuffledReader:
    """Minibatches of some keys of a store (sites, or ``token_ids`` / ``doc_ids`` / ``positions``).

    Iterating yields ``[batch, width]`` tensors for one key given as a string, or a dict of
    row-aligned tensors for a list of keys; ``len()`` is the number of batches over all epochs.
    Made by ``Store.batches``; see there for the arguments.
    """

    def __init__(self, store: "Store", sites: str | Sequence[str], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int | None = None, epochs: int = 1,
                 drop_last: bool = False, device=None, dtype=None):
        self.store = store
        self.single = isinstance(sites, str)
        self.keys = [sites] if self.single else list(sites)
        if not self.keys:
            raise ActlabError("batches needs at least one site (or token_ids / doc_ids / positions)")
        for key in self.keys:
            if not isinstance(key, str):
                raise ActlabError(f"site names must be strings, got {key!r}")
            store._check_key(key)
        if len(set(self.keys)) != len(self.keys):
            raise ActlabError(f"a site is named twice in {self.keys}; name each once")
        self.batch_size = _positive_int("batch_size", batch_size, 1)
        self.seed = _positive_int("seed", seed, 0)
        self.epochs = _positive_int("epochs", epochs, 1)
        sizes = [e["n_tokens"] for e in store._shards]
        if shuffle_buffer is None and sizes:  # the buffer is sized by a file on disk, not by a manifest number
            store.check_shard(sizes.index(max(sizes)))
        biggest = max(sizes, default=0)
        buffer = biggest if shuffle_buffer is None else _positive_int("shuffle_buffer", shuffle_buffer, 0)
        self.shuffle = bool(shuffle)
        self.capacity = min(buffer, store.n_tokens) if self.shuffle else 0
        self.drop_last = bool(drop_last)
        self.device = _check_device(device)
        self.dtype = _check_dtype(dtype)

    def __len__(self) -> int:
        n, b = self.store.n_tokens, self.batch_size
        return self.epochs * (n // b if self.drop_last else -(-n // b))

    def __repr__(self) -> str:
        return (f"ShuffledReader(keys={self.keys}, batch_size={self.batch_size}, buffer={self.capacity}, "
                f"epochs={self.epochs}, seed={self.seed})")

    def __iter__(self) -> Iterator[Batch]:
        for epoch in range(self.epochs):
            yield from self._epoch(epoch)

    # ------------------------------------------------------------ one epoch
    def _empty(self) -> dict[str, Maker]:
        widths, dtype = self.store.widths, self.store.dtype
        return {key: (lambda n, w=widths.get(key): torch.empty(n, dtype=torch.int64) if w is None
                      else torch.empty(n, w, dtype=dtype)) for key in self.keys}

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        n_shards = self.store.n_shards
        order = rng.permutation(n_shards) if self.shuffle else np.arange(n_shards)
        empty = self._empty()
        pool = _Pool(self.capacity, empty)
        batcher = _Batcher(empty, self.batch_size, self.store.n_tokens)
        for k in order.tolist():
            shard = self.store.load_shard(k, self.keys)
            total = pool.size + int(shard[self.keys[0]].shape[0])
            perm = rng.permutation(total) if self.shuffle else np.arange(total)
            sent = perm[: max(0, total - pool.capacity)]
            yield from self._deliver_all(batcher.add(pool, shard, sent))
            if pool.capacity:
                pool.refill(shard, sent, perm[len(sent) :], total)
            del shard
        rest = rng.permutation(pool.size) if self.shuffle else np.arange(pool.size)
        yield from self._deliver_all(batcher.add(pool, None, rest))
        if batcher.filled:  # only if a shard held other row counts than its manifest entry says
            yield from self._deliver_all([batcher.take()])

    def _deliver_all(self, batches) -> Iterator[Batch]:
        for batch in batches:
            if len(next(iter(batch.values()))) == self.batch_size or not self.drop_last:
                yield self._deliver(batch)

    def _deliver(self, batch: dict[str, torch.Tensor]) -> Batch:
        out = {}
        for key, t in batch.items():
            dtype = self.dtype if key in self.store.widths else None
            if self.device is not None or dtype is not None:
                t = t.to(device=self.device, dtype=dtype)
            out[key] = t
        return out[self.keys[0]] if self.single else out
