"""Distributed recording: N gloo ranks write one store, byte-identical to a single process; a rank killed
mid-run leaves a store that a rerun with another number of ranks completes, byte-identically."""

from __future__ import annotations

import json
import os

import pytest
import torch

from actlab.store import MANIFEST_NAME, Store, record
from dist_helpers import run_ranks
from test_store import SITES, assert_same_store, make_docs

PARAMS = dict(shard_tokens=60)
BATCH = 4


def _model():
    from tiny_models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process store, recorded with one torch thread as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ref") / "s"
        record(_model(), make_docs(), SITES, out, batch_size=BATCH, **PARAMS)
    finally:
        torch.set_num_threads(threads)
    return out


def _logging_shards(log):
    """Make this process note every shard it records in ``log`` (one index a line)."""
    from actlab.store import shard_writer

    submit = shard_writer.ShardPipeline.submit

    def logged(self, shard, on_batch=None):
        with open(log, "a") as f:
            f.write(f"{shard.index}\n")
        return submit(self, shard, on_batch)

    shard_writer.ShardPipeline.submit = logged


def _record_rank(rank: int, out, logs) -> None:
    _logging_shards(logs / f"rank{rank}.txt")
    store = record(_model(), make_docs(), SITES, out, batch_size=BATCH, distributed=True, **PARAMS)
    assert store.complete  # every rank returns the finished store


def _shards_of(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.slow  # two spawned processes import torch: ~10 s on a quiet machine
def test_two_ranks_write_the_single_process_store(reference, tmp_path):
    out, logs = tmp_path / "s", tmp_path / "logs"
    logs.mkdir()
    run_ranks(_record_rank, 2, out, logs)
    assert_same_store(reference, out)  # every shard byte-identical, the manifest equal but for its time stamps
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())  # no markers left
    shares = [_shards_of(logs / f"rank{r}.txt") for r in range(2)]
    n = Store(out).n_shards
    assert sorted(shares[0] + shares[1]) == list(range(n)) and all(len(s) >= n // 2 for s in shares)


def _record_then_die(rank: int, out, logs) -> None:
    """Rank 1 dies (os._exit, no cleanup) half-way through writing its second shard's file."""
    _logging_shards(logs / f"rank{rank}.txt")
    if rank == 1:
        import actlab.files

        real_save, calls = actlab.files.save_file, []

        def dying_save(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 2:
                with open(filename, "wb") as f:
                    f.write(b"half a shard")
                os._exit(17)
            return real_save(tensors, filename, metadata=metadata)

        actlab.files.save_file = dying_save
    record(_model(), make_docs(), SITES, out, batch_size=BATCH, distributed=True, **PARAMS)


@pytest.mark.slow
def test_a_killed_rank_is_reported_and_a_rerun_with_one_rank_completes_the_store(reference, tmp_path):
    out, logs = tmp_path / "s", tmp_path / "logs"
    logs.mkdir()
    with pytest.raises(AssertionError) as failed:
        run_ranks(_record_then_die, 2, out, logs)
    report = str(failed.value)
    assert "rank 0 failed" in report and "another rank stopped" in report and "rerun the same command" in report
    # rank 0 wrote its whole share (marked done), rank 1 its first shard and half a temp file; nothing is finalised
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and manifest["shards"] == []
    rank0, rank1 = _shards_of(logs / "rank0.txt"), _shards_of(logs / "rank1.txt")
    marked = sorted(int(p.name[6:11]) for p in out.iterdir() if p.name.endswith(".done.json"))
    assert marked == sorted(rank0 + rank1[:1]) and len(rank1) >= 2  # its third may have been filling
    assert any(p.name.endswith(".tmp") for p in out.iterdir())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = record(_model(), make_docs(), SITES, out, batch_size=BATCH, distributed=True, **PARAMS)  # world of 1
    finally:
        torch.set_num_threads(threads)
    assert store.complete and store.verify() == []
    assert_same_store(reference, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def _record_url(rank: int, url) -> None:
    store = record(_model(), make_docs(), SITES, url, batch_size=BATCH, distributed=True, **PARAMS)
    assert store.complete and str(store.path) == url


@pytest.mark.slow
def test_two_ranks_record_into_a_file_url(reference, tmp_path):
    """An fsspec URL (file://, the one filesystem two processes here share) works as a plain path does."""
    url = f"file://{tmp_path}/s"
    run_ranks(_record_url, 2, url)
    assert_same_store(reference, tmp_path / "s")  # every shard byte-identical, the manifest but for time stamps
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(p.name for p in reference.iterdir())
