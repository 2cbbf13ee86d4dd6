"""Small text datasets shipped with actlab."""

from __future__ import annotations

from importlib import resources

__all__ = ["default_prompts", "profile_texts", "PROFILE_PART", "N_PARTS"]

# The bundled held-out genre passages are split three ways by position (row i goes to part i % 3):
# part 0 is profile text (Command-V), parts 1 and 2 are the tuning and evaluation contrast texts of the
# genre experiments (``actlab.experiments.genre_data``). Kept here so the library default and the
# experiments agree on what is profile text.
N_PARTS = 3
PROFILE_PART = 0


def default_prompts() -> list[str]:
    """About 300 short, varied English prompts (narrative, questions, technical, scripture-like,
    dictionary entries, jokes, code, instructions, news, dialogue, verse, arithmetic), one per
    line of ``prompts.txt``, in file order. Returns a fresh list each call."""
    text = resources.files(__name__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def profile_texts() -> list[str]:
    """The default Command-V profile set: the bundled prompts plus every third bundled held-out passage
    of each demo genre (part ``PROFILE_PART``; 100 × 40-token passages per genre): ~820 texts, ~27k
    tokens. Why: converters fitted on the ~320 short prompts alone see too few rows and too little
    register variety (a pasted genre vector then points only half the right way; docs/transfer.md).
    Deterministic order, no duplicates."""
    from actlab.datasets import genres

    texts = default_prompts()
    for genre in genres.GENRES:
        texts += [row["text"] for row in genres.heldout(genre)[PROFILE_PART::N_PARTS]]
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))
