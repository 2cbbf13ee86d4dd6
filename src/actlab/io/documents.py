"""Reading documents (texts or token-id lists) from files, and cutting them to a token budget.

Formats (``fmt``):

* ``"lines"``      one document per line; blank lines are skipped.
* ``"paragraphs"`` documents separated by one or more blank lines; the lines of a document
                   are joined with ``"\\n"``.
* ``"jsonl"``      one JSON value per line: an object whose ``text_field`` (default ``"text"``)
                   is a string, or a bare JSON string. Blank lines are skipped.
* ``"json"``       the whole file is one JSON array of strings, of objects with ``text_field``,
                   or of token-id arrays (``[[1, 2], [3]]``); or an object holding such an
                   array under ``"documents"``, ``"texts"`` or ``"data"``.
* ``"tokens"``     one token-id document per line, either a JSON array (``[15, 7, 99]``) or
                   integers separated by spaces or commas (``15 7 99``).
* ``"auto"``       (default) picks by file name: ``*.ids``, ``*.tokens``, ``*.tokens.jsonl``
                   -> tokens; ``*.jsonl``, ``*.ndjson`` -> jsonl; ``*.json`` -> json; anything
                   else is plain text: ``"paragraphs"`` if the file has a blank line between two
                   non-blank lines, otherwise ``"lines"``.

In text formats the line terminator (``\\n`` or ``\\r\\n``) and trailing whitespace of each line
are removed; leading whitespace is kept. Whitespace-only lines count as blank. Empty texts and
empty token lists are skipped. A UTF-8 byte-order mark at the start is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from actlab.errors import ActlabError
from actlab.io.budget import budget, token_counter
from actlab.io.formats import FORMATS, Document, check_file, detect_format, parse

__all__ = [
    "FORMATS",
    "Document",
    "detect_format",
    "iter_documents",
    "read_documents",
    "budget",
    "token_counter",
]


# ---------------------------------------------------------------------------- public API
def iter_documents(
    path: str | os.PathLike, *, fmt: str = "auto", text_field: str = "text"
) -> Iterator[Document]:
    """Yield documents one by one (texts, or token-id lists for ``fmt="tokens"``).

    Line-based formats stream the file, so memory stays small for large corpora; ``"json"``
    reads the whole file. Raises ActlabError for a missing/empty file, bad bytes or JSON (naming
    the line), and when the file holds no document at all.
    """
    if fmt not in FORMATS:
        raise ActlabError(f"unknown document format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(text_field, str) or not text_field:
        raise ActlabError(f"text_field must be a non-empty string, got {text_field!r}")
    p = check_file(path)
    if fmt == "auto":
        fmt = detect_format(p)
    gen = parse(p, fmt, text_field)
    n = 0
    for doc in gen:
        n += 1
        yield doc
    if n == 0:
        raise ActlabError(
            f"{p} contains no documents (read as {fmt!r}: only blank lines or empty texts)"
        )


def read_documents(
    path: str | os.PathLike, *, fmt: str = "auto", text_field: str = "text"
) -> list[str] | list[list[int]]:
    """All documents of ``path`` as a list; see ``iter_documents`` and the module docstring."""
    return list(iter_documents(path, fmt=fmt, text_field=text_field))
