"""Performance-aware activation sparsity ("PPL-p%", the Sparsing Law of Luo et al., 2024).

How sparse can the MLP activations be made before the model gets worse? A rule maps one global
level in [0, 1] to a per-layer threshold for every ``mlp.hidden.{i}`` site:

* ``rule="cett"`` (default, the paper's): the level is a shared CETT target ``tau``; layer i's
  threshold is the largest ``eps_i`` whose mean CETT on the reservoir is at most ``tau``
  (``actlab.sparse.cett``), and the edit zeroes neuron j where ``|a_j| * ||w_out,j|| < eps_i``;
* ``rule="quantile"`` (uniform quantile): the level ``s`` gives every layer the threshold
  ``t_i(s)`` = the s-quantile of ``|a|`` in its reservoir sample, so every layer is made about
  ``s`` sparse and the least sparse layer sets the limit.

The PPL-p% point is the largest level whose perplexity on held-out texts is at most
``(1 + p/100)`` times the unedited perplexity, found by bisection (assuming perplexity grows with
the level); the activation ratio is the fraction of neurons left non-zero there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from actlab.analyses.base import ProfileData, Skipped, layer_index, perplexity, pick, reservoir_acts, sites_of_kind
from actlab.analyses.figures import integer_xaxis, new_axes
from actlab.engine.config import Config, check_fields
from actlab.errors import ActlabError
from actlab.report.serialize import to_jsonable
from actlab.sparse.cett import CettCurve, ContributionThreshold, output_norms

__all__ = ["PplSparsityConfig", "ThresholdEdit", "PplSparsityResult", "ppl_sparsity", "layer_thresholds"]

RULES = {"cett": "CETT rule", "quantile": "uniform-quantile rule"}


@dataclass
class PplSparsityConfig(Config):
    """Options of ``ppl_sparsity`` (saved in its result)."""

    ps: tuple[float, ...] = (1.0, 5.0)  # perplexity budgets, % above the unedited model
    rule: str = "cett"  # "cett" (the Sparsing Law's) or "quantile" (one |a| quantile level for every layer)
    steps: int = 8  # bisection halvings of [0, 1]: the level is found to 2**-steps
    max_texts: int | None = None  # evaluation texts used (None: all, as the other perplexity checks)
    calibration_tokens: int = 1024  # reservoir tokens the CETT thresholds are calibrated on (seeded subset)
    seed: int = 0

    def validate(self) -> None:
        check_fields(self, positive_ints=("steps", "calibration_tokens"), choices={"rule": tuple(RULES)})
        if self.max_texts is not None:
            check_fields(self, positive_ints=("max_texts",))
        if not self.ps or any(not (isinstance(p, (int, float)) and p >= 0) for p in self.ps):
            raise ActlabError(f"ps must be perplexity budgets >= 0 in percent, such as (1, 5); got {self.ps!r}")

Evaluate = Callable[[float, dict[str, float]], float]


@dataclass
class ThresholdEdit(ContributionThreshold):
    """Zero the entries of ``site`` whose magnitude is below ``threshold`` (``|x| < threshold``): the
    uniform-quantile rule's edit, a ``ContributionThreshold`` without output norms (it counts the
    sparsity the model really ran with the same way)."""


def layer_thresholds(sorted_abs: dict[str, np.ndarray], level: float) -> dict[str, float]:
    """Per-site threshold for target sparsity ``level``: the order statistic at index
    ``floor(level * N)`` of the site's sorted |x| sample (``inf`` for level 1, 0 for level 0), so
    the fraction of the sample strictly below it is at most ``level`` (equal when no ties)."""
    out = {}
    for site, a in sorted_abs.items():
        n = a.shape[0]
        i = int(math.floor(level * n))
        out[site] = 0.0 if level <= 0 else (math.inf if i >= n else float(a[i]))
    return out


@dataclass
class PplSparsityResult:
    """PPL-p% sparsity per p (see ``ppl_sparsity``)."""

    ps: list[float]
    base_ppl: float
    layers: list[int]
    sites: list[str]
    natural_zero_frac: list[float]  # per layer, exact-zero fraction without edit (on the eval texts)
    levels: list[dict[str, Any]]  # one per p: see ``ppl_sparsity``
    evaluations: list[dict[str, float]]  # every (level, ppl, measured sparsity) evaluated, by level
    steps: int
    n_eval_texts: int
    rule: str = "cett"
    config: dict[str, Any] = field(default_factory=dict)
    key: str = "ppl_sparsity"
    title: str = "Performance-aware sparsity (PPL-p%)"
    explanation: str = (
        "How much of the MLP activation can be switched off before the model gets worse, measured as in 'Sparsing "
        "Law: Towards Large Language Models with Greater Activation Sparsity' (Luo et al., 2024). Neuron j of a "
        "layer contributes |a_j|·||w_out,j|| to the MLP output; it is switched off when that contribution is below "
        "the layer's threshold. Each layer's threshold is the largest one whose cumulative error of tail truncation "
        "(CETT: the norm of the switched-off part of the MLP output over the norm of the whole output, averaged "
        "over sampled tokens) stays within one CETT target shared by all layers. The PPL-p% point is the largest "
        "CETT target (found by bisection) whose perplexity on held-out text is at most p% above the unedited "
        "model's; the activation ratio is the fraction of neurons left on there. With the uniform-quantile rule "
        "(an option) every layer instead gets the same quantile level of |a|. The plot shows perplexity against "
        "the measured sparsity of every level tried."
    )

    def headline(self) -> str:
        if not self.levels:
            return "n/a"
        r = self.levels[0]
        return (f"PPL-{r['p']:g}% ({RULES.get(self.rule, self.rule)}): activation ratio "
                f"{100 * r['activation_ratio']:.1f}% (sparsity {100 * r['sparsity']:.1f}%)")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(pick(self, "rule", "config", "ps", "base_ppl", "layers", "sites", "natural_zero_frac",
                                "levels", "evaluations", "steps", "n_eval_texts"))

    def table(self):
        level = "CETT target" if self.rule == "cett" else "quantile level s"
        cols = ["p %", level, "activation ratio %", "sparsity %", "perplexity", "rise %",
                "next level (fails)", "its rise %"]
        rows = []
        for r in self.levels:
            rows.append([r["p"], round(r["level"], 4), round(100 * r["activation_ratio"], 2),
                         round(100 * r["sparsity"], 2), round(r["ppl"], 4), round(r["rise_pct"], 3),
                         None if r["next_level"] is None else round(r["next_level"], 4),
                         None if r["next_rise_pct"] is None else round(r["next_rise_pct"], 3)])
        return cols, rows

    def figures(self) -> list:
        figs = []
        ev = [e for e in self.evaluations if math.isfinite(e["ppl"])]
        if ev:
            fig, ax = new_axes()
            xs = [100 * (e["sparsity"] if e["sparsity"] is not None and math.isfinite(e["sparsity"]) else e["level"])
                  for e in ev]
            ax.plot(xs, [e["ppl"] for e in ev], "o", ms=4, label="levels tried")
            for r in self.levels:
                ax.axhline(self.base_ppl * (1 + r["p"] / 100), ls=":", lw=1, color="grey")
                ax.plot([100 * r["sparsity"]], [r["ppl"]], "*", ms=12, label=f"PPL-{r['p']:g}%")
            ax.axhline(self.base_ppl, color="black", lw=1, label="unedited")
            ax.set_yscale("log")
            ax.set_xlabel("MLP activation sparsity (%)")
            ax.set_ylabel("perplexity")
            ax.set_title("Perplexity vs. magnitude-threshold sparsity")
            ax.legend(fontsize="small")
            figs.append(fig)
        if self.levels and self.layers:
            fig, ax = new_axes()
            for r in self.levels:
                ax.plot(self.layers, [100 * v if v is not None else math.nan for v in r["sparsity_per_layer"]], "o-",
                        label=f"PPL-{r['p']:g}%")
            ax.plot(self.layers, [100 * v for v in self.natural_zero_frac], "k--", label="unedited (exact zeros)")
            ax.set_xlabel("layer")
            integer_xaxis(ax)
            ax.set_ylabel("sparsity (%)")
            ax.set_ylim(0, 100)
            ax.set_title("Per-layer sparsity at PPL-p%")
            ax.legend(fontsize="small")
            figs.append(fig)
        return figs


class _Levels:
    """Evaluates (and caches) the model at global levels: thresholds, perplexity, measured sparsity."""

    def __init__(self, model, data: ProfileData, sites: list[str], texts: list[str], batch_size: int,
                 evaluate: Evaluate | None, config: PplSparsityConfig, downs: dict[str, torch.Tensor]):
        self.model, self.sites, self.texts, self.batch_size, self.evaluate = model, sites, texts, batch_size, evaluate
        self.rule = config.rule
        self.norms = {s: output_norms(downs[s]) for s in downs}
        acts = {s: reservoir_acts(data, s) for s in sites}
        if self.rule == "cett":
            gen = torch.Generator().manual_seed(config.seed)
            rows = {s: torch.randperm(a.shape[0], generator=gen)[:config.calibration_tokens] for s, a in acts.items()}
            self.curves = {s: CettCurve(acts[s][rows[s]], downs[s]) for s in sites}
            scores = {s: acts[s].abs().double() * self.norms[s] for s in sites}
        else:
            scores = {s: a.abs() for s, a in acts.items()}
        self.sorted_scores = {s: np.sort(v.flatten().numpy()) for s, v in scores.items()}
        self.cache: dict[float, dict[str, Any]] = {}
        self.base = self(0.0)["ppl"]

    def thresholds(self, level: float) -> dict[str, float]:
        if level <= 0:
            return {}
        if self.rule == "cett":
            return {s: self.curves[s].threshold(level) for s in self.sites}
        return layer_thresholds(self.sorted_scores, level)

    def edit(self, site: str, threshold: float):
        if self.rule == "cett":
            return ContributionThreshold(site, threshold, self.norms[site].float())
        return ThresholdEdit(site, threshold)

    def reservoir_sparsity(self, thresholds: dict[str, float]) -> dict[str, float]:
        """Per site, the fraction of the reservoir sample the thresholds would zero (or is zero already)."""
        out = {}
        for s, a in self.sorted_scores.items():
            t = thresholds.get(s, 0.0)
            below = a.shape[0] if math.isinf(t) else int(np.searchsorted(a, t, side="left"))
            zeros = int(np.searchsorted(a, 0.0, side="right"))
            out[s] = max(below, zeros) / a.shape[0]
        return out

    def __call__(self, level: float) -> dict[str, Any]:
        level = float(level)
        if level in self.cache:
            return self.cache[level]
        thresholds = self.thresholds(level)
        if self.evaluate is not None:
            ppl = float(self.evaluate(level, dict(thresholds)))
            per_layer = self.reservoir_sparsity(thresholds)
        else:
            edits = [self.edit(s, thresholds.get(s, 0.0)) for s in self.sites]
            with self.model.edit(*edits):
                ppl = perplexity(self.model, self.texts, batch_size=self.batch_size)
            per_layer = {e.site: e.measured_sparsity for e in edits}
            if any(not math.isfinite(v) for v in per_layer.values()):
                per_layer = self.reservoir_sparsity(thresholds)
        rec = {"level": level, "ppl": ppl, "thresholds": thresholds, "per_layer": per_layer,
               "sparsity": float(np.mean(list(per_layer.values())))}
        self.cache[level] = rec
        return rec

    def rise(self, rec) -> float:
        """Perplexity rise over the unedited model, in %."""
        return 100.0 * (rec["ppl"] / self.base - 1.0) if math.isfinite(rec["ppl"]) and self.base > 0 else math.inf

    def largest_within(self, p: float, steps: int) -> dict[str, Any]:
        """Bisection for the largest level whose rise is at most ``p`` %, and the level above it that fails."""
        lo, hi = 0.0, 1.0
        if self.rise(self(1.0)) <= p:
            lo, hi = 1.0, None
        else:
            for _ in range(steps):
                mid = (lo + hi) / 2
                if self.rise(self(mid)) <= p:
                    lo = mid
                else:
                    hi = mid
        rec = self(lo)
        nxt = self(hi) if hi is not None else None
        return {
            "p": p,
            "level": lo,
            "ppl": rec["ppl"],
            "rise_pct": self.rise(rec),
            "thresholds": [rec["thresholds"].get(s, 0.0) for s in self.sites],
            "sparsity": rec["sparsity"],
            "sparsity_per_layer": [rec["per_layer"][s] for s in self.sites],
            "activation_ratio": 1.0 - rec["sparsity"],
            "activation_ratio_per_layer": [1.0 - rec["per_layer"][s] for s in self.sites],
            "next_level": hi,
            "next_ppl": nxt["ppl"] if nxt else None,
            "next_rise_pct": self.rise(nxt) if nxt else None,
            "next_sparsity": nxt["sparsity"] if nxt else None,
        }


def ppl_sparsity(
    model,
    data: ProfileData,
    eval_texts: Sequence[str] | None = None,
    config: PplSparsityConfig | None = None,
    *,
    batch_size: int = 8,
    evaluate: Evaluate | None = None,
    down_weights: dict[str, torch.Tensor] | None = None,
    **overrides,
) -> PplSparsityResult | Skipped:
    """PPL-p% sparsity: the largest global level of the threshold rule (``config.rule``) whose
    perplexity on ``eval_texts`` (default ``data.eval_texts``, all of them unless ``max_texts``) is
    at most ``p``% above the unedited perplexity; keyword ``overrides`` set ``PplSparsityConfig``
    fields (``ps=(1, 5)``, ``rule="quantile"``, ``steps=6`` ...).

    Bisection on the level over [0, 1] with ``steps`` halvings; level 0 (no edit) is feasible by
    definition and level 1 is tried first (CETT target 1 / quantile 1 switch every neuron off).
    Evaluations are cached and shared between the ``ps``. ``evaluate(level, thresholds)`` replaces
    the perplexity run (for tests): it gets the level and the per-site thresholds (empty for the
    unedited baseline) and returns a perplexity. ``down_weights`` (site -> ``[d_model, d_mlp]``)
    replaces ``model.anatomy.mlp_parts(i).down`` for the CETT rule (tests without a model).

    Each entry of ``levels`` holds: ``p``, ``level`` (the CETT target or quantile level found),
    ``ppl``, ``rise_pct``, ``thresholds`` (per layer: on ``|a_j|·||w_out,j||`` for the CETT rule,
    on ``|a_j|`` for the quantile rule), ``sparsity`` (exact zeros measured while evaluating, mean
    over layers; the reservoir estimate when ``evaluate`` is injected), ``sparsity_per_layer``,
    ``activation_ratio`` = 1 - sparsity (and per layer), and ``next_level``/``next_ppl``/
    ``next_rise_pct``: the smallest level tried above it, which broke the budget (None if level 1 passed).
    """
    config = PplSparsityConfig.with_overrides(config, overrides)
    key, title, why = "ppl_sparsity", PplSparsityResult.title, PplSparsityResult.explanation
    if evaluate is None and not getattr(model, "has_lm_head", False):
        return Skipped(key, title, reason="needs perplexity, and this model has no LM head (encoder)", explanation=why)
    sites = [s for s in sites_of_kind(data, model, "mlp.hidden") if reservoir_acts(data, s) is not None]
    if not sites:
        return Skipped(key, title, reason="the profile reservoir holds no mlp.hidden sites", explanation=why)
    texts = [t for t in (eval_texts if eval_texts is not None else data.eval_texts) if t][:config.max_texts]
    if evaluate is None and not texts:
        return Skipped(key, title, reason="no evaluation texts: pass eval_texts or collect the profile with eval_texts",
                       explanation=why)
    downs: dict[str, torch.Tensor] = {}
    if config.rule == "cett":
        if down_weights is None and model is None:
            raise ActlabError("the CETT rule needs the down projections: pass the model, down_weights={site: W}, "
                              "or rule='quantile'")
        downs = {s: (down_weights[s] if down_weights is not None else model.anatomy.mlp_parts(layer_index(s)).down)
                 .detach().float().cpu() for s in sites}
    run = _Levels(model, data, sites, texts, batch_size, evaluate, config, downs)
    natural = [float(run(0.0)["per_layer"][s]) for s in sites]
    levels = [run.largest_within(float(p), config.steps) for p in config.ps]
    evaluations = [{"level": r["level"], "ppl": r["ppl"], "rise_pct": run.rise(r), "sparsity": r["sparsity"]}
                   for _, r in sorted(run.cache.items())]
    return PplSparsityResult(
        ps=[float(p) for p in config.ps], base_ppl=run.base, layers=[layer_index(s) for s in sites], sites=sites,
        natural_zero_frac=natural, levels=levels, evaluations=evaluations, steps=config.steps,
        n_eval_texts=len(texts), rule=config.rule, config=config.to_dict(),
    )
