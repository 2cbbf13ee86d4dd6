"""Text input: read documents from files (plain text, JSONL, JSON, token ids) and budget them."""

from actlab.io.documents import (
    FORMATS,
    Document,
    budget,
    detect_format,
    iter_documents,
    read_documents,
    token_counter,
)

__all__ = [
    "FORMATS",
    "Document",
    "budget",
    "detect_format",
    "iter_documents",
    "read_documents",
    "token_counter",
]
