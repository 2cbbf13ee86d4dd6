"""``repair_store`` (``actlab store verify --repair``): drop the damaged shards of a store so that the
same record command re-records just those.

A shard is dropped when its manifest entry is unsound (a wrong type, a count out of range, a file
that is not the store's own name, entries that overlap) or its file disagrees with the entry
(missing, truncated, checksum mismatch, unreadable, other tensors or header). Dropping deletes the
shard's file (the store's own name for its index, never a name read from the manifest) and its
marker, and rewrites the manifest without the entry: the shard is back to "not done", and the next
``record`` with the same arguments writes it again, byte-identical to the original. A completion
marker (left by a worker) whose file is damaged goes the same way; unreadable markers, or markers of
another plan, are deleted (``record`` ignores them anyway). The other shards are not touched. A
manifest whose header is damaged cannot be repaired (its plan is unknown): that store is recorded
again with ``overwrite=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from actlab.store._files import DirLock
from actlab.store.checks import shard_problems
from actlab.store.directory import MARKER_RE, header_of, read_marker, sync_manifest
from actlab.store.manifest import load_manifest, marker_name, shard_name
from actlab.store.remote import as_path
from actlab.store.schema import entry_problem, is_int, listing_problem, show


def _sound_entries(out: Path, manifest: dict) -> tuple[dict[int, dict], list[str]]:
    """Entries whose own fields and file are sound (one per index, following one another), and a
    line for each entry left out."""
    kept: dict[int, dict] = {}
    dropped: list[str] = []
    for entry in manifest["shards"]:
        problems = [entry_problem(entry, manifest)]
        if problems[0] is None:
            problems = shard_problems(out, manifest, entry, checksums=True)
            if not problems and entry["index"] in kept:
                problems = [f"shard {entry['index']} is listed twice"]
        if problems:
            dropped.append(problems[0])
        else:
            kept[entry["index"]] = entry
    previous = None
    for index in sorted(kept):  # sound on their own, not with their neighbour: which one is wrong is unknown
        problem = listing_problem([kept[index]] if previous is None else [previous, kept[index]])
        if problem:
            dropped.append(problem)
            if previous is not None:
                del kept[previous["index"]]
            del kept[index]
            previous = None
        else:
            previous = kept[index]
    return kept, dropped


def _damaged_markers(out: Path, manifest: dict, kept: dict[int, dict]) -> tuple[list[Path], set[int], list[str]]:
    """Markers that are unreadable, of another plan or unsound (to delete), the indices whose marker
    names a damaged file (their file goes too), and a line for each of the latter."""
    junk, damaged, lines = [], set(), []
    for path in sorted(out.iterdir()):
        if not MARKER_RE.match(path.name):
            continue
        entry = read_marker(path, manifest)
        if entry is None:
            junk.append(path)
            continue
        problems = [] if entry["index"] in kept else shard_problems(out, manifest, entry, checksums=True)
        if problems:
            damaged.add(entry["index"])
            lines.append(f"{problems[0]} (its completion marker)")
    return junk, damaged, lines


def _remove_files(out: Path, index: int) -> None:
    """The shard's file and marker, by the store's own names (a link is removed, not what it points to)."""
    for name in (shard_name(index), marker_name(index)):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()


def repair_store(path: str | os.PathLike) -> list[str]:
    """Drop every damaged shard of the store at ``path`` (see the module's docstring); returns one line
    per shard dropped (what was wrong), [] when there was nothing to repair. Run the same record
    command afterwards to re-record the dropped shards."""
    out = as_path(path)
    load_manifest(out)  # a damaged header: ActlabError before the lock, nothing touched
    with DirLock(out):
        manifest = load_manifest(out)
        kept, dropped = _sound_entries(out, manifest)
        junk, damaged, lines = _damaged_markers(out, manifest, kept)
        dropped += lines
        n_shards = manifest["plan"]["n_shards"]
        counts = (sum(e["n_tokens"] for e in kept.values()), len(kept) == n_shards)
        if not dropped and counts != (manifest["n_tokens"], manifest.get("complete")):
            dropped.append(f"manifest: n_tokens {show(manifest['n_tokens'])} and complete "
                           f"{show(manifest.get('complete'))} recomputed from the shards")
        if dropped:  # the manifest first: a crash then leaves unlisted files, which record rewrites
            sync_manifest(out, header_of(manifest), kept, n_shards, manifest)
        listed = {e["index"] for e in manifest["shards"] if isinstance(e, dict) and is_int(e.get("index"), 0, n_shards - 1)}
        for index in sorted((listed | damaged) - set(kept)):
            _remove_files(out, index)
        for path in junk:
            path.unlink(missing_ok=True)
    return dropped
