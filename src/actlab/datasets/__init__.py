"""Small text datasets shipped with actlab."""

from __future__ import annotations

from importlib import resources

from actlab.errors import ActlabError

__all__ = ["default_prompts", "profile_texts", "training_text", "PROFILE_DOCS", "PROFILE_PART", "N_PARTS"]

# The bundled held-out genre passages are split three ways by position (row i goes to part i % 3):
# parts 1 and 2 are the tuning and evaluation contrast texts of the genre experiments
# (``actlab.experiments.genre_data``); part 0 was the Command-V profile text until session 23 and is
# kept out of both, so the two splits stay what they were.
N_PARTS = 3
PROFILE_PART = 0
PROFILE_DOCS = 920  # the Command-V profile: this many documents spaced evenly through the training text


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
    """The default Command-V profile set: ``PROFILE_DOCS`` documents spaced evenly through the bundled
    training text (``training_text("train")``: the five genres in equal shares), ~106k tokens. Why: the
    same text SAEs and the browser use, four times the rows of the earlier prompt-and-passage set (823
    texts, 27k tokens), and on the tuning split as good for pasted vectors and adapters with a smaller
    random control (docs/transfer.md, session 23). Deterministic order."""
    docs = training_text("train")
    return docs[:: max(1, len(docs) // PROFILE_DOCS)][:PROFILE_DOCS]
