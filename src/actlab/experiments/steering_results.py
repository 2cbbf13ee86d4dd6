"""Results of the steering evaluation: dose-response curves and layer sweeps, their summaries and files.

``DoseResponse`` holds the target-genre rate and the neutral perplexity of each method at each
coefficient (plus the pooled random control); ``LayerSweep`` one fitted vector per layer at one
coefficient. Both summarise themselves (best point under a perplexity limit, effects, Spearman
correlations), draw their figures and round-trip through JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from actlab.errors import ActlabError
from actlab.report.serialize import save_figure, to_jsonable, write_json

MAX_PPL_RATIO = 2.0
RANDOM = "random"

__all__ = ["Point", "Curve", "DoseResponse", "LayerResult", "LayerSweep", "spearman", "MAX_PPL_RATIO", "RANDOM"]


# ------------------------------------------------------------------------------------ results
@dataclass
class Point:
    """One (intervention, coefficient) measurement."""

    coef: float
    rate: float  # fraction of continuations classified as the target genre
    rate_se: float  # binomial standard error of ``rate``
    perplexity: float  # neutral held-out perplexity under the edit
    n: int  # continuations scored
    samples: list[str] = field(default_factory=list)  # the first few continuations


@dataclass
class Curve:
    method: str
    kind: str  # intervention kind (steering_vector, affine, ...), "none" for the unedited model
    points: list[Point]
    norm: float | None = None  # norm of the vector at coefficient 1 (steering vectors)
    control_of: str | None = None  # for the random control: the method whose norm it matches

    @property
    def coefs(self) -> list[float]:
        return [p.coef for p in self.points]

    @property
    def rates(self) -> list[float]:
        return [p.rate for p in self.points]

    @property
    def perplexities(self) -> list[float]:
        return [p.perplexity for p in self.points]

    def at(self, coef: float) -> Point:
        for p in self.points:
            if math.isclose(p.coef, coef, abs_tol=1e-12):
                return p
        raise ActlabError(f"{self.method} was not evaluated at coefficient {coef}; grid: {self.coefs}")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan if either side is constant."""

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    if len(x) != len(y) or len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class DoseResponse:
    """Genre rate and neutral perplexity against the coefficient, per method (+ random control)."""

    model: str
    target_genre: str
    coefs: list[float]
    baseline: Point  # coefficient 0: the unedited model
    curves: dict[str, Curve]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [m for m in self.curves if m != RANDOM]

    def rates(self, method: str) -> list[float]:
        return self.curves[method].rates

    def perplexities(self, method: str) -> list[float]:
        return self.curves[method].perplexities

    # --------------------------------------------------------------- summary
    def best(self, method: str, max_ppl_ratio: float = MAX_PPL_RATIO) -> Point:
        """The point with the highest target rate whose perplexity is within ``max_ppl_ratio`` of
        the unedited model's (coefficient 0 always qualifies); ties go to the lower perplexity."""
        limit = self.baseline.perplexity * max_ppl_ratio
        ok = [p for p in self.curves[method].points if p.perplexity <= limit or p.coef == 0]
        return max(ok, key=lambda p: (p.rate, -p.perplexity, -abs(p.coef)))

    def summary(self, max_ppl_ratio: float = MAX_PPL_RATIO, reach: float = 0.8) -> dict[str, Any]:
        """Per method: best coefficient, ``effect = rate(best) - rate(0)``, perplexity ratio there,
        Spearman correlation of rate with coefficient over the grid, the smallest positive
        coefficient reaching ``reach`` of the effect; and the random control's effect at the
        matched method's best coefficient (and its largest effect over the grid)."""
        base = self.baseline
        out: dict[str, Any] = {"target_genre": self.target_genre, "baseline_rate": base.rate,
                               "baseline_perplexity": base.perplexity, "max_ppl_ratio": max_ppl_ratio, "methods": {}}
        for method in self.methods:
            curve = self.curves[method]
            best = self.best(method, max_ppl_ratio)
            effect = best.rate - base.rate
            reaching = [p for p in curve.points if p.coef > 0 and p.rate - base.rate >= reach * effect] if effect > 0 else []
            first = min(reaching, key=lambda p: p.coef) if reaching else None
            out["methods"][method] = {
                "best_coef": best.coef, "rate_at_best": best.rate, "effect": effect,
                "perplexity_at_best": best.perplexity, "ppl_ratio_at_best": best.perplexity / base.perplexity,
                "spearman": spearman(curve.coefs, curve.rates),
                "max_rate": max(curve.rates), "norm": curve.norm,
                f"coef_reaching_{int(reach * 100)}pct": first.coef if first else None,
                f"ppl_ratio_reaching_{int(reach * 100)}pct": first.perplexity / base.perplexity if first else None,
            }
        if self.methods:
            out["best_method"] = max(self.methods, key=lambda m: out["methods"][m]["effect"])
        if RANDOM in self.curves:
            rnd = self.curves[RANDOM]
            matched = rnd.control_of
            coef = out["methods"][matched]["best_coef"] if matched in out["methods"] else max(rnd.coefs)
            at = min(rnd.points, key=lambda p: abs(p.coef - coef))
            out["random"] = {
                "control_of": matched, "coef": at.coef, "effect": at.rate - base.rate,
                "max_effect": max(p.rate for p in rnd.points) - base.rate,
                "ppl_ratio": at.perplexity / base.perplexity, "norm": rnd.norm,
            }
        return out

    def table(self) -> str:
        """A markdown table: rate (perplexity) per method and coefficient."""
        head = "| method | " + " | ".join(f"{c:g}" for c in self.coefs) + " |"
        rows = [head, "|" + "---|" * (len(self.coefs) + 1)]
        for name, curve in self.curves.items():
            cells = []
            for c in self.coefs:
                try:
                    p = curve.at(c)
                    cells.append(f"{p.rate:.2f} ({p.perplexity:.1f})")
                except ActlabError:
                    cells.append("")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    # -------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "kind": "dose_response", "model": self.model, "target_genre": self.target_genre, "coefs": self.coefs,
            "baseline": asdict(self.baseline), "settings": self.settings,
            "curves": {name: asdict(curve) for name, curve in self.curves.items()},
            "summary": self.summary(),
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DoseResponse":
        curves = {name: Curve(method=c["method"], kind=c["kind"], points=[Point(**p) for p in c["points"]],
                              norm=c.get("norm"), control_of=c.get("control_of"))
                  for name, c in data["curves"].items()}
        return cls(model=data["model"], target_genre=data["target_genre"], coefs=list(data["coefs"]),
                   baseline=Point(**data["baseline"]), curves=curves, settings=dict(data.get("settings", {})))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def figure(self, path: str | Path | None = None):
        """Two panels: target-genre rate vs coefficient per method (random control dashed), and
        neutral perplexity vs coefficient (log scale). Saved to ``path`` when given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), layout="constrained")
        ax_rate, ax_ppl = fig.subplots(1, 2)
        for name, curve in self.curves.items():
            style = dict(linestyle="--", color="grey") if name == RANDOM else {}
            label = f"random (norm of {curve.control_of})" if name == RANDOM else name
            ax_rate.errorbar(curve.coefs, curve.rates, yerr=[p.rate_se for p in curve.points], marker="o",
                             capsize=2, label=label, **style)
            ax_ppl.plot(curve.coefs, curve.perplexities, marker="o", label=label, **style)
        ax_rate.axhline(self.baseline.rate, color="black", linewidth=0.6)
        ax_rate.set(xlabel="coefficient", ylabel=f"'{self.target_genre}' rate", ylim=(-0.03, 1.03),
                    title=f"{self.model}: genre rate")
        ax_ppl.axhline(self.baseline.perplexity, color="black", linewidth=0.6)
        ax_ppl.set(xlabel="coefficient", ylabel="neutral perplexity", yscale="log", title="cost: neutral perplexity")
        ax_rate.legend(fontsize=8)
        return save_figure(fig, path)


@dataclass
class LayerResult:
    site: str
    rate: float
    rate_se: float
    perplexity: float
    effect: float  # rate - baseline rate
    ppl_ratio: float  # perplexity / baseline perplexity
    norm: float  # norm of the fitted vector (coefficient 1)
    random_rate: float | None = None  # the same-norm random control at the same coefficient
    samples: list[str] = field(default_factory=list)


@dataclass
class LayerSweep:
    """One fitted vector per layer, scored at one coefficient."""

    model: str
    method: str
    coef: float
    target_genre: str
    baseline: Point
    layers: list[LayerResult]
    max_ppl_ratio: float = MAX_PPL_RATIO
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> LayerResult:
        """Largest rate gain among layers within ``max_ppl_ratio`` (ties: lower perplexity); if
        every layer breaks the perplexity limit, the one with the lowest perplexity ratio."""
        ok = [r for r in self.layers if r.ppl_ratio <= self.max_ppl_ratio]
        if not ok:
            return min(self.layers, key=lambda r: r.ppl_ratio)
        return max(ok, key=lambda r: (r.effect, -r.ppl_ratio))

    @property
    def best_site(self) -> str:
        return self.best.site

    def summary(self) -> dict[str, Any]:
        b = self.best
        return {"method": self.method, "coef": self.coef, "target_genre": self.target_genre,
                "baseline_rate": self.baseline.rate, "baseline_perplexity": self.baseline.perplexity,
                "best_site": b.site, "effect": b.effect, "ppl_ratio": b.ppl_ratio,
                "effects": {r.site: r.effect for r in self.layers},
                "ppl_ratios": {r.site: r.ppl_ratio for r in self.layers}}

    def table(self) -> str:
        rows = ["| site | rate | effect | perplexity (ratio) | vector norm | random rate |", "|---|---|---|---|---|---|"]
        for r in self.layers:
            rnd = "" if r.random_rate is None else f"{r.random_rate:.2f}"
            mark = " **best**" if r.site == self.best_site else ""
            rows.append(f"| {r.site}{mark} | {r.rate:.2f} | {r.effect:+.2f} | {r.perplexity:.1f} ({r.ppl_ratio:.2f}×) "
                        f"| {r.norm:.2f} | {rnd} |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"kind": "layer_sweep", "model": self.model, "method": self.method, "coef": self.coef,
                          "target_genre": self.target_genre, "baseline": asdict(self.baseline),
                          "max_ppl_ratio": self.max_ppl_ratio, "settings": self.settings,
                          "layers": [asdict(r) for r in self.layers], "summary": self.summary()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerSweep":
        return cls(model=data["model"], method=data["method"], coef=data["coef"], target_genre=data["target_genre"],
                   baseline=Point(**data["baseline"]), layers=[LayerResult(**r) for r in data["layers"]],
                   max_ppl_ratio=data.get("max_ppl_ratio", MAX_PPL_RATIO), settings=dict(data.get("settings", {})))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def figure(self, path: str | Path | None = None):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), layout="constrained")
        ax_rate, ax_ppl = fig.subplots(1, 2)
        x = np.arange(len(self.layers))
        labels = [r.site for r in self.layers]
        ax_rate.bar(x, [r.rate for r in self.layers], label=f"{self.method} × {self.coef:g}")
        if any(r.random_rate is not None for r in self.layers):
            ax_rate.plot(x, [np.nan if r.random_rate is None else r.random_rate for r in self.layers], "o--",
                         color="grey", label="random, same norm")
        ax_rate.axhline(self.baseline.rate, color="black", linewidth=0.8, label="unedited")
        ax_rate.set(xticks=x, xticklabels=labels, ylabel=f"'{self.target_genre}' rate", ylim=(0, 1.03),
                    title=f"{self.model}: layer sweep")
        ax_rate.legend(fontsize=8)
        ax_ppl.bar(x, [r.ppl_ratio for r in self.layers])
        ax_ppl.axhline(1.0, color="black", linewidth=0.8)
        ax_ppl.axhline(self.max_ppl_ratio, color="red", linewidth=0.8, linestyle=":")
        ax_ppl.set(xticks=x, xticklabels=labels, ylabel="perplexity / unedited", title="cost")
        return save_figure(fig, path)
