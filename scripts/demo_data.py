"""Helpers shared by the demo-model scripts (corpus files, passage sampling). Not a CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "work-data" / "corpus"
TOKENIZER = REPO / "work-data" / "tokenizer"
GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        sys.exit(f"{path} not found; run scripts/build_corpus.py first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def load_split(split: str) -> list[dict]:
    return read_jsonl(CORPUS / f"{split}.jsonl")


def load_tokenizer(path: Path | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path or TOKENIZER))
    tok.model_max_length = 10**9  # scripts tokenize whole documents; silence the length warning
    return tok


def make_passages(rows: list[dict], tokenizer, n_tokens: int, per_genre: int, seed: int,
                  min_tokens: int | None = None, per_doc: int = 2, genres=GENRES,
                  exclude: set[str] | None = None) -> list[dict]:
    """Sample passages of ``n_tokens`` tokens (fewer only for short documents, never fewer than
    ``min_tokens``) that start at a line start of a document. Deterministic given ``seed``."""
    min_tokens = min_tokens if min_tokens is not None else n_tokens
    exclude = exclude or set()
    rng = random.Random(seed)
    out = []
    for genre in genres:
        docs = [r for r in rows if r["genre"] == genre]
        rng.shuffle(docs)
        got = 0
        for d in docs:
            text = d["text"]
            starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text) and not text[i + 1].isspace()]
            rng.shuffle(starts)
            taken = 0
            for s in starts:
                ids = tokenizer(text[s : s + 12 * n_tokens], add_special_tokens=False)["input_ids"][:n_tokens]
                if len(ids) < min_tokens:
                    continue
                passage = tokenizer.decode(ids).strip()
                if passage in exclude or len(passage) < 20:
                    continue
                exclude.add(passage)
                out.append({"text": passage, "genre": genre, "doc": d["id"], "n_tokens": len(ids)})
                taken += 1
                got += 1
                if taken >= per_doc or got >= per_genre:
                    break
            if got >= per_genre:
                break
    return out
