"""``record``: run a model over documents and write a resumable, sharded activation store."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

import actlab
from actlab.engine import runner
from actlab.engine.batch import TokenBatch
from actlab.engine.batching import LongDocs, Positions, Row, selection_mask
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.models.model import same_model
from actlab.store._files import DirLock, finish_atomic, is_tmp_file, sha256_file, tmp_path_for, write_json_atomic
from actlab.store.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_KEYS,
    MANIFEST_NAME,
    dtype_name,
    positions_to_json,
    read_manifest,
    shard_name,
    torch_dtype,
)
from actlab.store.reader import Store

DEFAULT_SHARD_BYTES = 256 * 2**20  # target shard size when shard_tokens is not given
_SHARD_RE = re.compile(r"^shard-\d{5,}\.safetensors$")
_COUNT_CHUNK = 1024


@dataclass
class _Shard:
    index: int
    rows: list[Row]
    row_start: int  # index of the first row in the plan
    n_tokens: int  # selected tokens (what the shard stores)
    token_offset: int  # global index of the shard's first token


@dataclass
class _Plan:
    shards: list[_Shard]
    n_rows: int
    n_tokens: int
    n_documents: int
    n_documents_input: int
    input_sha256: str
    plan_sha256: str


# ------------------------------------------------------------------ planning
def _selected_counts(rows: list[Row], positions: Positions) -> list[int]:
    """Tokens each row sends to the sinks, computed with the runner's own selection rule."""
    counts: list[int] = []
    for i in range(0, len(rows), _COUNT_CHUNK):
        chunk = rows[i : i + _COUNT_CHUNK]
        width = max(len(r.ids) for r in chunk)
        counts.extend(int(c) for c in selection_mask(chunk, width, positions).sum(1).tolist())
    return counts


def _trim(row: Row, keep: int, positions: Positions) -> Row:
    """Cut a row's ids so exactly ``keep`` of its selected tokens remain (selections are contiguous)."""
    sel = selection_mask([row], len(row.ids), positions)[0]
    first = int(sel.nonzero()[0, 0])
    trimmed = Row(row.doc_id, row.start, row.ids[: first + keep], row.doc_length)
    if int(selection_mask([trimmed], len(trimmed.ids), positions).sum()) != keep:  # pragma: no cover - defensive
        raise ActlabError(f"cannot cut a row to {keep} tokens with positions={positions!r}; drop max_tokens")
    return trimmed


def _hash_rows(digest, rows: Iterable[Row]) -> None:
    for r in rows:
        digest.update(np.array([r.doc_id, r.start, r.doc_length, len(r.ids)], dtype="<i8").tobytes())
        digest.update(np.asarray(r.ids, dtype="<i8").tobytes())


def _make_plan(rows: list[Row], n_docs_input: int, positions: Positions, max_tokens: int | None,
               shard_tokens: int, params: dict) -> _Plan:
    """Cut rows into shards at row boundaries; depends only on the rows and the parameters."""
    digest = hashlib.sha256()
    _hash_rows(digest, rows)
    input_sha256 = digest.hexdigest()

    counts = _selected_counts(rows, positions)
    kept: list[tuple[Row, int]] = []
    total = 0
    for row, count in zip(rows, counts):
        if count == 0:
            continue  # nothing of this row is stored: do not spend a forward pass on it
        if max_tokens is not None:
            if total >= max_tokens:
                break
            if total + count > max_tokens:
                count = max_tokens - total
                row = _trim(row, count, positions)
        kept.append((row, count))
        total += count
    if not kept:
        raise ActlabError(f"positions={positions!r} selects no token of these documents: nothing to record")

    shards: list[_Shard] = []
    current: list[Row] = []
    cur_tokens = row_start = offset = 0
    for k, (row, count) in enumerate(kept):
        current.append(row)
        cur_tokens += count
        if cur_tokens >= shard_tokens or k == len(kept) - 1:
            shards.append(_Shard(len(shards), current, row_start, cur_tokens, offset))
            offset += cur_tokens
            row_start = k + 1
            current, cur_tokens = [], 0

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(input_sha256.encode())
    for shard in shards:
        digest.update(np.array([shard.index, shard.row_start, len(shard.rows), shard.n_tokens], dtype="<i8").tobytes())
        _hash_rows(digest, shard.rows)
    n_documents = len({row.doc_id for row, _ in kept})
    return _Plan(shards, len(kept), total, n_documents, n_docs_input, input_sha256, digest.hexdigest())


# ------------------------------------------------------------------ writing
class _ShardBuffer:
    """Preallocated tensors for exactly one shard; the runner's batches are copied in as they come."""

    def __init__(self, n_tokens: int, widths: dict[str, int], dtype: torch.dtype):
        self.n_tokens = n_tokens
        self.acts = {s: torch.empty(n_tokens, w, dtype=dtype) for s, w in widths.items()}
        self.index = {k: torch.empty(n_tokens, dtype=torch.int64) for k in INDEX_KEYS}
        self.filled = 0

    def consume(self, batch: TokenBatch) -> None:
        a, b = self.filled, self.filled + batch.n_tokens
        if b > self.n_tokens:
            raise ActlabError(f"internal error: a shard got more tokens than planned ({b} > {self.n_tokens})")
        for site, t in self.acts.items():
            t[a:b] = batch.acts[site]
        self.index["token_ids"][a:b] = batch.token_ids
        self.index["doc_ids"][a:b] = batch.doc_ids
        self.index["positions"][a:b] = batch.positions
        self.filled = b

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.acts, **self.index}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_shard(out: Path, shard: _Shard, buf: _ShardBuffer, manifest: dict, batch_size: int) -> dict:
    path = out / shard_name(shard.index)
    tmp = tmp_path_for(path)
    # One metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make byte-identical reruns impossible.
    metadata = {
        FORMAT_NAME: json.dumps({
            "format_version": FORMAT_VERSION,
            "shard": shard.index,
            "token_offset": shard.token_offset,
            "n_tokens": shard.n_tokens,
            "config_hash": manifest["model"].get("config_hash"),
            "dtype": manifest["dtype"],
        }, sort_keys=True)
    }
    try:
        save_file(buf.tensors(), str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        finish_atomic(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    doc_ids = buf.index["doc_ids"]
    return {
        "index": shard.index,
        "file": path.name,
        "n_tokens": shard.n_tokens,
        "token_offset": shard.token_offset,
        "rows": [shard.row_start, shard.row_start + len(shard.rows)],
        "doc_ids": [int(doc_ids[0]), int(doc_ids[-1])],
        "batch_size": batch_size,
        "bytes": size,
        "sha256": digest,
    }


def _describe_model(ident: dict) -> str:
    return f"{ident.get('model_name')} ({ident.get('model_class')}, config hash {ident.get('config_hash')})"


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between an existing manifest and the one this run would write."""
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


def _clear_store_files(out: Path) -> None:
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()  # first, so a crash half-way leaves no store that looks valid
    for entry in out.iterdir():
        if _SHARD_RE.match(entry.name) or is_tmp_file(entry):
            entry.unlink()


def _shard_ok(out: Path, entry: dict) -> bool:
    path = out / entry.get("file", "")
    return path.is_file() and path.stat().st_size == entry.get("bytes")


# ------------------------------------------------------------------ public API
def record(
    model,
    docs: Sequence[str] | Sequence[Sequence[int]],
    sites: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    positions: Positions = "all",
    batch_size: int = 8,
    shard_tokens: int | None = None,
    max_tokens: int | None = None,
    dtype: str | torch.dtype | None = None,
    max_length: int | None = None,
    long_docs: LongDocs = "chunk",
    progress: bool = False,
    overwrite: bool = False,
) -> Store:
    """Record the activations of ``sites`` over ``docs`` into a sharded store at ``out_dir``.

    Rows (documents split at ``max_length``) are cut into shards of about ``shard_tokens`` stored
    tokens at row boundaries; each shard is written atomically and then listed, with its sha256,
    in ``manifest.json``. Running the same call again after an interruption skips the shards
    already listed and ends with the same files as an uninterrupted run. A directory holding a
    store recorded differently (model, sites, dtype, positions, data, plan parameters) is refused
    unless ``overwrite=True``. Returns the finished ``Store``.
    """
    if batch_size < 1:
        raise ActlabError(f"batch_size must be at least 1, not {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ActlabError(f"max_tokens must be at least 1, not {max_tokens}")
    if shard_tokens is not None and shard_tokens < 1:
        raise ActlabError(f"shard_tokens must be at least 1, not {shard_tokens}")
    if isinstance(positions, list):
        positions = tuple(positions)
    if not isinstance(docs, Sequence) or isinstance(docs, str):
        docs = [docs] if isinstance(docs, str) else list(docs)
    site_names = model.resolve(sites)
    widths = {s: int(model.sites[s]) for s in site_names}
    store_dtype = dtype_name(dtype if dtype is not None else model.dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ActlabError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    with DirLock(out):
        for entry in out.iterdir():  # temp files of a killed run: never part of the store
            if is_tmp_file(entry):
                entry.unlink()
        old = None
        if overwrite:
            others = sorted(e.name for e in out.iterdir() if e.name != MANIFEST_NAME and not _SHARD_RE.match(e.name))
            if others:
                raise ActlabError(
                    f"{out} holds files that are not part of an activation store ({', '.join(others[:3])}); "
                    "overwrite only replaces stores: record into a new or empty directory"
                )
        elif (out / MANIFEST_NAME).exists():
            try:
                old = read_manifest(out)
            except ActlabError as e:
                raise ActlabError(f"{e}; pass overwrite=True (--overwrite) to replace it") from None
        else:
            found = sorted(e.name for e in out.iterdir())
            if found:
                hint = ("pass overwrite=True (--overwrite) to delete them"
                        if all(_SHARD_RE.match(name) for name in found) else "record into a new or empty directory")
                raise ActlabError(
                    f"{out} is not empty and holds no activation store (no {MANIFEST_NAME}; found "
                    f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); {hint}"
                )
        if shard_tokens is None:
            if old is not None and isinstance(old["plan"].get("shard_tokens"), int):
                shard_tokens = old["plan"]["shard_tokens"]
            else:
                per_token = sum(widths.values()) * torch_dtype(store_dtype).itemsize + 8 * len(INDEX_KEYS)
                shard_tokens = max(1, DEFAULT_SHARD_BYTES // per_token)

        resolved_max_length = int(max_length or model.max_length)
        rows = runner.plan_rows(model, docs, max_length=resolved_max_length, long_docs=long_docs)
        params = {
            "positions": positions_to_json(positions),
            "max_length": resolved_max_length,
            "long_docs": long_docs,
            "max_tokens": max_tokens,
            "shard_tokens": shard_tokens,
        }
        plan = _make_plan(rows, len(docs), positions, max_tokens, shard_tokens, params)
        del rows

        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "actlab_version": actlab.__version__,
            "model": model.identity(),
            "model_dtype": str(model.dtype).removeprefix("torch."),
            "sites": widths,
            "dtype": store_dtype,
            "positions": positions_to_json(positions),
            "shapes": {**{s: [plan.n_tokens, w] for s, w in widths.items()}, **{k: [plan.n_tokens] for k in INDEX_KEYS}},
            "n_documents": plan.n_documents,
            "plan": {
                "n_shards": len(plan.shards),
                "n_tokens": plan.n_tokens,
                "n_rows": plan.n_rows,
                "n_documents_input": plan.n_documents_input,
                "max_length": resolved_max_length,
                "long_docs": long_docs,
                "max_tokens": max_tokens,
                "shard_tokens": shard_tokens,
                "input_sha256": plan.input_sha256,
                "plan_sha256": plan.plan_sha256,
            },
        }
        if overwrite:
            _clear_store_files(out)  # only now that the run's parameters are known to be valid
        if old is not None:
            diffs = _differences(old, header)
            if diffs:
                raise ActlabError(
                    f"{out} already holds an activation store recorded differently:\n  - "
                    + "\n  - ".join(diffs)
                    + "\nrecord into a new directory, or pass overwrite=True (--overwrite) to replace it"
                )

        done = {}
        if old is not None:
            for entry in old["shards"]:
                if isinstance(entry, dict) and _shard_ok(out, entry) and 0 <= entry.get("index", -1) < len(plan.shards):
                    done[entry["index"]] = entry
        manifest = {
            **header,
            "n_tokens": 0,
            "complete": False,
            "shards": [],
            "created": old.get("created", _now()) if old else _now(),
            "updated": _now(),
        }

        def refresh() -> None:
            manifest["shards"] = [done[i] for i in sorted(done)]
            manifest["n_tokens"] = sum(e["n_tokens"] for e in manifest["shards"])
            manifest["complete"] = len(done) == len(plan.shards)

        def save_manifest() -> None:
            refresh()
            manifest["updated"] = _now()
            write_json_atomic(out / MANIFEST_NAME, manifest)

        refresh()
        stamps = ("created", "updated")
        if old is None or {k: v for k, v in old.items() if k not in stamps} != {
            k: v for k, v in manifest.items() if k not in stamps
        }:
            save_manifest()  # claim the directory (or drop shards that went missing) before any work

        todo = [s for s in plan.shards if s.index not in done]
        description = "recording" if not done else f"resuming ({len(done)}/{len(plan.shards)} shards done)"
        with progress_bar(description, plan.n_tokens, enabled=progress and bool(todo)) as bar:
            bar.advance(sum(e["n_tokens"] for e in done.values()))
            for shard in todo:
                buf = _ShardBuffer(shard.n_tokens, widths, torch_dtype(store_dtype))
                runner.run(
                    model,
                    sites=site_names,
                    sinks=[buf],
                    rows=shard.rows,
                    positions=positions,
                    batch_size=batch_size,
                    progress=False,
                    on_batch=lambda _rows, batch: bar.advance(batch.n_tokens),
                )
                if buf.filled != shard.n_tokens:
                    raise ActlabError(
                        f"internal error: shard {shard.index} got {buf.filled} tokens, planned {shard.n_tokens}"
                    )
                done[shard.index] = _write_shard(out, shard, buf, manifest, batch_size)
                del buf
                save_manifest()
    return Store(out)
