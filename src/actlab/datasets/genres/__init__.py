"""Small held-out genre data sets bundled with actlab (built by scripts/build_genre_sets.py).

Files in this directory (all from the demo corpus' TEST split, or test + validation for the contrast
pairs; never from the data the demo models or the genre classifier were trained on):

* ``heldout.jsonl``: 300 passages of 40 tokens per genre, fields ``text``, ``genre``, ``doc``, ``n_tokens``.
* ``contrast_pairs.jsonl``: 200 pairs for steering toward scripture: ``prompt`` (the first 2-3 words
  of a sentence found in scripture and in another genre), ``pos`` (its scripture continuation),
  ``neg`` (its continuation in ``neg_genre``), ``pos_genre``, ``neg_genre``.
* ``contrast_pairs_by_genre.jsonl``: the same with each genre as ``pos_genre`` (field ``set``).
* ``neutral.txt``: 500 held-out passages of 64 tokens mixing all five genres, one per line.
"""

from __future__ import annotations

import json
from pathlib import Path

DIR = Path(__file__).parent
GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]


def _jsonl(name: str) -> list[dict]:
    with open(DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout(genre: str | None = None) -> list[dict]:
    """Held-out passages (dicts with ``text`` and ``genre``), optionally of one genre."""
    rows = _jsonl("heldout.jsonl")
    return [r for r in rows if genre is None or r["genre"] == genre]


def contrast_pairs(pos_genre: str = "scripture") -> list[dict]:
    """Contrast pairs whose ``pos`` continuation is in ``pos_genre``."""
    if pos_genre == "scripture":
        return _jsonl("contrast_pairs.jsonl")
    return [r for r in _jsonl("contrast_pairs_by_genre.jsonl") if r["pos_genre"] == pos_genre]


def neutral() -> list[str]:
    """Held-out passages mixing all genres (for perplexity)."""
    return [ln for ln in (DIR / "neutral.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]


__all__ = ["DIR", "GENRES", "heldout", "contrast_pairs", "neutral"]
