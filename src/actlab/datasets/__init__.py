"""Small text datasets shipped with actlab."""

from __future__ import annotations

from importlib import resources

from actlab.errors import ActlabError

__all__ = ["default_prompts", "profile_texts", "training_text", "PROFILE_PART", "N_PARTS"]

# The bundled held-out genre passages are split three ways by position (row i goes to part i % 3):
# part 0 is profile text (Command-V), parts 1 and 2 are the tuning and evaluation contrast texts of the
# genre experiments (``actlab.experiments.genre_data``). Kept here so the library default and the
# experiments agree on what is profile text.
N_PARTS = 3
PROFILE_PART = 0


def training_text(split: str = "train", genre: str | None = None) -> list[str]:
    """The bundled SAE text (scripts/build_sae_text.py): ``"train"`` is ~2.1M tokens of the demo corpus'
    training split, ``"eval"`` ~190k tokens of its validation split, the five genres in equal shares,
    documents of at most ~250 tokens. Why: an SAE needs millions of tokens and the prompt set has 6.5k;
    the eval split is the default held-out text of ``sae eval``. Deterministic order."""
    import json
    import lzma

    if split not in ("train", "eval"):
        raise ActlabError(f"the bundled text has splits 'train' and 'eval', not {split!r}")
    with lzma.open(resources.files(__name__).joinpath("text", f"{split}.jsonl.xz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["text"] for r in rows if genre is None or r["genre"] == genre]


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
