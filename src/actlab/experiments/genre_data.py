"""The data of the genre experiments, kept disjoint: pairs to fit on, prompts to continue, texts to score.

Everything comes from the bundled sets (``actlab.datasets.genres``): steering data are the first
``n_fit`` contrast pairs toward a genre, evaluation prompts are prompts of the *other* pairs, the
perplexity texts are lines of ``neutral.txt``, and the Command-V profile prompts are documents of the
bundled training text (``actlab.datasets.profile_texts``).

The Command-V matrix (``split_setup``) keeps a *tuning* split apart from the *evaluation* split: the
held-out passages are cut in three by position (unused / tune / eval) and the pair prompts in two by
hash; every default is chosen on "tune" and reported on "eval".
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from actlab.errors import ActlabError
from actlab.interventions.contrast import ContrastSet

DEFAULT_PROMPTS = 16
DEFAULT_NEUTRAL = 32
DEFAULT_FIT_PAIRS = 64
DEFAULT_EVAL_PROMPTS = 80  # Command-V evaluation prompts
DEFAULT_TRANSFER_NEUTRAL = 16
SPLITS = ("tune", "eval")
SPLIT_PART = {"tune": 1, "eval": 2}  # parts of the held-out passages (part 0: profile text)

__all__ = [
    "GenreSetup", "genre_setup", "neutral_texts", "default_profile_prompts", "SPLITS",
    "split_prompts", "split_passages", "passage_contrast", "split_setup",
    "adapter_training_data_for_genre", "adapter_data",
]


@dataclass
class GenreSetup:
    """Disjoint data for one genre-steering evaluation, from ``actlab.datasets.genres``."""

    target_genre: str
    contrast: ContrastSet  # pairs fitted on
    prompts: list[str]  # prompts continued (from pairs not fitted on)
    neutral_texts: list[str]  # held-out mixed-genre texts for the perplexity cost


def _distinct_prompts(rows: list[dict], into: list[str]) -> list[str]:
    for r in rows:
        if r["prompt"] not in into:
            into.append(r["prompt"])
    return into


def genre_setup(target_genre: str = "techdoc", *, n_fit: int = DEFAULT_FIT_PAIRS, n_prompts: int = DEFAULT_PROMPTS,
                n_neutral: int = DEFAULT_NEUTRAL, neutral_tokens: int | None = None) -> GenreSetup:
    """Fit on the first ``n_fit`` contrast pairs toward ``target_genre``; continue the (distinct)
    prompts of the remaining pairs — two or three words that start a sentence in the target genre
    and in another one, so the unedited model is not already committed to a genre; measure
    perplexity on ``n_neutral`` evenly spaced lines of neutral.txt."""
    from actlab.datasets import genres

    if target_genre not in genres.GENRES:
        raise ActlabError(f"unknown genre {target_genre!r}; choose one of {', '.join(genres.GENRES)}")
    rows = genres.contrast_pairs(target_genre)
    if len(rows) < 2:
        raise ActlabError(f"only {len(rows)} contrast pairs toward {target_genre!r}; choose another genre")
    n_fit = max(1, min(n_fit, len(rows) - 1))
    fit_rows, rest = rows[:n_fit], rows[n_fit:]
    prompts = _distinct_prompts(rest, [])
    if len(prompts) < n_prompts:  # top up with the distinct prompts of fitted pairs
        _distinct_prompts(fit_rows, prompts)
    prompts = prompts[:n_prompts]
    neutral = neutral_texts(n_neutral)
    if neutral_tokens is not None:
        neutral = [" ".join(t.split()[:neutral_tokens]) for t in neutral]
    contrast = ContrastSet(pos=[r["pos"] for r in fit_rows], neg=[r["neg"] for r in fit_rows],
                           prompts=[r["prompt"] for r in fit_rows])
    return GenreSetup(target_genre, contrast, prompts, neutral)


def neutral_texts(n: int) -> list[str]:
    """``n`` evenly spaced lines of neutral.txt (mixed genres): the texts perplexity is measured on."""
    from actlab.datasets import genres

    lines = genres.neutral()
    return lines[::max(1, len(lines) // max(1, n))][:n]


def default_profile_prompts() -> list[str]:
    """The Command-V profile set every path uses by default (``actlab.datasets.profile_texts``)."""
    from actlab.datasets import profile_texts

    return profile_texts()


# ------------------------------------------------------------------ tuning and evaluation splits
def _split_of(text: str) -> str:
    """A stable split for a prompt, by hash (so adding prompts never moves the old ones)."""
    return SPLITS[int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2]


def split_prompts(split: str) -> list[str]:
    """The distinct 2–3-word sentence openings of every bundled contrast pair (all genres pooled),
    those whose hash puts them in ``split`` ("tune" or "eval"; ~130 and ~120). They start a sentence in
    two genres, so the unedited model is not committed to either."""
    from actlab.datasets import genres as g

    _check_split(split)
    prompts = [r["prompt"] for genre in g.GENRES for r in g.contrast_pairs(genre)]
    return [p for p in dict.fromkeys(prompts) if _split_of(p) == split]


def split_passages(genre: str, split: str) -> list[str]:
    """The bundled held-out passages of ``genre`` in ``split`` (every third one; the profile set has another third)."""
    from actlab.datasets import N_PARTS
    from actlab.datasets import genres as g

    _check_split(split)
    if genre not in g.GENRES:
        raise ActlabError(f"unknown genre {genre!r}; choose one of {', '.join(g.GENRES)}")
    return [row["text"] for row in g.heldout(genre)[SPLIT_PART[split]::N_PARTS]]


def passage_contrast(genre: str, split: str, seed: int = 0, n: int = DEFAULT_FIT_PAIRS) -> ContrastSet:
    """Contrast texts as a user would bring them: ``n`` passages of ``genre`` against ``n`` passages of the
    other genres (round robin over them), drawn with ``seed`` from ``split``; no prompts."""
    from actlab.datasets import genres as g

    rng = random.Random(f"{genre}-{split}-{seed}")
    pos = rng.sample(split_passages(genre, split), n)
    others = [rng.sample(split_passages(o, split), n) for o in g.GENRES if o != genre]
    neg = [others[i % len(others)][i // len(others)] for i in range(n)]
    return ContrastSet(pos=pos, neg=neg)


def split_setup(genre: str, split: str = "eval", seed: int = 0, *, n_fit: int = DEFAULT_FIT_PAIRS,
                n_prompts: int = DEFAULT_EVAL_PROMPTS, n_neutral: int = DEFAULT_TRANSFER_NEUTRAL) -> GenreSetup:
    """One cell of the Command-V matrix: ``passage_contrast`` to fit on and ``n_prompts`` of
    ``split_prompts(split)`` (drawn with ``seed``) to continue, all from one split; the perplexity texts are
    the same evenly spaced neutral lines for every cell."""
    contrast = passage_contrast(genre, split, seed, n_fit)
    pool = split_prompts(split)
    prompts = random.Random(f"prompts-{split}-{seed}").sample(pool, min(n_prompts, len(pool)))
    return GenreSetup(genre, contrast, prompts, neutral_texts(n_neutral))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ActlabError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def adapter_data(contrast: ContrastSet) -> list:
    """What an adapter is trained on for a contrast set: (prompt, positive continuation) pairs, or the
    positive texts alone when the set has no prompts (the language-model loss on the positives)."""
    return list(zip(contrast.prompts, contrast.pos)) if contrast.paired else list(contrast.pos)


def adapter_training_data_for_genre(genre: str, *, min_pairs: int = 32, max_pairs: int | None = None
                                    ) -> list[tuple[str, str]]:
    """(prompt, completion) pairs whose completion is in ``genre``, from the bundled contrast pairs.

    Each bundled contrast pair gives its shared prompt (the first words of a sentence) and its
    continuation in ``genre``. Genres with fewer than ``min_pairs`` such pairs (the bundled set has
    only a handful for "dictionary") are topped up from the bundled held-out passages of the genre,
    split after their first three words. Deterministic order.
    """
    from actlab.datasets import genres as g

    if genre not in g.GENRES:
        raise ActlabError(f"unknown genre {genre!r}; choose one of {', '.join(g.GENRES)}")
    pairs = [(r["prompt"], r["pos"]) for r in g.contrast_pairs(genre) if r.get("pos_genre", genre) == genre]
    if len(pairs) < min_pairs:
        for row in g.heldout(genre):
            words = row["text"].split(" ")
            if len(words) < 6:
                continue
            pairs.append((" ".join(words[:3]), " " + " ".join(words[3:])))
            if len(pairs) >= min_pairs:
                break
    if not pairs:
        raise ActlabError(f"no bundled training data for genre {genre!r}")
    return pairs[:max_pairs] if max_pairs else pairs
