"""The store directory while it is being written: who may write into it, which shards are done,
and the manifest that lists them.

A shard is done once its file sits under its final name with a completion marker next to it
(``shard-00007.done.json``: the manifest entry of that shard and the plan it belongs to), or
once the manifest lists it. Writers of disjoint shards only add files and markers; the manifest
is rewritten by whoever plans or finalises the store (and, shard by shard, by ``record``), so
workers never race on it. Finalising folds the markers into the manifest and deletes them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from actlab.errors import ActlabError
from actlab.models.model import same_model
from actlab.store._files import is_tmp_file, write_json_atomic
from actlab.store.manifest import MANIFEST_NAME, marker_name, read_manifest

SHARD_RE = re.compile(r"^shard-\d{5,}\.safetensors$")
MARKER_RE = re.compile(r"^shard-\d{5,}\.done\.json$")
LISTING_KEYS = ("n_tokens", "complete", "shards", "created", "updated")  # manifest fields that are not the header
_STAMPS = ("created", "updated")


def is_store_file(name: str) -> bool:
    return bool(SHARD_RE.match(name) or MARKER_RE.match(name))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ before planning
def existing_manifest(out: Path, overwrite: bool) -> dict | None:
    """Check what ``out`` holds (under the writer lock) and return its manifest, if it is a store.

    Deletes the temp files of a killed run; refuses a directory holding anything else than a store
    (and, without ``overwrite``, a damaged store or shard files without a manifest).
    """
    for entry in out.iterdir():  # temp files of a killed run: never part of the store
        if is_tmp_file(entry):
            entry.unlink()
    if overwrite:
        others = sorted(e.name for e in out.iterdir() if e.name != MANIFEST_NAME and not is_store_file(e.name))
        if others:
            raise ActlabError(
                f"{out} holds files that are not part of an activation store ({', '.join(others[:3])}); "
                "overwrite only replaces stores: record into a new or empty directory"
            )
        return None
    if (out / MANIFEST_NAME).exists():
        try:
            return read_manifest(out)
        except ActlabError as e:
            raise ActlabError(f"{e}; pass overwrite=True (--overwrite) to replace it") from None
    found = sorted(e.name for e in out.iterdir())
    if found:
        hint = ("pass overwrite=True (--overwrite) to delete them"
                if all(is_store_file(name) for name in found) else "record into a new or empty directory")
        raise ActlabError(
            f"{out} is not empty and holds no activation store (no {MANIFEST_NAME}; found "
            f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); {hint}"
        )
    return None


def _describe_model(ident: dict) -> str:
    return f"{ident.get('model_name')} ({ident.get('model_class')}, config hash {ident.get('config_hash')})"


def differences(old: dict, new: dict) -> list[str]:
    """What differs between an existing manifest and the header this run would write."""
    diffs = []
    if not same_model(old["model"], new["model"]):
        diffs.append(f"model: the store was recorded with {_describe_model(old['model'])}, "
                     f"this run uses {_describe_model(new['model'])}")
    if old.get("model_dtype") != new["model_dtype"]:
        diffs.append(f"model dtype: store {old.get('model_dtype')}, this run {new['model_dtype']}")
    if old["sites"] != new["sites"]:
        diffs.append(f"sites: store {', '.join(old['sites'])}; this run {', '.join(new['sites'])}")
    for key in ("dtype", "positions"):
        if old.get(key) != new[key]:
            diffs.append(f"{key}: store {old.get(key)!r}, this run {new[key]!r}")
    old_plan, new_plan = old["plan"], new["plan"]
    if old_plan.get("input_sha256") != new_plan["input_sha256"]:
        diffs.append("input data: the documents (or their tokenization) differ from the ones the store was recorded from")
    for key in ("max_length", "long_docs", "max_tokens", "shard_tokens"):
        if old_plan.get(key) != new_plan[key]:
            diffs.append(f"{key}: store {old_plan.get(key)!r}, this run {new_plan[key]!r}")
    if not diffs and old_plan.get("plan_sha256") != new_plan["plan_sha256"]:
        diffs.append("shard plan: the rows are cut into shards differently (a different actlab version?)")
    return diffs


def refuse_differences(out: Path, old: dict, header: dict) -> None:
    diffs = differences(old, header)
    if diffs:
        raise ActlabError(
            f"{out} already holds an activation store recorded differently:\n  - "
            + "\n  - ".join(diffs)
            + "\nrecord into a new directory, or pass overwrite=True (--overwrite) to replace it"
        )


def clear_store_files(out: Path) -> None:
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()  # first, so a crash half-way leaves no store that looks valid
    for entry in out.iterdir():
        if is_store_file(entry.name) or is_tmp_file(entry):
            entry.unlink()


# ------------------------------------------------------------------ which shards are done
def shard_ok(out: Path, entry: dict) -> bool:
    path = out / entry.get("file", "")
    return path.is_file() and path.stat().st_size == entry.get("bytes")


def write_marker(out: Path, plan_sha256: str, entry: dict) -> None:
    """Declare shard ``entry["index"]`` done: call only once its file is complete under its name."""
    write_json_atomic(out / marker_name(entry["index"]), {"plan_sha256": plan_sha256, "shard": entry})


def read_marker(path: Path, plan_sha256: str) -> dict | None:
    """The shard entry a marker holds, or None when it is unreadable or belongs to another plan."""
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("plan_sha256") != plan_sha256:
        return None
    entry = marker.get("shard")
    return entry if isinstance(entry, dict) and isinstance(entry.get("index"), int) else None


def done_entries(out: Path, n_shards: int, plan_sha256: str, listed: list) -> dict[int, dict]:
    """Shards whose file is in place: those the manifest lists, and those with a marker."""
    done: dict[int, dict] = {}
    for entry in listed:
        if isinstance(entry, dict) and shard_ok(out, entry) and 0 <= entry.get("index", -1) < n_shards:
            done[entry["index"]] = entry
    for path in sorted(out.iterdir()):
        if MARKER_RE.match(path.name):
            entry = read_marker(path, plan_sha256)
            if entry is not None and entry["index"] not in done and 0 <= entry["index"] < n_shards \
                    and shard_ok(out, entry):
                done[entry["index"]] = entry
    return done


def remove_markers(out: Path, index: int | None = None) -> None:
    """Delete the markers (of shard ``index`` only, when given): once the manifest lists a shard,
    its marker has done its job."""
    if index is not None:
        (out / marker_name(index)).unlink(missing_ok=True)
        return
    for path in out.iterdir():
        if MARKER_RE.match(path.name):
            path.unlink()


# ------------------------------------------------------------------ the manifest
def sync_manifest(out: Path, header: dict, done: dict[int, dict], n_shards: int, previous: dict | None) -> dict:
    """The manifest listing ``done``; written only when it differs from ``previous`` (stamps aside)."""
    shards = [done[i] for i in sorted(done)]
    manifest = {
        **header,
        "n_tokens": sum(e["n_tokens"] for e in shards),
        "complete": len(done) == n_shards,
        "shards": shards,
        "created": previous.get("created", now()) if previous else now(),
        "updated": now(),
    }
    if previous is not None and {k: v for k, v in previous.items() if k not in _STAMPS} == {
        k: v for k, v in manifest.items() if k not in _STAMPS
    }:
        return previous
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def header_of(manifest: dict) -> dict:
    """The manifest without its listing: what the plan says, in the manifest's own key order."""
    return {k: v for k, v in manifest.items() if k not in LISTING_KEYS}
