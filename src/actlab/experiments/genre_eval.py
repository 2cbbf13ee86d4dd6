"""The whole genre-steering evaluation (``actlab steer eval``): pick a layer, fit every method, draw curves.

A mean-diff layer sweep (when no site is given) picks the site, then each method — mean-diff, pca,
dims steering vectors, a LinEAS-style affine map and a LoReFT adapter — is fitted there on the same
contrast pairs and run through the dose-response grid on held-out prompts (``genre_data.genre_setup``).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from actlab.errors import ActlabError
from actlab.experiments.genre_data import (
    DEFAULT_FIT_PAIRS, DEFAULT_NEUTRAL, DEFAULT_PROMPTS, GenreSetup, adapter_data, genre_setup,
)
from actlab.experiments.genre_scoring import DEFAULT_NEW_TOKENS, ScoringConfig
from actlab.experiments.steering_eval import DEFAULT_COEFS, DEFAULT_SWEEP_COEF, dose_response, layer_sweep
from actlab.experiments.steering_results import DoseResponse, LayerSweep
from actlab.interventions.base import Composition, Intervention
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.fit import fit_steering
from actlab.report.serialize import write_json
from actlab.engine.config import Config

METHODS = ("mean-diff", "pca", "dims", "affine", "adapter")

__all__ = ["GenreEvalConfig", "GenreEvaluation", "evaluate_genre", "fit_methods", "write_evaluation", "METHODS"]


def _optional(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(f"actlab.interventions.{module}"), name)
    except (ImportError, AttributeError):
        return None


def fit_methods(model, contrast: ContrastSet, site: str, methods: Sequence[str] = METHODS,
                **kwargs) -> dict[str, Intervention | Composition]:
    """Fit each method at ``site``: mean-diff / pca / dims steering vectors, a LinEAS-style affine
    map moving the negatives' activations toward the positives' (``affine_fit.fit_affine``) and a
    LoReFT adapter trained with the language-model loss on the positive continuations
    (``adapter_train.train_adapter``); methods whose module is missing are skipped. ``affine=`` and
    ``adapter=`` dicts pass keyword arguments to those fitters."""
    out: dict[str, Intervention | Composition] = {}
    for method in methods:
        if method in ("mean-diff", "pca", "dims"):
            out[method] = fit_steering(model, contrast, site, method=method)[model.resolve(site)[0]]
        elif method == "affine":
            fit = _optional("affine_fit", "fit_affine")
            if fit is not None:
                out[method] = fit(model, contrast, site, **(kwargs.get("affine") or {}))
        elif method == "adapter":
            train = _optional("adapter_train", "train_adapter")
            if train is not None:  # language-model loss on the positive continuations (after their prompts)
                out[method] = train(model, adapter_data(contrast), site, **(kwargs.get("adapter") or {}))
        else:
            raise ActlabError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return out


@dataclass
class GenreEvalConfig(Config):
    """Settings of ``evaluate_genre`` (saved into evaluation.json)."""

    site: str | None = None  # None: a mean-diff layer sweep over resid.* picks it
    methods: Sequence[str] = METHODS
    coefs: Sequence[float] = DEFAULT_COEFS
    sweep_coef: float = DEFAULT_SWEEP_COEF
    n_fit: int = DEFAULT_FIT_PAIRS
    n_prompts: int = DEFAULT_PROMPTS
    n_neutral: int = DEFAULT_NEUTRAL
    affine: dict = field(default_factory=dict)  # keyword arguments of fit_affine
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    seed: int = 0
    adapter: dict = field(default_factory=dict)  # keyword arguments of train_adapter


@dataclass
class GenreEvaluation:
    setup: GenreSetup
    site: str
    sweep: LayerSweep | None
    dose: DoseResponse
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "seconds": self.seconds, "sweep": self.sweep.to_dict() if self.sweep else None,
                "dose_response": self.dose.to_dict(), "config": self.config}


def evaluate_genre(model, target_genre: str = "techdoc", config: GenreEvalConfig | None = None, *,
                   progress: bool = False, **overrides) -> GenreEvaluation:
    """The whole genre-steering evaluation: a mean-diff layer sweep (when ``site`` is None) picks
    the site, then every method is fitted there and run through the dose-response grid."""
    config = GenreEvalConfig.with_overrides(config, overrides)
    start = time.perf_counter()
    setup = genre_setup(target_genre, n_fit=config.n_fit, n_prompts=config.n_prompts, n_neutral=config.n_neutral)
    scoring = ScoringConfig(prompts=setup.prompts, neutral_texts=setup.neutral_texts,
                            max_new_tokens=config.max_new_tokens, seed=config.seed)
    sweep, site = None, config.site
    if site is None:
        sweep = layer_sweep(model, setup.contrast, "resid.*", scoring, coef=config.sweep_coef,
                            target_genre=target_genre, progress=progress)
        site = sweep.best_site
    site = model.resolve(site)[0]
    interventions = fit_methods(model, setup.contrast, site, config.methods, affine=config.affine,
                                adapter=config.adapter)
    dose = dose_response(model, interventions, config.coefs, scoring, target_genre=target_genre, progress=progress)
    return GenreEvaluation(setup, site, sweep, dose, time.perf_counter() - start, config.to_dict())


def write_evaluation(result: GenreEvaluation, out: str | Path) -> list[Path]:
    """evaluation.json, dose_response.png (and layer_sweep.png) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "evaluation.json", out / "dose_response.png"]
    write_json(paths[0], result.to_dict())
    result.dose.figure(paths[1])
    if result.sweep is not None:
        paths.append(out / "layer_sweep.png")
        result.sweep.figure(paths[2])
    return paths
