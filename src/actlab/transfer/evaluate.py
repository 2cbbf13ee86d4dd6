"""Validating Command-V: does a pasted intervention do in the recipient what the recipient's own does?

``evaluate_transfer(donor, recipient, kind="vector" | "adapter")`` runs the whole check on one
behaviour — steering generations toward a target genre — with every piece of data kept apart:

1. **Make the behaviour in the donor** at ``donor_site``: a mean-difference steering vector fitted on
   the first ``n_fit`` contrast pairs toward the genre (``kind="vector"``), or a rank-``rank`` LoReFT
   adapter trained with ``train_adapter`` on the same pairs' (prompt, genre continuation) texts
   (``kind="adapter"``).
2. **Paste it** into the recipient: both models are profiled on ``profile_prompts``
   (``profile_model`` / ``cached_profile``; every token by default — the demo models share a
   tokenizer — else the last prompt token), ridge converters are fitted for every layer pair matched
   by relative depth (``fit_paste_converters``: ``fit_converters`` with λ ≥ 0.1, see there), and
   ``paste`` gives an ordinary recipient intervention at the matched recipient layer. No gradient is
   taken anywhere on this path.
3. **Compare on the recipient**, with the generation and scoring protocol of
   ``actlab.interventions.evaluate`` (its ``_Scorer``: continuations sampled at temperature 1 with a
   fixed seed shared by every condition — common random numbers — classified by the bundled genre
   classifier; perplexity of held-out neutral texts), four conditions:

   * ``none``: the unedited recipient;
   * ``random``: a random intervention of the same kind made in the *donor* (a ``random_like``
     vector of the donor vector's norm; for adapters, a random orthonormal ``R`` with ``W − R`` and
     ``b`` of the trained adapter's norms), pasted through the same converters, then rescaled so
     that its mean ``‖Δ‖`` on the recipient's profile activations equals the pasted intervention's
     (for vectors: the same norm as the pasted vector). ``n_random`` = 4 draws, pooled: two random
     interventions and their negatives (antithetic pairs — the random distribution is symmetric, so
     this is a sample of it whose first-order effects cancel; what is left is the effect of *any*
     edit of that size, which is what the control is for). Per-draw effects are in ``diagnostics``;
   * ``pasted``: the pasted donor intervention;
   * ``direct``: the recipient's own intervention of the same kind at the matched layer, made from
     the same data (for vectors: fitted the same way and applied at the same coefficient; for
     adapters: trained on the recipient with the same data, rank, steps and seed).

   ``effect = rate − rate(none)``; the issue's targets are ``pasted ≥ 0.8 × direct`` and
   ``random ≤ 0.1 × direct``. Effects carry paired standard errors (per continuation, against the
   same row of ``none``) and the two ratios carry bootstrap intervals (resampling prompts).

Data are disjoint: the steering data are the first ``n_fit`` contrast pairs; the evaluation prompts
are prompts of the *other* pairs that are not also the prompt of a fitted pair; the perplexity texts
are lines of ``neutral.txt``; the profile prompts (``default_profile_prompts``) are the bundled
prompt set plus 10-word openings of ``heldout.jsonl`` passages, none equal to an evaluation prompt.

Defaults, chosen on the *fitted* pairs' prompts (never on the evaluation prompts): genre scripture
(200 pairs, so 80 evaluation prompts are left after fitting on 64; the unedited rate is 0.5–0.6,
leaving room both ways); coefficient 0.5 for vectors (the direct vector moves the rate to ≈ 0.8–0.9 —
at 1 both saturate near 1 and the ratio says little) and 1 for adapters; 80 prompts × 4 samples × 24
tokens; ``paste``'s de-attenuation with its gain capped at 1.5.

Default layer (``default_site``): the donor layer whose relative depth ``(i + 1) / n_layers`` is
nearest one half (ties: the shallower) — ``resid.1`` of demo-llama (4 layers), which matches
``resid.2`` of demo-gpt2 (6 layers) exactly; ``resid.2`` of demo-gpt2, which matches ``resid.1`` of
demo-llama. Middle layers carry the genre in both models (a layer sweep steers from every layer) and
their converters fit as well as any (held-out R² ≈ 0.7–0.8).

Run ``actlab paste eval --kind vector`` (or ``adapter``) for the evaluation of the demo
pair; ``docs/transfer.md`` has the measured numbers.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.report.serialize import save_figure, to_jsonable, write_json
from actlab.interventions.base import Intervention
from actlab.interventions.types import LowRankAdapter, SteeringVector
from actlab.transfer.paste import DEFAULT_MAX_GAIN

KINDS = ("vector", "adapter")
CONDITIONS = ("none", "random", "pasted", "direct")
DEFAULT_GENRE = "scripture"
DEFAULT_VECTOR_COEF = 0.5
DEFAULT_ADAPTER_COEF = 1.0
DEFAULT_EVAL_PROMPTS = 80
DEFAULT_SAMPLES = 4
DEFAULT_NEW_TOKENS = 24
DEFAULT_NEUTRAL = 16
DEFAULT_FIT_PAIRS = 64
DEFAULT_RANK = 4
DEFAULT_STEPS = 200
DEFAULT_POSITIONS = "all"
# ridge λ (relative to the mean eigenvalue) the evaluation lets the converters choose from: at least 0.1
# (see the module docstring); None would be fit_converters' own grid down to 1e-8
PASTE_LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0)
N_RANDOM = 4
PROFILE_PER_GENRE = 60
PROFILE_WORDS = 10
TARGET_PASTED = 0.8
TARGET_RANDOM = 0.1
_SAMPLES_KEPT = 3

__all__ = [
    "Condition", "TransferEvaluation", "evaluate_transfer", "default_profile_prompts", "default_site",
    "evaluation_prompts", "fit_paste_converters", "random_adapter_like", "PASTE_LAMBDAS",
]


# ------------------------------------------------------------------------------------- data
def default_profile_prompts(n_per_genre: int = PROFILE_PER_GENRE, n_words: int = PROFILE_WORDS) -> list[str]:
    """The bundled prompt set (``actlab.datasets.default_prompts()``, ~320 varied prompts) plus the
    first ``n_words`` words of the first ``n_per_genre`` held-out passages of each of the five genres
    (``heldout.jsonl``): 623 prompts by default, so the profile sees the genres' own registers as well
    as everyday text. Deterministic order, no duplicates."""
    from actlab.datasets import default_prompts
    from actlab.datasets import genres as g

    out: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)

    for p in default_prompts():
        add(p)
    for genre in g.GENRES:
        for row in g.heldout(genre)[:n_per_genre]:
            add(" ".join(row["text"].split()[:n_words]))
    return out


def default_site(model) -> str:
    """``resid.{i}`` with relative depth ``(i + 1) / n_layers`` nearest 0.5 (ties: the shallower)."""
    n = model.n_layers
    i = min(range(n), key=lambda k: (abs((k + 1) / n - 0.5), k))
    return f"resid.{i}"


def evaluation_prompts(target_genre: str, n_fit: int = DEFAULT_FIT_PAIRS, n: int = DEFAULT_EVAL_PROMPTS,
                       n_neutral: int = DEFAULT_NEUTRAL):
    """``(GenreSetup, prompts)``: the genre setup of ``actlab.interventions.evaluate`` (fit on the first
    ``n_fit`` pairs) and up to ``n`` evaluation prompts from the other pairs that are not the prompt of
    any fitted pair (``genre_setup`` would top a short list up with fitted prompts; we do not)."""
    from actlab.interventions.evaluate import genre_setup

    setup = genre_setup(target_genre, n_fit=n_fit, n_prompts=10_000, n_neutral=n_neutral)
    fitted = set(setup.contrast.prompts or [])
    prompts = [p for p in setup.prompts if p not in fitted][:n]
    if not prompts:
        raise ActlabError(f"no contrast-pair prompts toward {target_genre!r} are left after the {n_fit} fitted "
                          "pairs; lower n_fit")
    return setup, prompts


# ---------------------------------------------------------------------------------- controls
def random_adapter_like(adapter: LowRankAdapter, seed: int = 0) -> LowRankAdapter:
    """A random adapter of the same size of change: random orthonormal ``R`` (same rank and width),
    ``W = R + G`` with ``‖G‖ = ‖W − R‖`` of ``adapter`` and a random ``b`` with its norm. (Matching
    ``‖W‖`` itself would not do: a trained adapter has ``W ≈ R``, and a random ``W`` of that norm would
    be a far larger edit.)"""
    from actlab.interventions.adapter_train import orthonormal_rows

    gen = torch.Generator().manual_seed(seed)
    rank, width = adapter.R.shape
    R = orthonormal_rows(rank, width, seed)
    G = torch.randn(rank, width, generator=gen)
    G = G / G.norm().clamp_min(1e-12) * (adapter.W.float() - adapter.R.float()).norm()
    b = torch.randn(rank, generator=gen)
    b = b / b.norm().clamp_min(1e-12) * adapter.b.float().norm()
    return LowRankAdapter(site=adapter.site, R=R, W=R + G, b=b, coef=adapter.coef, positions=adapter.positions,
                          model=adapter.model, params={"method": "random", "seed": seed})


def _random_in_donor(item, seed: int):
    from actlab.interventions.fit import random_like

    if isinstance(item, SteeringVector):
        return random_like(item, seed=seed)
    if isinstance(item, LowRankAdapter):
        return random_adapter_like(item, seed=seed)
    raise ActlabError(f"no random control for a {item.kind}")


def _mean_delta_norm(item: Intervention, h: torch.Tensor) -> float:
    with torch.no_grad():
        return float((item.coef * item.delta(h)).norm(dim=-1).mean())


# ------------------------------------------------------------------------------------ results
@dataclass
class Condition:
    """One recipient condition: genre rate of the continuations and neutral perplexity."""

    name: str
    rate: float
    rate_se: float  # binomial standard error
    perplexity: float
    n: int  # continuations scored (pooled over the random draws for "random")
    effect: float = 0.0  # rate - rate(none)
    effect_se: float = 0.0  # paired standard error of the effect (per row against "none")
    samples: list[str] = field(default_factory=list)


@dataclass
class TransferEvaluation:
    """The result of ``evaluate_transfer``; ``summary_lines()`` reads it, ``figure()`` draws it."""

    donor: str
    recipient: str
    kind: str
    target_genre: str
    coef: float
    donor_site: str
    recipient_site: str
    positions: str
    conditions: dict[str, Condition]
    donor_conditions: dict[str, Condition]  # the behaviour in the donor itself ("none", "edited")
    ratios: dict[str, Any]  # pasted/direct and random/direct with bootstrap intervals
    converters: list[dict]  # held-out R² and λ per layer pair
    converter_fit_seconds: float
    compute: dict[str, Any]  # seconds and approximate FLOPs of pasting vs fitting directly
    diagnostics: dict[str, Any]  # cosine / norms / relative change sizes
    settings: dict[str, Any]
    seconds: float

    # ------------------------------------------------------------- numbers
    def effect(self, name: str) -> float:
        return self.conditions[name].effect

    @property
    def pasted_ratio(self) -> float:
        """effect(pasted) / effect(direct)."""
        return self.ratios["pasted_over_direct"]

    @property
    def random_ratio(self) -> float:
        """effect(random) / effect(direct)."""
        return self.ratios["random_over_direct"]

    def targets(self, pasted_min: float = TARGET_PASTED, random_max: float = TARGET_RANDOM) -> dict[str, bool]:
        """The issue's targets on the point estimates (see ``ratios`` for their intervals)."""
        return {"pasted_ge_%g_direct" % pasted_min: bool(self.pasted_ratio >= pasted_min),
                "random_le_%g_direct" % random_max: bool(abs(self.random_ratio) <= random_max)}

    # ------------------------------------------------------------- reading
    def summary_lines(self) -> list[str]:
        c, r, d, k = self.conditions, self.ratios, self.diagnostics, self.compute
        lines = [f"Command-V {self.kind}: {self.donor} {self.donor_site} → {self.recipient} {self.recipient_site} "
                 f"(toward {self.target_genre}, coefficient {self.coef:g}, profile positions {self.positions})"]
        if self.donor_conditions:
            dn, de = self.donor_conditions["none"], self.donor_conditions["edited"]
            lines.append(f"  in the donor: rate {dn.rate:.3f} → {de.rate:.3f} (effect {de.effect:+.3f} ± "
                         f"{de.effect_se:.3f}), perplexity {dn.perplexity:.1f} → {de.perplexity:.1f}")
        lines.append(f"  recipient ({c['none'].n} continuations per condition; random pooled over "
                     f"{self.settings.get('n_random', N_RANDOM)} draws):")
        for name in CONDITIONS:
            x = c[name]
            eff = "" if name == "none" else f"  effect {x.effect:+.3f} ± {x.effect_se:.3f}"
            lines.append(f"    {name:<7} rate {x.rate:.3f} ± {x.rate_se:.3f}{eff}  perplexity {x.perplexity:.1f} "
                         f"({x.perplexity / c['none'].perplexity:.2f}× none)")
        for key, sign, target, relation in (("pasted", "", TARGET_PASTED, "≥"), ("random", "+", TARGET_RANDOM, "≤")):
            lo, hi = r[f"{key}_over_direct_ci"]
            lines.append(f"  {key}/direct effect {r[f'{key}_over_direct']:{sign}.2f} (95% bootstrap {lo:{sign}.2f}–"
                         f"{hi:{sign}.2f}; target {relation} {target:g})")
        lines.append("  held-out R² (R→D / D→R) per pair: " + ", ".join(
            f"{p['donor_layer']}:{p['recipient_layer']} {p['r2_to_donor']:.2f}/{p['r2_to_recipient']:.2f}"
            for p in self.converters) + f" (λ of the used pair: {self._pair_lambda()})")
        if "cosine_pasted_direct" in d:
            lines.append(f"  pasted vs direct vector: cosine {d['cosine_pasted_direct']:.3f}, norm ratio "
                         f"{d['norm_ratio_pasted_direct']:.2f}")
        gains = self.settings.get("deattenuation_gains")
        lines.append(f"  de-attenuation gains (max {self.settings.get('max_gain')}): " + ", ".join(f"{g:.2f}" for g in gains)
                     if gains else "  de-attenuation: off")
        lines.append(f"  |Δ|/|h| on the profile rows: donor {d['donor_rel_change']:.3f}, pasted "
                     f"{d['pasted_rel_change']:.3f}, direct {d['direct_rel_change']:.3f}")
        lines.append(f"  compute: paste {k['paste_seconds']:.1f} s (profiles {k['profile_seconds']:.1f} s, converters "
                     f"{k['converter_fit_seconds']:.2f} s, paste {k['paste_only_seconds'] * 1e3:.1f} ms; "
                     f"≈{k['paste_gflop']:.0f} GFLOP) vs direct {k['direct_method']} {k['direct_seconds']:.1f} s "
                     f"(≈{k['direct_gflop']:.0f} GFLOP)")
        lines.append(f"  total {self.seconds:.1f} s")
        return lines

    def _pair_lambda(self) -> str:
        pair = next((p for p in self.converters if f"resid.{p['donor_layer']}" == self.donor_site), None)
        return "?" if pair is None else f"{pair['lambda_to_donor']:g} R→D, {pair['lambda_to_recipient']:g} D→R"

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "kind": "transfer_evaluation", "donor": self.donor, "recipient": self.recipient, "intervention": self.kind,
            "target_genre": self.target_genre, "coef": self.coef, "donor_site": self.donor_site,
            "recipient_site": self.recipient_site, "positions": self.positions,
            "conditions": {k: asdict(v) for k, v in self.conditions.items()},
            "donor_conditions": {k: asdict(v) for k, v in self.donor_conditions.items()},
            "ratios": self.ratios, "targets": self.targets(), "converters": self.converters,
            "converter_fit_seconds": self.converter_fit_seconds, "compute": self.compute,
            "diagnostics": self.diagnostics, "settings": self.settings, "seconds": self.seconds,
        })

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def figure(self, path: str | Path | None = None):
        """Bars: target-genre rate of none / random-pasted / pasted / direct (± binomial SE), neutral
        perplexity written above each bar. Saved to ``path`` when given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        labels = {"none": "none", "random": "random\n(pasted)", "pasted": "pasted", "direct": "direct"}
        colors = {"none": "#999999", "random": "#c9b37e", "pasted": "#3b75af", "direct": "#519e3e"}
        x = np.arange(len(CONDITIONS))
        rates = [self.conditions[n].rate for n in CONDITIONS]
        ses = [self.conditions[n].rate_se for n in CONDITIONS]
        ax.bar(x, rates, yerr=ses, capsize=4, color=[colors[n] for n in CONDITIONS])
        for i, n in enumerate(CONDITIONS):
            ax.text(i, rates[i] + ses[i] + 0.02, f"ppl {self.conditions[n].perplexity:.0f}", ha="center", fontsize=8)
        ax.axhline(self.conditions["none"].rate, color="black", linewidth=0.6)
        ax.set(xticks=x, xticklabels=[labels[n] for n in CONDITIONS], ylim=(0, 1.12),
               ylabel=f"'{self.target_genre}' rate of continuations",
               title=f"{self.kind}: {self.donor} {self.donor_site} → {self.recipient} {self.recipient_site}\n"
                     f"pasted/direct {self.pasted_ratio:.2f}, random/direct {self.random_ratio:+.2f}")
        ax.title.set_fontsize(9)
        return save_figure(fig, path)




# ------------------------------------------------------------------------------------ scoring
class _Rows:
    """Per-continuation scoring with ``interventions.evaluate``'s scorer (same generation protocol),
    keeping each row's hit so effects can be paired and bootstrapped."""

    def __init__(self, model, *, target_genre, prompts, neutral_texts, max_new_tokens, samples_per_prompt, seed,
                 batch_size, classifier):
        from actlab.interventions.evaluate import _Scorer

        self.scorer = _Scorer(model, target_genre=target_genre, prompts=prompts, neutral_texts=neutral_texts,
                              max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                              do_sample=True, temperature=1.0, batch_size=batch_size, classifier=classifier)
        self.model, self.target = model, target_genre
        self.prompt_of_row = np.repeat(np.arange(len(prompts)), samples_per_prompt)

    def run(self, name: str, edits) -> tuple[Condition, np.ndarray]:
        """Score one edit, None (unedited), or a list of edits pooled (hits averaged per row);
        ``self.last_hits`` keeps each edit's own hits."""
        edits = edits if isinstance(edits, list) else [edits]
        hits, log_ppl, texts = [], [], []
        for e in edits:
            with self.model.edit(e) if e is not None else nullcontext():
                out = self.scorer.continuations()
                log_ppl.append(math.log(self.scorer.perplexity()))
            pred = self.scorer.classifier.predict(out)
            hits.append(np.array([p == self.target for p in pred], dtype=float))
            texts += out
        self.last_hits = hits
        row = np.mean(hits, axis=0)
        rate = float(row.mean())
        n = len(row) * len(edits)
        cond = Condition(name=name, rate=rate, rate_se=math.sqrt(rate * (1 - rate) / n),
                         perplexity=math.exp(float(np.mean(log_ppl))), n=n, samples=texts[:_SAMPLES_KEPT])
        return cond, row


def _paired(cond: Condition, row: np.ndarray, base: Condition, base_row: np.ndarray) -> None:
    diff = row - base_row
    cond.effect = float(diff.mean())
    cond.effect_se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0


def _bootstrap_ratios(rows: dict[str, np.ndarray], prompt_of_row: np.ndarray, seed: int, n_boot: int = 2000) -> dict:
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
    out["n_bootstrap"] = n_boot
    out["resampled"] = "prompts"
    return out


# ------------------------------------------------------------------------------------ compute
def _n_params(model) -> int:
    return int(sum(p.numel() for p in model.hf.parameters()))


def _n_tokens(model, texts: Sequence[str]) -> int:
    return int(sum(len(ids) for ids in model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]))


def _ridge_flops(n: int, d_in: int, d_out: int, grid: int, holdout: float = 0.2) -> float:
    """Gram matrices (train split and all rows), one solve per λ plus the refit, held-out predictions."""
    gram = 2 * 2.0 * n * d_in * (d_in + d_out)
    solves = (grid + 1) * (2 / 3 * d_in**3 + 2.0 * d_in**2 * d_out)
    preds = grid * 2.0 * holdout * n * d_in * d_out
    return gram + solves + preds


def _converter_flops(converters, d_prof, r_prof) -> float:
    from actlab.transfer.converters import LAMBDA_GRID

    n = d_prof.acts[0].shape[0]
    total = 0.0
    for _d, _r in converters.layer_map.items():
        total += _ridge_flops(n, r_prof.d_model, d_prof.d_model, len(LAMBDA_GRID))
        total += _ridge_flops(n, d_prof.d_model, r_prof.d_model, len(LAMBDA_GRID))
    return total


def _adapter_flops(model, data, adapter: LowRankAdapter, batch_size: int, steps: int) -> float:
    """≈ 2P FLOPs per token forward, ≈ 2P more backward (activation gradients only: weights frozen),
    for ``steps_run`` batches of ``batch_size`` examples, plus the held-out evaluations (forward)."""
    from actlab.interventions.adapter_train import encode_lm_data

    _, examples = encode_lm_data(model, data)
    mean_len = float(np.mean([len(p) + len(c) for p, c in examples]))
    P = _n_params(model)
    p = adapter.params
    steps_run = int(p.get("steps_run", steps))
    eval_every = max(1, min(25, steps // 20))
    n_evals = steps_run // eval_every + 2
    train = steps_run * batch_size * mean_len * 4.0 * P
    evals = n_evals * int(p.get("n_val", 0)) * mean_len * 2.0 * P
    return train + evals


# ------------------------------------------------------------------------------------ the run
def fit_paste_converters(d_prof, r_prof, lambdas: Sequence[float] | None = PASTE_LAMBDAS, *,
                         layer_map: dict[int, int] | None = None):
    """``fit_converters`` with the ridge λ chosen (by held-out error, as there) from ``lambdas`` only —
    by default λ ≥ 0.1 (``PASTE_LAMBDAS``); ``lambdas=None`` is ``fit_converters`` itself.

    Why: with all-token profiles the held-out error picks λ ≈ 1e-4, which predicts activations best
    but gives large gains to donor directions the profile barely varies in. A steering vector (a
    high-variance direction) does not care; a trained adapter's edit partly lies in such directions,
    and pasted through those converters it becomes a large, unrelated edit (demo pair: |Δ|/|h| 0.54
    instead of the donor's 0.30, genre effect gone, perplexity ×1.37). See docs/transfer.md.
    """
    from actlab.transfer.converters import fit_converters

    return fit_converters(d_prof, r_prof, layer_map=layer_map, lambdas=lambdas)


def _same_tokens(donor, recipient, prompts: Sequence[str]) -> bool:
    a = donor.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    b = recipient.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return [list(x) for x in a] == [list(x) for x in b]


def evaluate_transfer(
    donor,
    recipient,
    *,
    kind: str = "vector",
    target_genre: str = DEFAULT_GENRE,
    donor_site: str | None = None,
    coef: float | None = None,
    profile_prompts: Sequence[str] | None = None,
    positions: str = DEFAULT_POSITIONS,
    n_eval_prompts: int = DEFAULT_EVAL_PROMPTS,
    samples_per_prompt: int = DEFAULT_SAMPLES,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    n_fit: int = DEFAULT_FIT_PAIRS,
    n_neutral: int = DEFAULT_NEUTRAL,
    n_random: int = N_RANDOM,
    rank: int = DEFAULT_RANK,
    steps: int = DEFAULT_STEPS,
    adapter_batch_size: int = 8,
    converter_lambdas: Sequence[float] | None = PASTE_LAMBDAS,
    deattenuate: bool = True,
    max_gain: float = DEFAULT_MAX_GAIN,
    eval_prompts: Sequence[str] | None = None,
    donor_check: bool = True,
    cache_dir: str | Path | None = None,
    classifier=None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> TransferEvaluation:
    """Make a genre-steering behaviour in ``donor``, paste it into ``recipient`` and compare it there
    with the recipient's own intervention, a pasted random one and no intervention (module docstring).

    ``kind``: "vector" (mean-difference steering vector) or "adapter" (rank-``rank`` LoReFT adapter,
    ``steps`` training steps with early stopping). ``coef``: the coefficient every condition is applied
    at (default 0.5 for vectors — in units of the fitted mean difference, where the direct vector is
    well short of saturating the rate — and 1 for adapters). ``donor_site``: default ``default_site``.
    ``positions``: profile rows, "all" (every token; needs the same tokenizer, falls back to "last"
    otherwise) or "last". ``eval_prompts`` replaces the held-out pair prompts (e.g. for tuning on
    other prompts). ``donor_check`` also scores the donor with and without its own intervention.
    ``deattenuate``, ``max_gain``: passed to ``paste`` (for the pasted and the random interventions alike).
    ``cache_dir``: reuse profiles (``cached_profile``); the timings then measure the cache.
    """
    from actlab.interventions.adapter_train import train_adapter
    from actlab.interventions.fit import fit_steering
    from actlab.transfer.paste import paste
    from actlab.transfer.profiles import cached_profile, profile_model

    start = time.perf_counter()
    if kind not in KINDS:
        raise ActlabError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if positions not in ("all", "last"):
        raise ActlabError(f"positions must be 'all' or 'last', not {positions!r}")
    if n_random < 1:
        raise ActlabError(f"n_random must be at least 1, not {n_random}")
    for m in (donor, recipient):
        if not m.is_causal:
            raise ActlabError(f"{m.name} cannot generate text: the transfer evaluation needs causal language models")
    coef = float(coef if coef is not None else (DEFAULT_VECTOR_COEF if kind == "vector" else DEFAULT_ADAPTER_COEF))
    donor_site = donor.resolve(donor_site or default_site(donor))[0]
    d_layer = int(donor_site.split(".")[1]) if donor_site.startswith("resid.") else None
    if d_layer is None:
        raise ActlabError(f"the donor site must be a residual stream site resid.{{i}}, not {donor_site!r}")

    setup, held_prompts = evaluation_prompts(target_genre, n_fit=n_fit, n=n_eval_prompts, n_neutral=n_neutral)
    prompts = list(eval_prompts) if eval_prompts is not None else held_prompts
    profile_prompts = list(profile_prompts) if profile_prompts is not None else default_profile_prompts()
    overlap = set(profile_prompts) & set(prompts)
    if overlap:
        raise ActlabError(f"{len(overlap)} evaluation prompt(s) are also profile prompts (e.g. {next(iter(overlap))!r}); "
                          "keep them apart")
    notes: list[str] = []
    if positions == "all" and not _same_tokens(donor, recipient, profile_prompts):
        positions = "last"
        notes.append("the tokenizers differ, so the profile uses the last prompt token only")
    contrast = setup.contrast
    adapter_data = list(zip(contrast.prompts, contrast.pos)) if contrast.paired else list(contrast.pos)

    n_steps = 7 + (2 if donor_check else 0)
    with progress_bar(f"Command-V {kind} evaluation", n_steps, unit="steps", enabled=progress) as bar:
        # 1. the behaviour in the donor
        t = time.perf_counter()
        if kind == "vector":
            donor_edit = fit_steering(donor, contrast, donor_site, method="mean-diff")[donor_site]
        else:
            donor_edit = train_adapter(donor, adapter_data, donor_site, rank=rank, steps=steps,
                                       batch_size=adapter_batch_size, seed=seed)
        donor_fit_seconds = time.perf_counter() - t
        bar.advance()

        # 2. profiles, converters, paste
        profile = (lambda m: cached_profile(m, profile_prompts, positions=positions, cache_dir=cache_dir)) \
            if cache_dir is not None else (lambda m: profile_model(m, profile_prompts, positions=positions))
        t = time.perf_counter()
        d_prof = profile(donor)
        d_prof_seconds = time.perf_counter() - t
        t = time.perf_counter()
        r_prof = profile(recipient)
        r_prof_seconds = time.perf_counter() - t
        bar.advance()
        converters = fit_paste_converters(d_prof, r_prof, converter_lambdas)
        bar.advance()
        t = time.perf_counter()
        pasted = paste(donor_edit, converters, recipient, deattenuate=deattenuate, max_gain=max_gain)
        paste_only_seconds = time.perf_counter() - t
        recipient_site = pasted.site
        r_layer = int(recipient_site.split(".")[1])

        # 3. the recipient's own intervention at the matched layer, from the same data
        t = time.perf_counter()
        if kind == "vector":
            direct = fit_steering(recipient, contrast, recipient_site, method="mean-diff")[recipient_site]
            direct_method = "fit_steering (mean-diff)"
        else:
            direct = train_adapter(recipient, adapter_data, recipient_site, rank=rank, steps=steps,
                                   batch_size=adapter_batch_size, seed=seed)
            direct_method = f"train_adapter (rank {rank}, {direct.params.get('steps_run')} steps run)"
        direct_seconds = time.perf_counter() - t
        bar.advance()

        # random controls: made in the donor, pasted, then matched to the pasted edit's size on the recipient
        h_r = r_prof.acts[r_layer]
        target_size = _mean_delta_norm(pasted, h_r)
        randoms, raw_sizes = [], []
        for j in range((n_random + 1) // 2):
            rnd = paste(_random_in_donor(donor_edit, seed + 7919 * (j + 1)), converters, recipient,
                        deattenuate=deattenuate, max_gain=max_gain)
            size = _mean_delta_norm(rnd, h_r)
            raw_sizes.append(size)
            rnd = rnd.scaled(target_size / size if size > 0 else 1.0)
            randoms += [rnd, rnd.scaled(-1.0)][: n_random - len(randoms)]  # antithetic pairs: r and −r

        # 4. score the recipient
        rows = _Rows(recipient, target_genre=target_genre, prompts=prompts, neutral_texts=setup.neutral_texts,
                     max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                     batch_size=batch_size, classifier=classifier)
        conds: dict[str, Condition] = {}
        hits: dict[str, np.ndarray] = {}
        for name, edit in (("none", None), ("random", [r * coef for r in randoms]), ("pasted", pasted * coef),
                           ("direct", direct * coef)):
            conds[name], hits[name] = rows.run(name, edit)
            if name == "random":
                random_draws = [float((h - hits["none"]).mean()) for h in rows.last_hits]
            bar.advance()
        for name in CONDITIONS[1:]:
            _paired(conds[name], hits[name], conds["none"], hits["none"])
        ratios = _bootstrap_ratios(hits, rows.prompt_of_row, seed)

        donor_conds: dict[str, Condition] = {}
        if donor_check:
            drows = _Rows(donor, target_genre=target_genre, prompts=prompts, neutral_texts=setup.neutral_texts,
                          max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                          batch_size=batch_size, classifier=classifier)
            donor_conds["none"], dn = drows.run("none", None)
            bar.advance()
            donor_conds["edited"], de = drows.run("edited", donor_edit * coef)
            _paired(donor_conds["edited"], de, donor_conds["none"], dn)
            bar.advance()

    # diagnostics
    h_d = d_prof.acts[d_layer]
    rel = lambda item, h: float(((item.coef * item.delta(h)).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).mean())
    diagnostics: dict[str, Any] = {
        "donor_rel_change": rel(donor_edit, h_d), "pasted_rel_change": rel(pasted, h_r),
        "direct_rel_change": rel(direct, h_r), "random_raw_size_over_pasted": [s / target_size for s in raw_sizes],
        "random_draw_effects": random_draws,
        "pasted_mean_delta_norm": target_size, "direct_mean_delta_norm": _mean_delta_norm(direct, h_r),
    }
    if kind == "vector":
        pv, dv = pasted.vector.float(), direct.vector.float()
        diagnostics |= {
            "cosine_pasted_direct": float(torch.nn.functional.cosine_similarity(pv, dv, dim=0)),
            "norm_ratio_pasted_direct": float(pv.norm() / dv.norm()),
            "donor_vector_norm": float(donor_edit.vector.norm()), "pasted_vector_norm": float(pv.norm()),
            "direct_vector_norm": float(dv.norm()),
        }
    else:
        diagnostics |= {"donor_adapter": _adapter_summary(donor_edit), "direct_adapter": _adapter_summary(direct)}

    # compute
    profile_flops = sum(2.0 * _n_params(m) * _n_tokens(m, profile_prompts) for m in (donor, recipient))
    paste_flops = profile_flops + _converter_flops(converters, d_prof, r_prof)
    if kind == "vector":
        texts = [p + x for side in (contrast.pos, contrast.neg) for p, x in zip(contrast.prompts, side)]
        direct_flops = 2.0 * _n_params(recipient) * _n_tokens(recipient, texts)
    else:
        direct_flops = _adapter_flops(recipient, adapter_data, direct, adapter_batch_size, steps)
    profile_seconds = d_prof_seconds + r_prof_seconds
    compute = {
        "profile_seconds": profile_seconds, "donor_profile_seconds": d_prof_seconds,
        "recipient_profile_seconds": r_prof_seconds, "profile_rows": int(h_d.shape[0]),
        "profile_prompts": len(profile_prompts), "profile_cached": cache_dir is not None,
        "converter_fit_seconds": converters.fit_seconds, "paste_only_seconds": paste_only_seconds,
        "paste_seconds": profile_seconds + converters.fit_seconds + paste_only_seconds,
        "paste_gflop": paste_flops / 1e9, "profile_gflop": profile_flops / 1e9, "donor_fit_seconds": donor_fit_seconds,
        "direct_method": direct_method, "direct_seconds": direct_seconds, "direct_gflop": direct_flops / 1e9,
        "threads": torch.get_num_threads(),
        "note": "FLOPs ≈ 2·params per token forward (+2·params backward for adapter training, weights frozen) "
                "plus the ridge algebra; profiles are reusable across interventions, converters too",
    }
    settings = {
        "n_eval_prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
        "temperature": 1.0, "seed": seed, "n_fit_pairs": len(contrast.pos), "n_neutral": len(setup.neutral_texts),
        "n_random": n_random, "random_control": "made in the donor (same norms), pasted, rescaled to the pasted "
        "edit's mean |Δ| on the recipient profile rows; antithetic pairs (r, −r)", "eval_prompts": "given" if eval_prompts is not None else
        "held-out contrast-pair prompts", "layer_map": converters.layer_map, "notes": notes,
        "deattenuate": deattenuate, "max_gain": max_gain, "deattenuation_gains": pasted.params.get("deattenuation", {}).get("gains"),
    }
    if kind == "adapter":
        settings |= {"rank": rank, "steps": steps, "adapter_batch_size": adapter_batch_size}
    return TransferEvaluation(
        donor=donor.name, recipient=recipient.name, kind=kind, target_genre=target_genre, coef=coef,
        donor_site=donor_site, recipient_site=recipient_site, positions=positions, conditions=conds,
        donor_conditions=donor_conds, ratios=ratios, converters=converters.report(),
        converter_fit_seconds=converters.fit_seconds, compute=compute, diagnostics=diagnostics, settings=settings,
        seconds=time.perf_counter() - start)


def _adapter_summary(adapter: LowRankAdapter) -> dict[str, Any]:
    p = adapter.params
    return {"rank": adapter.rank, "W_minus_R_norm": float((adapter.W - adapter.R).norm()),
            "b_norm": float(adapter.b.norm()), "steps_run": p.get("steps_run"), "best_step": p.get("best_step"),
            "val_loss_before": p.get("val_loss_before"), "val_loss": p.get("val_loss"),
            "train_seconds": p.get("train_seconds")}


# ------------------------------------------------------------------------------------- script


def parse_lambdas(text: str) -> Sequence[float] | None:
    """``paste`` (λ ≥ 0.1), ``auto`` (fit_converters' own grid) or numbers separated by commas."""
    if text == "paste":
        return PASTE_LAMBDAS
    if text == "auto":
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ActlabError(f"--lambdas expects paste, auto or numbers separated by commas, not {text!r}") from None


def write_result(result: "TransferEvaluation", out: str | Path, name: str | None = None) -> list[Path]:
    """``{name}.json`` and ``{name}.png`` under ``out``."""
    out = Path(out)
    stem = name or f"transfer_{result.kind}_{result.donor}_to_{result.recipient}"
    paths = [out / f"{stem}.json", out / f"{stem}.png"]
    result.save(paths[0])
    result.figure(paths[1])
    return paths

