"""Token budgets: keep the leading documents that fit in a number of tokens, cutting the last one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from actlab.errors import ActlabError
from actlab.io.formats import Document

__all__ = ["budget", "token_counter"]


def token_counter(tokenizer_or_count_fn: Any, *, add_special_tokens: bool = True) -> Callable[[str], int]:
    """A ``str -> int`` token counter from a tokenizer (anything with ``encode``: HF
    tokenizers, ``tokenizers.Tokenizer``) or a plain counting function."""
    t = tokenizer_or_count_fn
    if hasattr(t, "encode"):

        def count(text: str) -> int:
            out = t.encode(text, add_special_tokens=add_special_tokens)
            return len(out.ids) if hasattr(out, "ids") else len(out)

        return count
    if callable(t):

        def count_fn(text: str) -> int:
            c = t(text)
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ActlabError(
                    f"the token counting function must return a non-negative int, got {c!r}"
                )
            return c

        return count_fn
    raise ActlabError(
        "budget needs a tokenizer (with .encode) or a function text -> token count, "
        f"got {type(t).__name__}"
    )


def _truncate_text(doc: str, limit: int, count: Callable[[str], int]) -> str:
    """Longest prefix of ``doc`` with at most ``limit`` tokens (binary search on characters)."""
    lo, hi = 0, len(doc)  # count(doc[:lo]) <= limit is kept invariant (checked by the caller)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(doc[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    cut = doc[:lo]
    stripped = cut.rstrip()  # do not end on a dangling space
    return stripped if count(stripped) <= limit else cut


def budget(
    docs: Iterable[Document],
    tokenizer_or_count_fn: Any,
    max_tokens: int,
    *,
    add_special_tokens: bool = True,
) -> list[Document]:
    """The leading documents of ``docs`` that fit in ``max_tokens`` tokens in total; the first
    document that does not fit is cut to the tokens left (text: the longest prefix that fits)
    and the rest is dropped.

    Token-id documents (lists of ints) are counted by length and cut by slicing; the counter
    may then be ``None``. For texts pass a tokenizer (each document is counted as it would
    be encoded alone, with special tokens unless ``add_special_tokens=False``) or a function
    ``text -> number of tokens``. ``docs`` may be a lazy iterator (e.g. ``iter_documents``):
    it is consumed only up to the budget.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ActlabError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    count: Callable[[str], int] | None = None
    out: list[Document] = []
    left = max_tokens
    for doc in docs:
        if isinstance(doc, list):
            if len(doc) <= left:
                out.append(doc)
                left -= len(doc)
            else:
                out.append(doc[:left])
                left = 0
        elif isinstance(doc, str):
            if count is None:
                count = token_counter(tokenizer_or_count_fn, add_special_tokens=add_special_tokens)
            n = count(doc)
            if n <= left:
                out.append(doc)
                left -= n
            else:
                if count("") <= left:
                    cut = _truncate_text(doc, left, count)
                    if cut.strip():
                        out.append(cut)
                left = 0
        else:
            raise ActlabError(
                f"documents must be strings or lists of token ids, got {type(doc).__name__}"
            )
        if left == 0:
            break
    return out
