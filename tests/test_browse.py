"""The feature browser (issue #14): the streaming pass against brute force, the logit table against the LM head,
the site's files, the CLI, and the pages in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from actlab.browse import BrowseConfig, build_browser, collect_units, logit_table, make_server, output_directions
from actlab.browse.kept import mix32
from actlab.errors import ActlabError

TEXTS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4) + f"tail {i * 7}"
         for i in range(24)]
SITE = "mlp.hidden.1"
UNITS = [0, 3, 5, 11, 20, 47]
SMALL = dict(top_k=6, window_before=5, window_after=3, bins=16, intervals=4, samples=3)


def _js(path: Path):
    """The object a data file hands to actlabBrowse."""
    text = path.read_text()
    return json.loads(text[text.index("(") + 1:text.rindex(")")])


@pytest.fixture(scope="module")
def reference(llama):
    """Every token's activation of every unit, in run order, with its document and position (brute force)."""
    b = llama.collect(TEXTS, [SITE], positions="all", batch_size=4)
    return dict(z=b.acts[SITE].float().numpy(), doc=b.doc_ids.numpy(), pos=b.positions.numpy(), tok=b.token_ids.numpy())


@pytest.fixture(scope="module")
def collected(llama):
    return collect_units(llama, TEXTS, SITE, UNITS, config=BrowseConfig(batch_size=3, **SMALL))


def _window(ref, row, cfg):
    """Brute-force window of token ``row``: same document, contiguous positions."""
    out = []
    for step in range(-cfg.window_before, cfg.window_after + 1):
        r = row + step
        if 0 <= r < len(ref["doc"]) and ref["doc"][r] == ref["doc"][row] and ref["pos"][r] == ref["pos"][row] + step:
            out.append(r)
    return out


def test_density_histogram_and_top_contexts_match_brute_force(collected, reference):
    d, cfg = collected, collected.config
    n = len(reference["doc"])
    assert d.n_tokens == n
    for i, unit in enumerate(UNITS):
        z = reference["z"][:, unit]
        fired = z > 0
        assert d.n_fire[i] == fired.sum() and d.density[i] == pytest.approx(fired.mean())
        assert d.max[i] == pytest.approx(z.max())
        # the bin width: the smallest power of two w with max < bins * w; counts = a direct histogram
        w = d.bin_width[i]
        assert np.log2(w) == int(np.log2(w)) and z.max() < cfg.bins * w <= 2 * z.max()
        edges = np.arange(cfg.bins + 1) * w
        assert d.counts[i].tolist() == np.histogram(z[fired], edges)[0].tolist()
        assert d.counts[i].sum() + (n - fired.sum()) == n
        # top-k: the largest activations, ties to the earlier token, with their windows
        order = np.lexsort((np.arange(n), -z))[:cfg.top_k]
        order = order[z[order] > 0]
        kept = d.top.row[i][d.top.row[i] >= 0]
        assert kept.tolist() == order.tolist()
        for slot, row in enumerate(kept):
            assert d.top.value[i, slot] == z[row]
            assert (d.top.doc[i, slot], d.top.pos[i, slot]) == (reference["doc"][row], reference["pos"][row])
            rows = _window(reference, row, cfg)
            valid = d.top.win_tok[i, slot] >= 0
            assert d.top.win_tok[i, slot][valid].tolist() == reference["tok"][rows].tolist()
            np.testing.assert_allclose(d.top.win_act[i, slot][valid], z[rows], rtol=1e-6, atol=1e-6)


def test_interval_samples_are_the_lowest_hash_keys_of_each_interval(collected, reference):
    d, cfg = collected, collected.config
    n, per = len(reference["doc"]), cfg.bins // cfg.intervals
    for i, unit in enumerate(UNITS):
        z = reference["z"][:, unit]
        for j in range(cfg.intervals):
            lo, hi = j * per * d.bin_width[i], (j + 1) * per * d.bin_width[i]
            inside = np.flatnonzero((z > 0) & (z >= lo) & (z < hi))
            assert d.counts[i, j * per:(j + 1) * per].sum() == inside.size
            keys = mix32(torch.as_tensor(inside) * 0x9E3779B1 + unit * 0x85EBCA6B + cfg.seed).numpy()
            expect = inside[np.lexsort((inside, keys))][:cfg.samples]
            group = i * cfg.intervals + j
            got = d.samples.row[group][d.samples.row[group] >= 0]
            assert got.tolist() == expect.tolist()
            assert all(lo <= v < hi for v in d.samples.value[group][:got.size])
    assert d.samples.row.max() < n


def test_the_result_does_not_depend_on_the_batching(llama, collected):
    other = collect_units(llama, TEXTS, SITE, UNITS, config=BrowseConfig(batch_size=7, **SMALL))
    for name in ("n_fire", "max", "bin_width", "counts"):
        np.testing.assert_array_equal(getattr(other, name), getattr(collected, name))
    for kept in ("top", "samples"):
        for field in ("row", "value", "win_tok", "win_act"):
            np.testing.assert_array_equal(getattr(getattr(other, kept), field), getattr(getattr(collected, kept), field))


def test_sae_latents_are_browsed_like_a_site(llama):
    from actlab.sae import SparseAutoencoder, attach

    sae = SparseAutoencoder(32, 24, "topk", 4)
    d = collect_units(llama, TEXTS, "resid.1", None, sae=sae, config=BrowseConfig(batch_size=5, **SMALL))
    with attach(llama, sae, "resid.1"):
        z = llama.collect(TEXTS, ["sae.resid.1"], positions="all").acts["sae.resid.1"].float().numpy()
    assert d.units.tolist() == list(range(24))
    assert d.n_fire.tolist() == (z > 0).sum(0).tolist()
    best = d.top.value[:, 0]
    np.testing.assert_allclose(best[d.n_fire > 0], z.max(0)[d.n_fire > 0], rtol=1e-6)
    assert "sae.resid.1" not in llama.sites  # detached after the pass


def test_direct_logit_effects_are_the_lm_head_times_the_output_direction(llama):
    from actlab.sae import SparseAutoencoder

    head = llama.hf.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    down = llama.hf.model.layers[1].mlp.down_proj.weight.detach().float()  # [d_model, d_mlp]
    directions, why = output_directions(llama, SITE, np.array(UNITS))
    assert why == "" and torch.allclose(directions, down[:, UNITS].T)
    table = logit_table(llama, directions, n=5, chunk=4)
    expect = head @ down[:, UNITS]  # [vocab, U]
    assert table["top_ids"].tolist() == expect.topk(5, dim=0).indices.T.tolist()
    assert table["bottom_ids"].tolist() == expect.topk(5, dim=0, largest=False).indices.T.tolist()
    sae = SparseAutoencoder(32, 8, "topk", 2)
    rows, _ = output_directions(llama, "resid.1", np.array([2, 5]), sae)
    assert torch.allclose(rows, sae.W_dec.detach()[[2, 5]] / sae.input_scale)
    none, why = output_directions(llama, "mlp.in.1", np.array([0]))
    assert none is None and "residual" in why


def test_bad_units_and_options_say_what_to_fix(llama, tmp_path):
    with pytest.raises(ActlabError, match="out of range"):
        collect_units(llama, TEXTS, SITE, "0-4,400")
    with pytest.raises(ActlabError, match="ranges such as"):
        collect_units(llama, TEXTS, SITE, "0-x")
    with pytest.raises(ActlabError, match="power-of-two multiple"):
        BrowseConfig(bins=64, intervals=6)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ActlabError, match="not a folder of actlab feature browser"):
        build_browser(llama, tmp_path / "other", SITE, "0-3", docs=TEXTS)
    with pytest.raises(ActlabError, match="not a feature browser"):
        make_server(tmp_path / "other", 0)


@pytest.fixture(scope="module")
def site(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "b"
    build_browser(llama, out, SITE, UNITS, docs=TEXTS, **SMALL)
    return out


def test_site_files_one_per_unit_and_offline(site, collected):
    assert sorted(p.name for p in (site / "units").iterdir()) == sorted(f"u{u}.js" for u in UNITS)
    meta = json.loads((site / "data" / "meta.json").read_text())
    assert meta["n_units"] == len(UNITS) and meta["n_tokens"] == collected.n_tokens and meta["has_logits"]
    rows = _js(site / "data" / "index.js")["units"]
    assert [r[0] for r in rows] == UNITS
    for i, unit in enumerate(UNITS):
        record = _js(site / "units" / f"u{unit}.js")
        assert record["n_fire"] == collected.n_fire[i] and sum(record["hist"]["counts"]) + record["hist"]["below"] == collected.n_tokens
        assert [c[0] for c in record["top"]] == pytest.approx(collected.top.value[i][collected.top.row[i] >= 0].tolist(), rel=2e-3, abs=1e-3)
        assert (record["prev"], record["next"]) == (UNITS[i - 1] if i else None, UNITS[i + 1] if i + 1 < len(UNITS) else None)
    for name in ("index.html", "unit.html", "app.js", "style.css"):
        text = (site / name).read_text()
        assert "fetch(" not in text and 'src="http' not in text and 'href="http' not in text and "url(" not in text


def test_rebuilding_replaces_the_browser_whole(llama, tmp_path):
    out = tmp_path / "b"
    build_browser(llama, out, SITE, [1, 2], docs=TEXTS[:4], top_k=2)
    build_browser(llama, out, SITE, [4], docs=TEXTS[:4], top_k=2)
    assert sorted(p.name for p in (out / "units").iterdir()) == ["u4.js"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left behind


def test_serve_serves_the_site(site):
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/index.html", timeout=10) as r:
            assert r.status == 200 and b"app.js" in r.read()
        with urllib.request.urlopen(f"{base}/units/u{UNITS[0]}.js", timeout=10) as r:
            assert r.read().startswith(b"actlabBrowse.unit(")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_cli_browse_and_errors(tmp_path):
    from typer.testing import CliRunner

    from actlab.cli import app

    cli = CliRunner()
    out = tmp_path / "b"
    result = cli.invoke(app, ["browse", "demo-llama", "--site", "mlp.hidden.0", "--units", "0-3", "--max-tokens", "1500",
                              "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "units").iterdir()) == ["u0.js", "u1.js", "u2.js", "u3.js"]
    bad = cli.invoke(app, ["browse", "demo-llama", "--site", "mlp.hidden.0", "--units", "0-9999", "-o", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "out of range" in bad.output
    assert cli.invoke(app, ["serve", str(tmp_path)]).exit_code == 2


# ---------------------------------------------------------------------- a real browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_checks(page, base: str, errors: list, requests: list) -> None:
    page.goto(f"{base}/index.html")
    page.wait_for_selector("#units tbody tr")
    index = page.evaluate("actlabBrowse.store.index.units")
    assert page.locator("#units tbody tr").count() == len(UNITS)
    # density filter: the rows left are exactly the units whose density is at least the bound
    bound = sorted(r[1] for r in index)[len(index) // 2]
    page.fill("#dmin", str(bound * 100))
    expect = sorted(r[0] for r in index if r[1] >= bound - 1e-12)
    page.wait_for_function(f"document.querySelectorAll('#units tbody tr').length === {len(expect)}")
    assert sorted(int(x) for x in page.locator("#units tbody tr").evaluate_all("rs => rs.map(r => r.dataset.unit)")) == expect
    page.fill("#dmin", "")
    # text search in the top contexts: loads search.js, keeps the units whose top contexts contain the text
    page.fill("#q", "tail 1")
    page.wait_for_function("window.actlabBrowse.store.search !== undefined")
    search = page.evaluate("actlabBrowse.store.search")
    expect = [r[0] for r, text in zip(index, search) if "tail 1" in text.lower()]
    page.wait_for_function(f"document.querySelectorAll('#units tbody tr').length === {len(expect)}")
    page.fill("#q", "")
    page.wait_for_function(f"document.querySelectorAll('#units tbody tr').length === {len(UNITS)}")
    # open a unit: its highlighted contexts, the center token's hover text is its activation
    requests.clear()
    page.click(f"#units tbody tr[data-unit='{UNITS[1]}'] a")
    page.wait_for_selector("#top .ctx span.t.center")
    unit = page.evaluate(f"actlabBrowse.store.units[{UNITS[1]}]")
    centers = page.locator("#top .ctx span.t.center")
    assert centers.count() == len(unit["top"]) > 0
    assert float(centers.first.get_attribute("data-act")) == pytest.approx(unit["top"][0][0], rel=1e-3)
    assert centers.first.get_attribute("title") and "background" in (centers.first.get_attribute("style") or "")
    assert page.locator("#hist svg rect.bar").count() >= 1 and page.locator("#logits table").count() == 2
    loaded = [u.rsplit("/", 1)[-1] for u in requests if "/units/" in u or "/data/" in u]
    assert loaded == ["vocab.js", f"u{UNITS[1]}.js"], loaded  # only this unit's data (and the vocabulary)
    page.click("#next")
    page.wait_for_function(f"document.getElementById('title').textContent === 'unit {UNITS[2]}'")
    assert errors == []


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (make test installs Debian's chromium when root)")
def test_pages_in_headless_chromium_from_disk_and_served(site):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    server = make_server(site, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
            try:
                for base in (site.resolve().as_uri(), f"http://127.0.0.1:{server.server_address[1]}"):
                    page = browser.new_page()
                    errors, requests = [], []
                    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on("request", lambda r: requests.append(r.url))
                    _browser_checks(page, base, errors, requests)
                    page.close()
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
