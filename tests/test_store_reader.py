"""Store.batches: shuffled minibatches for training, every token once per epoch, bounded memory."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from actlab.errors import ActlabError
from actlab.store import ShuffledReader, Store, record
from tiny_models import tiny_model

SITES = ["resid.0", "mlp.hidden.1"]
KEYS = SITES + ["doc_ids", "positions"]


def make_docs(n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + (i * 7) % 19)) for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    out = tmp_path_factory.mktemp("reader") / "s"
    s = record(tiny_model("llama"), make_docs(60), SITES, out, shard_tokens=60)
    assert s.n_shards >= 30 and s.complete
    return s


def key_of(doc_ids: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int]]:
    """(document, position) names a token of an ``positions="all"`` store uniquely."""
    return list(zip(doc_ids.tolist(), positions.tolist()))


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return x[torch.from_numpy(np.lexsort(x.T.numpy()[::-1]).copy())]


def split_epochs(batches: list, per_epoch: int) -> list[list]:
    return [batches[i : i + per_epoch] for i in range(0, len(batches), per_epoch)]


# ---------------------------------------------------------------- every token exactly once
@pytest.mark.parametrize("buffer,batch_size", [(None, 16), (0, 7), (50, 1), (10_000, 64), (37, 5000)])
def test_every_token_exactly_once_per_epoch(store, buffer, batch_size):
    n = len(store)
    index = {k: i for i, k in enumerate(key_of(store["doc_ids"][:], store["positions"][:]))}
    assert len(index) == n  # the (doc, position) key is unique in this store
    reader = store.batches(KEYS, batch_size, seed=3, shuffle_buffer=buffer, epochs=2)
    batches = list(reader)
    per_epoch = -(-n // batch_size)
    assert len(batches) == len(reader) == 2 * per_epoch
    full = {site: store[site][:] for site in SITES}
    for epoch in split_epochs(batches, per_epoch):
        keys = [k for b in epoch for k in key_of(b["doc_ids"], b["positions"])]
        assert len(keys) == n and set(keys) == set(index)  # every token, once
        order = torch.tensor([index[k] for k in keys])
        for site in SITES:
            rows = torch.cat([b[site] for b in epoch])
            assert torch.equal(rows, full[site][order])  # the sites' rows are aligned with the keys
            assert torch.equal(sorted_rows(rows), sorted_rows(full[site]))  # same multiset as the store
        if batch_size < n:
            assert order.tolist() != sorted(order.tolist())  # and it is shuffled


def test_one_site_gives_tensors_and_no_shuffle_keeps_store_order(store):
    batches = list(store.batches("resid.0", 100, shuffle=False))
    assert all(isinstance(b, torch.Tensor) and b.shape[1] == 32 for b in batches)
    assert torch.equal(torch.cat(batches), store["resid.0"][:])
    ids = list(store.batches("token_ids", 100, shuffle=False))
    assert torch.equal(torch.cat(ids), store["token_ids"][:])


# ---------------------------------------------------------------- reproducible
def order_of(reader: ShuffledReader) -> list[tuple[int, int]]:
    return [k for b in reader for k in key_of(b["doc_ids"], b["positions"])]


def test_same_seed_same_order_other_seed_other_order(store):
    a = list(store.batches(KEYS, 32, seed=11, shuffle_buffer=80))
    b = list(store.batches(KEYS, 32, seed=11, shuffle_buffer=80))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in KEYS)
    first = order_of(store.batches(KEYS, 32, seed=11, shuffle_buffer=80))
    other = order_of(store.batches(KEYS, 32, seed=12, shuffle_buffer=80))
    assert sorted(first) == sorted(other) and first != other
    # each epoch has its own order, and epoch e is the same whatever the number of epochs
    two = order_of(store.batches(KEYS, 32, seed=11, shuffle_buffer=80, epochs=2))
    assert two[: len(first)] == first and two[len(first) :] != first
    assert sorted(two[len(first) :]) == sorted(first)


# ---------------------------------------------------------------- memory
def held_bytes(exclude: set[int]) -> int:
    """Bytes of every CPU tensor storage alive in the process, except those in ``exclude``.

    Independent of the reader's own bookkeeping: it walks every live tensor object."""
    seen: dict[int, int] = {}
    tensor = torch.Tensor
    for obj in gc.get_objects():
        if type(obj) is tensor and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in exclude:
                seen[ptr] = storage.nbytes()
    return sum(seen.values())


def live_storages() -> set[int]:
    return {o.untyped_storage().data_ptr() for o in gc.get_objects() if type(o) is torch.Tensor}


def test_memory_is_bounded_by_buffer_shard_and_batch(store):
    buffer, batch_size = 100, 100
    row_bytes = sum(store[k].dtype.itemsize * (store.widths.get(k) or 1) for k in KEYS)
    biggest_shard = max(e["n_tokens"] for e in store.manifest["shards"])
    bound = (buffer + biggest_shard + 2 * batch_size) * row_bytes
    assert bound < len(store) * row_bytes / 4  # the store is much larger than what may be held

    loads = []
    original = store.load_shard
    store.load_shard = lambda k, keys=None: loads.append(k) or original(k, keys)
    try:
        baseline = live_storages()
        yielded: set[int] = set()
        peak = 0
        for batch in store.batches(KEYS, batch_size, seed=0, shuffle_buffer=buffer):
            yielded |= {t.untyped_storage().data_ptr() for t in batch.values()}
            peak = max(peak, held_bytes(baseline | yielded))
    finally:
        del store.load_shard
    assert sorted(loads) == list(range(store.n_shards))  # each shard read once, none twice
    assert 0 < peak <= bound, (peak, bound)

    # the probe is real: holding the whole store (what a naive reader does) is far above the bound
    everything = list(store.iter_shards(KEYS))
    assert held_bytes(baseline) > 2 * bound
    del everything


# ---------------------------------------------------------------- batches
def test_partial_last_batch_and_drop_last(store):
    n = len(store)
    batch_size = 64
    assert n % batch_size
    sizes = [b.shape[0] for b in store.batches("resid.0", batch_size, seed=1)]
    assert sizes == [batch_size] * (n // batch_size) + [n % batch_size]
    reader = store.batches("resid.0", batch_size, seed=1, drop_last=True, epochs=3)
    sizes = [b.shape[0] for b in reader]
    assert sizes == [batch_size] * (3 * (n // batch_size)) and len(reader) == len(sizes)


def test_dtype_and_device_are_applied_to_each_batch(store):
    batches = list(store.batches(["resid.0", "token_ids"], 200, shuffle=False, dtype=torch.float16))
    assert all(b["resid.0"].dtype == torch.float16 and b["token_ids"].dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat([b["resid.0"] for b in batches]), store["resid.0"][:].half())
    meta = next(iter(store.batches("resid.0", 16, device="meta")))
    assert meta.device.type == "meta" and meta.shape == (16, 32)
    if torch.cuda.is_available():
        cuda = next(iter(store.batches("resid.0", 16, device="cuda", dtype="bfloat16")))
        assert cuda.is_cuda and cuda.dtype == torch.bfloat16


def test_an_interrupted_store_yields_its_recorded_tokens(store, tmp_path):
    import json
    import shutil

    from actlab.store import MANIFEST_NAME

    part = tmp_path / "part"
    shutil.copytree(store.path, part)
    manifest = json.loads((part / MANIFEST_NAME).read_text())
    manifest["shards"] = manifest["shards"][:5]
    manifest["complete"] = False
    (part / MANIFEST_NAME).write_text(json.dumps(manifest))
    partial = Store(part)
    rows = torch.cat(list(partial.batches("resid.0", 50, seed=2)))
    assert rows.shape[0] == len(partial) < len(store)
    assert torch.equal(sorted_rows(rows), sorted_rows(partial["resid.0"][:]))


def test_bad_arguments_are_actlab_errors(store):
    with pytest.raises(ActlabError, match="'resid.2' is not in this store"):
        store.batches("resid.2", 8)
    with pytest.raises(ActlabError, match="not in this store"):
        store.batches(["resid.0", "nope"], 8)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ActlabError, match="batch_size"):
            store.batches("resid.0", bad)
    with pytest.raises(ActlabError, match="shuffle_buffer"):
        store.batches("resid.0", 8, shuffle_buffer=-1)
    with pytest.raises(ActlabError, match="epochs"):
        store.batches("resid.0", 8, epochs=0)
    with pytest.raises(ActlabError, match="seed"):
        store.batches("resid.0", 8, seed=-1)
    with pytest.raises(ActlabError, match="at least one site"):
        store.batches([], 8)
    with pytest.raises(ActlabError, match="twice"):
        store.batches(["resid.0", "resid.0"], 8)
    with pytest.raises(ActlabError, match="dtype"):
        store.batches("resid.0", 8, dtype=torch.int32)
    with pytest.raises(ActlabError, match="device"):
        store.batches("resid.0", 8, device="toaster")
