"""Streaming statistics: exact merges, numerics, histogram binning, top-k, files, memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import actlab
from actlab.engine.batch import TokenBatch
from actlab.errors import ActlabError
from actlab.stats import STATE_FIELDS, ChannelStats, StatsSink, SymlogBinning
from actlab.stats.sink import FORMAT_VERSION

SRC = Path(__file__).resolve().parents[1] / "src"


def make_data(n=3000, w=48, seed=0, dtype=torch.float64):
    """Channels with very different scales, offsets, exact zeros and one dead channel."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-5, 3, w, dtype=torch.float64)
    x = torch.randn(n, w, generator=g, dtype=torch.float64) * scale
    x[:, 3] += 1e4  # large offset
    x[:, 5] = torch.relu(x[:, 5])  # half zeros
    if w > 7:
        x[:, 7] = 0.0  # dead channel
    x[x.abs() < 1e-4 * scale] = 0.0
    doc = torch.arange(n) // 100
    pos = torch.arange(n) % 100
    tok = torch.randint(0, 5000, (n,), generator=g)
    return x.to(dtype), doc, pos, tok


def chunks(n, seed=1):
    g = np.random.default_rng(seed)
    cuts = np.sort(g.choice(np.arange(1, n), size=12, replace=False))
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def assert_same_state(a: ChannelStats, b: ChannelStats, rtol=1e-9, float32_input=False):
    """Every field equal: counts, histograms, min/max and top-k exactly; mean/M2 to rtol (for
    float32 input, which is summed in float32 within a block: to ~1e-6 of the spread)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == set(STATE_FIELDS)
    for k in STATE_FIELDS:
        if sa[k].dtype == torch.int64:
            assert torch.equal(sa[k], sb[k]), k
        elif float32_input and k == "mean":
            assert torch.all((sa[k] - sb[k]).abs() <= 1e-6 * a.std + 1e-12), k
        elif float32_input and k == "m2":
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-12, msg=k)
        elif float32_input and k in ("min", "max", "absmax", "top_value"):
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=1e-9, equal_nan=True, msg=k)


# ---------------------------------------------------------------- exactness of merging
def test_streamed_and_merged_equal_one_go():
    x, doc, pos, tok = make_data()
    one = ChannelStats(x.shape[1], topk=50)
    one.update(x, doc, pos, tok)

    streamed = ChannelStats(x.shape[1], topk=50)
    merged = ChannelStats(x.shape[1], topk=50)
    for lo, hi in chunks(len(x)):
        streamed.update(x[lo:hi], doc[lo:hi], pos[lo:hi], tok[lo:hi])
        part = ChannelStats(x.shape[1], topk=50)
        part.update(x[lo:hi], doc[lo:hi], pos[lo:hi], tok[lo:hi])
        merged.merge(part)
    assert_same_state(one, streamed)
    assert_same_state(one, merged)


def test_merge_order_and_empty_pieces_do_not_matter():
    x, doc, pos, tok = make_data(n=800, seed=3)
    parts = []
    for lo, hi in chunks(len(x), seed=4):
        p = ChannelStats(x.shape[1])
        p.update(x[lo:hi], doc[lo:hi], pos[lo:hi], tok[lo:hi])
        parts.append(p)
    fwd, rev = ChannelStats(x.shape[1]), ChannelStats(x.shape[1])
    fwd.merge(ChannelStats(x.shape[1]))  # merging an empty one is a no-op
    for p in parts:
        fwd.merge(p)
    for p in reversed(parts):
        rev.merge(p)
    rev.update(x[:0])  # zero tokens
    assert_same_state(fwd, rev)


def test_float32_chunks_match_one_go_closely():
    x, doc, pos, tok = make_data(dtype=torch.float32)
    one = ChannelStats(x.shape[1])
    one.update(x, doc, pos, tok)
    merged = ChannelStats(x.shape[1])
    for lo, hi in chunks(len(x)):
        p = ChannelStats(x.shape[1])
        p.update(x[lo:hi], doc[lo:hi], pos[lo:hi], tok[lo:hi])
        merged.merge(p)
    for k in ("count", "zeros", "small", "active", "hist", "sparsity_hist", "min", "max", "absmax"):
        assert torch.equal(one.state_dict()[k], merged.state_dict()[k]), k
    # float32 input is summed in float32 inside a block: agreement to ~1e-6 of the spread
    std = one.std.nan_to_num(0)
    assert torch.all((merged.mean - one.mean).abs() <= 1e-6 * std + 1e-12)
    torch.testing.assert_close(merged.var, one.var, rtol=1e-5, atol=1e-12, equal_nan=True)
    ref = x.double().numpy()
    np.testing.assert_allclose(merged.var.numpy(), ref.var(0), rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------- numerics vs numpy
def test_fields_match_numpy():
    x, doc, pos, tok = make_data()
    st = ChannelStats(x.shape[1], eps=1e-3)
    st.update(x, doc, pos, tok)
    a = x.numpy()
    np.testing.assert_allclose(st.mean.numpy(), a.mean(0), rtol=1e-12, atol=1e-15)
    live = a.var(0) > 0
    np.testing.assert_allclose(st.var.numpy()[live], a.var(0)[live], rtol=1e-10)
    np.testing.assert_allclose(st.var_unbiased.numpy()[live], a.var(0, ddof=1)[live], rtol=1e-10)
    np.testing.assert_allclose(st.std.numpy()[live], a.std(0)[live], rtol=1e-10)
    np.testing.assert_array_equal(st.min.numpy(), a.min(0))
    np.testing.assert_array_equal(st.max.numpy(), a.max(0))
    np.testing.assert_array_equal(st.absmax.numpy(), np.abs(a).max(0))
    np.testing.assert_array_equal(st.zeros.numpy(), (a == 0).sum(0))
    np.testing.assert_array_equal(st.small.numpy(), (np.abs(a) < 1e-3).sum(0))
    np.testing.assert_array_equal(st.active.numpy(), (np.abs(a) >= 1e-3).sum(0))
    np.testing.assert_allclose(st.zero_frac.numpy(), (a == 0).mean(0))
    np.testing.assert_allclose(st.small_frac.numpy() + st.active_frac.numpy(), 1.0)
    assert st.dead[7] and not st.dead[3]
    # per-token fraction of small channels, binned in 20 equal bins of [0, 1]
    frac_small = (np.abs(a) < 1e-3).sum(1) / a.shape[1]
    expected = np.histogram(np.minimum(frac_small, 1 - 1e-12), bins=20, range=(0, 1))[0]
    np.testing.assert_array_equal(st.sparsity_hist.numpy(), expected)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_variance_with_large_offset_has_no_cancellation(dtype, rtol):
    g = torch.Generator().manual_seed(5)
    x = (1e6 + torch.randn(20_000, 8, generator=g, dtype=torch.float64) * torch.tensor([1e-2, 0.1, 1, 3, 1, 1, 1, 1], dtype=torch.float64)).to(dtype)
    st = ChannelStats(8)
    for lo in range(0, len(x), 1000):
        st.update(x[lo : lo + 1000])
    ref = x.double().numpy()
    np.testing.assert_allclose(st.var.numpy(), ref.var(0), rtol=rtol)
    np.testing.assert_allclose(st.mean.numpy(), ref.mean(0), rtol=1e-12)
    # the textbook one-pass formula in float32 would be useless here
    naive = (x.float() ** 2).mean(0) - x.float().mean(0) ** 2
    assert not np.allclose(naive.double().numpy(), ref.var(0), rtol=0.5)


def test_small_threshold_is_exact_at_eps_in_float32():
    eps = 1e-3
    e32 = np.float32(eps)
    around = np.array(
        [0, e32, np.nextafter(e32, 0), np.nextafter(e32, 1), -e32, -np.nextafter(e32, 0), 1e-30, 1e30, 5e-4, 2e-3],
        dtype=np.float32,
    )
    x = torch.from_numpy(np.tile(around, (3, 1)))
    st = ChannelStats(len(around), eps=eps)
    st.update(x)
    np.testing.assert_array_equal(st.small.numpy(), 3 * (np.abs(around) < e32))
    np.testing.assert_array_equal(st.zeros.numpy(), 3 * (around == 0))
    st0 = ChannelStats(len(around), eps=0)
    st0.update(x)
    assert int(st0.small.sum()) == 0 and int(st0.active.sum()) == 3 * int((around != 0).sum()) + 3


def test_bfloat16_input_equals_its_float32_value():
    x, *_ = make_data(n=500, dtype=torch.float32)
    xb = x.to(torch.bfloat16)
    a, b = ChannelStats(x.shape[1]), ChannelStats(x.shape[1])
    a.update(xb)
    b.update(xb.float())
    assert_same_state(a, b, rtol=0)


def test_nonfinite_values_are_counted_and_kept_out_of_moments():
    x, doc, pos, tok = make_data(n=400, w=6)
    x[10, 0] = math.nan
    x[11, 1] = math.inf
    x[12, 1] = -math.inf
    st = ChannelStats(6, topk=5)
    st.update(x, doc, pos, tok)
    a = x.numpy()
    fin = np.isfinite(a)
    for c in range(6):
        v = a[fin[:, c], c]
        assert st.mean[c].item() == pytest.approx(v.mean(), rel=1e-12, abs=1e-15)
        assert st.var[c].item() == pytest.approx(v.var(), rel=1e-9, abs=1e-15)
    assert st.nonfinite.tolist() == [1, 2, 0, 0, 0, 0]
    assert st.max[1].item() == math.inf and st.min[1].item() == -math.inf
    assert math.isfinite(st.max[0].item())  # NaN ignored by min/max
    b = st.binning
    assert st.hist[b.nan_bin].item() == 1
    assert st.hist[0].item() >= 1 and st.hist[b.nan_bin - 1].item() >= 1  # -inf, +inf overflow
    assert int(st.hist.sum()) == 400 * 6
    assert not any(math.isnan(e["value"]) for e in st.top_entries())
    assert st.top_entries()[0]["value"] in (math.inf, -math.inf)
    # a clean shard merged with the dirty one equals the one-go result
    y, *_ = make_data(n=300, w=6, seed=9)
    one = ChannelStats(6, topk=5)
    one.update(torch.cat([x, y]))
    st2 = ChannelStats(6, topk=5)
    st2.update(y)
    st_copy = ChannelStats(6, topk=5)
    st_copy.update(x)
    assert_same_state(one, st_copy.merge(st2))


def test_fast_path_agrees_with_exact_path(monkeypatch):
    """The vectorised float32 fast path and the masked float64 path give the same stats."""
    import actlab.stats.channel as channel

    x, doc, pos, tok = make_data(n=2000, w=70, seed=21, dtype=torch.float32)
    fast = ChannelStats(70, topk=20)
    fast.update(x, doc, pos, tok)
    monkeypatch.setattr(channel.ChannelStats, "_update_block_fast", lambda self, *a: False)
    exact = ChannelStats(70, topk=20)
    exact.update(x, doc, pos, tok)
    assert_same_state(fast, exact, float32_input=True)


@pytest.mark.parametrize("nonfinite", [False, True])
def test_compiled_pass_agrees_with_torch_path(monkeypatch, nonfinite):
    """The compiled single pass (stats/kernel.py) and the torch tiles: integer fields, extrema, histogram and
    top-k identical; moments to float32 rounding (the torch path sums tiles in float32). Several blocks and
    tiles, values exactly at eps, and (parametrised) a NaN / inf block that must take the exact path."""
    import actlab.stats.update as update
    from actlab.stats.kernel import kernel_available

    if not kernel_available():
        pytest.skip("no C compiler: the torch path is the only one")
    x, doc, pos, tok = make_data(n=40_000, w=70, seed=22, dtype=torch.float32)
    x[::7, 61] = torch.tensor(1e-3, dtype=torch.float32)  # |x| == float32(eps): not small
    x[::5, 62] = -torch.nextafter(torch.tensor(1e-3, dtype=torch.float32), torch.tensor(0.0))  # just below: small
    if nonfinite:
        x[30_001, 4], x[30_002, 9] = math.nan, -math.inf
    compiled = ChannelStats(70, topk=20)
    compiled.update(x, doc, pos, tok)
    monkeypatch.setattr(update, "kernel_available", lambda: False)
    torch_path = ChannelStats(70, topk=20)
    torch_path.update(x, doc, pos, tok)
    assert_same_state(compiled, torch_path, float32_input=True)
    assert torch.equal(compiled.small, (x.abs() < torch.tensor(1e-3, dtype=torch.float32)).sum(0))  # NaN: not small


def test_other_input_dtypes_and_layouts():
    x = torch.tensor([[60000.0, 1.0], [70000.0, 2.0]]).half()  # 70000 overflows to inf
    st = ChannelStats(2)
    st.update(x)
    assert st.nonfinite.tolist() == [1, 0] and st.mean.tolist() == [60000.0, 1.5]
    ints = ChannelStats(3)
    ints.update(torch.tensor([[1, 0, 2], [3, 0, 0]]))
    assert ints.mean.tolist() == [2.0, 0.0, 1.0] and ints.zeros.tolist() == [0, 2, 1]
    y = torch.randn(40, 64, requires_grad=True)
    a, b = ChannelStats(40), ChannelStats(40)
    a.update(y.t())  # non-contiguous
    b.update(y.detach().t().contiguous())
    assert_same_state(a, b, rtol=0)
    wide = ChannelStats(300_000, topk=3)  # wider than one tile
    z = torch.randn(3, 300_000)
    wide.update(z)
    assert wide.top["top_value"].abs().max() == z.abs().max()
    assert int(wide.hist.sum()) == z.numel()


# ---------------------------------------------------------------- histogram
def test_histogram_bins_match_reference_and_sum_to_count():
    b = SymlogBinning.from_range((1e-6, 1e6), 4)
    assert (b.lo_exp, b.hi_exp) == (-20, 20) and b.n_bins == 2 * 160 + 4
    edges = b.edges()
    assert edges.shape == (b.n_bins,) and torch.all(edges[1:] > edges[:-1])
    special = [0.0, -0.0, 2.0**-20, -(2.0**-20), 2.0**-21, 2.0**20, -(2.0**20), 1.25, 1.2499999, -1.75, 3e38, -3e38, 1e-40]
    g = torch.Generator().manual_seed(2)
    rnd = torch.randn(3000, generator=g, dtype=torch.float64) * torch.logspace(-9, 9, 3000, dtype=torch.float64)
    vals = torch.cat([torch.tensor(special, dtype=torch.float64), rnd, edges[1:-1]])
    ref = torch.bincount(b.bin_of(vals), minlength=b.n_bins)
    assert torch.equal(b.histogram(vals), ref)
    v32 = vals.float()
    assert torch.equal(b.histogram(v32), torch.bincount(b.bin_of(v32.double()), minlength=b.n_bins))
    # each value lies inside its bin's edges
    idx = b.bin_of(rnd)
    lo, hi = edges[idx], edges[idx + 1]
    assert torch.all((rnd >= lo) & (rnd <= hi))
    st = ChannelStats(30, hist_range=(1e-6, 1e6))
    st.update(rnd.view(100, 30))
    assert int(st.hist.sum()) == st.count * st.width
    assert int(st.sparsity_hist.sum()) == st.count


def test_histogram_range_and_resolution_are_configurable():
    st = ChannelStats(4, hist_range=(0.01, 100), bins_per_octave=16)
    b = st.binning
    assert (b.lo, b.hi) == (2.0**-7, 2.0**7) and b.n_mag == 14 * 16
    x = torch.tensor([[0.001, 0.5, 200.0, -3.0]])
    st.update(x)
    assert st.hist[b.center_bin] == 1 and st.hist[2 * b.n_mag + 2] == 1
    assert int(st.hist.sum()) == 4


# ---------------------------------------------------------------- top-k
def test_topk_equals_sorting_the_concatenation():
    x, doc, pos, tok = make_data(n=2500, w=40, seed=11)
    k = 37
    st = ChannelStats(40, topk=k)
    for lo, hi in chunks(len(x), seed=12):
        st.update(x[lo:hi], doc[lo:hi], pos[lo:hi], tok[lo:hi])
    flat = x.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True)[:k]
    rows, chans = order // 40, order % 40
    got = st.top
    assert torch.equal(got["top_value"], flat[order])
    assert torch.equal(got["top_channel"], chans)
    assert torch.equal(got["top_doc"], doc[rows])
    assert torch.equal(got["top_position"], pos[rows])
    assert torch.equal(got["top_token"], tok[rows])
    e = st.top_entries()[0]
    assert e["value"] == flat[order[0]].item() and e["doc_id"] == doc[rows[0]].item()


def test_topk_with_many_equal_values_is_deterministic():
    x = torch.zeros(50, 3)
    x[::7, 1] = 5.0
    a, b = ChannelStats(3, topk=4), ChannelStats(3, topk=4)
    a.update(x, torch.arange(50), torch.arange(50), torch.arange(50))
    for lo in (30, 10, 0):  # reversed order of pieces
        hi = {30: 50, 10: 30, 0: 10}[lo]
        p = ChannelStats(3, topk=4)
        p.update(x[lo:hi], torch.arange(lo, hi), torch.arange(lo, hi), torch.arange(lo, hi))
        b.merge(p)
    assert a.top["top_doc"].tolist() == [0, 7, 14, 21] == b.top["top_doc"].tolist()


# ---------------------------------------------------------------- sink and files
def batches(n_batches=4, n=300, widths=None, seed=0):
    widths = widths or {"resid.0": 16, "mlp.1": 40}
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        acts = {s: torch.randn(n, w, generator=g) * (1 + 10 * i) for s, w in widths.items()}
        out.append(
            TokenBatch(
                acts=acts,
                token_ids=torch.randint(0, 100, (n,), generator=g),
                doc_ids=torch.arange(n) // 50 + i * 100,
                positions=torch.arange(n) % 50,
            )
        )
    return out


def test_sink_consumes_merges_and_summarises():
    bs = batches()
    whole = StatsSink({"resid.0": 16, "mlp.1": 40}, topk=8)
    for b in bs:
        whole.consume(b)
    a = StatsSink({"resid.0": 16, "mlp.1": 40}, topk=8)
    b2 = StatsSink({"resid.0": 16, "mlp.1": 40}, topk=8)
    for b in bs[:2]:
        a.consume(b)
    for b in bs[2:]:
        b2.consume(b)
    a.merge(b2)
    for site in whole.sites:
        assert_same_state(whole[site], a[site], float32_input=True)
    summ = whole.summary()
    allv = torch.cat([b.acts["mlp.1"] for b in bs]).double()
    s = summ["mlp.1"]
    assert s["tokens"] == 1200 and s["width"] == 40
    assert s["mean"] == pytest.approx(allv.mean().item(), rel=1e-5, abs=1e-6)
    assert s["std"] == pytest.approx(allv.std(correction=0).item(), rel=1e-6)
    assert s["absmax"] == pytest.approx(allv.abs().max().item())
    assert s["dead_channels"] == 0 and s["nonfinite"] == 0
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_sink_learns_sites_from_first_batch():
    sink = StatsSink()
    sink.consume(batches(1)[0])
    assert sink.widths == {"resid.0": 16, "mlp.1": 40}


def test_save_load_round_trip(tmp_path):
    sink = StatsSink({"resid.3": 16, "mlp.1": 40}, eps=1e-2, topk=5, bins_per_octave=8)
    for b in batches(widths={"resid.3": 16, "mlp.1": 40}):
        sink.consume(b)
    path = sink.save(tmp_path / "stats.safetensors", metadata={"model": "tiny-gpt", "config_hash": "abc123"})
    raw = load_file(str(path))
    assert "resid.3/mean" in raw and raw["resid.3/mean"].dtype == torch.float64
    loaded = StatsSink.load(path)
    assert loaded.metadata == {"model": "tiny-gpt", "config_hash": "abc123"}
    assert loaded.file_header["actlab_version"] == actlab.__version__
    assert loaded.file_header["format_version"] == FORMAT_VERSION
    assert loaded.widths == sink.widths and loaded.config() == sink.config()
    for site in sink.sites:
        assert_same_state(sink[site], loaded[site], rtol=0)
    assert loaded.summary() == sink.summary()
    # a loaded sink keeps streaming and merging
    loaded.merge(sink)
    assert loaded["mlp.1"].count == 2 * sink["mlp.1"].count


def corrupt_variants(good: Path, tmp: Path):
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["actlab"])
    tensors = load_file(str(good))

    def write(name, tensors, metadata):
        p = tmp / name
        save_file(tensors, str(p), metadata=metadata)
        return p

    yield "garbage", (tmp / "garbage.safetensors", b"not a safetensors file at all")
    yield "truncated", (tmp / "truncated.safetensors", data[: len(data) // 2])
    yield "empty", (tmp / "empty.safetensors", b"")
    yield "no header", write("nohdr.safetensors", tensors, {"other": "x"})
    yield "bad json", write("badjson.safetensors", tensors, {"actlab": "{nope"})
    yield "foreign format", write("foreign.safetensors", tensors, {"actlab": json.dumps({**meta, "format": "x"})})
    yield "newer version", write("newer.safetensors", tensors, {"actlab": json.dumps({**meta, "format_version": 99})})
    missing = {k: v for k, v in tensors.items() if k != "resid.0/m2"}
    yield "missing tensor", write("missing.safetensors", missing, {"actlab": json.dumps(meta)})
    wrong = dict(tensors)
    wrong["resid.0/mean"] = torch.zeros(3, dtype=torch.float64)
    yield "wrong shape", write("shape.safetensors", wrong, {"actlab": json.dumps(meta)})
    wrongt = dict(tensors)
    wrongt["resid.0/hist"] = wrongt["resid.0/hist"].float()
    yield "wrong dtype", write("dtype.safetensors", wrongt, {"actlab": json.dumps(meta)})
    yield "bad config", write("cfg.safetensors", tensors, {"actlab": json.dumps({**meta, "config": {**meta["config"], "topk": -1}})})


def test_corrupt_or_foreign_files_raise_actlab_error(tmp_path):
    sink = StatsSink({"resid.0": 16, "mlp.1": 40})
    for b in batches(2):
        sink.consume(b)
    good = sink.save(tmp_path / "good.safetensors")
    for name, item in corrupt_variants(good, tmp_path):
        if isinstance(item, tuple):
            path, content = item
            path.write_bytes(content)
        else:
            path = item
        with pytest.raises(ActlabError) as e:
            StatsSink.load(path)
        msg = str(e.value)
        assert str(path) in msg or "version" in msg, (name, msg)
        if name == "newer version":
            assert "upgrade" in msg
    with pytest.raises(ActlabError, match="not found"):
        StatsSink.load(tmp_path / "absent.safetensors")


def test_user_errors_are_actlab_errors():
    with pytest.raises(ActlabError, match="width"):
        ChannelStats(0)
    with pytest.raises(ActlabError, match="eps"):
        ChannelStats(4, eps=-1)
    with pytest.raises(ActlabError, match="hist_range"):
        ChannelStats(4, hist_range=(10, 1))
    with pytest.raises(ActlabError, match="bins_per_octave"):
        ChannelStats(4, bins_per_octave=3)
    with pytest.raises(ActlabError, match="site 'a': width"):
        StatsSink({"a": 0})
    with pytest.raises(ActlabError, match="unknown stats option"):
        StatsSink({"a": 4}, bins=3)
    st = ChannelStats(4)
    with pytest.raises(ActlabError, match="width 4"):
        st.update(torch.zeros(3, 5))
    with pytest.raises(ActlabError, match="doc_ids"):
        st.update(torch.zeros(3, 4), doc_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ActlabError, match="different configs"):
        st.merge(ChannelStats(4, eps=0.5))
    sink = StatsSink({"resid.9": 16})
    with pytest.raises(ActlabError, match="resid.9"):
        sink.consume(batches(1)[0])
    with pytest.raises(ActlabError, match="JSON"):
        s2 = StatsSink({"resid.0": 16})
        s2.consume(batches(1)[0])
        s2.save("/tmp/never-written.safetensors", metadata={"obj": object()})


# ---------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    from actlab.engine.batch import TokenBatch
    from actlab.stats import StatsSink

    widths = {"resid.0": 256, "mlp.0": 1024}
    sink = StatsSink(widths)
    n = 1024
    g = torch.Generator().manual_seed(0)
    acts = {s: torch.empty(n, w) for s, w in widths.items()}
    ids = torch.zeros(n, dtype=torch.long)

    def feed(n_batches, start):
        for i in range(n_batches):
            for s, a in acts.items():
                a.normal_(generator=g).mul_(1 + (i % 7))
            b = TokenBatch(acts=acts, token_ids=ids, doc_ids=torch.arange(n) + (start + i) * n,
                           positions=torch.arange(n))
            sink.consume(b)

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    N = int(sys.argv[1])
    feed(N, 0)
    after_n = peak_mb()
    feed(9 * N, N)
    after_10n = peak_mb()
    assert sink["mlp.0"].count == 10 * N * n
    print(after_n, after_10n)
    """
)


def test_memory_does_not_grow_with_tokens(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    n_batches = 6  # 6k tokens, then 60k tokens in total
    out = subprocess.run(
        [sys.executable, str(script), str(n_batches)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    after_n, after_10n = map(float, out.stdout.split())
    assert after_10n - after_n < 20, (after_n, after_10n)
