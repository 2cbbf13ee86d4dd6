"""The data of the genre experiments, kept disjoint: pairs to fit on, prompts to continue, texts to score.

Everything comes from the bundled sets (``actlab.datasets.genres``): steering data are the first
``n_fit`` contrast pairs toward a genre, evaluation prompts are prompts of the *other* pairs, the
perplexity texts are lines of ``neutral.txt``, and the Command-V profile prompts are the bundled prompt
set plus openings of held-out passages, none equal to an evaluation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from actlab.errors import ActlabError
from actlab.interventions.contrast import ContrastSet

DEFAULT_PROMPTS = 16
DEFAULT_NEUTRAL = 32
DEFAULT_FIT_PAIRS = 64
DEFAULT_EVAL_PROMPTS = 80  # Command-V evaluation prompts
DEFAULT_TRANSFER_NEUTRAL = 16
PROFILE_PER_GENRE = 60
PROFILE_WORDS = 10

__all__ = [
    "GenreSetup", "genre_setup", "evaluation_prompts", "tuning_prompts", "default_profile_prompts",
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
    neutral = genres.neutral()
    step = max(1, len(neutral) // max(1, n_neutral))
    neutral = neutral[::step][:n_neutral]
    if neutral_tokens is not None:
        neutral = [" ".join(t.split()[:neutral_tokens]) for t in neutral]
    contrast = ContrastSet(pos=[r["pos"] for r in fit_rows], neg=[r["neg"] for r in fit_rows],
                           prompts=[r["prompt"] for r in fit_rows])
    return GenreSetup(target_genre, contrast, prompts, neutral)


def evaluation_prompts(target_genre: str, n_fit: int = DEFAULT_FIT_PAIRS, n: int = DEFAULT_EVAL_PROMPTS,
                       n_neutral: int = DEFAULT_TRANSFER_NEUTRAL) -> tuple[GenreSetup, list[str]]:
    """``(GenreSetup, prompts)``: the genre setup (fit on the first ``n_fit`` pairs) and up to ``n``
    evaluation prompts from the other pairs that are not the prompt of any fitted pair (``genre_setup``
    would top a short list up with fitted prompts; we do not)."""
    setup = genre_setup(target_genre, n_fit=n_fit, n_prompts=10_000, n_neutral=n_neutral)
    fitted = set(setup.contrast.prompts or [])
    prompts = [p for p in setup.prompts if p not in fitted][:n]
    if not prompts:
        raise ActlabError(f"no contrast-pair prompts toward {target_genre!r} are left after the {n_fit} fitted "
                          "pairs; lower n_fit")
    return setup, prompts


def tuning_prompts(target_genre: str, n: int = DEFAULT_EVAL_PROMPTS) -> list[str]:
    """The fitted pairs' own distinct prompts (at most ``n``): for choosing settings without touching the
    evaluation prompts."""
    return list(dict.fromkeys(evaluation_prompts(target_genre)[0].contrast.prompts))[:n]


def default_profile_prompts(n_per_genre: int = PROFILE_PER_GENRE, n_words: int = PROFILE_WORDS) -> list[str]:
    """The bundled prompt set (``actlab.datasets.default_prompts()``, ~320 varied prompts) plus the
    first ``n_words`` words of the first ``n_per_genre`` held-out passages of each of the five genres
    (``heldout.jsonl``): 623 prompts by default, so the profile sees the genres' own registers as well
    as everyday text. Deterministic order, no duplicates."""
    from actlab.datasets import default_prompts
    from actlab.datasets import genres as g

    texts = list(default_prompts())
    for genre in g.GENRES:
        texts += [" ".join(row["text"].split()[:n_words]) for row in g.heldout(genre)[:n_per_genre]]
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


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
