"""Scoring the Command-V conditions with ``GenreScorer``: rates, paired effects, bootstrap ratios.

Every condition continues the same prompts with the same seed (common random numbers), so each row
of a condition is paired with the same row of ``none``: effects carry paired standard errors, and the
ratios of effects to the direct one carry percentile intervals from resampling prompts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actlab.experiments.genre_scoring import GenreScorer, Scored, ScoringConfig, paired_effect
from actlab.experiments.transfer_results import CONDITIONS, Condition

__all__ = ["condition", "bootstrap_ratios", "score_recipient", "score_donor", "N_BOOTSTRAP"]

N_BOOTSTRAP = 2000


def condition(name: str, scored: Scored) -> Condition:
    return Condition(name=name, rate=scored.rate, rate_se=scored.rate_se, perplexity=scored.perplexity, n=scored.n,
                     samples=scored.samples)


def _set_effect(cond: Condition, scored: Scored, base: Scored) -> None:
    cond.effect, cond.effect_se = paired_effect(scored.row_hits, base.row_hits)


def bootstrap_ratios(rows: dict[str, np.ndarray], prompt_of_row: np.ndarray, seed: int,
                     n_boot: int = N_BOOTSTRAP) -> dict[str, Any]:
    """Ratios of effects to the direct effect, with 95% percentile intervals from resampling prompts."""
    n_prompts = int(prompt_of_row.max()) + 1
    per_prompt = {k: np.array([v[prompt_of_row == p].mean() for p in range(n_prompts)]) for k, v in rows.items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts))

    def eff(k, ix=None):
        v = per_prompt[k] - per_prompt["none"]
        return v.mean() if ix is None else v[ix].mean(axis=1)

    out: dict[str, Any] = {}
    direct_b = eff("direct", idx)
    for k in ("pasted", "random"):
        point = eff(k) / eff("direct") if eff("direct") != 0 else float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = eff(k, idx) / direct_b
        boot = boot[np.isfinite(boot)]
        ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else [math.nan, math.nan]
        out[f"{k}_over_direct"] = float(point)
        out[f"{k}_over_direct_ci"] = ci
    out["per_prompt"] = {k: [round(float(x), 6) for x in v] for k, v in per_prompt.items()}  # for pooling cells
    out["n_bootstrap"] = n_boot
    out["resampled"] = "prompts"
    return out


def score_recipient(recipient, target_genre: str, scoring: ScoringConfig, edits: dict[str, Any], seed: int,
                    bar) -> tuple[dict[str, Condition], dict[str, Any], list[float]]:
    """Score ``edits`` (condition → edit: None, one edit, or a list pooled) on the recipient, in
    ``CONDITIONS`` order: ``(conditions, ratios, per-draw effects of the random control)``."""
    scorer = GenreScorer(recipient, target_genre, scoring)
    scored: dict[str, Scored] = {}
    for name in CONDITIONS:
        scored[name] = scorer.score(edits[name])
        bar.advance()
    conds = {name: condition(name, s) for name, s in scored.items()}
    for name in CONDITIONS[1:]:
        _set_effect(conds[name], scored[name], scored["none"])
    draws = [float((h - scored["none"].row_hits).mean()) for h in scored["random"].hits]
    ratios = bootstrap_ratios({k: s.row_hits for k, s in scored.items()}, scorer.prompt_of_row, seed)
    return conds, ratios, draws


def score_donor(donor, target_genre: str, scoring: ScoringConfig, edit, bar) -> dict[str, Condition]:
    """The behaviour in the donor itself: ``none`` and ``edited``, the latter's effect paired against the former."""
    scorer = GenreScorer(donor, target_genre, scoring)
    none = scorer.score(None)
    bar.advance()
    edited = scorer.score(edit)
    conds = {"none": condition("none", none), "edited": condition("edited", edited)}
    _set_effect(conds["edited"], edited, none)
    bar.advance()
    return conds
