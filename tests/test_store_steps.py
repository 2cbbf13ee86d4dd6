"""Recording in steps: plan_record → write_shard (any order, several workers) → finalise_record."""

from __future__ import annotations

import json
import shutil

import pytest

from actlab.errors import ActlabError
from actlab.store import MANIFEST_NAME, RecordConfig, Store, finalise_record, plan_record, record, write_shard
from actlab.store._files import DirLock, sha256_file
from actlab.store.manifest import marker_name, shard_name
from test_store import SITES, assert_same_store, make_docs

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


def markers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".done.json"))


def test_two_workers_in_any_order_give_records_store(llama, docs, reference, tmp_path):
    out = tmp_path / "s"
    coordinator = plan_record(llama, docs, SITES, out, **PARAMS)  # claims the directory
    worker = plan_record(llama, docs, SITES, out, claim=False, **PARAMS)  # another process would do this
    assert worker.plan_sha256 == coordinator.plan_sha256 and worker.n_shards == coordinator.n_shards > 4
    claimed = Store(out)
    assert not claimed.complete and claimed.n_shards == 0 and claimed.manifest["plan"]["n_shards"] == worker.n_shards
    n = coordinator.n_shards
    odd = [i for i in reversed(range(n)) if i % 2]
    even = [i for i in range(n) if not i % 2][::-1]
    for i in odd:
        write_shard(worker, i, batch_size=BATCH)
    for i in even:
        write_shard(coordinator, i, batch_size=BATCH)
    assert markers(out) == [marker_name(i) for i in range(n)]
    assert Store(out).n_shards == 0  # listed only once finalised: workers never touch the manifest
    store = finalise_record(out)
    assert store.complete and store.verify() == []
    assert markers(out) == []
    assert_same_store(reference, out)  # byte-identical shards, same manifest as record's


def test_record_is_plan_write_finalise(llama, docs, reference, tmp_path):
    """The config object and the keywords describe the same store; record with a config equals the reference."""
    out = tmp_path / "s"
    record(llama, docs, SITES, out, RecordConfig(shard_tokens=60), batch_size=BATCH)
    assert_same_store(reference, out)
    with pytest.raises(ActlabError, match="unknown RecordConfig option"):
        record(llama, docs, SITES, tmp_path / "t", shard_token=60)


def test_finalise_refuses_while_shards_are_missing(llama, docs, reference, tmp_path):
    out = tmp_path / "s"
    plan = plan_record(llama, docs, SITES, out, **PARAMS)
    for i in range(plan.n_shards):
        if i not in (1, 3):
            write_shard(plan, i, batch_size=BATCH)
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(ActlabError, match=r"2 of \d+ shards are not written yet \(shards 1, 3\)"):
        finalise_record(plan)
    assert (out / MANIFEST_NAME).read_bytes() == before and len(markers(out)) == plan.n_shards - 2
    write_shard(plan, 3, batch_size=BATCH)
    with pytest.raises(ActlabError, match=r"shards 1\)"):
        finalise_record(out)
    # record resumes from the workers' markers: the shards they wrote are not written again
    inode = (out / shard_name(0)).stat().st_ino
    record(llama, docs, SITES, out, batch_size=BATCH, **PARAMS)
    assert (out / shard_name(0)).stat().st_ino == inode
    assert_same_store(reference, out)


def test_a_marker_appears_only_once_its_shard_file_is_complete(llama, docs, tmp_path, monkeypatch):
    import actlab.files
    import actlab.store.directory as directory

    out = tmp_path / "s"
    plan = plan_record(llama, docs, SITES, out, **PARAMS)
    seen = []
    real_write = directory.write_json_atomic

    def checked_write(path, data):
        entry = data["shard"]
        shard = out / entry["file"]
        # the shard file is in place, whole, under its final name before its marker is written
        assert shard.is_file() and shard.stat().st_size == entry["bytes"] and sha256_file(shard) == entry["sha256"]
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
        seen.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(directory, "write_json_atomic", checked_write)
    write_shard(plan, 2, batch_size=BATCH)
    assert seen == [marker_name(2)]

    # a write that dies half-way leaves neither a shard file nor a marker (nor its temp file)
    real_save = actlab.files.save_file

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(actlab.files, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        write_shard(plan, 3, batch_size=BATCH)
    assert not (out / shard_name(3)).exists() and not (out / marker_name(3)).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(actlab.files, "save_file", real_save)
    write_shard(plan, 3, batch_size=BATCH)
    assert (out / marker_name(3)).exists() and seen == [marker_name(2), marker_name(3)]


def test_step_errors_and_locks(llama, docs, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(ActlabError, match="plan_record"):
        write_shard(plan_record(llama, docs, SITES, out, claim=False, **PARAMS), 0)  # nothing claimed yet
    plan = plan_record(llama, docs, SITES, out, **PARAMS)
    for bad in (-1, plan.n_shards, "0"):
        with pytest.raises(ActlabError, match="out of range"):
            write_shard(plan, bad)
    with pytest.raises(ActlabError, match="batch_size"):
        write_shard(plan, 0, batch_size=0)
    with pytest.raises(ActlabError, match="RecordPlan"):
        write_shard(str(out), 0)
    with pytest.raises(ActlabError, match="recorded differently"):
        plan_record(llama, docs, SITES, out, claim=False, shard_tokens=70)
    with pytest.raises(ActlabError, match="claim=True"):
        plan_record(llama, docs, SITES, out, claim=False, overwrite=True, **PARAMS)
    with DirLock(out):  # a coordinator (or record) holds the store: workers wait for it
        with pytest.raises(ActlabError, match="another process"):
            write_shard(plan, 0)
    with DirLock(out, shared=True):  # a worker is writing: nobody finalises or plans meanwhile
        with pytest.raises(ActlabError, match="another process"):
            finalise_record(plan)
        with pytest.raises(ActlabError, match="another process"):
            plan_record(llama, docs, SITES, out, **PARAMS)
        with DirLock(out, shared=True):
            pass  # but workers share the directory
    # a store replaced meanwhile is not written into with the old plan
    record(llama, docs[:5], SITES, out, shard_tokens=60, overwrite=True)
    with pytest.raises(ActlabError, match="planned differently"):
        write_shard(plan, 0)
    with pytest.raises(ActlabError, match="no planned store"):
        finalise_record(tmp_path / "elsewhere")


def test_markers_of_another_plan_are_ignored(llama, docs, reference, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(reference, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entry = manifest["shards"][1]
    manifest["shards"] = manifest["shards"][:1]
    manifest["complete"] = False
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / marker_name(1)).write_text(json.dumps({"plan_sha256": "0" * 64, "shard": entry}))
    with pytest.raises(ActlabError, match="not written yet"):
        finalise_record(out)  # a stale marker does not count
    record(llama, docs, SITES, out, batch_size=BATCH, **PARAMS)
    assert_same_store(reference, out)
