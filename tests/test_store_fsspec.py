"""Stores behind fsspec URLs (the in-memory and local filesystems): record, read, shuffle, verify, repair and
resume give exactly what a plain local path gives, byte for byte."""

from __future__ import annotations

import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pytest
import torch

from actlab.errors import ActlabError
from actlab.store import MANIFEST_NAME, Store, record, repair_store
from actlab.store.remote import FsPath, as_path
from test_store import SITES, make_docs, manifest_wo_stamps

PARAMS = dict(shard_tokens=60)
BATCH = 4


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def reference(llama, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "s"
    record(llama, docs, SITES, out, batch_size=BATCH, **PARAMS)
    return out


def url_for(kind: str, tmp_path) -> str:
    return f"memory://actlab-test/{uuid.uuid4().hex}/s" if kind == "memory" else f"file://{tmp_path}/s"


def remote_files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p.rstrip("/").rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(root, detail=False)}


def assert_same_as_local(url: str, reference) -> None:
    files = remote_files(url)
    assert sorted(files) == sorted(p.name for p in reference.iterdir())  # no temp files or markers left
    for path in reference.iterdir():
        if path.name != MANIFEST_NAME:
            assert files[path.name] == path.read_bytes(), path.name
    import json
    ours = {k: v for k, v in json.loads(files[MANIFEST_NAME]).items() if k not in ("created", "updated")}
    assert ours == manifest_wo_stamps(reference)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_record_and_read_through_fsspec_equal_a_local_store(llama, docs, reference, tmp_path, kind):
    url = url_for(kind, tmp_path)
    store = record(llama, docs, SITES, url, batch_size=BATCH, **PARAMS)
    assert isinstance(store.path, FsPath) and store.path == as_path(url) == as_path(str(store.path)) and store.complete
    assert_same_as_local(url, reference)
    local = Store(reference)
    assert store.verify() == [] and len(store) == len(local) and store.info()["bytes"] == local.info()["bytes"]
    for a, b in zip(store.iter_shards(), local.iter_shards()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n = len(local)
    for key in ("resid.0", "doc_ids"):
        assert torch.equal(store[key][50:130], local[key][50:130])  # crosses shards: row ranges read by range
        picks = torch.tensor([n - 1, 3, 77, 3])
        assert torch.equal(store.get(key, picks), local.get(key, picks)) and torch.equal(store[key][-1], local[key][-1])
    ours = list(store.batches(["resid.0", "token_ids"], 32, seed=3, shuffle_buffer=100))
    theirs = list(local.batches(["resid.0", "token_ids"], 32, seed=3, shuffle_buffer=100))
    assert len(ours) == len(theirs) and all(torch.equal(a[k], b[k]) for a, b in zip(ours, theirs) for k in a)
    assert record(llama, docs, SITES, url, batch_size=BATCH, **PARAMS).manifest == store.manifest  # complete: no-op


def test_an_interrupted_memory_store_resumes_and_a_damaged_shard_is_repaired(llama, docs, reference, tmp_path,
                                                                           monkeypatch):
    url = url_for("memory", tmp_path)
    real_write, writes = FsPath.write_atomic, []

    def dying_write(self, data, tmp):
        if self.name.startswith("shard-") and self.name.endswith(".safetensors"):
            writes.append(self.name)
            if len(writes) == 3:
                raise KeyboardInterrupt  # a Ctrl-C while the third shard is being written
        return real_write(self, data, tmp)

    monkeypatch.setattr(FsPath, "write_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        record(llama, docs, SITES, url, batch_size=BATCH, **PARAMS)
    monkeypatch.setattr(FsPath, "write_atomic", real_write)
    partial = Store(url)
    assert not partial.complete and partial.n_shards == 2 and partial.verify()[0].startswith("incomplete")
    record(llama, docs, SITES, url, batch_size=BATCH, **PARAMS)
    assert_same_as_local(url, reference)

    fs, root = fsspec.core.url_to_fs(url)
    name = f"{root}/shard-00001.safetensors"
    data = bytearray(fs.cat_file(name))
    data[-5] ^= 0xFF  # one flipped byte in the last tensor
    fs.pipe_file(name, bytes(data))
    problems = Store(url).verify()
    assert len(problems) == 1 and "shard-00001.safetensors: checksum mismatch" in problems[0]
    assert len(repair_store(url)) == 1 and not fs.exists(name)
    record(llama, docs, SITES, url, batch_size=BATCH, **PARAMS)
    assert_same_as_local(url, reference)


def test_a_url_without_a_driver_is_a_clear_error(llama, docs):
    with pytest.raises(ActlabError, match="cannot open the store URL 'nosuch://bucket/s': Protocol not known"):
        record(llama, docs, SITES, "nosuch://bucket/s", **PARAMS)
    with pytest.raises(ActlabError, match="cannot open the store URL"):
        Store("nosuch://bucket/s")


def test_a_remote_shard_whose_header_lies_is_refused_before_it_is_read(reference):
    """RemoteTensors checks the header against the object's real size, as safetensors does for a file."""
    url = f"memory://actlab-test/{uuid.uuid4().hex}/s"
    fs, root = fsspec.core.url_to_fs(url)
    for path in reference.iterdir():
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    assert Store(url).verify() == []
    name = f"{root}/shard-00002.safetensors"
    data = bytearray(fs.cat_file(name))
    n = int.from_bytes(data[:8], "little")
    header = bytes(data[8 : 8 + n]).replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    fs.pipe_file(name, bytes(data[:8]) + header + bytes(data[8 + n :]))  # a tensor shifted: sizes disagree
    problems = Store(url).verify(checksums=False)
    assert len(problems) == 1 and "shard-00002.safetensors: unreadable" in problems[0], problems
    store = Store(url)
    offset = store.manifest["shards"][2]["token_offset"]
    with pytest.raises(ActlabError, match="shard-00002.safetensors"):
        store["resid.0"][offset]
    fs.pipe_file(name, (10**12).to_bytes(8, "little") + bytes(data[8:]))  # a header longer than the object
    assert "unreadable" in Store(url).verify(checksums=False)[0]


class ListingCacheFS(LocalFileSystem):
    """The local disk seen as object stores see it (s3fs, gcsfs, adlfs): a directory listing is cached and
    answers later questions about its files until this process changes one of them, so files another
    process wrote since are missing from it."""

    protocol = ("listingcache",)
    cachable = False

    def ls(self, path, detail=False, **kwargs):
        path = self._strip_protocol(path)
        entries = super().ls(path, detail=True, **kwargs)
        self.dircache[path] = entries
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        parent = self._parent(path)
        if path not in self.dircache and parent in self.dircache:
            for entry in self.dircache[parent]:
                if entry["name"] == path:
                    return entry
            raise FileNotFoundError(path)
        return super().info(path, **kwargs)

    def isfile(self, path):
        try:
            return self.info(path)["type"] == "file"
        except FileNotFoundError:
            return False

    def isdir(self, path):
        path = self._strip_protocol(path)
        return path in self.dircache or super().isdir(path)

    def exists(self, path, **kwargs):
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def pipe_file(self, path, value, **kwargs):  # its own changes it forgets the listings of, as s3fs does
        super().pipe_file(path, value, **kwargs)
        self.invalidate_cache(path)

    def mv(self, path1, path2, **kwargs):
        super().mv(path1, path2, **kwargs)
        self.invalidate_cache(path1)
        self.invalidate_cache(path2)

    def rm_file(self, path):
        super().rm_file(path)
        self.invalidate_cache(path)

    def makedirs(self, path, exist_ok=False):
        super().makedirs(path, exist_ok=exist_ok)
        self.invalidate_cache(path)

    def invalidate_cache(self, path=None):
        if path is None:
            self.dircache.clear()
            return
        path = self._strip_protocol(path)
        while True:  # the path and its parents, as s3fs does
            self.dircache.pop(path, None)
            parent = self._parent(path)
            if parent == path or not parent:
                return
            path = parent


def test_a_store_another_process_wrote_is_read_through_a_stale_listing(reference, tmp_path):
    """A process that listed the folder before another one wrote the store (a rank other than 0, a reader
    started early) reads the store as it is now, not as its cached listing says."""
    import shutil

    fs = ListingCacheFS()
    root = FsPath(fs, str(tmp_path / "s"))
    root.mkdir()
    assert list(root.iterdir()) == [] and fs.dircache  # listed (and cached) while empty
    for path in reference.iterdir():  # "another process": the plain file system, which knows no cache
        shutil.copyfile(path, tmp_path / "s" / path.name)
    store, local = Store(root), Store(reference)
    assert store.verify() == [] and len(store) == len(local)
    for key in ("resid.0", "doc_ids"):
        assert torch.equal(store[key][:], local[key][:])
