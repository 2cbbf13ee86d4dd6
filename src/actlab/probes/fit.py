"""Linear probes: softmax logistic regression (L2 chosen on held-out rows), difference of means (mass-mean)
and k-sparse probes (units ranked by a class-separation score, then a logistic fit on the top k).

Every probe is one ``LinearProbe``: ``logits = ((x[:, units] − mean) / scale) @ weight.T + bias``, so
scoring, saving and steering treat all methods alike. Fits are full-batch and deterministic (float64
L-BFGS from zero), so the same rows give the same probe on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from actlab.errors import ActlabError

__all__ = ["LinearProbe", "fit_logistic", "fit_massmean", "fit_sparse", "unit_scores", "LAMBDAS", "KS", "METHODS"]

# L2 strengths (on standardised inputs, per row of the mean loss); chosen per probe on the tuning split
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
KS = (1, 2, 4, 8, 16, 32, 64)  # the sparse-probing paper's k list
METHODS = ("logistic", "massmean", "sparse")


@dataclass
class LinearProbe:
    """A fitted linear read-out over ``units`` of a site (all units when ``units`` is None)."""

    weight: torch.Tensor  # [C, k] on standardised inputs
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [k]
    scale: torch.Tensor  # [k]
    classes: list[str]
    method: str
    width: int  # the site's width
    units: torch.Tensor | None = None  # [k] long
    info: dict = field(default_factory=dict)  # λ, k, fit diagnostics

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ActlabError(f"this probe reads {self.width} units per row, got rows of shape {tuple(x.shape)}")
        x = x.double()
        return x if self.units is None else x[:, self.units]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, C]`` class scores of rows ``x`` ``[n, width]``."""
        return ((self._inputs(x) - self.mean) / self.scale) @ self.weight.T + self.bias

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)

    def direction(self, cls: int | str) -> torch.Tensor:
        """The activation-space direction that raises class ``cls``'s logit against the mean logit fastest
        (``∂(logit_c − mean logit)/∂x``, zero outside ``units``): what the causal check steers along."""
        c = self.classes.index(cls) if isinstance(cls, str) else int(cls)
        w = (self.weight[c] - self.weight.mean(0)) / self.scale
        full = torch.zeros(self.width, dtype=torch.float64)
        full[slice(None) if self.units is None else self.units] = w
        return full


# ------------------------------------------------------------------ the optimiser
def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    return mean, torch.where(scale > 1e-8 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))


def _softmax_fit(z: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100):
    """Minimise mean cross-entropy + λ/2 ‖W‖² over (W, b) by L-BFGS (strong Wolfe line search), float64."""
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64) if start is None else start[0].clone()
    b = torch.zeros(n_classes, dtype=torch.float64) if start is None else start[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _log_loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, y))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], *, x_tune: torch.Tensor,
                 y_tune: torch.Tensor, lambdas: Sequence[float] = LAMBDAS, units: torch.Tensor | None = None,
                 width: int | None = None, method: str = "logistic") -> LinearProbe:
    """Softmax regression on standardised ``x``; λ is the grid value with the lowest log-loss on the tuning
    rows, then the probe is refitted on training + tuning rows with that λ (the test rows stay unseen)."""
    if not lambdas or any(not lam > 0 for lam in lambdas):
        raise ActlabError(f"the L2 grid must be positive numbers, not {list(lambdas)}")
    width = x.shape[1] if width is None else width
    pick = (lambda t: t.double()) if units is None else (lambda t: t[:, units].double())
    xa, xt = pick(x), pick(x_tune)
    mean, scale = _standardise(xa)
    za, zt = (xa - mean) / scale, (xt - mean) / scale
    losses, accs, start = {}, {}, None
    for lam in sorted(lambdas, reverse=True):  # strong to weak: each fit warm-starts the next
        start = _softmax_fit(za, y, len(classes), lam, start)
        logits = zt @ start[0].T + start[1]
        losses[lam], accs[lam] = _log_loss(logits, y_tune), float((logits.argmax(1) == y_tune).double().mean())
    best = min(sorted(losses), key=lambda lam: (losses[lam], -lam))  # ties: the stronger penalty
    xall = torch.cat([xa, xt])
    mean, scale = _standardise(xall)
    w, b = _softmax_fit((xall - mean) / scale, torch.cat([y, y_tune]), len(classes), best)
    return LinearProbe(w, b, mean, scale, list(classes), method, width, units,
                       {"lambda": best, "tune_accuracy": accs[best],
                        "tune_log_loss": {str(k): v for k, v in sorted(losses.items())}})


def fit_massmean(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], *, x_tune: torch.Tensor,
                 y_tune: torch.Tensor) -> LinearProbe:
    """Class means, no fitted weights: ``logit_c = x·μ_c − ½‖μ_c‖²`` (nearest class mean), so for two classes
    the direction is ``μ₁ − μ₀`` and the threshold the midpoint. One temperature and the class biases are then
    calibrated on the same training rows (C + 1 numbers: probabilities and class priors come out sensible),
    so the tuning rows stay held out and give an honest tuning accuracy."""
    x, xt = x.double(), x_tune.double()
    mu = torch.stack([x[y == c].mean(0) if bool((y == c).any()) else x.mean(0) for c in range(len(classes))])
    raw = lambda t: t @ mu.T - 0.5 * (mu * mu).sum(1)  # noqa: E731
    s, y_cal = raw(x), y
    spread = float(s.std().clamp_min(1e-12))
    temp = torch.tensor([1.0 / spread], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([temp, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(s * temp + bias, y_cal)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(temp.detach().clamp_min(0.0))
    weight, b = mu * t, (-0.5 * (mu * mu).sum(1)) * t + bias.detach()
    ones = torch.ones(x.shape[1], dtype=torch.float64)
    probe = LinearProbe(weight, b, torch.zeros_like(ones), ones, list(classes), "massmean", x.shape[1], None,
                        {"temperature": t, "mean_difference_norm": float((mu[-1] - mu[0]).norm())})
    probe.info["tune_accuracy"] = float((probe.predict(xt) == y_tune).double().mean())
    return probe


def unit_scores(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """How well each unit alone separates the classes: between-class variance over within-class variance
    (for two classes, proportional to the squared mean difference over the pooled variance)."""
    x = x.double()
    mu = x.mean(0)
    between = torch.zeros(x.shape[1], dtype=torch.float64)
    within = torch.zeros(x.shape[1], dtype=torch.float64)
    for c in range(n_classes):
        rows = x[y == c]
        if rows.shape[0] == 0:
            continue
        mc = rows.mean(0)
        between += rows.shape[0] * (mc - mu) ** 2
        within += ((rows - mc) ** 2).sum(0)
    return between / within.clamp_min(1e-12)


def fit_sparse(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], *, x_tune: torch.Tensor,
               y_tune: torch.Tensor, k: int, lambdas: Sequence[float] = LAMBDAS) -> LinearProbe:
    """Rank units by ``unit_scores`` on the training rows, keep the top ``k``, fit a logistic probe on them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ActlabError(f"k must be a positive integer, not {k!r}")
    scores = unit_scores(x, y, len(classes))
    k = min(k, x.shape[1])
    units = torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values
    probe = fit_logistic(x, y, classes, x_tune=x_tune, y_tune=y_tune, lambdas=lambdas, units=units,
                         width=x.shape[1], method="sparse")
    probe.info["k"] = k
    return probe
