"""One shard file against its manifest entry: the checks that verify, repair, resume and the reader share.

The entry itself is sound (``store.schema``); what is checked here is that the file agrees with it:
the path stays in the store, the size is the listed one, the sha256 matches (``checksums=True``),
and the file's own header (its tensors' names, shapes and dtypes, and the ``actlab-store``
metadata the recorder wrote) says the same shard, offset and token count. safetensors refuses a
header whose offsets do not fit in the file, so once this passes every shape is bounded by the
bytes on disk, never by a number of the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from actlab.errors import ActlabError
from actlab.files import brief
from actlab.store._files import confined, open_shard, sha256_file
from actlab.store.manifest import FORMAT_NAME, INDEX_KEYS

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _header_problems(name: str, f, manifest: dict, entry: dict) -> list[str]:
    """The file's own ``actlab-store`` metadata names the same shard as the entry."""
    raw = (f.metadata() or {}).get(FORMAT_NAME)
    try:
        own = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        own = None
    if not isinstance(own, dict):
        return [f"{name}: its header has no readable '{FORMAT_NAME}' record"]
    want = {"shard": entry["index"], "token_offset": entry["token_offset"], "n_tokens": entry["n_tokens"],
            "dtype": manifest["dtype"]}
    wrong = [f"{key} {brief(own.get(key), 24)} (manifest: {value})" for key, value in want.items() if own.get(key) != value]
    if wrong:
        return [f"{name}: its header says {', '.join(wrong)}"]
    if "doc_ids" in f.keys() and list(f.get_slice("doc_ids").get_shape()) == [entry["n_tokens"]]:
        docs = f.get_slice("doc_ids")
        ends = [int(docs[0:1][0]), int(docs[entry["n_tokens"] - 1 : entry["n_tokens"]][0])]
        if ends != entry["doc_ids"]:
            return [f"{name}: its tokens come from documents {ends[0]} to {ends[1]}, the manifest says "
                    f"{entry['doc_ids'][0]} to {entry['doc_ids'][1]}"]
    return []


def _tensor_problems(name: str, f, manifest: dict, n: int) -> list[str]:
    """Every site and index tensor is there, with the manifest's shape and dtype."""
    problems: list[str] = []
    present = set(f.keys())
    widths = manifest["sites"]
    for key in [*widths, *INDEX_KEYS]:
        if key not in present:
            problems.append(f"{name}: no '{key}' tensor")
            continue
        sl = f.get_slice(key)
        shape = list(sl.get_shape())
        want = [n, widths[key]] if key in widths else [n]
        if shape != want:
            problems.append(f"{name}: '{key}' has shape {shape}, the manifest says {want}")
        dtype = sl.get_dtype()
        want_dtype = SAFETENSORS_DTYPES[manifest["dtype"]] if key in widths else "I64"
        if dtype != want_dtype:
            problems.append(f"{name}: '{key}' has dtype {dtype}, expected {want_dtype}")
    return problems


def shard_problems(directory: Path, manifest: dict, entry: dict, *, checksums: bool) -> list[str]:
    """Everything wrong with the file of one (sound) shard entry; [] when the file agrees with it."""
    name = entry["file"]
    try:
        path = confined(directory, name)
    except ActlabError as e:
        return [f"{name}: {e}"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']} (file truncated or replaced)")
    if checksums:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(
                f"{name}: checksum mismatch (sha256 {digest[:16]}..., manifest {entry['sha256'][:16]}...): "
                "the file is corrupted or was modified"
            )
    try:
        with open_shard(path) as f:
            problems += _tensor_problems(name, f, manifest, entry["n_tokens"]) + _header_problems(name, f, manifest, entry)
    except Exception as e:  # safetensors raises its own error types for broken headers
        problems.append(f"{name}: unreadable ({' '.join(str(e).split())[:160]})")
    return problems
