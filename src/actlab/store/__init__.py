"""On-disk activation store: sharded safetensors files + a JSON manifest, resumable writes.

``record(model, docs, sites, out_dir)`` writes a store; ``Store(out_dir)`` reads it. See docs/store.md.
"""

from actlab.store.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from actlab.store.reader import SiteView, Store
from actlab.store.record import DEFAULT_SHARD_BYTES, record

__all__ = ["DEFAULT_SHARD_BYTES", "FORMAT_VERSION", "MANIFEST_NAME", "SiteView", "Store", "read_manifest", "record"]
