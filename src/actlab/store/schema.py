"""What a store manifest may hold: the type and range of every field, and how the fields agree.

``read_manifest`` runs these checks before anything reads a store, resumes it or verifies it, so
no number of a manifest is trusted: every count is checked against the others (shapes against
sites and the plan, each shard entry against the plan and the storage dtype), a shard's ``file``
must be the store's own name for its index, and nothing loops over or allocates by a number from
the header (checks walk the listed shards only). A shard entry's agreement with its file (size,
checksum, tensor shapes, the file's own header) is checked where the file is opened
(``store.checks``).
"""

from __future__ import annotations

import re
from typing import Any

from actlab.files import brief
from actlab.store.manifest import INDEX_KEYS, shard_name, torch_dtype

HEX64 = re.compile(r"^[0-9a-f]{64}$")
STORE_DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_HEADER_MIN = 8  # the 8-byte header length every safetensors file starts with
PLAN_INTS = {"n_shards": 1, "n_tokens": 1, "n_rows": 1, "n_documents_input": 1, "max_length": 1, "shard_tokens": 1}


def show(value: Any, limit: int = 40) -> str:
    """A value for a one-line message, cut to ``limit`` characters (a 4000-digit number stays short)."""
    return brief(value, limit)


INT64_MAX = 2**63 - 1  # every count and offset of a store is an int64 in its shards


def is_int(value: Any, lo: int = 0, hi: int = INT64_MAX) -> bool:
    """An int (never a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


# ------------------------------------------------------------------ the header
def _sites_problem(sites: Any) -> str | None:
    if not isinstance(sites, dict) or not sites:
        return f"'sites' should be a non-empty object {{site: width}}, not {show(sites)}"
    for site, width in sites.items():
        if not site or site in INDEX_KEYS:
            return f"'sites' names a site {show(site)}, which is not a site name"
        if not is_int(width, 1):
            return f"site {show(site)} has width {show(width)}, not a positive integer"
    return None


def _plan_problem(plan: Any) -> str | None:
    if not isinstance(plan, dict):
        return f"'plan' should be an object, not {show(plan)}"
    for key, lo in PLAN_INTS.items():
        if not is_int(plan.get(key), lo):
            return f"plan.{key} is {show(plan.get(key))}, not an integer of at least {lo}"
    if not plan["n_shards"] <= plan["n_rows"] <= plan["n_tokens"]:
        return (f"the plan's counts disagree: {show(plan['n_shards'])} shards, {show(plan['n_rows'])} rows and "
                f"{show(plan['n_tokens'])} tokens (each shard holds rows, each row tokens)")
    max_tokens = plan.get("max_tokens")
    if max_tokens is not None and not is_int(max_tokens, plan["n_tokens"]):
        return f"plan.max_tokens is {show(max_tokens)}, but the plan holds {plan['n_tokens']} tokens"
    if not isinstance(plan.get("long_docs"), str):
        return f"plan.long_docs is {show(plan.get('long_docs'))}, not a string"
    for key in ("input_sha256", "plan_sha256"):
        if not isinstance(plan.get(key), str) or not HEX64.match(plan[key]):
            return f"plan.{key} is {show(plan.get(key))}, not a sha256 hex digest"
    return None


def _positions_problem(positions: Any) -> str | None:
    if positions in ("all", "last"):
        return None
    if isinstance(positions, list) and len(positions) == 2 and all(p is None or is_int(p, -INT64_MAX) for p in positions):
        return None
    return f"'positions' is {show(positions)}, not \"all\", \"last\" or [start, stop]"


def _shapes_problem(manifest: dict) -> str | None:
    n, sites, shapes = manifest["plan"]["n_tokens"], manifest["sites"], manifest.get("shapes")
    want = {**{s: [n, w] for s, w in sites.items()}, **{k: [n] for k in INDEX_KEYS}}
    if not isinstance(shapes, dict) or shapes != want:
        return (f"'shapes' {show(shapes, 80)} disagrees with the sites and the plan's {n} tokens "
                f"(expected {show(want, 80)})")
    return None


def header_problem(manifest: dict) -> str | None:
    """The first thing wrong with the manifest's header (everything but the shard list), or None."""
    if not isinstance(manifest.get("model"), dict):
        return f"'model' should be an object, not {show(manifest.get('model'))}"
    for key in ("model_dtype", "actlab_version"):
        if key in manifest and not isinstance(manifest[key], str):
            return f"'{key}' is {show(manifest[key])}, not a string"
    if manifest.get("dtype") not in STORE_DTYPES:
        return f"'dtype' is {show(manifest.get('dtype'))}, not one of {', '.join(STORE_DTYPES)}"
    problem = _sites_problem(manifest.get("sites")) or _plan_problem(manifest.get("plan"))
    problem = problem or _positions_problem(manifest.get("positions")) or _shapes_problem(manifest)
    if problem:
        return problem
    if not is_int(manifest.get("n_tokens"), 0):
        return f"'n_tokens' is {show(manifest.get('n_tokens'))}, not a non-negative integer"
    if "n_documents" in manifest and not is_int(manifest["n_documents"], 0, manifest["plan"]["n_documents_input"]):
        return f"'n_documents' is {show(manifest['n_documents'])}, not a count of the input documents"
    if not isinstance(manifest.get("complete", False), bool):
        return f"'complete' is {show(manifest.get('complete'))}, not true or false"
    if not isinstance(manifest.get("shards"), list):  # its entries: shards_problem (repairable)
        return f"'shards' should be a list, not {show(manifest.get('shards'))}"
    return None


# ------------------------------------------------------------------ the shard entries
def bytes_per_token(manifest: dict) -> int:
    """Bytes every stored token takes in a shard file: its sites in the storage dtype, and the index keys."""
    return sum(manifest["sites"].values()) * torch_dtype(manifest["dtype"]).itemsize + 8 * len(INDEX_KEYS)


def entry_problem(entry: Any, manifest: dict) -> str | None:
    """What is wrong with one shard entry on its own (the header is sound), or None."""
    if not isinstance(entry, dict):
        return f"a shard entry is {show(entry)}, not an object"
    plan = manifest["plan"]
    index = entry.get("index")
    if not is_int(index, 0, plan["n_shards"] - 1):
        return f"a shard entry has index {show(index)}; the plan has shards 0 to {plan['n_shards'] - 1}"
    name = shard_name(index)
    if entry.get("file") != name:
        return f"shard {index} names its file {show(entry.get('file'))}; it must be the bare file name {name}"
    n, offset = entry.get("n_tokens"), entry.get("token_offset")
    if not is_int(n, 1) or not is_int(offset, 0):
        return (f"{name}: n_tokens {show(n)} or token_offset {show(offset)} is not a token count "
                "(an integer below 2^63; n_tokens at least 1)")
    if offset + n > plan["n_tokens"]:
        return f"{name}: n_tokens {show(n)} at token_offset {show(offset)} go past the plan's {plan['n_tokens']} tokens"
    if offset < index or plan["n_tokens"] - offset - n < plan["n_shards"] - 1 - index:
        return f"{name}: token_offset {offset} leaves no room for the other shards (each holds at least one token)"
    if index == plan["n_shards"] - 1 and offset + n != plan["n_tokens"]:
        return f"{name}, the last shard, ends at token {offset + n}, not at the plan's {plan['n_tokens']}"
    rows, docs = entry.get("rows"), entry.get("doc_ids")
    if not (isinstance(rows, list) and len(rows) == 2 and is_int(rows[0], 0) and is_int(rows[1], rows[0] + 1, plan["n_rows"])):
        return f"{name}: rows {show(rows)} is not a span [first, end) of the plan's {plan['n_rows']} rows"
    if rows[0] < index or plan["n_rows"] - rows[1] < plan["n_shards"] - 1 - index:
        return f"{name}: rows {rows} leave no room for the other shards (each holds at least one row)"
    if index == plan["n_shards"] - 1 and rows[1] != plan["n_rows"]:
        return f"{name}, the last shard, ends at row {rows[1]}, not at the plan's {plan['n_rows']}"
    last_doc = plan["n_documents_input"] - 1
    if not (isinstance(docs, list) and len(docs) == 2 and is_int(docs[0], 0) and is_int(docs[1], docs[0], last_doc)):
        return f"{name}: doc_ids {show(docs)} is not a span [first, last] of the input's documents"
    if not is_int(entry.get("batch_size"), 1):
        return f"{name}: batch_size {show(entry.get('batch_size'))} is not a positive integer"
    least = n * bytes_per_token(manifest) + SAFETENSORS_HEADER_MIN
    if not is_int(entry.get("bytes"), least):
        return f"{name}: {show(entry.get('bytes'))} bytes cannot hold {n} tokens (at least {least} bytes)"
    if not isinstance(entry.get("sha256"), str) or not HEX64.match(entry["sha256"]):
        return f"{name}: sha256 {show(entry.get('sha256'))} is not a sha256 hex digest"
    return None


def listing_problem(entries: list[dict]) -> str | None:
    """What is wrong with sound entries taken together (one entry per shard, in token order), or None."""
    previous = None
    for entry in sorted(entries, key=lambda e: e["index"]):
        name = entry["file"]
        if previous is None:
            if entry["index"] == 0 and (entry["token_offset"], entry["rows"][0]) != (0, 0):
                return f"{name}: the first shard starts at token {entry['token_offset']}, row {entry['rows'][0]}, not 0"
        elif entry["index"] == previous["index"]:
            return f"shard {entry['index']} is listed twice"
        else:
            end, row_end = previous["token_offset"] + previous["n_tokens"], previous["rows"][1]
            start = (entry["token_offset"], entry["rows"][0])
            if entry["index"] == previous["index"] + 1:  # next to each other: exactly where the previous ends
                broken = start != (end, row_end)
            else:  # a gap of unrecorded shards between them, each of at least one row and one token
                gap = entry["index"] - previous["index"] - 1
                broken = start[0] < end + gap or start[1] < row_end + gap
            if broken:
                return (f"{name}: token offset {start[0]} (row {start[1]}) does not follow "
                        f"{previous['file']}, which ends at token {end} (row {row_end})")
        previous = entry
    return None


def shards_problem(manifest: dict) -> str | None:
    """The first problem of the shard list (each entry, then the entries together), or None."""
    for entry in manifest["shards"]:
        problem = entry_problem(entry, manifest)
        if problem:
            return problem
    return listing_problem(manifest["shards"])
