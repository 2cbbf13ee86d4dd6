"""Command-V between two loaded models in one call: profiles → converters → paste (``actlab paste run``).

``paste_between`` profiles both models on the same prompts (cached by model weights and prompts when
``cache_dir`` is set), fits ridge converters for every layer pair matched by relative depth (or an
explicit ``layer_map``) with λ at least ``MIN_LAMBDA``, and pastes the donor intervention into the
recipient. No gradient is taken anywhere on this path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from actlab.interventions.base import Composition, Intervention
from actlab.interventions.types import AffineMap, SteeringVector
from actlab.engine.config import Config
from actlab.errors import ActlabError
from actlab.transfer.converters import MIN_LAMBDA, PASTE_LAMBDAS, ConverterSet, fit_converters
from actlab.transfer.effect_paste import paste_effect
from actlab.transfer.paste import DEFAULT_MAX_GAIN, calibrate_scale, paste, predicted_effect
from actlab.transfer.profiles import ActivationProfile, cached_profile, profile_model, resolve_positions

__all__ = ["PasteConfig", "PasteResult", "paste_between", "paste_with", "fit_paste_converters"]


def fit_paste_converters(d_prof: ActivationProfile, r_prof: ActivationProfile,
                         lambdas: Sequence[float] | None = PASTE_LAMBDAS, *,
                         layer_map: dict[int, int] | None = None) -> ConverterSet:
    """``fit_converters`` with the ridge λ chosen (by held-out error, as there) from ``lambdas`` only —
    by default λ ≥ ``MIN_LAMBDA`` (``PASTE_LAMBDAS``); ``lambdas=None`` is ``fit_converters`` itself.

    Why: with all-token profiles the held-out error picks λ ≈ 1e-4, which predicts activations best
    but gives large gains to donor directions the profile barely varies in. A steering vector (a
    high-variance direction) does not care; a trained adapter's edit partly lies in such directions,
    and pasted through those converters it becomes a large, unrelated edit (demo pair: |Δ|/|h| 0.54
    instead of the donor's 0.30, genre effect gone, perplexity ×1.37). See docs/transfer.md.
    """
    return fit_converters(d_prof, r_prof, layer_map=layer_map, lambdas=lambdas)


ADAPTER_PASTES = ("effect", "weights")


def pastes_by_effect(edit: Intervention | Composition, config: "PasteConfig") -> bool:
    """Whether ``paste_between`` pastes ``edit`` by its effect: anything but plain steering vectors, unless
    ``adapter_paste="weights"``."""
    return config.adapter_paste == "effect" and not all(isinstance(e, SteeringVector) for e in edit.edits())


@dataclass
class PasteConfig(Config):
    """How ``paste_between`` profiles, fits and pastes."""

    positions: str = "auto"  # profile rows: "all" tokens when the tokenizers agree, else the "last" prompt token
    cache_dir: str | Path | None = None  # reuse profiles between runs (None: profile afresh)
    layer_map: dict[int, int] | None = None  # donor layer → recipient layer (default: relative depth)
    lambdas: Sequence[float] | None = None  # ridge grid (None: linalg.LAMBDA_GRID) ...
    min_lambda: float = MIN_LAMBDA  # ... restricted to λ ≥ this
    deattenuate: bool = True  # restore the length regression converters lose along the edit's directions
    max_gain: float = DEFAULT_MAX_GAIN  # cap on the de-attenuation gain
    calibrate: bool = True  # pasted adapters/affine maps: match the donor edit's size relative to the stream
    calibrate_effect: str | None = None  # pasted adapters: "shift" / "kl" match the donor edit's effect on the predictions
    adapter_paste: str = "effect"  # adapters/affine maps: "effect" (paste_effect) or "weights" (closed form)
    batch_size: int = 16  # prompts per profiling forward pass

    def validate(self) -> None:
        if self.adapter_paste not in ADAPTER_PASTES:
            raise ActlabError(f"adapter_paste must be one of {ADAPTER_PASTES}, not {self.adapter_paste!r}")
        if self.calibrate_effect not in (None, "shift", "kl"):
            raise ActlabError(f"calibrate_effect must be None, 'shift' or 'kl', not {self.calibrate_effect!r}")


@dataclass
class PasteResult:
    """The pasted intervention with everything it was made from, and how long each part took."""

    pasted: Intervention | Composition
    converters: ConverterSet
    donor_profile: ActivationProfile
    recipient_profile: ActivationProfile
    donor_edit: Intervention | Composition
    seconds: dict[str, float]  # donor_profile, recipient_profile, converters, paste
    positions: str = "all"  # the profile rows actually used ("auto" resolved)
    notes: list[str] = field(default_factory=list)

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """Per pasted item: sites, held-out R² of its converters and |Δ|/|h| in donor and recipient."""
        return predicted_effect(self.donor_edit, self.pasted, self.donor_profile, self.recipient_profile,
                                self.converters)


def _profile(model, prompts: Sequence[str], positions: str, config: PasteConfig,
             progress: bool) -> tuple[ActivationProfile, float]:
    start = time.perf_counter()
    if config.cache_dir is None:
        prof = profile_model(model, prompts, positions=positions, batch_size=config.batch_size, progress=progress)
    else:
        prof = cached_profile(model, prompts, positions=positions, cache_dir=config.cache_dir,
                              batch_size=config.batch_size, progress=progress)
    return prof, time.perf_counter() - start


def _fit_between(donor, recipient, prompts: list[str], config: PasteConfig, progress: bool):
    positions, note = resolve_positions(config.positions, donor, recipient, prompts)
    d_prof, d_seconds = _profile(donor, prompts, positions, config, progress)
    r_prof, r_seconds = _profile(recipient, prompts, positions, config, progress)
    converters = fit_converters(d_prof, r_prof, layer_map=config.layer_map, lambdas=config.lambdas,
                                min_lambda=config.min_lambda)
    return (d_prof, r_prof, converters), positions, note, (d_seconds, r_seconds)


def fit_between(donor, recipient, prompts: Sequence[str] | None = None, config: PasteConfig | None = None, *,
                progress: bool = False, **overrides) -> ConverterSet:
    """The converters ``paste_between`` would fit (the same profiles, cache and λ), before any edit exists:
    what a donor edit made with the recipient in view (``shared_basis``) needs first."""
    from actlab.datasets import profile_texts

    config = PasteConfig.with_overrides(config, overrides)
    prompts = profile_texts() if prompts is None else list(prompts)
    return _fit_between(donor, recipient, prompts, config, progress)[0][2]


def paste_with(donor, recipient, donor_edit: Intervention | Composition, converters: ConverterSet,
               d_prof: ActivationProfile, r_prof: ActivationProfile, config: PasteConfig) -> Intervention | Composition:
    """``donor_edit`` pasted with fitted converters as ``config`` says (by effect or in closed form, sized when
    ``calibrate``): the one dispatch ``paste_between`` and the evaluation's random controls share."""
    if pastes_by_effect(donor_edit, config):
        return paste_effect(donor, recipient, donor_edit, converters, d_prof, r_prof, calibrate=config.calibrate,
                            batch_size=config.batch_size)
    pasted = paste(donor_edit, converters, recipient, deattenuate=config.deattenuate, max_gain=config.max_gain)
    return calibrate_scale(donor_edit, pasted, d_prof, r_prof) if config.calibrate else pasted


def paste_between(donor, recipient, donor_edit: Intervention | Composition, prompts: Sequence[str] | None = None,
                  config: PasteConfig | None = None, *, progress: bool = False, **overrides) -> PasteResult:
    """Profile both models on ``prompts`` (default ``actlab.datasets.profile_texts()``), fit converters and
    paste ``donor_edit`` into ``recipient``."""
    from actlab.datasets import profile_texts

    config = PasteConfig.with_overrides(config, overrides)
    prompts = profile_texts() if prompts is None else list(prompts)
    (d_prof, r_prof, converters), positions, note, (d_seconds, r_seconds) = _fit_between(
        donor, recipient, prompts, config, progress)
    start = time.perf_counter()
    pasted = paste_with(donor, recipient, donor_edit, converters, d_prof, r_prof, config)
    if config.calibrate_effect and any(isinstance(e, AffineMap) for e in pasted.edits()):
        from actlab.transfer.calibration import calibrate_effect

        pasted = calibrate_effect(donor, recipient, donor_edit, pasted, prompts, measure=config.calibrate_effect)
    seconds = {"donor_profile": d_seconds, "recipient_profile": r_seconds, "converters": converters.fit_seconds,
               "paste": time.perf_counter() - start}
    return PasteResult(pasted=pasted, converters=converters, donor_profile=d_prof, recipient_profile=r_prof,
                       donor_edit=donor_edit, seconds=seconds, positions=positions, notes=[note] if note else [])
