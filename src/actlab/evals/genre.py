"""A small, fast genre classifier for the five genres of actlab's demo corpus.

Multinomial naive Bayes over hashed features (byte 3/4/5-grams, lowercased word unigrams and
bigrams), numpy only. It is trained by ``scripts/train_genre_classifier.py`` on the corpus train
split; the parameters ship in ``genre_classifier/`` next to this module as safetensors (per-genre
feature log-probabilities) + JSON (genres, hashing settings, measured accuracy). No pickle, no
scikit-learn.

    >>> from actlab.evals.genre import GenreClassifier, genre_rate
    >>> clf = GenreClassifier.load()
    >>> clf.predict(["And the LORD spake unto Moses, saying,"])
    ['scripture']
    >>> genre_rate(["def f(x):\\n    return x"], "techdoc")
    1.0
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from actlab.errors import ActlabError

BUNDLED_DIR = Path(__file__).parent / "genre_classifier"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "actlab-genre-nb-v1"

DEFAULT_GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]
DEFAULT_SETTINGS = {"n_buckets": 1 << 17, "char_ngrams": [3, 4, 5], "word_ngrams": [1, 2]}

_MULT = np.uint64(1000003)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_SPACES = re.compile(r"[ \t]+")


def _bucket(h: np.ndarray, bits: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((h * _MIX) >> np.uint64(64 - bits)).astype(np.int64)


def text_features(text: str, settings: dict | None = None) -> np.ndarray:
    """Hashed feature ids (with repetition) of one text; deterministic across runs and platforms."""
    s = settings or DEFAULT_SETTINGS
    bits = int(s["n_buckets"]).bit_length() - 1
    text = _SPACES.sub(" ", text.strip())
    out = []
    b = np.frombuffer((" " + text + " ").encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    with np.errstate(over="ignore"):
        for n in s["char_ngrams"]:
            if b.size < n:
                continue
            m = b.size - n + 1
            h = np.full(m, np.uint64(n * 7919), dtype=np.uint64)
            for k in range(n):
                h = h * _MULT + b[k : k + m]
            out.append(_bucket(h, bits))
    words = _WORD.findall(text.lower())
    wh = []
    if 1 in s["word_ngrams"]:
        wh += [zlib.crc32(("w " + w).encode()) for w in words]
    if 2 in s["word_ngrams"]:
        wh += [zlib.crc32(("b " + a + " " + c).encode()) for a, c in zip(words, words[1:])]
    if wh:
        out.append(_bucket(np.asarray(wh, dtype=np.uint64) + np.uint64(1 << 40), bits))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class GenreClassifier:
    """Naive Bayes genre classifier. ``GenreClassifier.load()`` returns the bundled one."""

    def __init__(self, log_prob: np.ndarray, log_prior: np.ndarray, genres: Sequence[str],
                 settings: dict | None = None, info: dict | None = None):
        self.log_prob = np.asarray(log_prob, dtype=np.float32)  # [n_genres, n_buckets]
        self.log_prior = np.asarray(log_prior, dtype=np.float32)  # [n_genres]
        self.genres = list(genres)
        self.settings = dict(settings or DEFAULT_SETTINGS)
        self.info = dict(info or {})
        if self.log_prob.shape != (len(self.genres), self.settings["n_buckets"]):
            raise ActlabError(
                f"genre classifier weights have shape {self.log_prob.shape}, expected "
                f"({len(self.genres)}, {self.settings['n_buckets']})"
            )

    # -- training ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, texts: Iterable[str], labels: Iterable[str], genres: Sequence[str] | None = None,
            alpha: float = 0.1, settings: dict | None = None) -> "GenreClassifier":
        """Count features per genre; uniform prior (the corpus mix should not bias predictions)."""
        settings = dict(settings or DEFAULT_SETTINGS)
        texts, labels = list(texts), list(labels)
        genres = list(genres or sorted(set(labels)))
        counts = np.zeros((len(genres), settings["n_buckets"]), dtype=np.float64)
        for t, g in zip(texts, labels):
            counts[genres.index(g)] += np.bincount(text_features(t, settings), minlength=settings["n_buckets"])
        return cls.from_counts(counts, genres, alpha, settings)

    @classmethod
    def from_counts(cls, counts: np.ndarray, genres: Sequence[str], alpha: float,
                    settings: dict | None = None) -> "GenreClassifier":
        sm = counts + alpha
        log_prob = np.log(sm) - np.log(sm.sum(axis=1, keepdims=True))
        log_prior = np.full(len(genres), -np.log(len(genres)))
        return cls(log_prob, log_prior, genres, settings, {"alpha": alpha})

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None) -> "GenreClassifier":
        """Load a classifier directory (default: the one bundled with actlab)."""
        from actlab.files import load_tensors

        d = Path(path) if path is not None else BUNDLED_DIR
        if not (d / WEIGHTS_FILE).is_file() or not (d / CONFIG_FILE).is_file():
            raise ActlabError(
                f"no genre classifier at {d} (expected {WEIGHTS_FILE} and {CONFIG_FILE}); "
                "rebuild it with: python scripts/train_genre_classifier.py"
            )
        cfg = json.loads((d / CONFIG_FILE).read_text())
        w, _ = load_tensors(d / WEIGHTS_FILE, FORMAT, "genre classifier weights")
        return cls(w["log_prob"].numpy().astype(np.float32), w["log_prior"].numpy().astype(np.float32),
                   cfg["genres"], cfg["settings"], cfg.get("info"))

    def save(self, path: str | Path) -> None:
        import torch

        from actlab.files import save_tensors, write_json

        d = Path(path)
        tensors = {"log_prob": torch.from_numpy(self.log_prob.astype(np.float16)),
                   "log_prior": torch.from_numpy(self.log_prior.astype(np.float32))}
        save_tensors(d / WEIGHTS_FILE, tensors, None, {"format": FORMAT})
        cfg = {"format": FORMAT, "model": "multinomial naive Bayes on hashed features",
               "genres": self.genres, "settings": self.settings, "info": self.info}
        write_json(d / CONFIG_FILE, cfg)
        (d / WEIGHTS_FILE).chmod(0o644)

    # -- inference -----------------------------------------------------------------------------
    def _as_list(self, texts) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ActlabError("GenreClassifier expects a list of strings")
        return texts

    def decision_scores(self, texts: Iterable[str] | str) -> np.ndarray:
        """Unnormalised log posteriors ``[n, n_genres]``."""
        texts = self._as_list(texts)
        out = np.empty((len(texts), len(self.genres)), dtype=np.float64)
        for i, t in enumerate(texts):
            f = text_features(t, self.settings)
            out[i] = self.log_prior + (self.log_prob[:, f].sum(axis=1) if f.size else 0.0)
        return out

    def predict_proba(self, texts: Iterable[str] | str) -> np.ndarray:
        """Posterior probabilities ``[n, n_genres]`` (columns in ``self.genres`` order)."""
        s = self.decision_scores(texts)
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, texts: Iterable[str] | str) -> list[str]:
        """The most likely genre of each text."""
        s = self.decision_scores(texts)
        return [self.genres[i] for i in s.argmax(axis=1)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        pred = self.predict(texts)
        return float(np.mean([p == g for p, g in zip(pred, labels)])) if pred else float("nan")

    def __repr__(self) -> str:
        return f"GenreClassifier(genres={self.genres}, n_buckets={self.settings['n_buckets']})"


_BUNDLED: GenreClassifier | None = None


def bundled() -> GenreClassifier:
    """The bundled classifier, loaded once per process."""
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = GenreClassifier.load()
    return _BUNDLED


def genre_rate(texts: Iterable[str] | str, genre: str, classifier: GenreClassifier | None = None) -> float:
    """Fraction of ``texts`` the (bundled) classifier assigns to ``genre``."""
    clf = classifier or bundled()
    if genre not in clf.genres:
        raise ActlabError(f"unknown genre {genre!r}; the classifier knows: {', '.join(clf.genres)}")
    texts = clf._as_list(texts)
    if not texts:
        raise ActlabError("genre_rate needs at least one text")
    pred = clf.predict(texts)
    return sum(p == genre for p in pred) / len(pred)


__all__ = ["GenreClassifier", "genre_rate", "text_features", "bundled", "DEFAULT_GENRES"]
