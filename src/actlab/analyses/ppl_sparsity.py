"""Performance-aware activation sparsity ("PPL-p%", after the Sparsing Law of Luo et al., 2024).

How sparse can the MLP activations be made, by zeroing small entries, before the model gets
worse? For a global target level ``s`` in [0, 1], every ``mlp.hidden.{i}`` site gets the
threshold ``t_i(s)`` = the s-quantile of ``|x|`` in that layer's reservoir sample, and the edit
``ThresholdEdit`` sets entries with ``|x| < t_i(s)`` to 0 (so about a fraction ``s`` of the
entries of every layer are zero, counting entries that were already zero). The PPL-p% sparsity
is the largest ``s`` whose perplexity on held-out texts is at most ``(1 + p/100)`` times the
unedited perplexity, found by bisection on ``s`` (assuming perplexity grows with ``s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from actlab.analyses.base import ProfileData, Skipped, layer_index, perplexity, pick, reservoir_acts, sites_of_kind
from actlab.analyses.figures import integer_xaxis, new_axes
from actlab.engine.hooks import ForwardState
from actlab.report.serialize import to_jsonable

__all__ = ["ThresholdEdit", "PplSparsityResult", "ppl_sparsity", "layer_thresholds"]

Evaluate = Callable[[float, dict[str, float]], float]


@dataclass
class ThresholdEdit:
    """Zero the entries of ``site`` whose magnitude is below ``threshold`` (``|x| < threshold``).

    While it runs it counts, over real (non-padding) tokens, how many entries of the edited
    activation are exactly zero: ``measured_sparsity`` is the sparsity the model really ran with.
    """

    site: str
    threshold: float
    n_zero: int = field(default=0, repr=False)
    n_total: int = field(default=0, repr=False)

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        new = h if self.threshold <= 0 else torch.where(h.abs() < self.threshold, torch.zeros_like(h), h)
        if new.ndim == 3 and state.batch_size == new.shape[0] and state.length == new.shape[1]:
            real = state.token_mask().to(new.device)
            rows = new[real]
        else:
            rows = new.reshape(-1, new.shape[-1])
        self.n_zero += int((rows == 0).sum())
        self.n_total += int(rows.numel())
        return new

    @property
    def measured_sparsity(self) -> float:
        return self.n_zero / self.n_total if self.n_total else math.nan


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
    key: str = "ppl_sparsity"
    title: str = "Performance-aware sparsity (PPL-p%)"
    explanation: str = (
        "How much of the MLP activation can be switched off before the model gets worse. We zero "
        "every MLP hidden activation whose magnitude is below a per-layer threshold, chosen as the "
        "s-quantile of that layer's |activation| so that every layer is made about s sparse, and "
        "measure perplexity on held-out text. The PPL-p% sparsity is the largest s (found by "
        "bisection) whose perplexity is at most p% above the unedited model's; the activation ratio "
        "is 1 minus that sparsity. This follows the PPL-p% sparsity metric of 'Sparsing Law: Towards "
        "Large Language Models with Greater Activation Sparsity' (Luo et al., 2024), with a simpler "
        "threshold rule (one global quantile level instead of their CETT criterion). The plot shows "
        "perplexity against the measured sparsity of every level tried."
    )

    def headline(self) -> str:
        if not self.levels:
            return "n/a"
        r = self.levels[0]
        return (f"PPL-{r['p']:g}%: sparsity {100 * r['sparsity']:.1f}% "
                f"(activation ratio {100 * r['activation_ratio']:.1f}%)")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(pick(self, "ps", "base_ppl", "layers", "sites", "natural_zero_frac", "levels",
                                "evaluations", "steps", "n_eval_texts"))

    def table(self):
        cols = ["p %", "target level s", "sparsity %", "activation ratio %", "perplexity", "rise %",
                "next level (fails)", "its rise %"]
        rows = []
        for r in self.levels:
            rows.append([r["p"], round(r["level"], 4), round(100 * r["sparsity"], 2),
                         round(100 * r["activation_ratio"], 2), round(r["ppl"], 4), round(r["rise_pct"], 3),
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
    """Evaluates (and caches) the model at global sparsity levels: thresholds, perplexity, measured sparsity."""

    def __init__(self, model, data: ProfileData, sites: list[str], texts: list[str], batch_size: int,
                 evaluate: Evaluate | None):
        self.model, self.sites, self.texts, self.batch_size, self.evaluate = model, sites, texts, batch_size, evaluate
        self.sorted_abs = {s: np.sort(reservoir_acts(data, s).abs().flatten().numpy()) for s in sites}
        self.cache: dict[float, dict[str, Any]] = {}
        self.base = self(0.0)["ppl"]

    def reservoir_sparsity(self, thresholds: dict[str, float]) -> dict[str, float]:
        """Per site, the fraction of the reservoir sample the thresholds would zero (or is zero already)."""
        out = {}
        for s, a in self.sorted_abs.items():
            t = thresholds.get(s, 0.0)
            below = a.shape[0] if math.isinf(t) else int(np.searchsorted(a, t, side="left"))
            zeros = int(np.searchsorted(a, 0.0, side="right"))
            out[s] = max(below, zeros) / a.shape[0]
        return out

    def __call__(self, level: float) -> dict[str, Any]:
        level = float(level)
        if level in self.cache:
            return self.cache[level]
        thresholds = layer_thresholds(self.sorted_abs, level) if level > 0 else {}
        if self.evaluate is not None:
            ppl = float(self.evaluate(level, dict(thresholds)))
            per_layer = self.reservoir_sparsity(thresholds)
        else:
            edits = [ThresholdEdit(s, thresholds.get(s, 0.0)) for s in self.sites]
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
            "next_level": hi,
            "next_ppl": nxt["ppl"] if nxt else None,
            "next_rise_pct": self.rise(nxt) if nxt else None,
            "next_sparsity": nxt["sparsity"] if nxt else None,
        }


def ppl_sparsity(
    model,
    data: ProfileData,
    eval_texts: Sequence[str] | None = None,
    ps: Sequence[float] = (1, 5),
    *,
    steps: int = 8,
    max_texts: int = 16,
    batch_size: int = 8,
    evaluate: Evaluate | None = None,
) -> PplSparsityResult | Skipped:
    """PPL-p% sparsity: the largest magnitude-threshold sparsity of all ``mlp.hidden`` sites whose
    perplexity on ``eval_texts`` is at most ``p``% above the unedited perplexity.

    Bisection on the global level ``s`` over [0, 1] with ``steps`` halvings (resolution
    ``2**-steps``); level 0 (no edit) is feasible by definition and level 1 (everything zeroed) is
    tried first. Evaluations are cached and shared between the ``ps``. ``evaluate(level,
    thresholds)`` replaces the perplexity run (for tests): it gets the level and the per-site
    thresholds (empty for the unedited baseline) and returns a perplexity.

    Each entry of ``levels`` holds: ``p``, ``level`` (the s found), ``ppl``, ``rise_pct``,
    ``thresholds`` (per layer), ``sparsity`` (exact zeros measured while evaluating, over all
    layers; the reservoir estimate when ``evaluate`` is injected), ``sparsity_per_layer``,
    ``activation_ratio`` = 1 - sparsity, and ``next_level``/``next_ppl``/``next_rise_pct``: the
    smallest level tried above it, which broke the budget (None if level 1 passed).
    """
    key, title = "ppl_sparsity", PplSparsityResult.title
    if evaluate is None and not getattr(model, "has_lm_head", False):
        return Skipped(key, title, reason="needs perplexity, and this model has no LM head (encoder)",
                       explanation=PplSparsityResult.explanation)
    sites = [s for s in sites_of_kind(data, model, "mlp.hidden") if reservoir_acts(data, s) is not None]
    if not sites:
        return Skipped(key, title, reason="the profile reservoir holds no mlp.hidden sites",
                       explanation=PplSparsityResult.explanation)
    texts = [t for t in (eval_texts if eval_texts is not None else data.eval_texts) if t][:max_texts]
    if evaluate is None and not texts:
        return Skipped(key, title, reason="no evaluation texts: pass eval_texts or collect the profile with eval_texts",
                       explanation=PplSparsityResult.explanation)
    steps = max(1, int(steps))
    run = _Levels(model, data, sites, texts, batch_size, evaluate)
    natural = [float(run(0.0)["per_layer"][s]) for s in sites]
    levels = [run.largest_within(float(p), steps) for p in ps]
    evaluations = [{"level": r["level"], "ppl": r["ppl"], "rise_pct": run.rise(r), "sparsity": r["sparsity"]}
                   for _, r in sorted(run.cache.items())]
    return PplSparsityResult(
        ps=[float(p) for p in ps], base_ppl=run.base, layers=[layer_index(s) for s in sites], sites=sites,
        natural_zero_frac=natural, levels=levels, evaluations=evaluations, steps=steps,
        n_eval_texts=len(texts),
    )
