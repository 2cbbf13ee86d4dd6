"""Files in and out: read documents and records (plain text, JSONL, JSON, token ids), budget them, and
check output paths before a long computation writes to them."""

from actlab.io.documents import (
    FORMATS,
    Document,
    budget,
    detect_format,
    iter_documents,
    read_documents,
    token_counter,
)
from actlab.io.outputs import check_output_dir, check_output_file
from actlab.io.records import first_record_fields, read_records

__all__ = [
    "FORMATS",
    "Document",
    "budget",
    "check_output_dir",
    "check_output_file",
    "detect_format",
    "first_record_fields",
    "iter_documents",
    "read_documents",
    "read_records",
    "token_counter",
]
