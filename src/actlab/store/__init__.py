"""On-disk activation store: sharded safetensors files + a JSON manifest, resumable writes.

``record(model, docs, sites, out_dir)`` writes a store (or, in steps that several processes can
share: ``plan_record`` → ``write_shard`` → ``finalise_record``); ``Store(out_dir)`` reads it, and
``Store.batches(...)`` streams shuffled minibatches for training; ``repair_store(out_dir)`` drops
damaged shards so that the same record call re-records them. See docs/store.md.
"""

from actlab.store.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from actlab.store.reader import SiteView, Store
from actlab.store.record import DEFAULT_SHARD_BYTES, RecordConfig, RecordPlan, finalise_record, plan_record, record, write_shard
from actlab.store.repair import repair_store
from actlab.store.shuffle import ShuffledReader

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RecordConfig",
    "RecordPlan",
    "ShuffledReader",
    "SiteView",
    "Store",
    "finalise_record",
    "plan_record",
    "read_manifest",
    "record",
    "repair_store",
    "write_shard",
]
