"""Affine fits between sites of the profile reservoir, shared by the linearity analysis and the lenses.

``fit_affine`` is least squares on standardized inputs with a ridge term only when the system is
ill-conditioned; the solve and the seeded split are ``actlab.linalg``'s, so every fitter in actlab
shares one solver and one splitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actlab import linalg
from actlab.errors import ActlabError

#: ridge used when the system is well conditioned (relative to the mean eigenvalue 1 of the
#: standardized Gram matrix): numerically negligible, it only guards the solve
RIDGE_TINY = 1e-6
#: ridge used when the system is ill-conditioned (fewer than 2 samples per input dimension or a
#: condition number above ``COND_LIMIT``)
RIDGE_ILL = 1e-3
COND_LIMIT = 1e8


@dataclass
class AffineFit:
    """``y ~ x @ weight + bias`` fitted by (ridge) least squares."""

    weight: torch.Tensor  # [d_in, d_out] float64
    bias: torch.Tensor  # [d_out] float64
    ridge: float  # lambda used, relative to the standardized Gram matrix (mean eigenvalue 1)
    condition: float  # condition number of the standardized Gram matrix
    n: int  # samples it was fitted on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight + self.bias


def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> AffineFit:
    """Least-squares affine map from ``x`` [n, d_in] to ``y`` [n, d_out], in float64.

    Inputs are centered and every input column scaled to unit variance before solving
    ``(Z^T Z / n + lambda I) A = Z^T Y / n``, so ``lambda`` is relative to the mean eigenvalue (1)
    of the standardized Gram matrix and the huge-variance "massive activation" channels do not
    dominate the regularization. With ``ridge=None`` lambda is ``RIDGE_TINY`` (1e-6) for a
    well-conditioned system and ``RIDGE_ILL`` (1e-3) when n < 2 d_in or the condition number
    exceeds 1e8. Constant input columns are ignored.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ActlabError(f"fit_affine needs [n, d] inputs with the same n; got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    if n < 2:
        raise ActlabError("fit_affine needs at least two samples")
    x = x.double()
    y = y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    sd = xc.pow(2).mean(0).sqrt()
    live = sd > 1e-12 * max(float(sd.max()), 1e-300)
    scale = torch.where(live, sd, torch.ones_like(sd))
    z = xc / scale
    z[:, ~live] = 0.0
    gram = z.T @ z / n
    eig = torch.linalg.eigvalsh(gram[live][:, live]) if bool(live.any()) else torch.ones(1, dtype=torch.float64)
    condition = float(eig[-1] / eig[0].clamp(min=1e-300)) if float(eig[-1]) > 0 else math.inf
    if ridge is None:
        ridge = RIDGE_ILL if (n < 2 * d or condition > COND_LIMIT) else RIDGE_TINY
    a = linalg.ridge_solve(gram, z.T @ yc / n, ridge)
    weight = a / scale.unsqueeze(1)
    weight[~live] = 0.0
    bias = my - mx @ weight
    return AffineFit(weight=weight, bias=bias, ridge=float(ridge), condition=condition, n=n)


def linearity_score(x: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> float:
    """The paper's in-sample score: center, scale to unit Frobenius norm, fit A, ``1 - ||XA - Y||^2``."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    x = x / x.norm().clamp(min=1e-300)
    y = y / y.norm().clamp(min=1e-300)
    fit = fit_affine(x, y, ridge)
    return 1.0 - float((fit(x) - y).pow(2).sum())


def heldout_linearity(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                      ridge: float | None = None) -> tuple[float, AffineFit]:
    """Score of an affine map fitted on ``train`` rows and applied to ``test`` rows.

    Normalising ``Y`` to unit Frobenius norm after centering makes the paper's ``1 - ||XA - Y||^2``
    equal to ``1 - SSE / SST`` (``linalg.r2_score``); on held-out rows that is what is returned (the
    map's bias is fitted too, so the centering uses the training means).
    """
    fit = fit_affine(x[train], y[train], ridge)
    return linalg.r2_score(fit(x[test]), y[test]), fit


def reservoir_split(n: int, n_test: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) rows of a reservoir of ``n`` tokens, seeded, each in reading order; test is half by default
    and always leaves at least two training rows."""
    if n < 4:
        raise ActlabError(f"the reservoir holds only {n} tokens; profile more text (at least a few hundred tokens)")
    n_test = n // 2 if n_test is None else max(1, min(int(n_test), n - 2))
    return linalg.split_indices(n, n_test, seed)


__all__ = ["AffineFit", "fit_affine", "heldout_linearity", "linearity_score", "reservoir_split"]
