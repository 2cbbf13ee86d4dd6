"""actlab.linalg: the shared splits, ridge solve and R² every fitter uses."""

import math

import pytest
import torch

from actlab import linalg
from actlab.analyses.affine import fit_affine, reservoir_split
from actlab.errors import ActlabError


def test_split_indices_is_a_seeded_sorted_permutation():
    kept, held = linalg.split_indices(50, 10, seed=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(held, torch.sort(perm[:10]).values) and torch.equal(kept, torch.sort(perm[10:]).values)
    assert sorted(kept.tolist() + held.tolist()) == list(range(50))
    raw_kept, raw_held = linalg.split_indices(50, 10, seed=3, sort=False)
    assert torch.equal(raw_held, perm[:10]) and torch.equal(raw_kept, perm[10:])
    gen = torch.Generator().manual_seed(3)
    first, second = linalg.split_indices(50, 10, gen), linalg.split_indices(50, 10, gen)
    assert not torch.equal(first[1], second[1])  # a shared generator keeps drawing


def test_reservoir_split_halves_and_keeps_two_training_rows():
    train, test = reservoir_split(11, seed=0)
    assert (train.numel(), test.numel()) == (6, 5)
    assert reservoir_split(10, n_test=100)[0].numel() == 2
    with pytest.raises(ActlabError, match="only 3 tokens"):
        reservoir_split(3)


def test_held_out_count():
    assert linalg.held_out_count(100, 0.2) == 20
    assert linalg.held_out_count(3, 0.2, at_least=1) == 1
    assert linalg.held_out_count(3, 0.2, min_n=10) == 0
    with pytest.raises(ActlabError):
        linalg.held_out_count(10, 1.0)


def test_r2_score_and_constant_targets():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(40, 3, generator=gen)
    pred = y + 0.1 * torch.randn(40, 3, generator=gen)
    sse = float(((pred.double() - y.double()) ** 2).sum())
    sst = float(((y.double() - y.double().mean(0)) ** 2).sum())
    assert linalg.r2_score(pred, y) == pytest.approx(1 - sse / sst, rel=1e-12)
    assert linalg.r2_score(y, y) == 1.0
    assert math.isnan(linalg.r2_score(pred, torch.ones(40, 3)))


def test_ridge_solve_solves_the_normal_equations():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    gram, cross = x.T @ x, x.T @ y
    w = linalg.ridge_solve(gram, cross, 0.5)
    torch.testing.assert_close((gram + 0.5 * torch.eye(4, dtype=torch.float64)) @ w, cross)
    torch.testing.assert_close(linalg.ridge_solve(gram, cross, 0.0), torch.linalg.lstsq(x, y).solution)


def test_fit_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=gen)
    m = torch.randn(6, 3, generator=gen)
    y = x @ m + 2.0 + 0.01 * torch.randn(400, 3, generator=gen)
    fit = linalg.fit_ridge(x, y)
    assert fit.r2 > 0.999 and fit.train_r2 > 0.999
    torch.testing.assert_close(fit(x).float(), y, atol=0.05, rtol=0)
    with pytest.raises(ActlabError, match="same n"):
        linalg.fit_ridge(x, y[:10])


def test_fit_affine_uses_the_shared_solver():
    """fit_affine's system is ridge_solve on standardized inputs: an exact affine map comes back (up to the
    1e-6 guard ridge), whatever the scale of each input channel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0])
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    fit = fit_affine(x, x @ w + 1.5)
    assert fit.ridge == 1e-6
    torch.testing.assert_close(fit.weight, w, atol=1e-3, rtol=0)
    torch.testing.assert_close(fit(x), x @ w + 1.5, atol=0, rtol=1e-4)


def _reference_ridge(x, y, lambdas, holdout=0.2, seed=0, center=True):
    """The textbook fit: centre, solve for every λ, predict the held-out rows, refit on all rows."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    train, val = linalg.split_indices(n, linalg.held_out_count(n, holdout, at_least=1), seed, sort=False)

    def system(rows):
        xm = x[rows].mean(0) if center else torch.zeros(x.shape[1], dtype=x.dtype)
        ym = y[rows].mean(0) if center else torch.zeros(y.shape[1], dtype=y.dtype)
        g = (x[rows] - xm).T @ (x[rows] - xm)
        return xm, ym, g, (x[rows] - xm).T @ (y[rows] - ym), float(torch.diagonal(g).mean())

    xm, ym, g, c, scale = system(train)
    errs = []
    for lam in lambdas:
        pred = (x[val] - xm) @ linalg.ridge_solve(g, c, lam * scale) + ym
        errs.append((float(((pred - y[val]) ** 2).mean()), lam, linalg.r2_score(pred, y[val])))
    _, lam, r2 = min(errs, key=lambda e: e[0])
    xm, ym, g, c, scale = system(torch.arange(n))
    w = linalg.ridge_solve(g, c, lam * scale)
    return w, xm, ym, lam, r2, linalg.r2_score((x - xm) @ w + ym, y)


@pytest.mark.parametrize("center", [True, False])
def test_fit_ridge_by_sums_equals_the_textbook_fit(center):
    """The one-pass fit (held-out errors and the refit from sums) gives the textbook fit's λ, weights and R²,
    also with a large offset in the data (residual streams have big means) and a near-exact relation."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(900, 12, generator=gen) * torch.linspace(0.05, 3, 12) + 40.0
    for noise in (1.0, 1e-4):
        y = x @ torch.randn(12, 5, generator=gen) + 7.0 + noise * torch.randn(900, 5, generator=gen)
        fit = linalg.fit_ridge(x, y, center=center)
        w, xm, ym, lam, r2, train_r2 = _reference_ridge(x, y, linalg.LAMBDA_GRID, center=center)
        assert fit.lam == lam
        torch.testing.assert_close(fit.weight, w, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fit.x_mean, xm, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(fit.y_mean, ym, rtol=1e-9, atol=1e-9)
        assert fit.r2 == pytest.approx(r2, abs=1e-9) and fit.train_r2 == pytest.approx(train_r2, abs=1e-9)


def test_fit_ridge_both_ways_equals_two_fits():
    """The shared-product fit is the same algebra as two separate fits on the same split."""
    from actlab.linalg import fit_ridge_both_ways

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(600, 7, generator=gen) * 3 + 10
    y = x @ torch.randn(7, 5, generator=gen) + 0.5 * torch.randn(600, 5, generator=gen) - 4
    forward, backward = fit_ridge_both_ways(x, y, lambdas=(1e-4, 1e-2, 1.0), seed=2)
    for got, want in ((forward, linalg.fit_ridge(x, y, lambdas=(1e-4, 1e-2, 1.0), seed=2)),
                      (backward, linalg.fit_ridge(y, x, lambdas=(1e-4, 1e-2, 1.0), seed=2))):
        assert got.lam == want.lam and got.r2 == pytest.approx(want.r2, abs=1e-12)
        torch.testing.assert_close(got.weight, want.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.x_mean, want.x_mean)
        torch.testing.assert_close(got.y_mean, want.y_mean)
