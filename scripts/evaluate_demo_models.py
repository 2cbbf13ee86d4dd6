#!/usr/bin/env python3
"""Evaluate the exported demo models and write their model cards.

For each model in src/actlab/models/zoo/<name>/ (exported by scripts/train_demo_models.py):

* validation perplexity per genre (non-overlapping 256-token windows of the tokenized validation
  split, documents joined by <|endoftext|> exactly as in training), next to a unigram baseline
  (add-one-smoothed token frequencies of the train split) on the same tokens;
* perplexity on the shipped neutral set (src/actlab/datasets/genres/neutral.txt) with
  actlab.evals.perplexity (all 500 passages, and the first 100 and first 20, which the tests recompute);
* three sample generations;
* the genre-classifier rate of generations prompted with each genre's document openings
  (first 8 tokens of test-split documents; 40 new sampled tokens; the continuation alone is
  classified), plus the genre mix of unprompted samples;

and writes eval_results.json and README.md (the model card) into the model directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import GENRES, REPO, load_split, read_jsonl  # noqa: E402

sys.path.insert(0, str(REPO / "src"))
ZOO = REPO / "src" / "actlab" / "models" / "zoo"
GENRE_DIR = REPO / "src" / "actlab" / "datasets" / "genres"

SAMPLE_PROMPTS = ["And the LORD said unto", "The function returns", "hacker (noun):"]
SEQ = 256


def genre_windows(tokdir: Path, split: str, max_windows: int):
    ids = np.fromfile(tokdir / f"{split}.bin", dtype=np.uint16)
    gen = np.fromfile(tokdir / f"{split}.genres.bin", dtype=np.uint8)
    out = {}
    for gi, g in enumerate(GENRES):
        stream = ids[gen == gi].astype(np.int64)
        n = stream.size // SEQ
        w = stream[: n * SEQ].reshape(n, SEQ)
        if n > max_windows:  # evenly spaced windows, deterministic
            w = w[np.linspace(0, n - 1, max_windows).astype(int)]
        out[g] = w
    return out


def unigram_logprobs(tokdir: Path, vocab: int, genre: int | None = None) -> np.ndarray:
    """Add-one-smoothed unigram log-probabilities of the train tokens (of one genre, if given)."""
    ids = np.fromfile(tokdir / "train.bin", dtype=np.uint16)
    if genre is not None:
        ids = ids[np.fromfile(tokdir / "train.genres.bin", dtype=np.uint8) == genre]
    c = np.bincount(ids, minlength=vocab).astype(np.float64) + 1.0
    return np.log(c / c.sum())


def window_ppl(model, windows: np.ndarray, batch: int = 16) -> tuple[float, int]:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i : i + batch])
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            n += x[:, 1:].numel()
    return math.exp(nll / n), n


def generate(model, tok, prompt_ids: list[list[int]], new_tokens: int, seed: int,
             temperature: float = 0.8, top_k: int = 40) -> list[str]:
    """Sample continuations of equal-length prompts (no padding needed); returns the continuations,
    each cut at its first <|endoftext|>."""
    import torch

    torch.manual_seed(seed)
    x = torch.tensor(prompt_ids, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                             temperature=temperature, top_k=top_k, max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id)
    conts = []
    for o in out.tolist():
        new = o[x.shape[1] :]
        if tok.eos_token_id in new:  # a finished document: keep only its own text
            new = new[: new.index(tok.eos_token_id)]
        conts.append(tok.decode(new))
    return conts


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (sensible near 0 and 1, unlike rate ± 2·SE)."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def md_escape(s: str) -> str:
    return s.replace("```", "'''")


def arch_rows(cfg) -> list[tuple[str, str]]:
    if cfg.model_type == "gpt2":
        return [
            ("class", "GPT2LMHeadModel"),
            ("layers x width", f"{cfg.n_layer} x {cfg.n_embd}"),
            ("attention heads", f"{cfg.n_head} (head dim {cfg.n_embd // cfg.n_head})"),
            ("MLP", f"{cfg.n_embd} -> {cfg.n_inner} -> {cfg.n_embd}, {cfg.activation_function.upper()}"),
            ("positions", f"learned, {cfg.n_positions}"),
            ("normalisation", "LayerNorm (pre-norm)"),
            ("vocabulary", f"{cfg.vocab_size} (byte-level BPE)"),
            ("tied input/output embeddings", str(cfg.tie_word_embeddings)),
        ]
    return [
        ("class", "LlamaForCausalLM"),
        ("layers x width", f"{cfg.num_hidden_layers} x {cfg.hidden_size}"),
        ("attention heads", f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value "
                            f"(grouped-query, head dim {cfg.hidden_size // cfg.num_attention_heads})"),
        ("MLP", f"SwiGLU {cfg.hidden_size} -> {cfg.intermediate_size} -> {cfg.hidden_size} ({cfg.hidden_act})"),
        ("positions", f"RoPE (theta {getattr(cfg, 'rope_theta', None) or (cfg.rope_parameters or {}).get('rope_theta')}), "
                      f"context {cfg.max_position_embeddings}"),
        ("normalisation", f"RMSNorm (eps {cfg.rms_norm_eps})"),
        ("vocabulary", f"{cfg.vocab_size} (byte-level BPE)"),
        ("tied input/output embeddings", str(cfg.tie_word_embeddings)),
    ]


SAMPLING = {"genre-balanced": "genre-balanced: each 256-token window comes from one genre's own stream, "
                               "the genre drawn uniformly"}


def write_card(d: Path, name: str, cfg, res: dict, summary: dict) -> None:
    clf = res["classifier"]
    L = [f"# {name}", ""]
    L += [f"A small demo causal language model bundled with actlab, trained from scratch by "
          f"`scripts/train_demo_models.py` on actlab's five-genre English corpus (scripture, fortunes, "
          f"jargon, techdoc, dictionary; built from Debian packages by `scripts/build_corpus.py`, see "
          f"`docs/demo_models.md`). It is meant for exercising activation tools, not for producing good text.", ""]
    L += ["## Architecture", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in arch_rows(cfg)]
    L += [f"| parameters | {summary['parameters']:,} |",
          "| weights | float16 safetensors (`model.safetensors`) |", ""]
    L += ["## Training", "", "| | |", "|---|---|",
          f"| tokens seen | {summary['tokens_seen']:,} ({summary['steps']} steps x {summary['batch_size']} x "
          f"{summary['seq_len']} tokens; {summary['epochs']} epochs of the {summary['train_tokens_available']:,}-token train split) |",
          f"| data sampling | {SAMPLING.get(summary.get('sampling'), 'random windows of the train stream')} |",
          f"| optimiser | {summary['optimizer']} |",
          f"| learning rate | peak {summary['peak_lr']}, {summary['schedule']} |",
          f"| seed / threads | {summary['seed']} / {summary['threads']} (CPU, torch {summary['torch']}) |",
          f"| training time | {summary['training_seconds'] / 60:.1f} min wall-clock on one CPU thread "
          f"(2-core machine shared with the other model's run and other work) |",
          f"| final validation loss | {summary['final_val_loss']:.3f} nats/token (fixed validation windows; "
          f"{'the same number per genre' if summary.get('sampling') else 'evenly spaced'}) |", ""]
    L += ["## Validation perplexity per genre", "",
          f"Token-level perplexity on non-overlapping {SEQ}-token windows of the validation split (up to "
          f"{res['max_windows']} windows per genre; float16 weights computed in float32). The unigram baselines "
          "use add-one-smoothed token frequencies of the whole train split, or of the train documents of "
          "that genre (an oracle that knows the genre), on the same tokens.", "",
          "| genre | tokens | model ppl | unigram ppl | genre-unigram ppl |", "|---|---:|---:|---:|---:|"]
    for g in GENRES:
        r = res["per_genre"][g]
        L.append(f"| {g} | {r['tokens']:,} | {r['ppl']:.2f} | {r['unigram_ppl']:.1f} | {r['genre_unigram_ppl']:.1f} |")
    a = res["all_genres"]
    L.append(f"| all (token-weighted) | {a['tokens']:,} | {a['ppl']:.2f} | {a['unigram_ppl']:.1f} | "
             f"{a['genre_unigram_ppl']:.1f} |")
    L += ["", f"`actlab.evals.perplexity` on the shipped `datasets/genres/neutral.txt` (500 mixed-genre "
              f"passages): **{res['neutral']['ppl_all']:.2f}** (first 100 passages: {res['neutral']['ppl_first100']:.2f}).", ""]
    L += ["## Sample generations", "",
          f"Sampling with temperature {res['sampling']['temperature']}, top-k {res['sampling']['top_k']}, "
          f"seed {res['sampling']['seed']}, {res['sampling']['sample_tokens']} new tokens.", ""]
    for s in res["samples"]:
        L += [f"**Prompt:** `{s['prompt']}`", "", "```text", md_escape(s["prompt"] + s["continuation"]), "```", ""]
    L += ["## Genre of generations", "",
          f"For each genre, {res['genre_rate']['n_per_genre']} test-split documents of that genre give their first "
          f"{res['genre_rate']['prompt_tokens']} tokens, after `<|endoftext|>` as every document opens in training, "
          f"as the prompt; the model samples "
          f"{res['genre_rate']['new_tokens']} tokens and the bundled genre classifier "
          f"(`actlab.evals.genre`, {clf['test_accuracy'] * 100:.1f}% accuracy on 40-token test passages, chance "
          f"{100 / len(GENRES):.0f}%) labels the continuation alone. Rate = fraction labelled with the prompt's genre.", "",
          "| prompt genre | genre rate of generations | 95% interval (Wilson) |", "|---|---:|---:|"]
    for g in GENRES:
        lo, hi = wilson(res['genre_rate']['rates'][g], res['genre_rate']['n_per_genre'])
        L.append(f"| {g} | {res['genre_rate']['rates'][g]:.2f} | {lo:.2f}–{hi:.2f} |")
    mix = res["genre_rate"]["unprompted_mix"]
    L += ["", "Genre mix of unprompted samples (prompt = `<|endoftext|>`): "
          + ", ".join(f"{g} {mix[g]:.2f}" for g in GENRES) + ".", ""]
    L += ["## Use", "", "```python",
          "from transformers import AutoModelForCausalLM, AutoTokenizer",
          "from importlib.resources import files",
          f"path = str(files('actlab') / 'models' / 'zoo' / '{name}')",
          "tok = AutoTokenizer.from_pretrained(path)",
          "model = AutoModelForCausalLM.from_pretrained(path)",
          "```", "", f"or `actlab.load('{name}')`.", ""]
    L += ["## Reproduce", "", "```bash",
          "sudo .venv/bin/python scripts/build_corpus.py          # apt-get installs the 5 source packages",
          ".venv/bin/python scripts/train_tokenizer.py",
          f".venv/bin/python scripts/train_demo_models.py {name}   # rerun the same command to resume",
          ".venv/bin/python scripts/train_genre_classifier.py",
          ".venv/bin/python scripts/build_genre_sets.py",
          f".venv/bin/python scripts/evaluate_demo_models.py {name}",
          "```", "",
          "Training data licences: King James Bible (public domain), BSD fortune files, the Jargon File "
          "(public domain), Python documentation (PSF License), WordNet 3.0 (WordNet licence). See "
          "`docs/demo_models.md` for the data card.", ""]
    (d / "README.md").write_text("\n".join(L))


def evaluate(name: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actlab.evals import perplexity
    from actlab.evals.genre import GenreClassifier

    d = args.zoo / name
    if not (d / "config.json").exists():
        sys.exit(f"evaluate_demo_models: {d} has no exported model; run scripts/train_demo_models.py {name}")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    summary = json.loads((d / "training_summary.json").read_text())
    tokdir = REPO / "work-data" / "tokens"
    uni = unigram_logprobs(tokdir, model.config.vocab_size)
    res: dict = {"model": name, "max_windows": args.max_windows, "per_genre": {}}
    tot = {"nll": 0.0, "uni": 0.0, "unig": 0.0, "n": 0}
    for g, w in genre_windows(tokdir, "validation", args.max_windows).items():
        ppl, n = window_ppl(model, w)
        tgt = w[:, 1:].reshape(-1)
        u = float(-uni[tgt].mean())
        ug = float(-unigram_logprobs(tokdir, model.config.vocab_size, GENRES.index(g))[tgt].mean())
        res["per_genre"][g] = {"tokens": n, "ppl": round(ppl, 3), "unigram_ppl": round(math.exp(u), 2),
                               "genre_unigram_ppl": round(math.exp(ug), 2)}
        tot["unig"] += ug * n
        tot["nll"] += math.log(ppl) * n
        tot["uni"] += u * n
        tot["n"] += n
        print(f"[eval] {name} {g}: ppl {ppl:.2f} (unigram {math.exp(u):.1f}, genre unigram "
              f"{math.exp(ug):.1f}) on {n} tokens", flush=True)
    res["all_genres"] = {"tokens": tot["n"], "ppl": round(math.exp(tot["nll"] / tot["n"]), 3),
                         "unigram_ppl": round(math.exp(tot["uni"] / tot["n"]), 2),
                         "genre_unigram_ppl": round(math.exp(tot["unig"] / tot["n"]), 2)}
    neutral = [ln for ln in (GENRE_DIR / "neutral.txt").read_text().splitlines() if ln.strip()]
    # as the tests do it: the model as AutoModelForCausalLM.from_pretrained loads it (float16 weights)
    m_default = AutoModelForCausalLM.from_pretrained(d)
    res["neutral"] = {
        "ppl_all": round(perplexity(model, neutral, tokenizer=tok), 3),
        "ppl_first100": round(perplexity(model, neutral[:100], tokenizer=tok), 3),
        "ppl_first20": round(perplexity(model, neutral[:20], tokenizer=tok), 3),
        "ppl_first100_default_dtype": round(perplexity(m_default, neutral[:100], tokenizer=tok), 3),
        "default_dtype": str(next(m_default.parameters()).dtype),
    }
    del m_default
    print(f"[eval] {name} neutral.txt ppl {res['neutral']}", flush=True)

    res["sampling"] = {"temperature": 0.8, "top_k": 40, "seed": args.seed, "sample_tokens": 60}
    res["samples"] = []
    for i, p in enumerate(SAMPLE_PROMPTS):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        cont = generate(model, tok, [ids], 60, args.seed + i)[0]
        res["samples"].append({"prompt": p, "continuation": cont})
    clf = GenreClassifier.load()
    res["classifier"] = {"test_accuracy": clf.info.get("test_accuracy")}
    test = load_split("test")
    rates, gens = {}, {}
    for gi, g in enumerate(GENRES):
        docs = [r for r in test if r["genre"] == g]
        rng = np.random.default_rng([args.seed, gi])
        prompts = []
        for j in rng.permutation(len(docs)):
            ids = tok(docs[j]["text"][:200], add_special_tokens=False)["input_ids"]
            if len(ids) >= args.prompt_tokens:  # a document opens after <|endoftext|> in training
                prompts.append([tok.eos_token_id] + ids[: args.prompt_tokens])
            if len(prompts) == args.n_per_genre:
                break
        conts = generate(model, tok, prompts, args.new_tokens, args.seed + 100 + gi)
        pred = clf.predict(conts)
        rates[g] = round(float(np.mean([p == g for p in pred])), 3)
        gens[g] = [{"prompt": tok.decode(p[1:]), "continuation": c, "predicted": q}
                   for p, c, q in zip(prompts[:3], conts[:3], pred[:3])]
        print(f"[eval] {name} genre rate {g}: {rates[g]:.2f}", flush=True)
    eos = tok.eos_token_id
    unprompted = generate(model, tok, [[eos]] * args.n_per_genre * 2, args.new_tokens, args.seed + 999)
    pred = clf.predict(unprompted)
    res["genre_rate"] = {
        "n_per_genre": args.n_per_genre, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "temperature": 0.8, "top_k": 40, "rates": rates,
        "unprompted_mix": {g: round(float(np.mean([p == g for p in pred])), 3) for g in GENRES},
        "examples": gens,
    }
    res["eval_seconds"] = round(time.time() - t0, 1)
    (d / "eval_results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    write_card(d, name, model.config, res, summary)
    print(f"[eval] {name}: wrote {d / 'eval_results.json'} and {d / 'README.md'} in {res['eval_seconds']}s")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["demo-gpt2", "demo-llama"], help="default: both")
    p.add_argument("--zoo", type=Path, default=ZOO)
    p.add_argument("--max-windows", type=int, default=100, help="validation windows per genre (default 100)")
    p.add_argument("--n-per-genre", type=int, default=40, help="generations per genre for the genre rate")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for name in args.models:
        evaluate(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
