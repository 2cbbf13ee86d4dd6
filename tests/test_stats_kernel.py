"""The compiled statistics pass (stats/kernel.py) against the torch path and against float64 arithmetic:
edge values of the histogram grid, widths that are not a multiple of the vector width, several tiles, other
grids, the exact-path fallback, and the precision its shifted float64 sums promise; and the compiled top-k
merge (stats/topk_kernel.py) against the numpy one, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import actlab.stats.update as update
from actlab.stats import STATE_FIELDS, ChannelStats, SymlogBinning
from actlab.stats.kernel import _TILE_ROWS, block_pass, kernel_available

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no compiled pass (no C compiler, or ACTLAB_STATS_KERNEL=off)")


def _both(x: torch.Tensor, monkeypatch, **cfg) -> tuple[ChannelStats, ChannelStats]:
    """The same tokens through the compiled pass and through the torch path."""
    compiled = ChannelStats(x.shape[1], **cfg)
    compiled.update(x)
    with monkeypatch.context() as m:
        m.setattr(update, "kernel_available", lambda: False)
        torch_path = ChannelStats(x.shape[1], **cfg)
        torch_path.update(x)
    return compiled, torch_path


def _assert_same(a: ChannelStats, b: ChannelStats) -> None:
    """Counts, histograms, extrema and top-k identical; moments to the torch path's float32 tile sums."""
    sa, sb = a.state_dict(), b.state_dict()
    for k in STATE_FIELDS:
        if k in ("mean", "m2"):
            continue
        assert torch.equal(sa[k], sb[k]), k
    std = a.std.nan_to_num(0)
    assert torch.all((sa["mean"] - sb["mean"]).abs() <= 1e-6 * std + 1e-12)
    torch.testing.assert_close(sa["m2"], sb["m2"], rtol=1e-5, atol=1e-12)


def _edge_values(binning: SymlogBinning) -> torch.Tensor:
    """float32 values on and next to every kind of bin edge: zeros, subnormals, lo, hi, octave edges."""
    f = np.float32
    lo, hi = f(binning.lo), f(binning.hi) if binning.hi_exp < 128 else np.finfo(np.float32).max
    pos = [f(0), f(1e-45), np.nextafter(lo, f(0)), lo, np.nextafter(lo, f(1)), f(0.75), f(1), np.nextafter(f(1), f(0)),
           f(1.25), f(1e-3), np.nextafter(hi, f(0)), hi, f(3e38), np.finfo(np.float32).max]
    vals = np.array(pos + [-v for v in pos], dtype=np.float32)  # -0.0 too
    return torch.from_numpy(vals)


@pytest.mark.parametrize("bins_per_octave,hist_range", [(4, (2.0**-20, 2.0**20)), (1, (1e-3, 1e3)),
                                                        (64, (2.0**-126, 2.0**128))])
def test_edge_values_of_the_grid_bin_like_the_torch_path(monkeypatch, bins_per_octave, hist_range):
    b = SymlogBinning.from_range(hist_range, bins_per_octave)
    edges = _edge_values(b)
    g = torch.Generator().manual_seed(3)
    n, w = 3 * _TILE_ROWS + 5, 37  # several tiles, a width no vector width divides
    x = torch.randn(n, w, generator=g) * torch.logspace(-4, 2, w)
    x.view(-1)[torch.randperm(n * w, generator=g)[: 40 * len(edges)]] = edges.repeat(40)
    cfg = dict(bins_per_octave=bins_per_octave, hist_range=hist_range, topk=7)
    compiled, torch_path = _both(x, monkeypatch, **cfg)
    # values near the float32 maximum make the torch path's float32 squares overflow: it takes the exact path
    _assert_same(compiled, torch_path)
    assert torch.equal(compiled.hist, b.histogram(x.double()))
    assert int(compiled.hist.sum()) == n * w


@pytest.mark.parametrize("eps", [0.0, 1e-3, 2.0**-30])
def test_small_counts_and_sparsity_for_any_eps(monkeypatch, eps):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(700, 50, generator=g) * 1e-3
    x[x.abs() < 3e-4] = 0.0
    x[::9, 3] = torch.tensor(eps, dtype=torch.float32)  # exactly eps: not small
    compiled, torch_path = _both(x, monkeypatch, eps=eps, sparsity_bins=7)
    _assert_same(compiled, torch_path)
    eps32 = torch.tensor(eps, dtype=torch.float32)
    per_row = (x.abs() < eps32).sum(1)
    assert torch.equal(compiled.small, (x.abs() < eps32).sum(0))
    assert torch.equal(compiled.sparsity_hist, torch.bincount((per_row * 7 // 50).clamp(max=6), minlength=7))


def test_moments_keep_float64_precision_with_offsets_and_outliers():
    """Each tile is summed around its first row in float64; that row may be an outlier, but it lies within
    sqrt(m - 1) standard deviations of the tile's mean, so cancellation costs a factor <= 128 of float64
    rounding: the moments match float64 arithmetic on the float32 values to 1e-10, far below float32's."""
    g = torch.Generator().manual_seed(5)
    n = 20 * _TILE_ROWS + 17
    offset = torch.tensor([1e4, 3.0], dtype=torch.float64).repeat(12)
    x = offset + torch.randn(n, 24, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 24, dtype=torch.float64)
    x[::_TILE_ROWS] += 1e3  # every tile's first row (the shift) is far out
    x = x.float()
    st = ChannelStats(24)
    st.update(x)
    ref = x.double().numpy()
    np.testing.assert_allclose(st.mean.numpy(), ref.mean(0), rtol=1e-10)
    np.testing.assert_allclose(st.var.numpy(), ref.var(0), rtol=1e-10)
    assert torch.equal(st.max, torch.from_numpy(ref.max(0))) and torch.equal(st.min, torch.from_numpy(ref.min(0)))


@pytest.mark.parametrize("where", ["tile start", "mid tile"])
def test_nonfinite_block_takes_the_exact_path(monkeypatch, where):
    x = torch.randn(5 * _TILE_ROWS, 20, generator=torch.Generator().manual_seed(6))
    row = 2 * _TILE_ROWS + (0 if where == "tile start" else 51)
    x[row, 4], x[row + 1, 7] = math.inf, math.nan  # an inf as a tile's shift poisons its sums too
    compiled, torch_path = _both(x, monkeypatch, topk=5)
    _assert_same(compiled, torch_path)
    assert compiled.nonfinite.tolist() == [0] * 4 + [1, 0, 0, 1] + [0] * 12


def test_a_block_with_nan_leaves_the_histograms_untouched():
    b = SymlogBinning()
    hist, sparsity = torch.zeros(b.n_bins, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    x = torch.randn(300, 33)
    x[299, 32] = math.nan
    assert block_pass(x, 1e-3, b, hist, sparsity) is None
    assert not hist.any() and not sparsity.any()
    out = block_pass(x[:299], 1e-3, b, hist, sparsity)
    assert out is not None and int(hist.sum()) == 299 * 33 and int(sparsity.sum()) == 299
    assert torch.equal(out["rowmax"], x[:299].abs().amax(1))


def _tied_data(n: int, w: int, seed: int) -> torch.Tensor:
    """float32 values with many exact ties of |x| within and across rows, and all-zero rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (n, w), generator=g).float() * 0.5
    x[::11] = 0.0
    x[5, :] = 3.0
    return x


@pytest.mark.parametrize("k,labels", [(37, True), (5, False), (400, True), (2000, True)])
def test_compiled_top_merge_equals_the_numpy_one(monkeypatch, k, labels):
    import actlab.stats.channel as channel
    from actlab.stats.topk_kernel import merge_block_top

    x = _tied_data(300, 23, seed=7)
    g = torch.Generator().manual_seed(8)
    aux = (torch.arange(300) // 40, torch.arange(300) % 40, torch.randint(0, 99, (300,), generator=g))
    if not labels:
        aux = (None, None, None)
    probe = ChannelStats(23, topk=k)
    assert merge_block_top(x, x.abs().amax(1), 0, aux, probe.top, k, -math.inf) is not False  # it runs here
    cuts = [0, 1, 17, 150, 151, 300]
    compiled, reference = ChannelStats(23, topk=k), ChannelStats(23, topk=k)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        compiled.update(x[lo:hi], *(None if t is None else t[lo:hi] for t in aux))
    with monkeypatch.context() as m:
        m.setattr(channel, "merge_block_top", lambda *a: None)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            reference.update(x[lo:hi], *(None if t is None else t[lo:hi] for t in aux))
    for name in compiled.top:
        assert torch.equal(compiled.top[name], reference.top[name]), name
    assert compiled.top["top_value"].numel() == min(k, x.numel())


def test_compiled_top_merge_defers_to_numpy_when_it_cannot_run():
    from actlab.stats.topk_kernel import merge_block_top

    x = _tied_data(50, 4, seed=9)
    st = ChannelStats(4, topk=6)
    st.update(x)
    rowmax = x.abs().amax(1)
    assert float(rowmax.max()) == st._top_floor == 3.0
    assert merge_block_top(x, rowmax, 0, (None,) * 3, st.top, 6, 3.5) is False  # below the floor: no change
    assert merge_block_top(x, rowmax, 0, (torch.arange(50, dtype=torch.int32), None, None), st.top, 6, -math.inf) is None
    assert merge_block_top(x.double(), rowmax, 0, (None,) * 3, st.top, 6, -math.inf) is None
    unordered = {name: t.flip(0) for name, t in st.top.items()}
    assert merge_block_top(x, rowmax, 0, (None,) * 3, unordered, 6, -math.inf) is None


def test_blocks_after_a_nonfinite_one_fold_like_the_torch_path(monkeypatch):
    """Once a NaN was seen the channels' counts differ, so the compiled pass returns the block's results for
    ChannelStats to fold (instead of folding them itself): both ways agree with the torch path."""
    x = torch.randn(5000, 1024, generator=torch.Generator().manual_seed(10)) * 3.0 + 1.0  # 3 blocks of 2048 rows
    x[10, 7] = math.nan
    compiled, torch_path = _both(x, monkeypatch, topk=9)
    _assert_same(compiled, torch_path)
    clean = x[2048:]
    one = ChannelStats(1024, topk=9)
    one.update(clean)  # folded by the compiled pass itself
    ref = clean.double().numpy()
    np.testing.assert_allclose(one.var.numpy(), ref.var(0), rtol=1e-10)
    np.testing.assert_allclose(compiled.var.numpy()[8:], np.nanvar(x.double().numpy(), 0)[8:], rtol=1e-10)
