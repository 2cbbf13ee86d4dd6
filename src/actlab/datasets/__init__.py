"""Small text datasets shipped with actlab."""

from __future__ import annotations

from importlib import resources

__all__ = ["default_prompts"]


def default_prompts() -> list[str]:
    """About 300 short, varied English prompts (narrative, questions, technical, scripture-like,
    dictionary entries, jokes, code, instructions, news, dialogue, verse, arithmetic), one per
    line of ``prompts.txt``, in file order. Returns a fresh list each call."""
    text = resources.files(__name__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
