"""Shared maths: seeded index splits, ridge regression with a held-out λ, and R².

Converters (Command-V), the linearity analysis, the affine fit and probes all hold out part of
their rows and solve ridge systems; they do it here, once, so a fix or a faster solver reaches
every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from actlab.errors import ActlabError

# λ grid relative to the mean eigenvalue of the (centred) Gram matrix
LAMBDA_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def as_generator(seed: int | torch.Generator) -> torch.Generator:
    """A torch generator: ``seed`` itself when it is one (so callers can share a stream), else a fresh seeded one."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def held_out_count(n: int, fraction: float, *, min_n: int = 0, at_least: int = 0) -> int:
    """How many of ``n`` rows to hold out: ``round(n * fraction)`` (at least ``at_least``), none when ``n < min_n``."""
    if not 0 <= fraction < 1:
        raise ActlabError(f"the held-out fraction must be in [0, 1), not {fraction}")
    if n < min_n:
        return 0
    return max(int(at_least), int(round(n * fraction)))


def split_indices(n: int, n_held: int, seed: int | torch.Generator = 0, *,
                  sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held)`` index tensors: a seeded permutation of ``range(n)`` whose first ``n_held`` are held out.

    ``sort`` returns each part in increasing order (reading order); unsorted keeps the random order.
    """
    perm = torch.randperm(n, generator=as_generator(seed))
    kept, held = perm[n_held:], perm[:n_held]
    if sort:
        kept, held = torch.sort(kept).values, torch.sort(held).values
    return kept, held


def r2_score(pred: torch.Tensor, y: torch.Tensor, y_mean: torch.Tensor | None = None) -> float:
    """``1 − SSE / SST`` over all entries (SST around ``y_mean``, the column means of ``y`` by default);
    NaN when ``y`` does not vary."""
    y = y.double()
    mean = y.mean(0) if y_mean is None else y_mean.double()
    sst = float((y - mean).pow(2).sum())
    if sst <= 0:
        return float("nan")
    return 1.0 - float((pred.double() - y).pow(2).sum()) / sst


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """``(gram + lam·I)⁻¹ cross``: the normal equations of ridge regression."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross)


@dataclass
class RidgeFit:
    """``y ≈ (x − x_mean) @ weight + y_mean``, with λ chosen on held-out rows."""

    weight: torch.Tensor  # [d_in, d_out] float64
    x_mean: torch.Tensor  # [d_in]
    y_mean: torch.Tensor  # [d_out]
    lam: float  # chosen λ, relative to the mean diagonal of the centred Gram matrix
    r2: float  # held-out R² at the chosen λ
    train_r2: float  # R² of the refit on every row

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.x_mean) @ self.weight + self.y_mean


@dataclass
class _Moments:
    """Sums of a row subset around a common shift: enough to score any linear map on those rows exactly."""

    n: int
    sx: torch.Tensor  # [d_in] Σ x
    sy: torch.Tensor  # [d_out] Σ y
    xx: torch.Tensor  # [d_in, d_in] Σ x xᵀ
    xy: torch.Tensor  # [d_in, d_out] Σ x yᵀ
    yy: torch.Tensor  # [d_out] Σ y² per column

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> "_Moments":
        return cls(x.shape[0], x.sum(0), y.sum(0), x.T @ x, x.T @ y, (y * y).sum(0))

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.n + other.n, self.sx + other.sx, self.sy + other.sy, self.xx + other.xx,
                        self.xy + other.xy, self.yy + other.yy)

    def centred(self, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_mean, y_mean, gram, cross)`` of these rows (means zero when not centring)."""
        xm = self.sx / self.n if center else torch.zeros_like(self.sx)
        ym = self.sy / self.n if center else torch.zeros_like(self.sy)
        gram = self.xx - torch.outer(self.sx, xm) - torch.outer(xm, self.sx) + self.n * torch.outer(xm, xm)
        cross = self.xy - torch.outer(self.sx, ym) - torch.outer(xm, self.sy) + self.n * torch.outer(xm, ym)
        return xm, ym, gram, cross

    def sse(self, weight: torch.Tensor, xm: torch.Tensor, ym: torch.Tensor) -> float:
        """Σ ‖y − ((x − xm) W + ym)‖² over these rows, from the sums alone."""
        b = ym - xm @ weight  # prediction = x W + b
        total = (self.yy.sum() - 2 * (weight * self.xy).sum() - 2 * (b * self.sy).sum()
                 + (weight * (self.xx @ weight)).sum() + 2 * (self.sx @ weight * b).sum() + self.n * (b * b).sum())
        return max(float(total), 0.0)

    def sst(self) -> float:
        """Σ ‖y − mean(y)‖² over these rows."""
        return float(self.yy.sum() - (self.sy * self.sy).sum() / self.n)


def _check_ridge_inputs(x: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float]) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ActlabError(f"ridge regression needs [n, d] inputs with the same n; got {tuple(x.shape)} and "
                          f"{tuple(y.shape)}")
    if not lambdas:
        raise ActlabError("no ridge λ given: pass at least one value")


def _shifted(t: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t − shift, shift)`` in float64, the shift being the column means (zero without centring)."""
    t = t.double()
    shift = t.mean(0) if center else torch.zeros_like(t[0])
    return t - shift, shift


def _fit_from_moments(m_train: _Moments, m_val: _Moments, shift_x: torch.Tensor, shift_y: torch.Tensor,
                      lambdas: Sequence[float], center: bool) -> RidgeFit:
    """λ by held-out error, then the refit on every row, from the two subsets' sums alone."""
    xm, ym, gram, cross = m_train.centred(center)
    scale = float(torch.diagonal(gram).mean().clamp_min(1e-30))
    sst_val = m_val.sst()
    best: tuple[float, float, float] | None = None
    for lam in lambdas:
        err = m_val.sse(ridge_solve(gram, cross, lam * scale), xm, ym)
        if best is None or err < best[1]:
            best = (float(lam), err, 1.0 - err / sst_val if sst_val > 0 else float("nan"))
    lam, _, r2_val = best
    everything = m_train + m_val
    xm, ym, gram, cross = everything.centred(center)
    scale = float(torch.diagonal(gram).mean().clamp_min(1e-30))
    weight = ridge_solve(gram, cross, lam * scale)
    sst = everything.sst()
    train_r2 = 1.0 - everything.sse(weight, xm, ym) / sst if sst > 0 else float("nan")
    return RidgeFit(weight=weight, x_mean=xm + shift_x, y_mean=ym + shift_y, lam=lam, r2=r2_val, train_r2=train_r2)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, *, lambdas: Sequence[float] = LAMBDA_GRID, holdout: float = 0.2,
              seed: int = 0, center: bool = True) -> RidgeFit:
    """Ridge regression ``x → y`` in float64: λ (relative to the Gram matrix's mean diagonal) is the one with the
    lowest held-out squared error on a seeded ``holdout`` split, then the map is refitted on every row.

    One pass over the rows: the training and held-out rows' sums (around a common shift, for precision) give
    every λ's held-out error, the refit on all rows and the training R² by algebra, so the cost is two Gram
    products whatever the grid (Command-V fits 8–12 of these on ~100k token rows)."""
    _check_ridge_inputs(x, y, lambdas)
    (xs, shift_x), (ys, shift_y) = _shifted(x, center), _shifted(y, center)  # sums around the means: no cancellation
    train, val = split_indices(x.shape[0], held_out_count(x.shape[0], holdout, at_least=1), seed, sort=False)
    m_train, m_val = _Moments.of(xs[train], ys[train]), _Moments.of(xs[val], ys[val])
    return _fit_from_moments(m_train, m_val, shift_x, shift_y, lambdas, center)


def fit_ridge_both_ways(x: torch.Tensor, y: torch.Tensor, *, lambdas: Sequence[float] = LAMBDA_GRID,
                        holdout: float = 0.2, seed: int = 0, center: bool = True) -> tuple[RidgeFit, RidgeFit]:
    """``(fit_ridge(x, y), fit_ridge(y, x))`` with the same split, from three Gram products instead of four
    (``xᵀy`` serves both directions): what Command-V's converters need for every layer pair."""
    _check_ridge_inputs(x, y, lambdas)
    (xs, shift_x), (ys, shift_y) = _shifted(x, center), _shifted(y, center)
    train, val = split_indices(x.shape[0], held_out_count(x.shape[0], holdout, at_least=1), seed, sort=False)
    pairs = []
    for rows in (train, val):
        a, b = xs[rows], ys[rows]
        xx, xy, yy = a.T @ a, a.T @ b, b.T @ b
        sx, sy = a.sum(0), b.sum(0)
        pairs.append((_Moments(a.shape[0], sx, sy, xx, xy, torch.diagonal(yy).clone()),
                      _Moments(a.shape[0], sy, sx, yy, xy.T, torch.diagonal(xx).clone())))
    (fwd_train, back_train), (fwd_val, back_val) = pairs
    return (_fit_from_moments(fwd_train, fwd_val, shift_x, shift_y, lambdas, center),
            _fit_from_moments(back_train, back_val, shift_y, shift_x, lambdas, center))
