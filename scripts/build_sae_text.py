#!/usr/bin/env python3
"""Build the default SAE training text shipped in src/actlab/datasets/text/ (issue #13).

  train.jsonl.xz   >= 2M tokens of the demo corpus' TRAIN split (what the demo models saw), the five
                   genres in equal token shares, whole documents in a seeded order (a long document is
                   cut at a line break near --max-doc-tokens (the demo models read 256)): {"genre", "text"} per line
  eval.jsonl.xz    ~200k tokens of the VALIDATION split, built the same way: the default held-out text
                   of `sae eval` (never used for training anything bundled)
  card.json        token counts per genre and split, the tokenizer, the seed, the sources

Why a slice of the corpus: an SAE needs millions of tokens, the bundled prompt set is 6.5k. Equal
shares keep the small genres (jargon is 5% of the corpus) from being drowned by the dictionary (43%).
Deterministic. Needs work-data/corpus (scripts/build_corpus.py); counts tokens with the demo tokenizer.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import GENRES, REPO, load_split, load_tokenizer  # noqa: E402

OUT = REPO / "src" / "actlab" / "datasets" / "text"
ZOO_TOKENIZER = REPO / "src" / "actlab" / "models" / "zoo" / "demo-llama"


def pieces(text: str, tokenizer, max_tokens: int) -> list[tuple[str, int]]:
    """The document cut at line breaks into pieces of at most ``max_tokens`` tokens (a single longer
    line stays whole), each with its token count."""
    out, lines, count = [], [], 0
    for line in text.split("\n"):
        n = len(tokenizer(line + "\n")["input_ids"])
        if lines and count + n > max_tokens:
            out.append(("\n".join(lines).strip(), count))
            lines, count = [], 0
        lines.append(line)
        count += n
    if lines and "\n".join(lines).strip():
        out.append(("\n".join(lines).strip(), count))
    return [(t, n) for t, n in out if t]


def take(split: str, tokenizer, tokens_per_genre: int, seed: int, max_doc_tokens: int) -> tuple[list, dict]:
    by_genre = defaultdict(list)
    for row in load_split(split):
        by_genre[row["genre"]].append(row["text"])
    rows, counts = [], {}
    for genre in GENRES:
        docs = by_genre[genre]
        random.Random(f"{seed}-{split}-{genre}").shuffle(docs)
        total = 0
        for doc in docs:
            for text, n in pieces(doc, tokenizer, max_doc_tokens):
                rows.append({"genre": genre, "text": text})
                total += n
            if total >= tokens_per_genre:
                break
        counts[genre] = total
    random.Random(f"{seed}-{split}-order").shuffle(rows)
    return rows, counts


def write_xz(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-tokens", type=int, default=2_200_000)
    p.add_argument("--eval-tokens", type=int, default=200_000)
    p.add_argument("--max-doc-tokens", type=int, default=250)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(ZOO_TOKENIZER)
    args.out.mkdir(parents=True, exist_ok=True)
    card = {"tokenizer": "demo (src/actlab/models/zoo/demo-llama/tokenizer.json)", "seed": args.seed,
            "sources": "scripts/build_corpus.py: work-data/corpus train (train.jsonl.xz) and validation "
                       "(eval.jsonl.xz) splits", "max_doc_tokens": args.max_doc_tokens, "splits": {}}
    for name, split, budget in (("train", "train", args.train_tokens), ("eval", "validation", args.eval_tokens)):
        rows, counts = take(split, tokenizer, budget // len(GENRES), args.seed, args.max_doc_tokens)
        write_xz(args.out / f"{name}.jsonl.xz", rows)
        card["splits"][name] = {"corpus_split": split, "documents": len(rows), "tokens": sum(counts.values()),
                                "tokens_per_genre": counts}
        print(f"{name}: {len(rows)} documents, {sum(counts.values()):,} tokens, "
              f"{(args.out / f'{name}.jsonl.xz').stat().st_size / 1e6:.1f} MB", flush=True)
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
