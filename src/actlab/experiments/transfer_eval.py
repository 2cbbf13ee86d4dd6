"""Validating Command-V: does a pasted intervention do in the recipient what the recipient's own does?

``evaluate_transfer(donor, recipient, kind="vector" | "adapter")`` runs the whole check on one
behaviour — steering generations toward a target genre — with every piece of data kept apart
(``genre_data``), in steps:

1. **Make the behaviour in the donor** at ``donor_site``: a mean-difference steering vector fitted on
   the contrast texts (``kind="vector"``), or a rank-``rank`` LoReFT adapter trained with ``train_adapter``
   on the genre texts with the LM loss (``kind="adapter"``).
2. **Paste it** into the recipient (``actlab.transfer.paste_between``): both models are profiled on
   ``profile_prompts`` (every token by default — the demo models share a tokenizer — else the last
   prompt token), ridge converters are fitted for every layer pair matched by relative depth with λ
   from ``converter_lambdas`` (by default λ ≥ ``MIN_LAMBDA``), and the paste is an ordinary recipient
   intervention: a vector in closed form at the matched recipient layer, an adapter by its effect at the
   recipient's last layer (``adapter_paste="effect"``; ``"weights"``: closed form at the matched layer).
   No gradient is taken anywhere on this path.
3. **The direct intervention**: the recipient's own intervention of the same kind at the matched layer,
   made from the same data (for vectors: fitted the same way and applied at the same coefficient; for
   adapters: trained on the recipient with the same data, rank, steps and seed).
4. **Random controls** (``transfer_controls``): ``n_random`` = 4 random donor interventions of the same
   kind and size, pasted the same way as the donor's edit, rescaled to the pasted edit's size on the recipient, in
   antithetic pairs; pooled. Per-draw effects are in ``diagnostics``.
5. **Score the recipient** (``transfer_scoring``, with the steering evaluation's ``GenreScorer``):
   ``none``, ``random``, ``pasted``, ``direct``. ``effect = rate − rate(none)``; the issue's targets are
   ``pasted ≥ 0.8 × direct`` and ``random ≤ 0.1 × direct``. Effects carry paired standard errors and the
   two ratios bootstrap intervals (resampling prompts).
6. **Diagnostics** (cosines, norms, relative change sizes) and **compute accounting**
   (``transfer_compute``).

Data (``genre_data.split_setup``): contrast texts as a user brings them — ``n_fit`` bundled passages of
the target genre against as many of the other genres, drawn by ``seed`` from ``split`` ("tune" for
choosing settings, "eval" for reporting) — and ``n_eval_prompts`` pair prompts of the same split; the
profile texts (``actlab.datasets.profile_texts``) are documents of the training text, apart from both.
Defaults are the library's and the CLI's (``paste_between``): positions "auto", λ ≥ 0.1, de-attenuation
capped at 1.5, adapters pasted by their effect and sized to the donor's relative change. Coefficient 0.5 for vectors (the issue's
setting) and 1 for adapters; 80 prompts × 4 samples × 24 tokens.

Default layer (``default_site``): ``resid.mid``, the donor layer whose relative depth ``(i + 1) / n_layers``
is nearest one half — ``resid.1`` of demo-llama (4 layers), matched to ``resid.2`` of demo-gpt2 (6 layers)
exactly, and back. ``actlab.experiments.transfer_matrix`` runs the whole genre × direction × kind × seed
matrix.

Run ``actlab paste eval --kind vector`` (or ``adapter``) for the evaluation of the demo
pair; ``docs/transfer.md`` has the measured numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from actlab.engine.config import Config
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.experiments.genre_data import (
    DEFAULT_EVAL_PROMPTS, DEFAULT_FIT_PAIRS, DEFAULT_TRANSFER_NEUTRAL, SPLITS, GenreSetup, adapter_data,
    default_profile_prompts, split_setup,
)
from actlab.experiments.genre_scoring import DEFAULT_NEW_TOKENS, ScoringConfig
from actlab.experiments.transfer_compute import compute_accounting
from actlab.experiments.transfer_controls import RandomControls, mean_delta_norm, random_controls
from actlab.experiments.transfer_results import N_RANDOM, TransferEvaluation
from actlab.experiments.transfer_scoring import score_donor, score_recipient
from actlab.interventions.types import LowRankAdapter
from actlab.transfer.converters import PASTE_LAMBDAS
from actlab.transfer.paste import DEFAULT_MAX_GAIN, mean_rel_change
from actlab.transfer.pipeline import PasteConfig, PasteResult, paste_between, paste_with
from actlab.transfer.profiles import POSITIONS, resolve_positions

KINDS = ("vector", "adapter")
DEFAULT_GENRE = "scripture"
DEFAULT_VECTOR_COEF = 0.5
DEFAULT_ADAPTER_COEF = 1.0
DEFAULT_SAMPLES = 4
DEFAULT_RANK = 4
DEFAULT_STEPS = 200

__all__ = ["TransferEvalConfig", "EvalData", "evaluate_transfer", "default_site", "evaluation_data",
           "make_behaviour", "DEFAULT_VECTOR_COEF", "KINDS"]


@dataclass
class TransferEvalConfig(Config):
    """Every setting of ``evaluate_transfer`` (saved into the result's JSON as ``config``).

    ``kind``: "vector" (mean-difference steering vector) or "adapter" (rank-``rank`` LoReFT adapter,
    ``steps`` training steps with early stopping). ``coef``: the coefficient every condition is applied
    at (default 0.5 for vectors — in units of the fitted mean difference, where the direct vector is
    well short of saturating the rate — and 1 for adapters). ``donor_site``: default ``default_site``.
    ``split``: "eval" or "tune" (the contrast texts and prompts; ``seed`` draws them). ``positions``: profile
    rows, "auto" (every token when the tokenizers agree, else the last token), "all" or "last".
    ``eval_prompts`` replaces the split's prompts. ``donor_check`` also scores the donor with and without its own intervention.
    ``deattenuate``, ``max_gain``: passed to ``paste`` (for the pasted and the random interventions alike);
    ``calibrate``: rescale pasted adapters to the donor edit's relative size (``calibrate_scale``).
    ``cache_dir``: reuse profiles (``cached_profile``); the timings then measure the cache.
    """

    # what is made, and where
    kind: str = "vector"
    target_genre: str = DEFAULT_GENRE
    split: str = "eval"  # which split's contrast texts and prompts ("tune" when choosing settings)
    rank: int = DEFAULT_RANK  # adapters: rank, training steps, batch
    steps: int = DEFAULT_STEPS
    adapter_batch_size: int = 8
    adapter_subspace: int | None = None  # AdapterConfig.subspace (None: its default)
    adapter_shared_subspace: int = 0  # m > 0: the donor adapter's R inside the m directions the recipient follows best
    donor_site: str | None = None
    n_fit: int = DEFAULT_FIT_PAIRS
    coef: float | None = None
    # how it is pasted
    positions: str = "auto"
    deattenuate: bool = True
    max_gain: float = DEFAULT_MAX_GAIN
    calibrate: bool = True  # pasted adapters: match the donor edit's size relative to the stream
    calibrate_effect: str | None = None  # pasted adapters: "shift" / "kl" match the donor edit's effect on the predictions
    adapter_paste: str = "effect"  # adapters: PasteConfig.adapter_paste ("effect" at the last layer, or "weights")
    profile_prompts: Sequence[str] | None = None
    profile_contrast: int = 0  # also profile the contrast texts, this many times (converters that see the behaviour's data)
    converter_lambdas: Sequence[float] | None = PASTE_LAMBDAS  # None: fit_converters' whole grid
    cache_dir: str | Path | None = None
    # how the conditions are scored
    n_eval_prompts: int = DEFAULT_EVAL_PROMPTS
    samples_per_prompt: int = DEFAULT_SAMPLES
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    n_neutral: int = DEFAULT_TRANSFER_NEUTRAL
    n_random: int = N_RANDOM
    eval_prompts: Sequence[str] | None = None
    donor_check: bool = True
    batch_size: int = 64  # prompts per generate call
    seed: int = 0
    classifier: Any = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ActlabError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.positions not in POSITIONS:
            raise ActlabError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.split not in SPLITS:
            raise ActlabError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        repeats = self.profile_contrast
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
            raise ActlabError(f"profile_contrast is how many times the contrast texts join the profile (0, 1, 2, ...), "
                              f"not {self.profile_contrast!r}")
        if self.n_random < 1:
            raise ActlabError(f"n_random must be at least 1, not {self.n_random}")
        shared = self.adapter_shared_subspace
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ActlabError(f"adapter_shared_subspace is a number of directions (0: anywhere), not {shared!r}")

    @property
    def resolved_coef(self) -> float:
        default = DEFAULT_VECTOR_COEF if self.kind == "vector" else DEFAULT_ADAPTER_COEF
        return float(self.coef if self.coef is not None else default)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["classifier"] = None if self.classifier is None else type(self.classifier).__name__
        return out

    def scoring(self, prompts: Sequence[str], neutral_texts: Sequence[str]) -> ScoringConfig:
        return ScoringConfig(prompts=prompts, neutral_texts=neutral_texts, max_new_tokens=self.max_new_tokens,
                             samples_per_prompt=self.samples_per_prompt, seed=self.seed, do_sample=True,
                             temperature=1.0, batch_size=self.batch_size, classifier=self.classifier)


def default_site(model) -> str:
    """``resid.{i}`` with relative depth ``(i + 1) / n_layers`` nearest 0.5 (``actlab.models.sites.middle_layer``)."""
    from actlab.models.sites import middle_layer

    return f"resid.{middle_layer(model.n_layers)}"


# --------------------------------------------------------------------------------- the data
@dataclass
class EvalData:
    """What one evaluation runs on: fit pairs, evaluation prompts, profile prompts and rows."""

    setup: GenreSetup
    prompts: list[str]  # continued in every condition
    profile_prompts: list[str]
    positions: str  # profile rows actually used
    notes: list[str]

    @property
    def contrast(self):
        return self.setup.contrast

    @property
    def adapter_data(self) -> list:
        return adapter_data(self.setup.contrast)


def evaluation_data(donor, recipient, config: TransferEvalConfig) -> EvalData:
    """The disjoint data sets of one cell (``split_setup``: contrast passages and prompts of ``config.split``,
    drawn with ``config.seed``), checked; ``positions="auto"`` resolved as ``paste run`` does."""
    setup = split_setup(config.target_genre, config.split, config.seed, n_fit=config.n_fit,
                        n_prompts=config.n_eval_prompts, n_neutral=config.n_neutral)
    prompts = list(config.eval_prompts) if config.eval_prompts is not None else setup.prompts
    profile = list(config.profile_prompts) if config.profile_prompts is not None else default_profile_prompts()
    overlap = set(profile) & (set(prompts) | set(setup.contrast.pos) | set(setup.contrast.neg))
    if overlap:
        raise ActlabError(f"{len(overlap)} evaluation prompt(s) or contrast text(s) are also profile prompts "
                          f"(e.g. {next(iter(overlap))[:60]!r}); keep them apart")
    if config.profile_contrast:  # repeated texts weight their rows in the ridge fit
        known = set(profile)
        extra = [t for t in setup.contrast.pos + setup.contrast.neg if t not in known]
        profile = profile + extra * int(config.profile_contrast)
    positions, note = resolve_positions(config.positions, donor, recipient, profile)
    return EvalData(setup, prompts, profile, positions, [note] if note else [])


def _donor_site(donor, recipient, config: TransferEvalConfig) -> str:
    for m in (donor, recipient):
        if not m.is_causal:
            raise ActlabError(f"{m.name} cannot generate text: the transfer evaluation needs causal language models")
    site = donor.resolve(config.donor_site or default_site(donor))[0]
    if not site.startswith("resid."):
        raise ActlabError(f"the donor site must be a residual stream site resid.{{i}}, not {site!r}")
    return site


# --------------------------------------------------------------------------------- the steps
def make_behaviour(model, site: str, data: EvalData, config: TransferEvalConfig,
                   basis=None) -> tuple[Any, float, str]:
    """``(intervention, seconds, how it was made)``: the genre behaviour made in ``model`` at ``site`` (an
    adapter inside ``basis`` when given)."""
    from actlab.interventions.adapter_train import train_adapter
    from actlab.interventions.fit import fit_steering

    start = time.perf_counter()
    if config.kind == "vector":
        edit = fit_steering(model, data.contrast, site, method="mean-diff")[site]
        method = "fit_steering (mean-diff)"
    else:
        edit = train_adapter(model, data.adapter_data, site, rank=config.rank, steps=config.steps,
                             batch_size=config.adapter_batch_size, seed=config.seed, basis=basis,
                             **({} if config.adapter_subspace is None else {"subspace": config.adapter_subspace}))
        method = f"train_adapter (rank {config.rank}, {edit.params.get('steps_run')} steps run)"
    return edit, time.perf_counter() - start, method


def _shared_basis(donor, recipient, donor_site: str, data: EvalData, config: TransferEvalConfig):
    """The donor adapter's directions under ``adapter_shared_subspace`` (None: anywhere)."""
    if config.kind != "adapter" or not config.adapter_shared_subspace:
        return None
    from actlab.transfer.paste import shared_basis
    from actlab.transfer.pipeline import fit_between

    converters = fit_between(donor, recipient, data.profile_prompts, positions=data.positions,
                             cache_dir=config.cache_dir, lambdas=config.converter_lambdas, min_lambda=0.0)
    return shared_basis(converters, int(donor_site.split(".")[1]), config.adapter_shared_subspace)


def _paste(donor, recipient, donor_edit, data: EvalData, config: TransferEvalConfig) -> PasteResult:
    # the evaluation's own grid (min_lambda 0: "auto" is the whole grid; PASTE_LAMBDAS already has the floor)
    return paste_between(donor, recipient, donor_edit, data.profile_prompts, positions=data.positions,
                         cache_dir=config.cache_dir, lambdas=config.converter_lambdas, min_lambda=0.0,
                         deattenuate=config.deattenuate, max_gain=config.max_gain, calibrate=config.calibrate,
                         calibrate_effect=config.calibrate_effect, adapter_paste=config.adapter_paste)


def _control_paste(donor, recipient, transfer: PasteResult, config: TransferEvalConfig):
    """How a random donor edit is pasted for the control: the way the donor's own edit was, before sizing
    (the controls are then matched to the pasted edit's size)."""
    how = PasteConfig(deattenuate=config.deattenuate, max_gain=config.max_gain, calibrate=False,
                      adapter_paste=config.adapter_paste)
    return lambda item: paste_with(donor, recipient, item, transfer.converters, transfer.donor_profile,
                                   transfer.recipient_profile, how)


def _adapter_summary(adapter: LowRankAdapter) -> dict[str, Any]:
    p = adapter.params
    return {"rank": adapter.rank, "W_minus_R_norm": float((adapter.W - adapter.R).norm()),
            "b_norm": float(adapter.b.norm()), "steps_run": p.get("steps_run"), "best_step": p.get("best_step"),
            "val_loss_before": p.get("val_loss_before"), "val_loss": p.get("val_loss"),
            "train_seconds": p.get("train_seconds")}


def diagnostics(kind: str, donor_edit, transfer: PasteResult, direct, controls: RandomControls,
                random_draws: list[float]) -> dict[str, Any]:
    """Cosines, norms and relative change sizes of the donor, pasted and direct interventions."""
    pasted = transfer.pasted
    h_d = transfer.donor_profile.acts[int(donor_edit.site.split(".")[1])]
    h_r = transfer.recipient_profile.acts[int(pasted.site.split(".")[1])]
    h_direct = transfer.recipient_profile.acts[int(direct.site.split(".")[1])]
    out: dict[str, Any] = {
        "donor_rel_change": mean_rel_change(donor_edit, h_d), "pasted_rel_change": mean_rel_change(pasted, h_r),
        "direct_rel_change": mean_rel_change(direct, h_direct),
        "random_raw_size_over_pasted": [s / controls.target_size for s in controls.raw_sizes],
        "random_draw_effects": random_draws,
        "pasted_mean_delta_norm": controls.target_size,
        "direct_mean_delta_norm": mean_delta_norm(direct, h_direct),
        "expected_ratio": pasted.params.get("expected_ratio"),
        "shared_correlations": pasted.params.get("shared_correlations"),
        "scale_calibration": pasted.params.get("scale_calibration"),
    }
    if kind == "vector":
        pv, dv = pasted.vector.float(), direct.vector.float()
        return out | {
            "cosine_pasted_direct": float(torch.nn.functional.cosine_similarity(pv, dv, dim=0)),
            "norm_ratio_pasted_direct": float(pv.norm() / dv.norm()),
            "donor_vector_norm": float(donor_edit.vector.norm()), "pasted_vector_norm": float(pv.norm()),
            "direct_vector_norm": float(dv.norm()),
        }
    return out | {"donor_adapter": _adapter_summary(donor_edit), "direct_adapter": _adapter_summary(direct)}


def _settings(config: TransferEvalConfig, data: EvalData, transfer: PasteResult) -> dict[str, Any]:
    settings = {
        "n_eval_prompts": len(data.prompts), "samples_per_prompt": config.samples_per_prompt,
        "max_new_tokens": config.max_new_tokens, "temperature": 1.0, "seed": config.seed,
        "n_fit_pairs": len(data.contrast.pos), "n_neutral": len(data.setup.neutral_texts),
        "n_random": config.n_random, "random_control": "made in the donor (same norms), pasted, rescaled to the "
        "pasted edit's mean |Δ| on the recipient profile rows; antithetic pairs (r, −r)",
        "eval_prompts": "given" if config.eval_prompts is not None else f"pair prompts of the {config.split} split",
        "split": config.split, "contrast": "bundled held-out passages (genre vs the other genres)",
        "layer_map": transfer.converters.layer_map, "notes": data.notes, "deattenuate": config.deattenuate,
        "max_gain": config.max_gain,
        "deattenuation_gains": transfer.pasted.params.get("deattenuation", {}).get("gains"),
    }
    if config.kind == "adapter":
        settings |= {"rank": config.rank, "steps": config.steps, "adapter_batch_size": config.adapter_batch_size}
    return settings


def evaluate_transfer(donor, recipient, config: TransferEvalConfig | None = None, *, progress: bool = False,
                      **overrides) -> TransferEvaluation:
    """Make a genre-steering behaviour in ``donor``, paste it into ``recipient`` and compare it there
    with the recipient's own intervention, a pasted random one and no intervention (module docstring).
    Settings: a ``TransferEvalConfig`` or its fields as keywords."""
    config = TransferEvalConfig.with_overrides(config, overrides)
    start = time.perf_counter()
    donor_site = _donor_site(donor, recipient, config)
    coef, data = config.resolved_coef, evaluation_data(donor, recipient, config)
    scoring = config.scoring(data.prompts, data.setup.neutral_texts)
    timings: dict[str, Any] = {}
    n_steps = 7 + (2 if config.donor_check else 0)
    with progress_bar(f"Command-V {config.kind} evaluation", n_steps, unit="steps", enabled=progress) as bar:
        donor_edit, timings["donor_fit"], _ = make_behaviour(donor, donor_site, data, config,
                                                             _shared_basis(donor, recipient, donor_site, data, config))
        bar.advance()
        transfer = _paste(donor, recipient, donor_edit, data, config)
        bar.advance()
        pasted = transfer.pasted
        # the recipient's own edit sits at the layer matched to the donor's (where a closed-form paste lands)
        direct_site = f"resid.{transfer.converters.layer_map[int(donor_site.split('.')[1])]}"
        direct, timings["direct_fit"], timings["direct_method"] = make_behaviour(recipient, direct_site, data, config)
        bar.advance()
        h_r = transfer.recipient_profile.acts[int(pasted.site.split(".")[1])]
        controls = random_controls(donor_edit, pasted, h_r, _control_paste(donor, recipient, transfer, config),
                                   n_random=config.n_random, seed=config.seed)
        edits = {"none": None, "random": [r * coef for r in controls.edits], "pasted": pasted * coef,
                 "direct": direct * coef}
        conds, ratios, draws = score_recipient(recipient, config.target_genre, scoring, edits, config.seed, bar)
        donor_conds = (score_donor(donor, config.target_genre, scoring, donor_edit * coef, bar)
                       if config.donor_check else {})
    return TransferEvaluation(
        donor=donor.name, recipient=recipient.name, kind=config.kind, target_genre=config.target_genre, coef=coef,
        donor_site=donor_site, recipient_site=pasted.site, positions=data.positions, conditions=conds,
        donor_conditions=donor_conds, ratios=ratios, converters=transfer.converters.report(),
        converter_fit_seconds=transfer.converters.fit_seconds,
        compute=compute_accounting(donor, recipient, config, data, transfer, direct, timings),
        diagnostics=diagnostics(config.kind, donor_edit, transfer, direct, controls, draws),
        settings=_settings(config, data, transfer), seconds=time.perf_counter() - start, config=config.to_dict())
