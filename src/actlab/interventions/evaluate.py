"""Evaluating interventions: dose-response curves and layer sweeps (see docs/steering.md).

``dose_response`` applies each intervention at a grid of coefficients (negative to positive,
0 included), generates continuations of a fixed set of prompts with the edit active, and scores

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

Run ``actlab steer eval demo-llama --genre techdoc`` for the whole
evaluation on a demo model.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from actlab.engine.edits import check_finite
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.report.serialize import save_figure, to_jsonable, write_json
from actlab.interventions.base import Composition, Intervention
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.fit import fit_steering, random_like
from actlab.interventions.types import SteeringVector

DEFAULT_COEFS = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0)
DEFAULT_SWEEP_COEF = 1.0
DEFAULT_PROMPTS = 16
DEFAULT_NEW_TOKENS = 24
DEFAULT_NEUTRAL = 32
DEFAULT_FIT_PAIRS = 64
MAX_PPL_RATIO = 2.0
RANDOM = "random"
_SAMPLES_KEPT = 3  # continuations stored per point (for reading, not scoring)

__all__ = [
    "DEFAULT_COEFS", "DoseResponse", "Curve", "Point", "LayerSweep", "LayerResult", "GenreSetup",
    "GenreEvaluation", "dose_response", "layer_sweep", "genre_setup", "fit_methods", "evaluate_genre", "spearman",
]


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




# ------------------------------------------------------------------------------------ scoring
class _Scorer:
    """Generates continuations under an edit and scores genre rate + neutral perplexity."""

    def __init__(self, model, *, target_genre: str, prompts: Sequence[str], neutral_texts: Sequence[str],
                 max_new_tokens: int, samples_per_prompt: int, seed: int, do_sample: bool, temperature: float,
                 batch_size: int, classifier=None, perplexity_batch_size: int = 16):
        if not model.is_causal:
            raise ActlabError(f"{model.name} cannot generate text: dose-response needs a causal language model")
        if not prompts:
            raise ActlabError("no prompts given: the dose-response needs prompts to continue")
        if not neutral_texts:
            raise ActlabError("no neutral texts given: the perplexity cost needs held-out texts")
        if samples_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ActlabError("samples_per_prompt, max_new_tokens and batch_size must be at least 1")
        if samples_per_prompt > 1 and not do_sample:
            raise ActlabError("samples_per_prompt > 1 needs sampling (do_sample=True): greedy decoding repeats itself")
        if classifier is None:
            from actlab.evals.genre import bundled

            classifier = bundled()
        if target_genre not in classifier.genres:
            raise ActlabError(f"unknown genre {target_genre!r}; the classifier knows: {', '.join(classifier.genres)}")
        self.model, self.classifier, self.target_genre = model, classifier, target_genre
        self.rows = [p for p in prompts for _ in range(samples_per_prompt)]
        self.neutral = list(neutral_texts)
        self.max_new_tokens, self.seed, self.do_sample = max_new_tokens, seed, do_sample
        self.temperature, self.batch_size, self.ppl_batch = temperature, batch_size, perplexity_batch_size
        self.n_generated = 0

    def settings(self) -> dict[str, Any]:
        return {"n_prompts": len(self.rows), "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "do_sample": self.do_sample, "temperature": self.temperature, "n_neutral": len(self.neutral),
                "classifier": type(self.classifier).__name__}

    def continuations(self) -> list[str]:
        texts: list[str] = []
        for i in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[i : i + self.batch_size]
            texts += self.model.generate(chunk, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                         temperature=self.temperature, seed=self.seed + i)
        self.n_generated += len(self.rows) * self.max_new_tokens
        return texts

    def perplexity(self) -> float:
        from actlab.evals.perplexity import perplexity

        return perplexity(self.model, self.neutral, batch_size=self.ppl_batch)

    def score(self, edit, coef: float) -> Point:
        """Score one edit (None: the unedited model), or pool a list of edits (the random controls:
        their continuations are scored together, their perplexities averaged geometrically)."""
        edits = edit if isinstance(edit, list) else [edit]
        texts: list[str] = []
        log_ppl = []
        for e in edits:
            with self.model.edit(e) if e is not None else nullcontext():
                texts += self.continuations()
                log_ppl.append(math.log(self.perplexity()))
        pred = self.classifier.predict(texts)
        rate = float(np.mean([p == self.target_genre for p in pred]))
        se = math.sqrt(rate * (1 - rate) / len(texts))
        return Point(coef=float(coef), rate=rate, rate_se=se, perplexity=math.exp(float(np.mean(log_ppl))),
                     n=len(texts), samples=texts[:_SAMPLES_KEPT])


def _is_additive(intervention) -> bool:
    items = intervention.edits() if hasattr(intervention, "edits") else [intervention]
    return all(getattr(i, "additive", False) for i in items)


def _steering_items(intervention) -> list[SteeringVector] | None:
    items = intervention.edits() if hasattr(intervention, "edits") else [intervention]
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


# ------------------------------------------------------------------------------- dose-response
def dose_response(
    model,
    make_intervention: Mapping[str, Intervention | Composition],
    coefs: Sequence[float] = DEFAULT_COEFS,
    *,
    target_genre: str,
    prompts: Sequence[str],
    neutral_texts: Sequence[str],
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    samples_per_prompt: int = 1,
    seed: int = 0,
    include_random: bool = True,
    random_of: str | None = None,
    n_random: int = 3,
    do_sample: bool = True,
    temperature: float = 1.0,
    batch_size: int = 16,
    classifier=None,
    progress: bool = False,
) -> DoseResponse:
    """Target-genre rate and neutral perplexity of each intervention at each coefficient.

    ``make_intervention`` maps a method name to its intervention at coefficient 1; each is applied
    as ``intervention * coef``. Coefficient 0 (added when missing) is one unedited run shared by
    all additive interventions. With ``include_random``, ``n_random`` random directions with the
    norm of the ``random_of`` steering vector (default: the first steering-vector method) run
    through the same grid as ``"random"``; their continuations are pooled into one rate per
    coefficient, so the control is not the accident of one direction.
    """
    if not make_intervention:
        raise ActlabError("no interventions given: pass {method name: intervention at coefficient 1}")
    if RANDOM in make_intervention:
        raise ActlabError(f"'{RANDOM}' is reserved for the random control; name the method otherwise")
    grid = _check_coefs(coefs)
    for item in make_intervention.values():
        item.check_model(model)
    scorer = _Scorer(model, target_genre=target_genre, prompts=prompts, neutral_texts=neutral_texts,
                     max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                     do_sample=do_sample, temperature=temperature, batch_size=batch_size, classifier=classifier)
    jobs: dict[str, tuple[Any, str | None]] = {name: (item, None) for name, item in make_intervention.items()}
    if include_random:
        candidates = [n for n, i in make_intervention.items() if _steering_items(i) is not None]
        source = random_of or (candidates[0] if candidates else None)
        if source is not None:
            if source not in candidates:
                raise ActlabError(f"random_of={source!r} is not one of the steering-vector methods {candidates}")
            jobs[RANDOM] = (_Pooled(_random_controls(make_intervention[source], seed, n_random)), source)
    n_points = 1 + sum(len([c for c in grid if c != 0 or not _is_additive(item)]) for item, _ in jobs.values())
    # (a pooled random control counts as one point per coefficient)
    start = time.perf_counter()
    curves: dict[str, Curve] = {}
    with progress_bar(f"dose-response ({target_genre})", n_points, unit="points", enabled=progress) as bar:
        baseline = scorer.score(None, 0.0)
        bar.advance()
        for name, (item, control_of) in jobs.items():
            points = []
            for c in grid:
                if c == 0 and _is_additive(item):
                    points.append(baseline)
                    continue
                points.append(scorer.score(item * c, c))
                bar.advance()
            kind = getattr(item, "kind", None) or "+".join(sorted({i.kind for i in item.edits()}))
            norm = _norm(item[0]) if isinstance(item, _Pooled) else _norm(item)
            curves[name] = Curve(method=name, kind=kind, points=points, norm=norm, control_of=control_of)
    settings = scorer.settings() | {"seconds": time.perf_counter() - start, "samples_per_prompt": samples_per_prompt,
                                    "n_random": n_random if RANDOM in jobs else 0,
                                    "sites": {n: sorted({e.site for e in i.edits()}) for n, (i, _) in jobs.items()}}
    return DoseResponse(model=model.name, target_genre=target_genre, coefs=grid, baseline=baseline, curves=curves,
                        settings=settings)


# --------------------------------------------------------------------------------- layer sweep
def layer_sweep(
    model,
    contrast: ContrastSet,
    sites: str | Sequence[str] = "resid.*",
    *,
    method: str = "mean-diff",
    coef: float = DEFAULT_SWEEP_COEF,
    target_genre: str,
    prompts: Sequence[str],
    neutral_texts: Sequence[str],
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    samples_per_prompt: int = 1,
    seed: int = 0,
    include_random: bool = False,
    max_ppl_ratio: float = MAX_PPL_RATIO,
    do_sample: bool = True,
    temperature: float = 1.0,
    batch_size: int = 16,
    classifier=None,
    progress: bool = False,
    **fit_kwargs,
) -> LayerSweep:
    """Fit a ``method`` vector at every site and score each at coefficient ``coef``.

    The best layer (``.best_site``) has the largest target-rate gain over the unedited model among
    layers whose neutral perplexity is within ``max_ppl_ratio`` of the unedited model's.
    """
    check_finite(coef, "the coefficient")
    vectors = fit_steering(model, contrast, sites, method=method, **fit_kwargs)
    scorer = _Scorer(model, target_genre=target_genre, prompts=prompts, neutral_texts=neutral_texts,
                     max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                     do_sample=do_sample, temperature=temperature, batch_size=batch_size, classifier=classifier)
    total = 1 + len(vectors) * (2 if include_random else 1)
    start = time.perf_counter()
    layers = []
    with progress_bar(f"layer sweep ({method} × {coef:g})", total, unit="points", enabled=progress) as bar:
        baseline = scorer.score(None, 0.0)
        bar.advance()
        for site, vec in vectors.items():
            p = scorer.score(vec * coef, coef)
            bar.advance()
            rnd = None
            if include_random:
                rnd = scorer.score(random_like(vec, seed=seed) * coef, coef).rate
                bar.advance()
            layers.append(LayerResult(site=site, rate=p.rate, rate_se=p.rate_se, perplexity=p.perplexity,
                                      effect=p.rate - baseline.rate, ppl_ratio=p.perplexity / baseline.perplexity,
                                      norm=float(vec.vector.norm()), random_rate=rnd, samples=p.samples))
    settings = scorer.settings() | {"seconds": time.perf_counter() - start, "samples_per_prompt": samples_per_prompt}
    return LayerSweep(model=model.name, method=method, coef=float(coef), target_genre=target_genre, baseline=baseline,
                      layers=layers, max_ppl_ratio=max_ppl_ratio, settings=settings)


# ------------------------------------------------------------------------ the genre recipe
@dataclass
class GenreSetup:
    """Disjoint data for one genre-steering evaluation, from ``actlab.datasets.genres``."""

    target_genre: str
    contrast: ContrastSet  # pairs fitted on
    prompts: list[str]  # prompts continued (from pairs not fitted on)
    neutral_texts: list[str]  # held-out mixed-genre texts for the perplexity cost


def genre_setup(target_genre: str = "techdoc", *, n_fit: int = DEFAULT_FIT_PAIRS, n_prompts: int = DEFAULT_PROMPTS,
                n_neutral: int = DEFAULT_NEUTRAL, neutral_tokens: int | None = None) -> GenreSetup:
    """Fit on the first ``n_fit`` contrast pairs toward ``target_genre``; continue the (distinct)
    prompts of the remaining pairs — two or three words that start a sentence in the target genre
    and in another one, so the unedited model is not already committed to a genre; measure
    perplexity on ``n_neutral`` evenly spaced lines of neutral.txt."""
    from actlab.datasets import genres

    if target_genre not in genres.GENRES:
        raise ActlabError(f"unknown genre {target_genre!r}; choose one of {', '.join(genres.GENRES)}")
    rows = genres.contrast_pairs(target_genre)
    if len(rows) < 2:
        raise ActlabError(f"only {len(rows)} contrast pairs toward {target_genre!r}; choose another genre")
    n_fit = max(1, min(n_fit, len(rows) - 1))
    fit_rows, rest = rows[:n_fit], rows[n_fit:]
    prompts: list[str] = []
    for r in rest:
        if r["prompt"] not in prompts:
            prompts.append(r["prompt"])
    if len(prompts) < n_prompts:  # top up with the distinct prompts of fitted pairs
        for r in fit_rows:
            if r["prompt"] not in prompts:
                prompts.append(r["prompt"])
    prompts = prompts[:n_prompts]
    neutral = genres.neutral()
    step = max(1, len(neutral) // max(1, n_neutral))
    neutral = neutral[::step][:n_neutral]
    if neutral_tokens is not None:
        neutral = [" ".join(t.split()[:neutral_tokens]) for t in neutral]
    contrast = ContrastSet(pos=[r["pos"] for r in fit_rows], neg=[r["neg"] for r in fit_rows],
                           prompts=[r["prompt"] for r in fit_rows])
    return GenreSetup(target_genre, contrast, prompts, neutral)


def _optional(module: str, name: str) -> Callable | None:
    import importlib

    try:
        return getattr(importlib.import_module(f"actlab.interventions.{module}"), name)
    except (ImportError, AttributeError):
        return None


def fit_methods(model, contrast: ContrastSet, site: str,
                methods: Sequence[str] = ("mean-diff", "pca", "dims", "affine", "adapter"),
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
                out[method] = fit(model, contrast, site, **kwargs.get("affine", {}))
        elif method == "adapter":
            train = _optional("adapter_train", "train_adapter")
            if train is not None:  # language-model loss on the positive continuations (after their prompts)
                data = list(zip(contrast.prompts, contrast.pos)) if contrast.paired else list(contrast.pos)
                out[method] = train(model, data, site, **kwargs.get("adapter", {}))
        else:
            raise ActlabError(f"unknown method {method!r}; choose from mean-diff, pca, dims, affine, adapter")
    return out


@dataclass
class GenreEvaluation:
    setup: GenreSetup
    site: str
    sweep: LayerSweep | None
    dose: DoseResponse
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "seconds": self.seconds, "sweep": self.sweep.to_dict() if self.sweep else None,
                "dose_response": self.dose.to_dict()}


def evaluate_genre(
    model,
    target_genre: str = "techdoc",
    *,
    site: str | None = None,
    methods: Sequence[str] = ("mean-diff", "pca", "dims", "affine", "adapter"),
    coefs: Sequence[float] = DEFAULT_COEFS,
    sweep_coef: float = DEFAULT_SWEEP_COEF,
    n_fit: int = DEFAULT_FIT_PAIRS,
    n_prompts: int = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    n_neutral: int = DEFAULT_NEUTRAL,
    seed: int = 0,
    progress: bool = False,
    **kwargs,
) -> GenreEvaluation:
    """The whole genre-steering evaluation: a mean-diff layer sweep (when ``site`` is None) picks
    the site, then every method is fitted there and run through the dose-response grid."""
    start = time.perf_counter()
    setup = genre_setup(target_genre, n_fit=n_fit, n_prompts=n_prompts, n_neutral=n_neutral)
    common = dict(target_genre=target_genre, prompts=setup.prompts, neutral_texts=setup.neutral_texts,
                  max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    sweep = None
    if site is None:
        sweep = layer_sweep(model, setup.contrast, "resid.*", coef=sweep_coef, **common)
        site = sweep.best_site
    site = model.resolve(site)[0]
    interventions = fit_methods(model, setup.contrast, site, methods, **kwargs)
    dose = dose_response(model, interventions, coefs, **common)
    return GenreEvaluation(setup, site, sweep, dose, time.perf_counter() - start)


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
