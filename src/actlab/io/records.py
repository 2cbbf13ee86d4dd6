"""JSONL files of records (contrast pairs, training pairs): each line a JSON object with string fields,
every problem named by its line (bad UTF-8, bad JSON, a missing field, a field of the wrong type)."""

from __future__ import annotations

import os
from typing import Sequence

from actlab.errors import ActlabError
from actlab.io.formats import _iter_lines, _loads, check_file


def _fields_text(fields: Sequence[str], optional: Sequence[str]) -> str:
    text = " and ".join(repr(f) for f in fields)
    return text + (f" (and optionally {', '.join(repr(f) for f in optional)})" if optional else "")


def read_records(path: str | os.PathLike, fields: Sequence[str], optional: Sequence[str] = ()) -> list[dict[str, str]]:
    """The records of a JSONL file: ``{field: text}`` with every ``fields`` entry present and a string,
    and each ``optional`` one a string when present ("" when absent). Blank lines are skipped (a file of
    only blank lines gives no records: the caller says what an empty set means to it)."""
    p = check_file(path)
    wanted = _fields_text(fields, optional)
    rows: list[dict[str, str]] = []
    for line_no, text in _iter_lines(p):
        if not text.strip():
            continue
        where = f"{p} line {line_no}"
        row = _loads(text, where)
        if not isinstance(row, dict):
            raise ActlabError(f"{where}: expected a JSON object with {wanted}, got {type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise ActlabError(f"{where}: missing field {missing[0]!r}; every line must be a JSON object with {wanted}")
        for f in (*fields, *optional):
            if f in row and not isinstance(row[f], str):
                raise ActlabError(f"{where}: field {f!r} must be a string, got {type(row[f]).__name__}")
        rows.append({f: row.get(f, "") for f in (*fields, *optional)})
    return rows


def first_record_fields(path: str | os.PathLike) -> set[str]:
    """The keys of the first non-blank line of a JSONL file (empty when it is not a JSON object)."""
    p = check_file(path)
    for line_no, text in _iter_lines(p):
        if text.strip():
            row = _loads(text, f"{p} line {line_no}")
            return set(row) if isinstance(row, dict) else set()
    return set()
