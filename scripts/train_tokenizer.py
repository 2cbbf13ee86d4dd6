#!/usr/bin/env python3
"""Train actlab's byte-level BPE tokenizer on the corpus train split and tokenize every split.

Reads work-data/corpus/{train,validation,test}.jsonl (made by scripts/build_corpus.py) and writes

  work-data/tokenizer/            a PreTrainedTokenizerFast (AutoTokenizer.from_pretrained loads it)
  work-data/tokens/<split>.bin    uint16 token ids of all documents of the split, each document
                                  followed by <|endoftext|> (id 0)
  work-data/tokens/<split>.genres.bin  uint8 genre index of every token (GENRES order)
  work-data/tokens/meta.json      vocab size, genres, token counts

Deterministic: the BPE trainer is fed the documents in file order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]
EOS = "<|endoftext|>"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return fast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=REPO / "work-data" / "corpus")
    p.add_argument("--out", type=Path, default=REPO / "work-data")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args(argv)

    if not (args.corpus / "train.jsonl").exists():
        sys.exit(f"train_tokenizer: {args.corpus / 'train.jsonl'} not found; run scripts/build_corpus.py first")
    t0 = time.time()
    train = read_jsonl(args.corpus / "train.jsonl")
    tok = build_tokenizer([r["text"] for r in train], args.vocab_size)
    tdir = args.out / "tokenizer"
    tok.save_pretrained(tdir)
    print(f"[tokenizer] vocab {len(tok)} trained on {len(train)} documents in {time.time() - t0:.1f}s -> {tdir}")

    tokdir = args.out / "tokens"
    tokdir.mkdir(parents=True, exist_ok=True)
    eos_id = tok.convert_tokens_to_ids(EOS)
    assert eos_id == 0, eos_id
    meta = {"vocab_size": len(tok), "eos_id": eos_id, "genres": GENRES, "splits": {}}
    for split in ["train", "validation", "test"]:
        rows = train if split == "train" else read_jsonl(args.corpus / f"{split}.jsonl")
        enc = tok._tokenizer.encode_batch([r["text"] for r in rows], add_special_tokens=False)
        ids, gen = [], []
        counts = {g: 0 for g in GENRES}
        nbytes = {g: 0 for g in GENRES}
        for r, e in zip(rows, enc):
            n = len(e.ids) + 1
            ids.append(np.asarray(e.ids + [eos_id], dtype=np.uint16))
            gen.append(np.full(n, GENRES.index(r["genre"]), dtype=np.uint8))
            counts[r["genre"]] += n
            nbytes[r["genre"]] += len(r["text"].encode("utf-8"))
        arr = np.concatenate(ids)
        np.concatenate(gen).tofile(tokdir / f"{split}.genres.bin")
        arr.tofile(tokdir / f"{split}.bin")
        meta["splits"][split] = {
            "tokens": int(arr.size),
            "tokens_per_genre": counts,
            "bytes_per_token_per_genre": {g: round(nbytes[g] / max(1, counts[g]), 3) for g in GENRES},
        }
        print(f"[tokenizer] {split}: {arr.size:,} tokens")
    (tokdir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[tokenizer] done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
