#!/usr/bin/env python3
"""Build the small genre data sets shipped in src/actlab/datasets/genres/ from the corpus TEST split
(contrast pairs: test + validation splits; never train).

  heldout.jsonl                 40-token passages, --per-genre per genre: {"text", "genre", "doc", "n_tokens"}
  contrast_pairs.jsonl          steering pairs toward scripture: the same short prompt (the first words
                                of a sentence or line that occurs in scripture AND in another genre),
                                continued in scripture (pos) and in the other genre (neg):
                                {"prompt", "pos", "neg", "pos_genre", "neg_genre"}; pos/neg are the
                                continuations only (append them to the prompt)
  contrast_pairs_by_genre.jsonl the same construction with every genre in turn as pos_genre (+ "set")
  neutral.txt                   held-out 64-token passages mixing all genres (equal numbers, shuffled),
                                one per line (newlines inside a passage replaced by spaces)

Deterministic (fixed seeds). Needs work-data/corpus and work-data/tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import GENRES, REPO, load_split, load_tokenizer, make_passages, write_jsonl  # noqa: E402

OUT = REPO / "src" / "actlab" / "datasets" / "genres"


def sentence_starts(text: str):
    """Offsets where a line or a sentence starts with a capital letter."""
    for m in re.finditer(r"(?:^|\n|(?<=[.!?;:] ))(?=[A-Z][a-z]*\b)", text):
        yield m.start() if text[m.start() : m.start() + 1] != "\n" else m.start() + 1


def index_prompts(rows, tok, n_words: int, cont_tokens: int):
    """{prompt: {genre: [continuation, ...]}} for prompts made of the first ``n_words`` words."""
    idx: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    word = re.compile(r"[A-Za-z']+")
    for r in rows:
        text = r["text"]
        for s in sentence_starts(text):
            seg = text[s : s + 400]
            m = re.match(r"^((?:[A-Za-z']+ ){%d}[A-Za-z']+)(?= )" % (n_words - 1), seg)
            if not m:
                continue
            prompt = m.group(1)
            if not all(word.fullmatch(w) for w in prompt.split()):
                continue
            rest = seg[len(prompt) :]
            ids = tok(rest, add_special_tokens=False)["input_ids"][:cont_tokens]
            if len(ids) < cont_tokens // 2:
                continue
            cont = tok.decode(ids)
            cont = cont.split("\n\n")[0].rstrip()
            if len(cont.strip()) < 15:
                continue
            idx[prompt][r["genre"]].append(cont)
    return idx


def build_pairs(idx, pos_genre: str, n_pairs: int, seed: int, per_prompt: int = 4):
    rng = random.Random(f"{seed}-{pos_genre}")
    prompts = sorted(p for p, g in idx.items() if pos_genre in g and any(h != pos_genre for h in g))
    rng.shuffle(prompts)
    others = [g for g in GENRES if g != pos_genre]
    pairs, k = [], 0
    for rnd in range(per_prompt):
        for p in prompts:
            g = idx[p]
            avail = [h for h in others if h in g]
            # rotate through the other genres so that neg genres stay balanced
            neg_genre = min(avail, key=lambda h: (sum(1 for x in pairs if x["neg_genre"] == h), others.index(h)))
            if rnd >= len(g[pos_genre]) or rnd >= len(g[neg_genre]) * 2:
                continue
            pos = g[pos_genre][rng.randrange(len(g[pos_genre]))]
            neg = g[neg_genre][rng.randrange(len(g[neg_genre]))]
            pair = {"prompt": p, "pos": pos, "neg": neg, "pos_genre": pos_genre, "neg_genre": neg_genre}
            if pair in pairs:
                continue
            pairs.append(pair)
            k += 1
            if k >= n_pairs:
                return pairs
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--per-genre", type=int, default=300, help="held-out passages per genre")
    p.add_argument("--neutral-per-genre", type=int, default=100)
    p.add_argument("--pairs", type=int, default=200, help="scripture contrast pairs")
    p.add_argument("--pairs-per-genre", type=int, default=100)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)

    tok = load_tokenizer()
    test = load_split("test")
    seen: set[str] = set()
    held = make_passages(test, tok, 40, args.per_genre, args.seed, per_doc=10, exclude=seen)
    write_jsonl(args.out / "heldout.jsonl", held)
    neutral = make_passages(test, tok, 64, args.neutral_per_genre, args.seed + 1, per_doc=3, exclude=seen)
    random.Random(args.seed).shuffle(neutral)
    lines = [" ".join(r["text"].split()) for r in neutral]
    (args.out / "neutral.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # prompts come from the test and validation splits (never train); held-out passages from test only
    pair_rows = test + load_split("validation")
    idx2 = index_prompts(pair_rows, tok, 2, 24)
    idx3 = index_prompts(pair_rows, tok, 3, 24)
    merged = defaultdict(lambda: defaultdict(list))
    for idx in (idx3, idx2):  # three-word prompts first (more specific), then two-word ones
        for pr, g in idx.items():
            for h, conts in g.items():
                merged[pr][h].extend(conts)
    pairs = build_pairs(merged, "scripture", args.pairs, args.seed)
    write_jsonl(args.out / "contrast_pairs.jsonl", pairs)
    allpairs = []
    for g in GENRES:
        for pr in build_pairs(merged, g, args.pairs_per_genre, args.seed + 1):
            allpairs.append({"set": f"{g}_vs_other", **pr})
    write_jsonl(args.out / "contrast_pairs_by_genre.jsonl", allpairs)

    counts = {g: sum(1 for r in held if r["genre"] == g) for g in GENRES}
    print(f"[genre-sets] heldout.jsonl: {len(held)} passages {json.dumps(counts)}")
    print(f"[genre-sets] neutral.txt: {len(lines)} passages")
    negs = {g: sum(1 for r in pairs if r["neg_genre"] == g) for g in GENRES}
    print(f"[genre-sets] contrast_pairs.jsonl: {len(pairs)} pairs (neg genres {json.dumps(negs)})")
    sets = {g: sum(1 for r in allpairs if r["pos_genre"] == g) for g in GENRES}
    print(f"[genre-sets] contrast_pairs_by_genre.jsonl: {len(allpairs)} pairs {json.dumps(sets)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
