"""One genre scorer: continuations sampled under an edit, classified by genre, and neutral perplexity.

The steering evaluation (dose-response, layer sweep) and the Command-V evaluation score edits the same
way, with this class:

* continuations of a fixed prompt set are **sampled** (temperature 1 by default) with a seed shared
  by every condition — common random numbers: every edit draws the same random numbers, so the
  difference between two conditions reflects the edit more than the sampling noise;
* the bundled genre classifier labels each continuation (continuation text only); a **hit** is a
  continuation labelled as the target genre, kept per row so effects can be paired and bootstrapped;
* the **cost** is the perplexity of held-out neutral texts under the same edit.

Several edits can be pooled into one score (random controls): their continuations are scored
together, their perplexities averaged geometrically.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from actlab.errors import ActlabError
from actlab.engine.config import Config

DEFAULT_NEW_TOKENS = 24
SAMPLES_KEPT = 3  # continuations stored per score (for reading, not scoring)

__all__ = ["SCORING_FIELDS", "ScoringConfig", "GenreScorer", "Scored", "paired_effect", "DEFAULT_NEW_TOKENS"]


@dataclass
class ScoringConfig(Config):
    """How edits are scored: which prompts are continued and how, which texts measure the cost."""

    max_new_tokens: int = DEFAULT_NEW_TOKENS
    samples_per_prompt: int = 1
    seed: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    prompts: Sequence[str] = ()
    neutral_texts: Sequence[str] = ()
    batch_size: int = 16  # prompts per generate call
    classifier: Any = None  # default: the bundled genre classifier
    perplexity_batch_size: int = 16

    def check(self) -> None:
        """Scoring needs prompts and texts (the defaults have none, so this is not ``validate``)."""
        if not self.prompts:
            raise ActlabError("no prompts given: the dose-response needs prompts to continue")
        if not self.neutral_texts:
            raise ActlabError("no neutral texts given: the perplexity cost needs held-out texts")
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ActlabError("samples_per_prompt, max_new_tokens and batch_size must be at least 1")
        if self.samples_per_prompt > 1 and not self.do_sample:
            raise ActlabError("samples_per_prompt > 1 needs sampling (do_sample=True): greedy decoding repeats itself")


SCORING_FIELDS = tuple(f.name for f in dataclasses.fields(ScoringConfig))


@dataclass
class Scored:
    """One condition: per-edit hits (one array per pooled edit), the continuations and the perplexity."""

    hits: list[np.ndarray]  # [n_rows] 1.0 where the continuation is in the target genre, per edit
    texts: list[str]
    perplexity: float

    @property
    def row_hits(self) -> np.ndarray:
        """Hits per row, averaged over the pooled edits (what paired effects compare)."""
        return np.mean(self.hits, axis=0)

    @property
    def n(self) -> int:
        return len(self.texts)

    @property
    def rate(self) -> float:
        return float(np.concatenate(self.hits).mean())

    @property
    def rate_se(self) -> float:
        """Binomial standard error of ``rate``."""
        return math.sqrt(self.rate * (1 - self.rate) / self.n)

    @property
    def samples(self) -> list[str]:
        return self.texts[:SAMPLES_KEPT]


def paired_effect(row: np.ndarray, base_row: np.ndarray) -> tuple[float, float]:
    """Mean of ``row − base_row`` and its standard error (the rows are paired: same prompt, same seed)."""
    diff = row - base_row
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


class GenreScorer:
    """Generates continuations under an edit and scores genre hits + neutral perplexity."""

    def __init__(self, model, target_genre: str, config: ScoringConfig | None = None, **overrides):
        config = ScoringConfig.with_overrides(config, overrides)
        if not model.is_causal:
            raise ActlabError(f"{model.name} cannot generate text: dose-response needs a causal language model")
        config.check()
        classifier = config.classifier
        if classifier is None:
            from actlab.evals.genre import bundled

            classifier = bundled()
        if target_genre not in classifier.genres:
            raise ActlabError(f"unknown genre {target_genre!r}; the classifier knows: {', '.join(classifier.genres)}")
        self.model, self.classifier, self.target_genre, self.config = model, classifier, target_genre, config
        self.rows = [p for p in config.prompts for _ in range(config.samples_per_prompt)]
        self.prompt_of_row = np.repeat(np.arange(len(config.prompts)), config.samples_per_prompt)
        self.neutral = list(config.neutral_texts)

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"n_prompts": len(self.rows), "max_new_tokens": c.max_new_tokens, "seed": c.seed,
                "do_sample": c.do_sample, "temperature": c.temperature, "n_neutral": len(self.neutral),
                "classifier": type(self.classifier).__name__}

    def continuations(self) -> list[str]:
        """One continuation per row under whatever edit is active; batch ``i`` is seeded ``seed + i``."""
        c = self.config
        texts: list[str] = []
        for i in range(0, len(self.rows), c.batch_size):
            texts += self.model.generate(self.rows[i : i + c.batch_size], max_new_tokens=c.max_new_tokens,
                                         do_sample=c.do_sample, temperature=c.temperature, seed=c.seed + i)
        return texts

    def perplexity(self) -> float:
        from actlab.evals.perplexity import perplexity

        return perplexity(self.model, self.neutral, batch_size=self.config.perplexity_batch_size)

    def hits(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([p == self.target_genre for p in self.classifier.predict(list(texts))], dtype=float)

    def score(self, edit) -> Scored:
        """Score one edit (None: the unedited model), or pool a list of edits."""
        edits = edit if isinstance(edit, list) else [edit]
        hits, texts, log_ppl = [], [], []
        for e in edits:
            with self.model.edit(e) if e is not None else nullcontext():
                out = self.continuations()
                log_ppl.append(math.log(self.perplexity()))
            hits.append(self.hits(out))
            texts += out
        return Scored(hits=hits, texts=texts, perplexity=math.exp(float(np.mean(log_ppl))))
