"""actlab.evals: perplexity and the bundled genre classifier (offline, fast)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from actlab.errors import ActlabError

GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]
GENRE_DIR = Path(str(files("actlab") / "datasets" / "genres"))


# ---------------------------------------------------------------------------------------------
# perplexity


@pytest.fixture(scope="module")
def tiny():
    """A tiny randomly initialised GPT-2 (no download) and the bundled byte-level BPE tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    # a character-level tokenizer built in memory keeps this test independent of the zoo files
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'\n0123456789"))
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<pad>")
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    return model, tok


TEXTS = ["In the beginning God created the heaven.", "Hello world", "a b", "The quick brown fox jumps."]


def manual_ppl(model, tok, texts):
    import torch

    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        k = ids.shape[1] - 1
        nll += float(loss) * k
        n += k
    return math.exp(nll / n)


def test_perplexity_matches_unbatched_computation(tiny):
    from actlab.evals import perplexity

    model, tok = tiny
    ref = manual_ppl(model, tok, TEXTS)
    for bs in (1, 2, 8):
        assert perplexity(model, TEXTS, batch_size=bs, tokenizer=tok) == pytest.approx(ref, rel=1e-4)


def test_perplexity_is_token_weighted(tiny):
    from actlab.evals import perplexity

    model, tok = tiny
    a, b = TEXTS[0], TEXTS[2]
    na, nb = len(tok(a)["input_ids"]) - 1, len(tok(b)["input_ids"]) - 1
    pa = perplexity(model, [a], tokenizer=tok)
    pb = perplexity(model, [b], tokenizer=tok)
    expect = math.exp((na * math.log(pa) + nb * math.log(pb)) / (na + nb))
    assert perplexity(model, [a, b], tokenizer=tok) == pytest.approx(expect, rel=1e-4)


def test_perplexity_duck_types_actlab_model(tiny):
    from actlab.evals import perplexity

    model, tok = tiny

    class Wrapper:  # stands in for actlab's Model: only .hf and .tokenizer are used
        def __init__(self, hf, tokenizer):
            self.hf, self.tokenizer = hf, tokenizer

    ref = perplexity(model, TEXTS, tokenizer=tok)
    assert perplexity(Wrapper(model, tok), TEXTS) == pytest.approx(ref, rel=1e-6)


def test_perplexity_max_length_truncates(tiny):
    from actlab.evals import perplexity

    model, tok = tiny
    long = "abcdefghij" * 5
    assert perplexity(model, [long], max_length=10, tokenizer=tok) == pytest.approx(
        manual_ppl(model, tok, [long[:10]]), rel=1e-4)


def test_perplexity_errors(tiny):
    from actlab.evals import perplexity

    model, tok = tiny
    with pytest.raises(ActlabError, match="empty"):
        perplexity(model, [], tokenizer=tok)
    with pytest.raises(ActlabError, match="tokenizer"):
        perplexity(model, TEXTS)


def test_perplexity_keeps_training_mode_and_grads(tiny):
    from actlab.evals import perplexity

    model, tok = tiny
    model.train()
    try:
        perplexity(model, TEXTS[:1], tokenizer=tok)
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


# ---------------------------------------------------------------------------------------------
# genre classifier


@pytest.fixture(scope="module")
def clf():
    from actlab.evals import GenreClassifier

    return GenreClassifier.load()


@pytest.fixture(scope="module")
def heldout():
    with open(GENRE_DIR / "heldout.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_classifier_bundle_has_no_pickle():
    d = Path(str(files("actlab") / "evals" / "genre_classifier"))
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["config.json", "weights.safetensors"]


def test_classifier_api(clf):
    assert clf.genres == GENRES
    texts = ["And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
             "The open() function returns a file object; see the io module for details.",
             "dog, domestic dog (noun): a member of the genus Canis"]
    p = clf.predict_proba(texts)
    assert p.shape == (3, 5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert clf.predict(texts) == ["scripture", "techdoc", "dictionary"]
    assert [clf.genres[i] for i in p.argmax(axis=1)] == clf.predict(texts)


def test_classifier_accuracy_on_shipped_heldout(clf, heldout):
    """The classifier scored 95.6% on 4,774 40-token test passages (see its config.json). The shipped
    held-out set is 1,500 40-token passages from the same test split, so the binomial standard error is
    about 0.5 points: 0.90 leaves a wide margin and is far above chance (0.20). Every genre must also
    be recognised well above chance (the weakest, jargon, scored 0.91 on the test passages; 0.75 is
    several standard errors below that for 300 passages)."""
    pred = clf.predict([r["text"] for r in heldout])
    gold = [r["genre"] for r in heldout]
    acc = float(np.mean([p == g for p, g in zip(pred, gold)]))
    assert acc >= 0.90, acc
    for g in GENRES:
        acc_g = np.mean([p == g for p, gg in zip(pred, gold) if gg == g])
        assert acc_g >= 0.75, (g, acc_g)
    assert clf.info["test_accuracy"] >= 0.90


def test_genre_rate(heldout):
    from actlab.evals import genre_rate

    scripture = [r["text"] for r in heldout if r["genre"] == "scripture"][:50]
    assert genre_rate(scripture, "scripture") >= 0.9
    assert genre_rate(scripture, "techdoc") <= 0.1
    with pytest.raises(ActlabError, match="unknown genre"):
        genre_rate(scripture, "poetry")
    with pytest.raises(ActlabError):
        genre_rate([], "scripture")


def test_classifier_save_load_round_trip(clf, tmp_path):
    from actlab.evals.genre import GenreClassifier

    clf.save(tmp_path)
    again = GenreClassifier.load(tmp_path)
    texts = ["Thou shalt not kill.", "import os\nos.listdir('.')"]
    np.testing.assert_allclose(again.predict_proba(texts), clf.predict_proba(texts), rtol=1e-5)
    with pytest.raises(ActlabError, match="no genre classifier"):
        GenreClassifier.load(tmp_path / "missing")


def test_fit_small_classifier():
    from actlab.evals.genre import GenreClassifier

    c = GenreClassifier.fit(["the cat sat", "a cat ran", "def f(): pass", "import sys"],
                            ["prose", "prose", "code", "code"], genres=["prose", "code"],
                            settings={"n_buckets": 1 << 10, "char_ngrams": [3], "word_ngrams": [1]})
    assert c.predict(["the cat", "def g(): pass"]) == ["prose", "code"]


# ---------------------------------------------------------------------------------------------
# shipped genre data sets


def test_genre_data_files(heldout):
    counts = {g: sum(1 for r in heldout if r["genre"] == g) for g in GENRES}
    assert counts == {g: 300 for g in GENRES}
    assert all(r["text"].strip() for r in heldout)
    with open(GENRE_DIR / "contrast_pairs.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) >= 100
    for p in pairs:
        assert set(p) >= {"prompt", "pos", "neg", "pos_genre", "neg_genre"}
        assert p["pos_genre"] == "scripture" and p["neg_genre"] != "scripture"
    neutral = [ln for ln in (GENRE_DIR / "neutral.txt").read_text(encoding="utf-8").splitlines() if ln]
    assert len(neutral) == 500
    assert not set(neutral) & {r["text"] for r in heldout}


def test_genre_dataset_helpers():
    from actlab.datasets import genres

    assert len(genres.heldout("jargon")) == 300
    assert all(p["pos_genre"] == "techdoc" for p in genres.contrast_pairs("techdoc"))
    assert len(genres.neutral()) == 500
