"""Evaluating interventions: dose-response curves and layer sweeps (see docs/steering.md).

``dose_response`` applies each intervention at a grid of coefficients (negative to positive,
0 included), generates continuations of a fixed set of prompts with the edit active, and scores
them with ``GenreScorer`` (``genre_scoring``):

* the **target-genre rate**: the fraction of continuations (continuation text only, not the
  prompt) that the bundled genre classifier assigns to the target genre;
* the **perplexity** of held-out neutral texts under the same edit (the cost of the edit).

Random directions of the same norm as the steering vector (``fit.random_like``; three by
default, continuations pooled) run through the same grid as the control: an effect a random
vector also has is not evidence for the fitted direction.

Decoding: continuations are **sampled** (temperature 1 by default) with a fixed seed, and
every point of every curve uses the same seed. Sampling measures the genre of the model's
distribution rather than of its single most likely continuation (greedy decoding of a small
model falls into repetition loops and flips between genres in steps, so its curves are
jagged), allows several samples per prompt, and the shared seed makes all points draw the
same random numbers (common random numbers): the difference between two coefficients then
reflects the edit more than the sampling noise. Coefficient 0 is one shared, unedited run.
``do_sample=False`` switches to greedy decoding. Measured on demo-llama (techdoc, 16 prompts): greedy
decoding gave rates 0.50 / 0.75 / 0.62 / 1.00 at coefficients 0 / 0.5 / 1 / 2, sampling
0.25 / 0.62 / 0.88 / 0.94 (docs/steering.md).

``layer_sweep`` fits one vector per layer and scores each at one fixed coefficient. The best
layer is the one with the largest target-rate gain over the unedited model at that coefficient
among layers whose neutral perplexity stays within ``max_ppl_ratio`` (2×) of the unedited
model's (ties: the lower perplexity). Coefficients are in units of each layer's own fitted
vector (mean difference), so every layer is pushed by the size of its own contrast.

Both take the scoring settings as one ``ScoringConfig`` (or its fields as keywords).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Mapping, Sequence

from actlab.engine.edits import check_finite
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.experiments.genre_scoring import SCORING_FIELDS, GenreScorer, Scored, ScoringConfig
from actlab.experiments.steering_results import (
    MAX_PPL_RATIO, RANDOM, Curve, DoseResponse, LayerResult, LayerSweep, Point,
)
from actlab.interventions.base import Composition, Intervention
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.fit import fit_steering, random_like
from actlab.interventions.types import SteeringVector

DEFAULT_COEFS = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0)
DEFAULT_SWEEP_COEF = 1.0

__all__ = ["DEFAULT_COEFS", "DEFAULT_SWEEP_COEF", "dose_response", "layer_sweep", "point"]


def point(scored: Scored, coef: float) -> Point:
    """A dose-response point from one score."""
    return Point(coef=float(coef), rate=scored.rate, rate_se=scored.rate_se, perplexity=scored.perplexity,
                 n=scored.n, samples=scored.samples)


def _items(intervention) -> list:
    return intervention.edits() if hasattr(intervention, "edits") else [intervention]


def _is_additive(intervention) -> bool:
    return all(getattr(i, "additive", False) for i in _items(intervention))


def _steering_items(intervention) -> list[SteeringVector] | None:
    items = _items(intervention)
    return items if items and all(isinstance(i, SteeringVector) for i in items) else None


def _norm(intervention) -> float | None:
    items = _steering_items(intervention)
    if items is None:
        return None
    return float(math.sqrt(sum(float((i.coef * i.vector).norm()) ** 2 for i in items)))


def _random_control(intervention, seed: int):
    items = _steering_items(intervention)
    controls = [random_like(i, seed=seed + k) for k, i in enumerate(items)]
    for c, i in zip(controls, items):  # random_like keeps the norm and the coefficient
        c.norm_preserving = c.params["norm_preserving"] = i.norm_preserving
    return controls[0] if len(controls) == 1 else Composition(controls)


def _random_controls(intervention, seed: int, n: int) -> list:
    """``n`` independent random directions, each with the norm of ``intervention``'s vector(s)."""
    if n < 1:
        raise ActlabError(f"n_random must be at least 1, not {n}")
    return [_random_control(intervention, seed + 7919 * (j + 1)) for j in range(n)]


class _Pooled(list):
    """Several interventions scored as one point (their continuations pooled)."""

    def __mul__(self, coef: float) -> "_Pooled":
        return _Pooled(item * coef for item in self)

    def edits(self) -> list:
        return [e for item in self for e in item.edits()]


def _check_coefs(coefs) -> list[float]:
    values = sorted({float(c) for c in coefs})
    if not values:
        raise ActlabError("no coefficients given: pass a grid such as -4,0,2,4,8")
    for c in values:
        check_finite(c, "a coefficient")
    if 0.0 not in values:
        values = sorted(values + [0.0])
    return values


def _jobs(make_intervention: Mapping[str, Any], include_random: bool, random_of: str | None, seed: int,
          n_random: int) -> dict[str, tuple[Any, str | None]]:
    """Method name → (intervention, the method a random control matches): the methods, plus the pooled
    random control with the norm of ``random_of`` (default: the first steering-vector method)."""
    jobs: dict[str, tuple[Any, str | None]] = {name: (item, None) for name, item in make_intervention.items()}
    if include_random:
        candidates = [n for n, i in make_intervention.items() if _steering_items(i) is not None]
        source = random_of or (candidates[0] if candidates else None)
        if source is not None:
            if source not in candidates:
                raise ActlabError(f"random_of={source!r} is not one of the steering-vector methods {candidates}")
            jobs[RANDOM] = (_Pooled(_random_controls(make_intervention[source], seed, n_random)), source)
    return jobs


def _curve(scorer: GenreScorer, name: str, item, control_of: str | None, grid: list[float], baseline: Point,
           bar) -> Curve:
    points = []
    for c in grid:
        if c == 0 and _is_additive(item):
            points.append(baseline)
            continue
        points.append(point(scorer.score(item * c), c))
        bar.advance()
    kind = getattr(item, "kind", None) or "+".join(sorted({i.kind for i in item.edits()}))
    norm = _norm(item[0]) if isinstance(item, _Pooled) else _norm(item)
    return Curve(method=name, kind=kind, points=points, norm=norm, control_of=control_of)


def dose_response(
    model,
    make_intervention: Mapping[str, Intervention | Composition],
    coefs: Sequence[float] = DEFAULT_COEFS,
    scoring: ScoringConfig | None = None,
    *,
    target_genre: str,
    include_random: bool = True,
    random_of: str | None = None,
    n_random: int = 3,
    progress: bool = False,
    **overrides,
) -> DoseResponse:
    """Target-genre rate and neutral perplexity of each intervention at each coefficient.

    ``make_intervention`` maps a method name to its intervention at coefficient 1; each is applied
    as ``intervention * coef``. Coefficient 0 (added when missing) is one unedited run shared by
    all additive interventions. With ``include_random``, ``n_random`` random directions with the
    norm of the ``random_of`` steering vector (default: the first steering-vector method) run
    through the same grid as ``"random"``; their continuations are pooled into one rate per
    coefficient, so the control is not the accident of one direction. ``scoring`` (or its fields
    as keywords: ``prompts``, ``neutral_texts``, ``max_new_tokens``, ``seed``, ...) says how.
    """
    scoring = ScoringConfig.with_overrides(scoring, overrides)
    if not make_intervention:
        raise ActlabError("no interventions given: pass {method name: intervention at coefficient 1}")
    if RANDOM in make_intervention:
        raise ActlabError(f"'{RANDOM}' is reserved for the random control; name the method otherwise")
    grid = _check_coefs(coefs)
    for item in make_intervention.values():
        item.check_model(model)
    scorer = GenreScorer(model, target_genre, scoring)
    jobs = _jobs(make_intervention, include_random, random_of, scoring.seed, n_random)
    # (a pooled random control counts as one point per coefficient)
    n_points = 1 + sum(len([c for c in grid if c != 0 or not _is_additive(item)]) for item, _ in jobs.values())
    start = time.perf_counter()
    with progress_bar(f"dose-response ({target_genre})", n_points, unit="points", enabled=progress) as bar:
        baseline = point(scorer.score(None), 0.0)
        bar.advance()
        curves = {name: _curve(scorer, name, item, control_of, grid, baseline, bar)
                  for name, (item, control_of) in jobs.items()}
    settings = scorer.settings() | {"seconds": time.perf_counter() - start,
                                    "samples_per_prompt": scoring.samples_per_prompt,
                                    "n_random": n_random if RANDOM in jobs else 0,
                                    "sites": {n: sorted({e.site for e in i.edits()}) for n, (i, _) in jobs.items()}}
    return DoseResponse(model=model.name, target_genre=target_genre, coefs=grid, baseline=baseline, curves=curves,
                        settings=settings)


def _split_sweep_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Scoring settings vs keyword arguments of ``fit_steering`` (aggregate, dims, positions)."""
    scoring = {k: v for k, v in overrides.items() if k in SCORING_FIELDS}
    fit = {k: v for k, v in overrides.items() if k not in scoring}
    allowed = set(inspect.signature(fit_steering).parameters) - {"model", "contrast", "sites", "method"}
    unknown = sorted(set(fit) - allowed)
    if unknown:
        raise ActlabError(f"layer_sweep got unknown setting(s) {', '.join(unknown)}; scoring settings: "
                          f"{', '.join(SCORING_FIELDS)}; fitting: {', '.join(sorted(allowed))}")
    return scoring, fit


def layer_sweep(
    model,
    contrast: ContrastSet,
    sites: str | Sequence[str] = "resid.*",
    scoring: ScoringConfig | None = None,
    *,
    method: str = "mean-diff",
    coef: float = DEFAULT_SWEEP_COEF,
    target_genre: str,
    include_random: bool = False,
    max_ppl_ratio: float = MAX_PPL_RATIO,
    progress: bool = False,
    **overrides,
) -> LayerSweep:
    """Fit a ``method`` vector at every site and score each at coefficient ``coef``.

    The best layer (``.best_site``) has the largest target-rate gain over the unedited model among
    layers whose neutral perplexity is within ``max_ppl_ratio`` of the unedited model's. Keywords are
    ``ScoringConfig`` fields or passed to ``fit_steering`` (``aggregate``, ``dims``, ``positions``).
    """
    check_finite(coef, "the coefficient")
    scoring_overrides, fit_kwargs = _split_sweep_overrides(overrides)
    scoring = ScoringConfig.with_overrides(scoring, scoring_overrides)
    vectors = fit_steering(model, contrast, sites, method=method, **fit_kwargs)
    scorer = GenreScorer(model, target_genre, scoring)
    total = 1 + len(vectors) * (2 if include_random else 1)
    start = time.perf_counter()
    layers = []
    with progress_bar(f"layer sweep ({method} × {coef:g})", total, unit="points", enabled=progress) as bar:
        baseline = point(scorer.score(None), 0.0)
        bar.advance()
        for site, vec in vectors.items():
            p = point(scorer.score(vec * coef), coef)
            bar.advance()
            rnd = None
            if include_random:
                rnd = scorer.score(random_like(vec, seed=scoring.seed) * coef).rate
                bar.advance()
            layers.append(LayerResult(site=site, rate=p.rate, rate_se=p.rate_se, perplexity=p.perplexity,
                                      effect=p.rate - baseline.rate, ppl_ratio=p.perplexity / baseline.perplexity,
                                      norm=float(vec.vector.norm()), random_rate=rnd, samples=p.samples))
    settings = scorer.settings() | {"seconds": time.perf_counter() - start,
                                    "samples_per_prompt": scoring.samples_per_prompt}
    return LayerSweep(model=model.name, method=method, coef=float(coef), target_genre=target_genre, baseline=baseline,
                      layers=layers, max_ppl_ratio=max_ppl_ratio, settings=settings)
