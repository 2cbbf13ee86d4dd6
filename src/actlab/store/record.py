"""Writing a store in three steps: ``plan_record`` → ``write_shard`` (any order, any process) →
``finalise_record``; and ``record``, which does all three in one process, resumably.

The split is what lets several processes (or machines sharing a file system) fill disjoint shards
of one store: each plans the same call (the plan is deterministic), one claims the directory,
each writes its shards under a shared lock, and one finalises. ``record`` is exactly the
composition of the three, so a store it writes is byte-identical to one assembled by workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from actlab.dist.coord import Coordinator
from actlab.dist.env import Rank
from actlab.dist.env import current as dist_current
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.store._files import DirLock
from actlab.store.directory import (
    clear_store_files,
    done_entries,
    existing_manifest,
    header_of,
    missing_shards,
    refuse_differences,
    remove_markers,
    sync_manifest,
)
from actlab.store.manifest import MANIFEST_NAME, read_manifest
from actlab.store.plan import DEFAULT_SHARD_BYTES, RecordConfig, RecordPlan, make_plan, resolve_sites
from actlab.store.reader import Store
from actlab.store.remote import FsPath, as_path
from actlab.store.shard_writer import ShardPipeline, record_shard

Docs = Sequence[str] | Sequence[Sequence[int]]  # texts, or token-id lists

__all__ = ["DEFAULT_SHARD_BYTES", "RecordConfig", "RecordPlan", "finalise_record", "plan_record", "record", "write_shard"]


# ------------------------------------------------------------------ argument checks
def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ActlabError(f"batch_size must be at least 1, not {batch_size}")


def _prepare(model, docs, sites, config: RecordConfig | None, overrides: dict):
    """Checked arguments: (docs as a sequence, site names, storage dtype name, the config)."""
    config = RecordConfig.with_overrides(config, overrides)
    if not isinstance(docs, Sequence) or isinstance(docs, str):
        docs = [docs] if isinstance(docs, str) else list(docs)
    site_names, store_dtype = resolve_sites(model, sites, config)
    return docs, site_names, store_dtype, config


def _open_dir(out_dir: str | os.PathLike) -> Path | FsPath:
    out = as_path(out_dir)
    if out.exists() and not out.is_dir():
        raise ActlabError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------ the three steps, lock held
def _claim(model, docs, site_names: list[str], store_dtype: str, out: Path, config: RecordConfig,
           overwrite: bool) -> tuple[RecordPlan, dict, dict[int, dict]]:
    """Plan, check the directory against the plan and write the manifest (under the exclusive lock)."""
    old = existing_manifest(out, overwrite)
    plan = make_plan(model, docs, site_names, store_dtype, out, config, old)
    if overwrite:
        clear_store_files(out)  # only now that the run's parameters are known to be valid
    if old is not None:
        refuse_differences(out, old, plan.header)
    done = done_entries(out, plan.header, old["shards"] if old else [], plan)
    # claim the directory (or drop shards that went missing) before any work
    manifest = sync_manifest(out, plan.header, done, plan.n_shards, old)
    return plan, manifest, done


def _finalise(out: Path, plan_sha256: str | None) -> None:
    manifest = _manifest_of(out, plan_sha256)
    n_shards = manifest["plan"]["n_shards"]
    done = done_entries(out, manifest, manifest["shards"])
    n_missing, first = missing_shards(n_shards, done)
    if n_missing:
        shown = ", ".join(map(str, first)) + (", ..." if n_missing > len(first) else "")
        raise ActlabError(
            f"cannot finalise {out}: {n_missing} of {n_shards} shards are not written yet (shards {shown}); "
            "write them with write_shard(plan, index) (or run the same record call), then finalise again"
        )
    sync_manifest(out, header_of(manifest), done, n_shards, manifest)
    remove_markers(out)


def _manifest_of(out: Path, plan_sha256: str | None) -> dict:
    """The manifest of a claimed store, checked against ``plan_sha256`` when given."""
    if not (out / MANIFEST_NAME).is_file():
        raise ActlabError(f"{out} holds no planned store (no {MANIFEST_NAME}): call plan_record(...) first")
    manifest = read_manifest(out)
    if plan_sha256 is not None and manifest["plan"].get("plan_sha256") != plan_sha256:
        raise ActlabError(
            f"{out} holds a store planned differently from this plan (another call, or it was replaced); "
            "plan again with plan_record(...) and the arguments the store was planned with"
        )
    return manifest


def _write_share(plan: RecordPlan, indices: list[int], done: dict[int, dict], batch_size: int, progress: bool,
                 manifest: dict | None) -> None:
    """Record shards ``indices`` in turn, each one's forward overlapping the previous one's write.

    Without ``manifest`` (one of several writers) each shard is marked done by its marker. With it (a
    sole writer, holding the lock exclusively) shards are listed in the manifest as they are written:
    each one at once while the store is small, later in groups, rewriting the manifest once the
    shards marked but not listed reach an eighth of the listed ones, so the rewrites add up to a few
    times the final manifest (not its size times the number of shards); ``_finalise`` lists the rest."""
    state = {"manifest": manifest}
    pending: list[int] = []  # marked, not listed yet

    def mark() -> bool:
        return manifest is None or len(pending) + 1 < max(1, (len(done) - len(pending)) // 8)

    def written(entry: dict, marked: bool) -> None:
        if manifest is None:
            return
        done[entry["index"]] = entry
        if marked:
            pending.append(entry["index"])
            return
        state["manifest"] = sync_manifest(plan.out, plan.header, done, plan.n_shards, state["manifest"])
        for index in [*pending, entry["index"]]:  # listed now (and any marker an earlier distributed run left)
            remove_markers(plan.out, index)
        pending.clear()

    before = sum(e["n_tokens"] for e in done.values())
    description = "recording" if not done else f"resuming ({len(done)}/{plan.n_shards} shards done)"
    total = before + sum(plan.shards[i].n_tokens for i in indices)
    with progress_bar(description, total, enabled=progress and bool(indices)) as bar, \
            ShardPipeline(plan, batch_size, written, mark) as pipeline:
        bar.advance(before)
        for i in indices:
            pipeline.submit(plan.shards[i], bar.advance)


def _claim_together(co: Coordinator, args: tuple) -> tuple[RecordPlan, list[int]]:
    """Rank 0 claims the directory; then every rank plans the same store and gets the shards still to do.

    The others plan after the claim (so they read the manifest rank 0 wrote, as a resume does) and the
    ranks compare their manifest headers: a rank with another model, documents or arguments stops them all."""
    model, docs, site_names, store_dtype, out, config, overwrite = args
    plan = claimed = None
    if co.rank.is_main:
        try:
            with DirLock(out):
                plan, _, done = _claim(*args)
            claimed = ("ok", [s.index for s in plan.shards if s.index not in done])
        except ActlabError as e:
            claimed = ("error", str(e))
    claimed = co.broadcast(claimed, "rank 0 claimed the store directory")
    if claimed[0] == "error":
        raise ActlabError(claimed[1])
    if plan is None:
        plan = make_plan(model, docs, site_names, store_dtype, out, config, read_manifest(out))
    mine = hashlib.sha256(json.dumps(plan.header, sort_keys=True).encode()).hexdigest()
    headers = co.gather(mine, "the ranks compared their plans")
    if len(set(headers)) > 1:
        odd = [r for r, h in enumerate(headers) if h != headers[0]]
        raise ActlabError(f"ranks {', '.join(map(str, odd))} planned another store than rank 0 (model, documents, sites "
                          "or arguments differ): every rank must make the same record call")
    return plan, claimed[1]


# ------------------------------------------------------------------ public API
def plan_record(model, docs: Docs, sites: str | Sequence[str], out_dir: str | os.PathLike,
                config: RecordConfig | None = None, *, overwrite: bool = False, claim: bool = True,
                **overrides) -> RecordPlan:
    """Plan the store ``record`` would write: the same arguments, less ``batch_size`` and ``progress``.

    With ``claim=True`` the directory is checked as ``record`` checks it and the manifest is
    written (complete=False), so workers can start. ``claim=False`` writes nothing: the plan for a
    worker whose coordinator has claimed the directory (an existing manifest must still match).
    """
    docs, site_names, store_dtype, config = _prepare(model, docs, sites, config, overrides)
    if not claim:
        if overwrite:
            raise ActlabError("overwrite=True replaces the store, which only the claiming call may do: pass claim=True")
        out = as_path(out_dir)
        old = read_manifest(out) if (out / MANIFEST_NAME).is_file() else None
        plan = make_plan(model, docs, site_names, store_dtype, out, config, old)
        if old is not None:
            refuse_differences(out, old, plan.header)
        return plan
    out = _open_dir(out_dir)
    with DirLock(out):
        return _claim(model, docs, site_names, store_dtype, out, config, overwrite)[0]


def write_shard(plan: RecordPlan, index: int, *, batch_size: int = 8, progress: bool = False) -> dict:
    """Record shard ``index`` of a claimed plan: its file, then its completion marker.

    Returns the shard's manifest entry. A shard already done is left as it is. Several processes
    may write disjoint shards at once (they share the directory lock); the store lists them once
    ``finalise_record`` runs.
    """
    if not isinstance(plan, RecordPlan):
        raise ActlabError(f"write_shard needs the RecordPlan from plan_record(...), not {type(plan).__name__}")
    _check_batch_size(batch_size)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < plan.n_shards:
        raise ActlabError(f"shard index {index!r} is out of range: the plan has {plan.n_shards} shards (0 to {plan.n_shards - 1})")
    _manifest_of(plan.out, plan.plan_sha256)  # fail early, before the lock, on an unclaimed directory
    with DirLock(plan.out, shared=True):
        manifest = _manifest_of(plan.out, plan.plan_sha256)
        done = done_entries(plan.out, plan.header, manifest["shards"], plan)
        if index in done:
            return done[index]
        shard = plan.shards[index]
        with progress_bar(f"shard {index}", shard.n_tokens, enabled=progress) as bar:
            return record_shard(plan, shard, batch_size, bar.advance)


def finalise_record(plan: RecordPlan | str | os.PathLike) -> Store:
    """List every written shard in the manifest (complete=True), delete the markers; returns the Store.

    Takes the plan, or just the store directory. ActlabError, changing nothing, while shards are
    missing.
    """
    out, sha = (plan.out, plan.plan_sha256) if isinstance(plan, RecordPlan) else (as_path(plan), None)
    _manifest_of(out, sha)
    with DirLock(out):
        _finalise(out, sha)
    return Store(out)


def record(model, docs: Docs, sites: str | Sequence[str], out_dir: str | os.PathLike,
           config: RecordConfig | None = None, *, batch_size: int = 8, progress: bool = False,
           overwrite: bool = False, distributed: bool = False, **overrides) -> Store:
    """Record the activations of ``sites`` over ``docs`` into a sharded store at ``out_dir``.

    Rows (documents split at ``max_length``) are cut into shards of about ``shard_tokens`` stored
    tokens at row boundaries; each shard is written atomically and then listed, with its sha256,
    in ``manifest.json``. Running the same call again after an interruption skips the shards
    already written and ends with the same files as an uninterrupted run. A directory holding a
    store recorded differently (model, sites, dtype, positions, data, plan parameters) is refused
    unless ``overwrite=True``. Returns the finished ``Store``. ``out_dir`` may be an fsspec URL
    (``memory://...``, ``s3://...``; see docs/store.md for what each backend guarantees).

    ``distributed=True``: every rank of the live ``torch.distributed`` group makes the same call;
    rank 0 claims the directory, each rank writes its share of the shards still to do, and rank 0
    finalises once all have finished (``actlab.dist.init()`` joins the group torchrun describes; a
    world of one is exactly the single-process run). The files are byte-identical to ``record``'s.

    The store's parameters are a ``RecordConfig`` (``config=``) and/or its fields as keywords:
    ``positions``, ``shard_tokens``, ``max_tokens``, ``dtype``, ``max_length``, ``long_docs``.
    """
    _check_batch_size(batch_size)
    docs, site_names, store_dtype, config = _prepare(model, docs, sites, config, overrides)
    rank = dist_current() if distributed else Rank()
    out = _open_dir(out_dir)
    with Coordinator(rank) as co:
        args = (model, docs, site_names, store_dtype, out, config, overwrite)
        if rank.world_size == 1:  # one writer: the exclusive lock throughout, each shard listed as it is done
            with DirLock(out):
                plan, manifest, done = _claim(*args)
                todo = [s.index for s in plan.shards if s.index not in done]
                _write_share(plan, todo, done, batch_size, progress, manifest)
                _finalise(out, plan.plan_sha256)
            return Store(out)
        plan, todo = _claim_together(co, args)
        mine = todo[rank.rank :: rank.world_size]
        with DirLock(out, shared=True):
            _write_share(plan, mine, {}, batch_size, progress and rank.is_main, None)
        co.barrier(f"the others recorded their shards (this rank's {len(mine)} shards are written; rerun the "
                   "same command, with any number of ranks, to record the rest and finalise the store)")
        if rank.is_main:
            with DirLock(out):
                _finalise(out, plan.plan_sha256)
        co.barrier("rank 0 finalised the store (rerun the same command to finalise it)")
    return Store(out)
