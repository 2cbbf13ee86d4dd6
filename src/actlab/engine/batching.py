"""Turn documents into padded model inputs: tokenise, split long documents, pad left or right."""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch

from actlab.errors import ActlabError

LongDocs = Literal["chunk", "truncate"]
Positions = str | tuple[int | None, int | None]


#: a custom token selection: (rows of a batch, padded width) -> [batch, width] bool of tokens for the sinks
Selector = Callable[[Sequence["Row"], int], torch.Tensor]


@dataclass
class Row:
    """One model input row: a window of one document's tokens."""

    doc_id: int
    start: int  # position of ids[0] inside the document
    ids: list[int]
    doc_length: int  # tokens in the whole document
    prompt_length: int = 0  # document positions before this are prompt (scored tokens start here)


def encode_pair(tokenizer, prompt: str, continuation: str, *, max_length: int | None,
                max_continuation: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its continuation, laid out as one sequence ``prompt + continuation``.

    The prompt gets the tokenizer's special tokens (BOS); the continuation gets them only when there
    is no prompt, so ``prompt + continuation`` starts like a tokenised document. The continuation is
    cut to ``max_continuation`` tokens; when the pair exceeds ``max_length`` the prompt loses its
    *start* (at least one prompt token is kept: the continuation's first token needs a context)
    and the continuation its end. ``max_length=None``: no limit (the runner chunks long rows).
    """
    p = list(tokenizer([prompt], add_special_tokens=True)["input_ids"][0]) if prompt else []
    c = list(tokenizer([continuation], add_special_tokens=not prompt)["input_ids"][0])
    if max_continuation is not None:
        c = c[:max_continuation]
    if max_length is not None and len(p) + len(c) > max_length:
        p = p[-max(1, max_length - len(c)):]
        c = c[: max_length - len(p)]
    return p, c


def pair_rows(pairs: Sequence[tuple[list[int], list[int]]], doc_offset: int = 0) -> list[Row]:
    """One row per (prompt ids, continuation ids) pair, its prompt marked by ``prompt_length``."""
    rows = []
    for k, (p, c) in enumerate(pairs):
        ids = list(p) + list(c)
        rows.append(Row(doc_offset + k, 0, ids, len(ids), prompt_length=len(p)))
    return rows


def continuation_mask(rows: Sequence[Row], width: int) -> torch.Tensor:
    """A ``Selector``: the real tokens at or after each row's ``prompt_length`` (the scored continuation)."""
    sel = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.ids)
        sel[i, :n] = (row.start + torch.arange(n)) >= row.prompt_length
    return sel


# ------------------------------------------------------------------ checking documents and token ids
def token_id(value, where: str) -> int:
    """One token id: an integer (numpy and torch integers too), never a float or a bool."""
    if isinstance(value, (bool, float)):
        raise ActlabError(f"{where} holds {value!r}: token ids are integers")
    try:
        return operator.index(value)
    except TypeError:
        raise ActlabError(f"{where} holds a {type(value).__name__}: token ids are integers") from None


def check_token_range(low: int, high: int, vocab: int | None) -> None:
    """Token ids must index the model's vocabulary (else the embedding fails with an IndexError)."""
    if vocab is not None and (high >= vocab or low < 0):
        bad = high if high >= vocab else low
        raise ActlabError(f"token id {bad} is outside this model's vocabulary: token ids must lie in [0, {vocab}); "
                          "were the ids made with another tokenizer?")


def id_lists(items: Sequence, name: str, *, allow_empty: bool) -> list[list[int]]:
    """Token-id lists checked one by one (tensors and arrays are taken as lists)."""
    rows: list[list[int]] = []
    for i, row in enumerate(items):
        if hasattr(row, "tolist") and not isinstance(row, (list, tuple)):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise ActlabError(f"{name}[{i}] is {type(row).__name__}, not a token-id list: {name} must be all texts "
                              "or all token-id lists")
        if not row and not allow_empty:
            raise ActlabError(f"{name}[{i}] is an empty token-id list: every row needs at least one token")
        try:
            rows.append([operator.index(x) for x in row])  # the fast path; floats and strings fail it
        except TypeError:
            rows.append([token_id(x, f"{name}[{i}]") for x in row])  # names the bad value
    return rows


def check_documents(docs) -> list:
    """``docs`` as a list of texts or of token-id lists; a single string (a sequence of characters,
    never meant as documents) or a mixed list is refused."""
    if isinstance(docs, (str, bytes)):
        shown = docs[:30]
        raise ActlabError(f"docs must be a list of documents, not the single string {shown!r}: wrap one "
                          f"document in a list: [{shown!r}]")
    if docs is None or isinstance(docs, dict) or not hasattr(docs, "__iter__"):
        raise ActlabError(f"docs must be a list of texts or of token-id lists, not {type(docs).__name__}")
    items = list(docs)
    if items and isinstance(items[0], str):
        for i, doc in enumerate(items):
            if not isinstance(doc, str):
                raise ActlabError(f"docs[{i}] is {type(doc).__name__}, not a text: docs must be all texts or all "
                                  "token-id lists")
        return items
    return id_lists(items, "docs", allow_empty=True)


def tokenize_documents(
    tokenizer,
    docs: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_length: int,
    long_docs: LongDocs = "chunk",
    doc_offset: int = 0,
) -> list[Row]:
    """Tokenise documents (or take token ids as given) and split them into rows of <= max_length.

    Long documents are split into consecutive windows ("chunk", the default: nothing is lost and
    positions keep counting inside the document) or cut at max_length with a warning ("truncate").
    Empty documents are skipped; their document ids stay reserved so ids match the input order.
    """
    docs = check_documents(docs)
    if len(docs) == 0:
        raise ActlabError("no documents to run: the input is empty (give at least one non-empty text)")
    if isinstance(docs[0], str):
        if tokenizer is None:
            raise ActlabError("this model has no tokenizer: pass token-id lists, or load it with tokenizer=...")
        encoded = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    else:
        encoded = docs
    rows: list[Row] = []
    truncated = 0
    for k, ids in enumerate(encoded):
        doc_id = doc_offset + k
        if not ids:
            continue
        if len(ids) > max_length and long_docs == "truncate":
            truncated += 1
            ids = ids[:max_length]
        for start in range(0, len(ids), max_length):
            rows.append(Row(doc_id, start, ids[start : start + max_length], len(ids)))
    if truncated:
        warnings.warn(
            f"{truncated} document(s) longer than the model context ({max_length} tokens) were truncated; "
            "use long_docs='chunk' to keep every token",
            stacklevel=2,
        )
    if not rows:
        raise ActlabError("every document is empty after tokenisation: nothing to run")
    return rows


def pad(rows_ids: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into [batch, T] ids and attention mask."""
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, r in enumerate(rows_ids):
        n = len(r)
        if side == "left":
            ids[i, width - n :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - n :] = 1
        else:
            ids[i, :n] = torch.tensor(r, dtype=torch.long)
            mask[i, :n] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def batches(rows: list[Row], batch_size: int) -> Iterator[list[Row]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


def selection_mask(rows: list[Row], width: int, positions: Positions) -> torch.Tensor:
    """[batch, width] bool: which (right-padded) columns to send to the sinks.

    ``positions`` is "all", "last" (the last token of each document), or a (start, stop) span of
    document positions with Python slice semantics (negative values count from the document end).
    """
    sel = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.ids)
        if positions == "all":
            sel[i, :n] = True
        elif positions == "last":
            if row.start + n == row.doc_length:
                sel[i, n - 1] = True
        elif isinstance(positions, tuple) and len(positions) == 2:
            lo, hi, _ = slice(*positions).indices(row.doc_length)
            a, b = max(lo - row.start, 0), min(hi - row.start, n)
            if a < b:
                sel[i, a:b] = True
        else:
            raise ActlabError(f"positions must be 'all', 'last' or a (start, stop) span, not {positions!r}")
    return sel
