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
from actlab.store._files import confined, is_tmp_file, write_json_atomic
from actlab.store.checks import shard_problems
from actlab.store.manifest import MANIFEST_NAME, marker_name, read_manifest, repair_hint, shard_name
from actlab.store.schema import entry_problem, listing_problem

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
            hint = "" if "overwrite" in str(e) else "; pass overwrite=True (--overwrite) to replace it"
            raise ActlabError(f"{e}{hint}") from None
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
    """The (sound) entry's file is in place, inside the store, with the listed size."""
    try:
        path = confined(out, shard_name(entry["index"]))
    except ActlabError:
        return False
    return path.is_file() and path.stat().st_size == entry["bytes"]


def write_marker(out: Path, plan_sha256: str, entry: dict) -> None:
    """Declare shard ``entry["index"]`` done: call only once its file is complete under its name."""
    write_json_atomic(out / marker_name(entry["index"]), {"plan_sha256": plan_sha256, "shard": entry})


def read_marker(path: Path, header: dict) -> dict | None:
    """The shard entry a marker holds, or None when it is unreadable, unsound or of another plan."""
    try:
        marker = json.loads(confined(path.parent, path.name).read_text(encoding="utf-8"))
    except (ActlabError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("plan_sha256") != header["plan"]["plan_sha256"]:
        return None
    entry = marker.get("shard")
    return entry if entry_problem(entry, header) is None else None


def _agrees(entry: dict, plan) -> bool:
    """Whether an entry says what the plan says about its shard (where, how many tokens, which rows)."""
    return plan is None or all(entry.get(k) == v for k, v in plan.expected_entry(entry["index"]).items())


def done_entries(out: Path, header: dict, listed: list, plan=None) -> dict[int, dict]:
    """Shards whose file is in place: those the manifest lists, and those with a marker.

    ``header``: the manifest header the entries belong to (its ``plan`` names the plan). With the
    ``RecordPlan``, an entry that disagrees with it is not done (the plan decides, not the numbers of
    a manifest: the shard is recorded again); without it, a marker counts only if its file agrees.
    """
    done: dict[int, dict] = {}
    for entry in listed:  # sound entries: read_manifest checked them
        if _agrees(entry, plan) and shard_ok(out, entry):
            done[entry["index"]] = entry
    for path in sorted(out.iterdir()):
        if not MARKER_RE.match(path.name):
            continue
        entry = read_marker(path, header)
        if entry is None or entry["index"] in done or not _agrees(entry, plan) or not shard_ok(out, entry):
            continue
        if plan is None and shard_problems(out, header, entry, checksums=False):
            continue
        done[entry["index"]] = entry
    problem = listing_problem(list(done.values()))
    if problem:
        raise ActlabError(f"{out} holds shards that do not fit together ({problem}); {repair_hint(out)}")
    return done


def missing_shards(n_shards: int, done: dict[int, dict], shown: int = 8) -> tuple[int, list[int]]:
    """How many of the plan's shards are not done, and the first ``shown`` of them (found without a
    loop over ``n_shards``: only as far as the done ones reach)."""
    first = [i for i in range(min(n_shards, len(done) + shown)) if i not in done][:shown]
    return n_shards - len(done), first


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
