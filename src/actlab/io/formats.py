"""Reading the document file formats: file checks, UTF-8 lines with their numbers, and one
parser per format (see ``actlab.io.documents`` for what each format is)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from actlab.errors import ActlabError

FORMATS = ("auto", "lines", "paragraphs", "jsonl", "json", "tokens")
Document = Union[str, list[int]]
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------------------- low level
def check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ActlabError(f"document file {p} not found; check the path")
    if p.is_dir():
        raise ActlabError(f"{p} is a directory; pass a document file (.txt, .jsonl, .json, .ids)")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ActlabError(f"cannot read {p}: {e}") from None
    if size == 0:
        raise ActlabError(f"{p} is empty; it must contain at least one document")
    return p


def _decode_error(
    path: Path, raw: bytes, line_no: int, line_start: int, err: UnicodeDecodeError
) -> ActlabError:
    offset = line_start + err.start
    bad = raw[err.start : err.start + 1]
    return ActlabError(
        f"{path} is not valid UTF-8: byte 0x{bad.hex()} at byte offset {offset} "
        f"(line {line_no}, byte {err.start + 1} of that line); re-encode the file as UTF-8, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
    )


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without terminator/trailing whitespace), streaming."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ActlabError(f"cannot read {path}: {e}") from None
    with f:
        offset = 0
        for line_no, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            body = raw
            if line_no == 1 and body.startswith(_BOM):
                body = body[len(_BOM) :]
                start += len(_BOM)
            if b"\x00" in body:
                raise ActlabError(
                    f"{path} line {line_no} contains NUL bytes: it looks like a binary file, "
                    "not text; pass a UTF-8 text, JSONL, JSON or token-id file"
                )
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, body, line_no, start, e) from None
            yield line_no, text.rstrip()


def _read_text(path: Path) -> str:
    lines = [text for _, text in _iter_lines(path)]  # validates UTF-8 with line numbers
    return "\n".join(lines)


def _has_interior_blank_line(path: Path) -> bool:
    seen_text = pending_blank = False
    for _, text in _iter_lines(path):
        if text.strip():
            if pending_blank and seen_text:
                return True
            seen_text, pending_blank = True, False
        else:
            pending_blank = True
    return False


def detect_format(path: str | os.PathLike) -> str:
    """The format ``"auto"`` resolves to for ``path`` (see the module docstring)."""
    p = check_file(path)
    name = p.name.lower()
    if name.endswith((".ids", ".tokens", ".tokens.jsonl")):
        return "tokens"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return "paragraphs" if _has_interior_blank_line(p) else "lines"


# ---------------------------------------------------------------------------- parsers
def _token_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        shown = json.dumps(value)[:60] if _jsonable(value) else repr(value)[:60]
        raise ActlabError(
            f"{where}: expected a list of non-negative integer token ids, got {shown}"
        )
    return value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _text_from_json(value: Any, text_field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if text_field not in value:
            keys = ", ".join(repr(k) for k in list(value)[:8]) or "none"
            hint = ""
            strings = [k for k, v in value.items() if isinstance(v, str)]
            if len(strings) == 1:
                hint = f"; pass text_field={strings[0]!r}"
            raise ActlabError(f"{where}: the object has no {text_field!r} field (keys: {keys}){hint}")
        text = value[text_field]
        if not isinstance(text, str):
            raise ActlabError(
                f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
            )
        return text
    if isinstance(value, list):
        raise ActlabError(
            f"{where}: got a JSON array, not a text; for token ids use fmt='tokens' "
            "(or a .ids / .tokens.jsonl file)"
        )
    raise ActlabError(
        f"{where}: expected a JSON object with a {text_field!r} field or a string, "
        f"got {type(value).__name__}"
    )


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ActlabError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_lines_format(path: Path) -> Iterator[str]:
    for _, text in _iter_lines(path):
        if text.strip():
            yield text


def _iter_paragraphs(path: Path) -> Iterator[str]:
    para: list[str] = []
    for _, text in _iter_lines(path):
        if text.strip():
            para.append(text)
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for line_no, text in _iter_lines(path):
        if not text.strip():
            continue
        where = f"{path} line {line_no}"
        doc = _text_from_json(_loads(text, where), text_field, where)
        if doc.strip():
            yield doc


def _iter_tokens(path: Path) -> Iterator[list[int]]:
    for line_no, text in _iter_lines(path):
        s = text.strip()
        if not s:
            continue
        where = f"{path} line {line_no}"
        if s.startswith("["):
            ids = _token_list(_loads(s, where), where)
        else:
            parts = s.replace(",", " ").split()
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                bad = next(p for p in parts if not p.lstrip("+-").isdigit())
                raise ActlabError(
                    f"{where}: {bad!r} is not an integer token id; token files hold integers "
                    "separated by spaces or commas, or a JSON array per line"
                ) from None
            if any(i < 0 for i in ids):
                raise ActlabError(f"{where}: token ids must be non-negative")
        if ids:
            yield ids


def _iter_json(path: Path, text_field: str) -> Iterator[Document]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ActlabError(
            f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
        ) from None
    if isinstance(data, dict):
        for key in ("documents", "texts", "data"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise ActlabError(
            f"{path}: expected a JSON array of documents (strings, objects with a "
            f"{text_field!r} field, or token-id arrays), got {type(data).__name__}"
        )
    for i, item in enumerate(data):
        where = f"{path} item {i}"
        if isinstance(item, list):
            ids = _token_list(item, where)
            if ids:
                yield ids
        else:
            doc = _text_from_json(item, text_field, where)
            if doc.strip():
                yield doc


_PARSERS = {
    "lines": lambda p, text_field: _iter_lines_format(p),
    "paragraphs": lambda p, text_field: _iter_paragraphs(p),
    "jsonl": _iter_jsonl,
    "json": _iter_json,
    "tokens": lambda p, text_field: _iter_tokens(p),
}


def parse(path: Path, fmt: str, text_field: str) -> Iterator[Document]:
    """The documents of ``path`` read as ``fmt`` (a format name other than ``"auto"``)."""
    return _PARSERS[fmt](path, text_field)
