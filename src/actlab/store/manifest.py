"""The store manifest (``manifest.json``): names, dtypes, and reading it back safely."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.store._files import confined
from actlab.store.remote import as_path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "actlab-store"
FORMAT_VERSION = 1
INDEX_KEYS = ("token_ids", "doc_ids", "positions")  # per-token int64 tensors stored next to the sites

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype) -> str:
    """Canonical storage name ("float32", "float16", "bfloat16") of a torch dtype or an alias."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ActlabError(f"unsupported store dtype '{dtype}'; use float32, float16 or bfloat16")
        dtype = _DTYPES[dtype]
    if dtype not in _NAMES:
        raise ActlabError(f"unsupported store dtype {dtype}; use float32, float16 or bfloat16")
    return _NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[dtype_name(name)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def marker_name(index: int) -> str:
    """The completion marker of shard ``index`` (present only while a store is being written)."""
    return f"shard-{index:05d}.done.json"


def positions_to_json(positions):
    """"all" / "last" stay strings; a (start, stop) span becomes a 2-list."""
    if isinstance(positions, (tuple, list)):
        return [None if p is None else int(p) for p in positions]
    return positions


def positions_from_json(positions):
    return tuple(positions) if isinstance(positions, list) else positions


HEADER_HINT = "record the store again (overwrite=True / --overwrite replaces it)"


def repair_hint(directory: str | Path) -> str:
    return (f"run `actlab store verify --repair {directory}` to drop the damaged shards, "
            "then the same record command to re-record just those")


def load_manifest(directory: str | Path) -> dict:
    """``DIR/manifest.json`` parsed, its header (everything but the shard list) checked: ActlabError
    with the reason when it is not usable. ``read_manifest`` checks the shard list too."""
    from actlab.store.schema import header_problem  # it uses this module's names

    directory = as_path(directory)
    if not directory.is_dir():
        raise ActlabError(f"no activation store at {directory}: the directory does not exist")
    path = confined(directory, MANIFEST_NAME)
    if not path.is_file():
        raise ActlabError(f"{directory} is not an activation store: it has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "it holds a number too long to be a count" if "integer string conversion" in str(e) else str(e)[:200]
        raise ActlabError(f"cannot read {path}: {reason}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ActlabError(f"{path} is not an actlab store manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ActlabError(f"{path} is damaged: its format_version {str(version)[:40]!r} is not a version number; "
                          f"{HEADER_HINT}")
    if version > FORMAT_VERSION:
        raise ActlabError(
            f"{path} has store format version {str(version)[:40]}, newer than this actlab understands "
            f"({FORMAT_VERSION}); upgrade actlab to read it"
        )
    for key in ("model", "sites", "dtype", "shards", "plan"):
        if key not in manifest:
            raise ActlabError(f"{path} is damaged: the '{key}' field is missing; {HEADER_HINT}")
    problem = header_problem(manifest)
    if problem:
        raise ActlabError(f"{path} is damaged: {problem}; {HEADER_HINT}")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """Parse and check ``DIR/manifest.json``: every field's type and range, the counts against each
    other, and each shard entry (a bare file name of the store, counts within the plan, entries
    following one another). ActlabError with the reason, and what to do, when it is not usable."""
    from actlab.store.schema import shards_problem

    manifest = load_manifest(directory)
    problem = shards_problem(manifest)
    if problem:
        raise ActlabError(f"{as_path(directory) / MANIFEST_NAME} is damaged: {problem}; {repair_hint(directory)}")
    return manifest
