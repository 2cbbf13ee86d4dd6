"""``Store.verify``: check every shard file of a store against its manifest, and say what is wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actlab.store.checks import shard_problems
from actlab.store.schema import show

if TYPE_CHECKING:
    from actlab.store.reader import Store

INCOMPLETE = "incomplete"  # how the one problem that only recording more shards fixes begins


def _planned_problems(store: "Store") -> list[str]:
    """Planned shards not recorded yet: counted from the listing (never a loop over the plan's number)."""
    planned = store.manifest["plan"]["n_shards"]
    missing = planned - len(store._shards)  # the manifest's check: indices unique and below planned
    if missing:
        return [
            f"{INCOMPLETE}: {missing} of {planned} planned shards are not recorded yet "
            "(run the same record command again to finish)"
        ]
    return []


def verify_store(store: "Store", *, checksums: bool = True) -> list[str]:
    """Problems found in ``store`` (see ``Store.verify``); an empty list means it is sound."""
    problems = _planned_problems(store)
    for entry in store._shards:
        problems += shard_problems(store.path, store.manifest, entry, checksums=checksums)
    held = sum(e["n_tokens"] for e in store._shards)
    if held != store.manifest["n_tokens"]:
        problems.append(f"manifest: n_tokens is {show(store.manifest['n_tokens'])}, the shards hold {held}")
    return problems
