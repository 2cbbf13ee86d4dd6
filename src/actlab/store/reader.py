"""``Store``: read a recorded activation store (iterate shards, random access, verify, info)."""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from actlab.errors import ActlabError
from actlab.models.model import same_model
from actlab.store._files import open_shard
from actlab.store.checks import shard_problems
from actlab.store.remote import FsPath, as_path
from actlab.store.manifest import INDEX_KEYS, MANIFEST_NAME, positions_from_json, read_manifest, repair_hint, torch_dtype

if TYPE_CHECKING:
    from actlab.store.shuffle import ShuffledReader

Index = int | slice | Sequence[int] | torch.Tensor | np.ndarray


class SiteView:
    """``store[site]``: one site (or ``token_ids`` / ``doc_ids`` / ``positions``) indexed by global token."""

    def __init__(self, store: "Store", key: str):
        self.store, self.key = store, key

    def __getitem__(self, idx: Index) -> torch.Tensor:
        return self.store.get(self.key, idx)

    def __len__(self) -> int:
        return self.store.n_tokens

    @property
    def shape(self) -> tuple[int, ...]:
        width = self.store.widths.get(self.key)
        return (self.store.n_tokens,) if width is None else (self.store.n_tokens, width)

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype if self.key in self.store.widths else torch.int64

    def __repr__(self) -> str:
        return f"SiteView({self.key!r}, shape={self.shape}, dtype={self.dtype})"


class Store:
    """A recorded activation store.

    ``store[site][i]`` / ``store.get(site, idx)`` read tokens by global index (int, slice, or a
    sequence/tensor of ints; ``token_ids``, ``doc_ids`` and ``positions`` work like sites);
    ``iter_shards()`` streams whole shards; ``verify()`` checks every file against the manifest.
    A store whose recording is still under way (or was interrupted) can be read: it holds the
    tokens of the shards finished so far.
    """

    def __init__(self, path: str | os.PathLike | FsPath, *, cache_size: int = 4):
        self.path = as_path(path)
        self.manifest = read_manifest(self.path)  # every field checked: see store.schema
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._shards = sorted(self.manifest["shards"], key=lambda e: e["token_offset"])
        self._offsets = [e["token_offset"] for e in self._shards]
        self._sound: set[int] = set()  # shards whose file was found to agree with its entry

    # ------------------------------------------------------------ properties
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def widths(self) -> dict[str, int]:
        return {s: int(w) for s, w in self.manifest["sites"].items()}

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.manifest["dtype"])

    @property
    def positions(self):
        return positions_from_json(self.manifest.get("positions"))

    @property
    def model(self) -> dict:
        """The identity of the model the store was recorded with (``Model.identity()``)."""
        return dict(self.manifest["model"])

    @property
    def n_tokens(self) -> int:
        """Tokens in the recorded shards (all planned tokens once the store is complete)."""
        return int(sum(e["n_tokens"] for e in self._shards))

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete")) and len(self._shards) == self.manifest["plan"].get("n_shards")

    def keys(self) -> list[str]:
        return self.sites + list(INDEX_KEYS)

    def __len__(self) -> int:
        return self.n_tokens

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> SiteView:
        self._check_key(key)
        return SiteView(self, key)

    def __repr__(self) -> str:
        state = "" if self.complete else f", incomplete {self.n_shards}/{self.manifest['plan'].get('n_shards')} shards"
        return (f"Store({str(self.path)!r}, model={self.manifest['model'].get('model_name')!r}, "
                f"sites={len(self.sites)}, tokens={self.n_tokens}, dtype={self.manifest['dtype']}{state})")

    def _check_key(self, key: str) -> None:
        if key not in self.keys():
            raise ActlabError(f"'{key}' is not in this store; it holds: {', '.join(self.keys())}")

    # ------------------------------------------------------------- shards
    def shard_paths(self) -> list[Path | FsPath]:
        return [self.path / e["file"] for e in self._shards]

    def check_shard(self, k: int) -> None:
        """ActlabError unless the k-th recorded shard's file agrees with its entry (in the store, of the
        listed size, its tensors and header those of the manifest); checked once per shard, before
        anything of its size is allocated. ``verify`` also checks the checksum."""
        if k in self._sound:
            return
        entry = self._shards[k]
        problems = shard_problems(self.path, self.manifest, entry, checksums=False)
        if problems:
            path = self.path / entry["file"]
            first = problems[0].removeprefix(f"{entry['file']}: ")
            what = f"{path} is missing" if first == "missing" else f"cannot read {path} ({first})"
            raise ActlabError(f"{what}; {repair_hint(self.path)}")
        self._sound.add(k)

    def _open(self, k: int):
        self.check_shard(k)
        path = self.path / self._shards[k]["file"]
        try:
            return open_shard(path)
        except Exception as e:
            raise ActlabError(f"cannot read {path} ({e}); run `actlab store verify {self.path}`") from None

    def load_shard(self, k: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of the k-th recorded shard (every site and index key unless ``keys`` says which)."""
        wanted = list(keys) if keys is not None else self.keys()
        for key in wanted:
            self._check_key(key)
        with self._open(k) as f:
            return {key: f.get_tensor(key) for key in wanted}

    def iter_shards(self, keys: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield one dict per shard, in token order: ``{site: [n, width], token_ids: [n], doc_ids, positions}``."""
        for k in range(len(self._shards)):
            yield self.load_shard(k, keys)

    def batches(self, sites: str | Sequence[str], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                shuffle_buffer: int | None = None, epochs: int = 1, drop_last: bool = False,
                device=None, dtype=None) -> "ShuffledReader":
        """Minibatches for training: every recorded token once per epoch, in an order set by ``seed``.

        ``sites``: one key (batches are ``[batch_size, width]`` tensors) or a list of keys (batches
        are dicts of row-aligned tensors); keys are sites or ``token_ids`` / ``doc_ids`` /
        ``positions``. Shards are visited in a random order and rows pass through a shuffle buffer of
        ``shuffle_buffer`` rows (default: the largest shard), so memory stays at about the buffer plus
        one shard. ``shuffle=False`` keeps the store's order. Each epoch ends with a partial batch
        unless ``drop_last``. ``device`` / ``dtype`` (sites only) convert each batch as it is handed out.
        """
        from actlab.store.shuffle import ShuffledReader

        return ShuffledReader(self, sites, batch_size, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                              epochs=epochs, drop_last=drop_last, device=device, dtype=dtype)

    # ------------------------------------------------------- random access
    def _indices(self, idx: Index) -> tuple[torch.Tensor | range, bool]:
        """Global indices as a range (contiguous ascending) or an int64 tensor; flag = scalar index."""
        n = self.n_tokens
        if isinstance(idx, torch.Tensor) and idx.ndim == 0:
            idx = int(idx)
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"token index {i} is out of range for a store of {n} tokens")
            i %= n
            return range(i, i + 1), True
        if isinstance(idx, slice):
            r = range(*idx.indices(n))
            if r.step == 1:
                return r, False
            return torch.arange(r.start, r.stop, r.step, dtype=torch.int64), False
        try:
            t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
        except (TypeError, ValueError):
            raise ActlabError(f"a store index must be an int, a slice or a sequence of ints, not {type(idx).__name__}") from None
        if t.dtype == torch.bool:
            if t.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), not {tuple(t.shape)}")
            return t.nonzero().flatten(), False
        if t.numel() == 0:
            return torch.zeros(0, dtype=torch.int64), False
        if t.is_floating_point() or t.is_complex() or t.ndim != 1:
            raise ActlabError("a store index must be a 1-D sequence of ints")
        t = t.to(torch.int64)
        bad = (t < -n) | (t >= n)
        if bool(bad.any()):
            raise IndexError(f"token index {int(t[bad][0])} is out of range for a store of {n} tokens")
        return torch.where(t < 0, t + n, t), False

    def _shard_of(self, i: int) -> int:
        k = bisect.bisect_right(self._offsets, i) - 1
        if k < 0 or i >= self._offsets[k] + int(self._shards[k]["n_tokens"]):
            raise ActlabError(f"token {i} lies in a shard that is not recorded; run `actlab store verify {self.path}`")
        return k

    def _spans(self, indices: range) -> list[tuple[int, int, int, int]]:
        """(shard, first row, end row, position in the result) of a contiguous range, shards checked."""
        spans, pos = [], indices.start
        while pos < indices.stop:
            k = self._shard_of(pos)
            self.check_shard(k)
            offset = self._offsets[k]
            hi = min(indices.stop, offset + self._shards[k]["n_tokens"])
            spans.append((k, pos - offset, hi - offset, pos - indices.start))
            pos = hi
        return spans

    def _cached(self, k: int, key: str) -> torch.Tensor:
        """One tensor of shard ``k``, through a small LRU cache that threads sharing this Store may use at once."""
        ck = (k, key)
        with self._cache_lock:
            if ck in self._cache:
                self._cache.move_to_end(ck)
                return self._cache[ck]
        with self._open(k) as f:
            t = f.get_tensor(key)
        if self.cache_size:
            with self._cache_lock:
                self._cache[ck] = t
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return t

    def _empty(self, key: str, n: int) -> torch.Tensor:
        width = self.widths.get(key)
        if width is None:
            return torch.empty(n, dtype=torch.int64)
        return torch.empty(n, width, dtype=self.dtype)

    def get(self, key: str, idx: Index) -> torch.Tensor:
        """Rows of ``key`` (a site, or token_ids / doc_ids / positions) at global token indices.

        An int gives ``[width]`` (a 0-d tensor for index keys), anything else ``[k, width]`` in the
        order asked. Contiguous ranges read only the needed rows from disk; other lookups load
        (and keep, in a small LRU cache) the whole tensor of each shard they touch.
        """
        self._check_key(key)
        indices, scalar = self._indices(idx)
        if isinstance(indices, range):
            spans = self._spans(indices)  # the shards are checked before the result is allocated
            out = self._empty(key, len(indices))
            for k, a, b, at in spans:
                if (k, key) in self._cache or (scalar and self.cache_size):
                    part = self._cached(k, key)[a:b]
                else:
                    with self._open(k) as f:
                        part = f.get_slice(key)[a:b]
                out[at : at + b - a] = part
            return out[0] if scalar else out
        out = self._empty(key, int(indices.numel()))
        if indices.numel() == 0:
            return out
        offsets = torch.tensor(self._offsets, dtype=torch.int64)
        shard_ids = torch.searchsorted(offsets, indices, right=True) - 1
        for k in torch.unique(shard_ids).tolist():
            where = (shard_ids == k).nonzero().flatten()
            if k < 0:
                self._shard_of(int(indices[where][0]))  # raises with the explanation
            local = indices[where] - self._offsets[k]
            if int(local.max()) >= int(self._shards[k]["n_tokens"]):
                self._shard_of(int(indices[where][local.argmax()]))  # raises with the explanation
            out[where] = self._cached(k, key)[local]
        return out

    # -------------------------------------------------------------- checks
    def check_model(self, model) -> None:
        """Raise ActlabError unless ``model`` is the model this store was recorded with: the same config,
        and the same name or (stores since the weights fingerprint) the same weights under another name."""
        ident = model.identity()
        stored = self.manifest["model"]
        if not same_model(ident, stored):
            raise ActlabError(
                f"the store at {self.path} was recorded with {stored.get('model_name')} "
                f"(config hash {stored.get('config_hash')}), not with {ident.get('model_name')} "
                f"(config hash {ident.get('config_hash')}); load the model it was recorded with"
            )

    def verify(self, *, checksums: bool = True) -> list[str]:
        """Problems found (an empty list means the store is sound).

        Checks that every planned shard is recorded, each listed file exists with the listed size and
        sha256 (skipped with ``checksums=False``), opens as safetensors, holds every site and index
        tensor with the manifest's shape and dtype, and that its own header names the same shard,
        offset and token count (the manifest's own fields were checked when the store was opened).
        Damaged shards are fixed by ``repair_store(path)`` (``actlab store verify --repair``), which
        drops them so that the same record command re-records just those.
        """
        from actlab.store.verify import verify_store

        return verify_store(self, checksums=checksums)

    def info(self) -> dict:
        """A summary for ``actlab store info``."""
        m = self.manifest
        size = sum(int(e.get("bytes", 0)) for e in self._shards)
        return {
            "path": str(self.path),
            "model": m["model"].get("model_name"),
            "model_class": m["model"].get("model_class"),
            "config_hash": m["model"].get("config_hash"),
            "model_dtype": m.get("model_dtype"),
            "sites": self.widths,
            "dtype": m["dtype"],
            "positions": m.get("positions"),
            "n_tokens": self.n_tokens,
            "n_tokens_planned": m["plan"].get("n_tokens"),
            "n_documents": m.get("n_documents"),
            "n_shards": self.n_shards,
            "n_shards_planned": m["plan"].get("n_shards"),
            "complete": self.complete,
            "bytes": size,
            "max_length": m["plan"].get("max_length"),
            "shard_tokens": m["plan"].get("shard_tokens"),
            "actlab_version": m.get("actlab_version"),
            "format_version": m.get("format_version"),
            "created": m.get("created"),
            "updated": m.get("updated"),
            "manifest": str(self.path / MANIFEST_NAME),
        }
