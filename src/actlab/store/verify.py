"""``Store.verify``: check every shard file of a store against its manifest, and say what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from actlab.files import open_tensors
from actlab.store._files import sha256_file

if TYPE_CHECKING:
    from actlab.store.reader import Store

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _planned_problems(store: "Store") -> list[str]:
    planned = store.manifest["plan"].get("n_shards")
    recorded = {e.get("index") for e in store._shards}
    if isinstance(planned, int):
        missing = [i for i in range(planned) if i not in recorded]
        if missing:
            return [
                f"incomplete: {len(missing)} of {planned} planned shards are not recorded yet "
                "(run the same record command again to finish)"
            ]
    return []


def _tensor_problems(store: "Store", name: str, path: Path, n: int) -> list[str]:
    """Every site and index tensor is there, with the manifest's shape and dtype."""
    problems: list[str] = []
    try:
        with open_tensors(path) as f:
            present = set(f.keys())
            for key in store.keys():
                if key not in present:
                    problems.append(f"{name}: no '{key}' tensor")
                    continue
                sl = f.get_slice(key)
                shape = list(sl.get_shape())
                want = [n, store.widths[key]] if key in store.widths else [n]
                if shape != want:
                    problems.append(f"{name}: '{key}' has shape {shape}, the manifest says {want}")
                dtype = sl.get_dtype()
                want_dtype = _SAFETENSORS_DTYPES.get(store.manifest["dtype"]) if key in store.widths else "I64"
                if dtype != want_dtype:
                    problems.append(f"{name}: '{key}' has dtype {dtype}, expected {want_dtype}")
    except Exception as e:  # safetensors raises its own error types for broken headers
        problems.append(f"{name}: unreadable ({e})")
    return problems


def _file_problems(store: "Store", entry: dict, checksums: bool) -> list[str]:
    name = entry.get("file", "?")
    path = store.path / name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry.get("bytes"):
        problems.append(f"{name}: {size} bytes, the manifest says {entry.get('bytes')} (file truncated or replaced)")
    if checksums:
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            problems.append(
                f"{name}: checksum mismatch (sha256 {digest[:16]}..., manifest {str(entry.get('sha256'))[:16]}...): "
                "the file is corrupted or was modified"
            )
    return problems + _tensor_problems(store, name, path, int(entry.get("n_tokens", -1)))


def verify_store(store: "Store", *, checksums: bool = True) -> list[str]:
    """Problems found in ``store`` (see ``Store.verify``); an empty list means it is sound."""
    problems = _planned_problems(store)
    expected_offset = 0
    for entry in store._shards:
        name = entry.get("file", "?")
        n = int(entry.get("n_tokens", -1))
        if entry.get("token_offset") != expected_offset:
            problems.append(f"{name}: token offset {entry.get('token_offset')} in the manifest, expected {expected_offset}")
        expected_offset = int(entry.get("token_offset", 0)) + n
        problems += _file_problems(store, entry, checksums)
    if expected_offset != store.manifest.get("n_tokens", expected_offset):
        problems.append(f"manifest: n_tokens is {store.manifest.get('n_tokens')}, the shards hold {expected_offset}")
    return problems
