"""Probes (actlab.probes, `actlab probe`): planted known answers for every fit, reference computations for the
scores, the control task's exact invariants, files, labelled data and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from actlab.errors import ActlabError
from actlab.probes import (
    LabelledSet, ProbeConfig, binary_auc, control_labels, fit_logistic, fit_massmean, fit_sparse, from_model,
    from_store, from_tensors, load_probe, macro_auc, read_labels, save_probe, steer_readout, sweep, token_property,
)
from actlab.probes.data import python_lines
from actlab.probes.scores import bootstrap


def _gauss(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _unit(d: int, seed: int) -> torch.Tensor:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


@pytest.fixture(scope="module")
def llama_acts(llama):
    """Real activations of the tiny model: ~5k tokens of resid.1, grouped by document."""
    from actlab.datasets import default_prompts

    batch = llama.collect(default_prompts()[:120], "resid.1", positions="all")
    return batch.acts["resid.1"].double(), batch.doc_ids, batch.token_ids


# ------------------------------------------------------------------ fits: planted answers
def test_logistic_recovers_a_planted_linear_label_on_model_activations(llama_acts):
    """y = [ (x − x̄)·u > 0 ] on real (anisotropic) activations: the label is a half-space, so the probe's
    decision normal (its direction) must be u and held-out accuracy near 1 (errors only from points within the
    estimation angle of the boundary, a few % at n/d ≈ 100)."""
    x, docs, _ = llama_acts
    u = _unit(x.shape[1], 1)
    y = ((x - x.mean(0)) @ u > 0).long()
    result = sweep(from_tensors(x, y, docs, classes=["neg", "pos"]), n_boot=50, control=False)
    row = result.rows[0]
    assert row.score["accuracy"] > 0.95 and row.score["auc"] > 0.99
    assert _cos(result.probes["x"].direction("pos"), u) > 0.9


def test_massmean_direction_is_the_mean_difference():
    """x ~ N(0, I), y = [x·u > 0]: E[x | y=1] − E[x | y=0] = 2·√(2/π)·u exactly; with n rows per class the
    estimate's error norm is about √(d · 2 · 2/n) (≈ 0.13 here), so 0.4 is a > 3σ margin."""
    d, n = 16, 4000
    x = _gauss(n, d, 2).double()
    u = _unit(d, 3)
    y = (x @ u > 0).long()
    fit, tune = slice(0, 3000), slice(3000, None)
    probe = fit_massmean(x[fit], y[fit], ["neg", "pos"], x_tune=x[tune], y_tune=y[tune])
    diff = x[fit][y[fit] == 1].mean(0) - x[fit][y[fit] == 0].mean(0)
    assert float((diff - 2 * math.sqrt(2 / math.pi) * u).norm()) < 0.4
    assert probe.info["mean_difference_norm"] == pytest.approx(float(diff.norm()), rel=1e-9)
    assert _cos(probe.direction("pos"), diff) == pytest.approx(1.0, abs=1e-9)  # the direction IS μ₁ − μ₀
    assert float((probe.predict(x[tune]) == y[tune]).double().mean()) > 0.95


def test_sparse_probe_picks_the_planted_units():
    """y = [x₃ + x₇ > 0]: only units 3 and 7 carry the label (each |corr| ≈ 1/√π ≈ 0.56 against ~1/√n noise)."""
    x = _gauss(3000, 32, 4)
    y = (x[:, 3] + x[:, 7] > 0).long()
    fit, tune = slice(0, 2000), slice(2000, None)
    two = fit_sparse(x[fit], y[fit], ["a", "b"], x_tune=x[tune], y_tune=y[tune], k=2)
    one = fit_sparse(x[fit], y[fit], ["a", "b"], x_tune=x[tune], y_tune=y[tune], k=1)
    assert two.units.tolist() == [3, 7]
    assert one.units.tolist()[0] in (3, 7)
    assert float((two.predict(x[tune]) == y[tune]).double().mean()) > 0.97
    assert two.direction(1)[[i for i in range(32) if i not in (3, 7)]].abs().max() == 0


def test_independent_label_scores_at_the_majority_baseline():
    """Labels drawn independently of the rows: the majority baseline must lie inside the accuracy interval and
    0.5 inside the AUC interval (an overfitting probe, or a leak from test to fit, would fail this)."""
    x = _gauss(1500, 16, 5)
    y = (torch.rand(1500, generator=torch.Generator().manual_seed(6)) < 0.3).long()
    row = sweep(from_tensors(x, y), n_boot=200, control=False).rows[0]
    lo, hi = row.score["accuracy_ci"]
    assert lo <= row.score["majority"] <= hi
    assert row.score["auc_ci"][0] <= 0.5 <= row.score["auc_ci"][1]


# ------------------------------------------------------------------ control task and selectivity
def test_control_labels_keep_each_token_types_labels():
    tok = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(8))
    c = control_labels(y, tok, seed=1)
    for t in range(20):
        assert sorted(c[tok == t].tolist()) == sorted(y[tok == t].tolist())
    assert not torch.equal(c, y)
    assert torch.equal(control_labels(tok % 2, tok, seed=3), tok % 2)  # a label of the type alone is unchanged


def test_selectivity_is_zero_for_a_lexical_label_and_large_for_a_contextual_one():
    n, d = 4000, 16
    gen = torch.Generator().manual_seed(9)
    tok = torch.randint(0, 40, (n,), generator=gen)
    embed = torch.randn(40, d, generator=gen)
    embed[:, 0] = 2.0 * (torch.arange(40) % 2) - 1  # the token's parity is written on unit 0
    noise = torch.randn(n, d, generator=gen)
    groups = torch.arange(n) // 20
    x = embed[tok] + 0.3 * noise
    lexical = sweep(from_tensors(x, tok % 2, groups, token_ids=tok, level="token"), n_boot=20).rows[0]
    assert lexical.score["accuracy"] > 0.9
    assert lexical.selectivity == 0.0  # control labels are the labels themselves
    x = 0.1 * embed[tok] + noise  # a label of the context (the noise), readable from x, not from the token
    y = (x @ _unit(d, 10).float() > 0).long()
    contextual = sweep(from_tensors(x, y, groups, token_ids=tok, level="token"), n_boot=20).rows[0]
    assert contextual.score["accuracy"] > 0.9
    assert contextual.selectivity > 0.3


# ------------------------------------------------------------------ scores against reference computations
def _pairwise_auc(s, pos) -> float:
    p, q = s[pos], s[~pos]
    wins = (p[:, None] > q[None, :]).double() + 0.5 * (p[:, None] == q[None, :]).double()
    return float(wins.mean())


def test_auc_matches_hand_examples_and_a_pairwise_reference():
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]).bool()) == 0.75
    assert binary_auc(torch.tensor([0.5, 0.5]), torch.tensor([False, True])) == 0.5
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
    gen = torch.Generator().manual_seed(11)
    s = torch.randint(0, 6, (200,), generator=gen).double()  # many ties
    pos = torch.rand(200, generator=gen) < 0.4
    assert binary_auc(s, pos) == pytest.approx(_pairwise_auc(s, pos), abs=1e-12)
    proba = torch.softmax(torch.randn(300, 3, generator=gen), 1)
    y = torch.randint(0, 3, (300,), generator=gen)
    ref = sum(_pairwise_auc(proba[:, c], y == c) for c in range(3)) / 3
    assert macro_auc(proba, y) == pytest.approx(ref, abs=1e-12)


def test_bootstrap_resamples_documents_not_rows():
    """Every row of a document shares its label: resampling documents keeps each resample's label mix a
    multiple of 1/(documents), while resampling rows would not; the interval of a constant metric is a point."""
    y = torch.tensor([0] * 10 + [1] * 10)
    groups = torch.tensor([0] * 10 + [1] * 10)
    seen = set()
    bootstrap(lambda p, t: seen.add(float(t.double().mean())) or 0.0, torch.zeros(20, 2), y, groups, 50)
    assert seen <= {0.0, 0.5, 1.0}
    assert bootstrap(lambda p, t: 0.25, torch.zeros(20, 2), y, groups, 20) == (0.25, 0.25)


# ------------------------------------------------------------------ labelled data
def test_python_lines_and_token_labels_follow_characters(llama):
    text = "Use it so.\n    def f(x):\n        return x + 1\nThe End"
    assert [text[s:e].strip() for s, e, _ in python_lines(text)] == ["def f(x):", "return x + 1"]
    data = token_property("number", texts=["ab 12 Cd", "x9"])
    feats = from_model(llama, data, "resid.0")  # the test tokenizer: one token per byte
    digits = [ch.isdigit() for t in data.texts for ch in t]
    assert [feats.classes[i] == "number" for i in feats.y.tolist()] == digits
    cap = from_model(llama, token_property("capitalised", texts=["ab Cd Ef"]), "resid.0")
    assert [cap.classes[i] for i in cap.y.tolist()] == ["other"] * 3 + ["capitalised"] * 2 + ["other"] \
        + ["capitalised"] * 2


def test_token_labels_with_a_real_tokenizer_use_offsets():
    import actlab

    m = actlab.load("demo-llama")
    feats = from_model(m, token_property("number", texts=["Hello World 123 ok"]), "resid.0")
    pieces = [m.tokenizer.decode([i]) for i in feats.token_ids.tolist()]
    labelled = [p for p, yy in zip(pieces, feats.y.tolist()) if feats.classes[yy] == "number"]
    assert "".join(labelled).strip() == "123" and all(any(c.isdigit() for c in p) for p in labelled)


def test_read_labels_jsonl(tmp_path):
    seq = tmp_path / "seq.jsonl"
    seq.write_text('{"text": "a b", "label": "x"}\n\n{"text": "c", "label": 3}\n')
    data = read_labels(seq)
    assert (data.level, data.labels, data.classes) == ("sequence", ["x", "3"], ["3", "x"])
    tok = tmp_path / "tok.jsonl"
    tok.write_text('{"text": "call at 5", "spans": [[8, 9, "time"]], "other": "none"}\n')
    data = read_labels(tok)
    assert data.char_label(0, 8, 9) == "time" and data.char_label(0, 0, 4) == "none"
    bad = {"mixed": '{"text": "a", "label": "x"}\n{"text": "b", "spans": []}\n',
           "span": '{"text": "ab", "spans": [[0, 5, "x"]]}\n', "both": '{"text": "a", "label": "x", "spans": []}\n',
           "none": '{"text": "a"}\n', "empty": "\n\n", "json": '{"text": \n'}
    for name, body in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(body)
        with pytest.raises(ActlabError, match="line|no labelled"):
            read_labels(path)


# ------------------------------------------------------------------ files
def test_probe_file_round_trip_and_refusal(llama, llama_acts, tmp_path):
    from tiny_models import tiny_model

    x, _, _ = llama_acts
    y = (x[:, 0] > x[:, 0].median()).long()
    probe = fit_sparse(x[:3000], y[:3000], ["lo", "hi"], x_tune=x[3000:], y_tune=y[3000:], k=4)
    path = save_probe(tmp_path / "p.safetensors", probe, model=llama.identity(), site="resid.1",
                      config=ProbeConfig().to_dict())
    back, header = load_probe(path, llama)
    assert torch.equal(back.logits(x[:50]), probe.logits(x[:50])) and back.units.tolist() == probe.units.tolist()
    assert header["site"] == "resid.1" and header["config"]["method"] == "logistic"
    with pytest.raises(ActlabError, match="fitted on"):
        load_probe(path, tiny_model("gpt2"))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ActlabError):
        load_probe(tmp_path / "bad.safetensors")


def test_from_store_gives_the_same_rows_as_from_memory(llama, tmp_path):
    from actlab.store import Store, record

    data = token_property("number", texts=["a 12 b", "34 cd 5", "no digits"])
    record(llama, data.texts, "resid.2", tmp_path / "s", positions="all", dtype="float32")
    mem, disk = from_model(llama, data, "resid.2"), from_store(Store(tmp_path / "s"), llama, data, "resid.2")
    assert torch.equal(mem.x["resid.2"], disk.x["resid.2"]) and torch.equal(mem.y, disk.y)
    seq = LabelledSet("s", "sequence", data.texts, ["a", "b", "a"])
    assert torch.allclose(from_model(llama, seq, "resid.2").x["resid.2"],
                          from_store(Store(tmp_path / "s"), llama, seq, "resid.2").x["resid.2"], atol=1e-6)


# ------------------------------------------------------------------ the causal check's arithmetic
def test_steering_readout_at_the_same_site_is_the_shifted_probe(llama):
    """Steering resid.1 by v and reading resid.1 with the same probe must give mean softmax(logits(x + v)):
    the edit runs before readers, so the read-out is exactly the shifted rows."""
    data = LabelledSet("t", "sequence", ["one two", "three four five", "six", "seven eight"], ["a", "b", "a", "b"])
    feats = from_model(llama, data, "resid.1")
    x = feats.x["resid.1"]
    probe = fit_logistic(x, feats.y, feats.classes, x_tune=x, y_tune=feats.y)
    out = steer_readout(llama, probe, "resid.1", probe, "resid.1", data, "b", scales=(0.5,))
    from actlab.probes.causal import steering_vectors

    v = steering_vectors(probe, "b", 0.5 * out["mean_norm"], 1)
    for kind in ("probe", "random"):
        ref = float(probe.proba(x.double() + v[kind].float().double())[:, 1].mean())
        assert out["steered"][0][kind] == pytest.approx(ref, abs=1e-5)
    assert out["steered"][0]["probe"] > out["baseline"]


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors():
    x = _gauss(40, 4, 12)
    with pytest.raises(ActlabError, match="two classes"):
        from_tensors(x, torch.zeros(40, dtype=torch.long), classes=["a", "b"])
    with pytest.raises(ActlabError, match="method"):
        ProbeConfig(method="svm")
    with pytest.raises(ActlabError, match="tune_fraction"):
        ProbeConfig(tune_fraction=0.5, test_fraction=0.45)
    with pytest.raises(ActlabError, match="at least 4"):
        sweep(from_tensors(x[:3], torch.tensor([0, 1, 0])))
    probe = fit_massmean(x, torch.arange(40) % 2, ["a", "b"], x_tune=x, y_tune=torch.arange(40) % 2)
    with pytest.raises(ActlabError, match="reads 4 units"):
        probe.logits(_gauss(3, 5, 1))
    from actlab.probes import bundled_task

    with pytest.raises(ActlabError, match="unknown probe task"):
        bundled_task("sentiment")


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_cli_probe_writes_probes_table_and_report(tmp_path):
    from typer.testing import CliRunner

    import actlab
    from actlab.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["probe", "demo-llama", "--task", "genre", "--sites", "resid.1,resid.3",
                                      "--docs", "40", "--causal-prompts", "8", "--causal-scales", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "probes.json").read_text())
    assert [r["site"] for r in record["rows"]] == ["resid.1", "resid.3"]
    for r in record["rows"]:
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and 0 < r["majority"] < 0.5
    assert {s["class"] for s in record["causal"]["steered"]} == set(record["classes"])
    probe, _ = load_probe(out / "probes" / "resid.3.safetensors", actlab.load("demo-llama"))
    assert probe.classes == record["classes"]
    html = (out / "report.html").read_text()
    assert "Probes by site" in html and html.count("<img") >= 1
    bad = CliRunner().invoke(app, ["probe", "demo-llama", "--task", "nope", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown probe task" in bad.output


def test_probe_rows_from_sae_latents(llama):
    """An attached SAE's latents are a site like any other: the probe rows at `sae.resid.1` are the SAE's
    encoding of the rows at `resid.1`, token by token."""
    from actlab.sae import SparseAutoencoder, attach

    texts = [f"alpha beta {i} gamma" for i in range(6)] + [f"delta {i} epsilon zeta" for i in range(6)]
    data = LabelledSet("toy", "sequence", texts, labels=["a"] * 6 + ["d"] * 6)
    sae = SparseAutoencoder(llama.d_model, 48, "relu", seed=2).eval()
    plain = llama.collect(texts, "resid.1", positions="all")
    with attach(llama, sae, "resid.1"):
        rows = from_model(llama, data, ["sae.resid.1"], pooling="mean")
    z = sae.encode(plain.acts["resid.1"].float())
    expected = torch.stack([z[plain.doc_ids == i].mean(0) for i in range(len(texts))])
    assert torch.allclose(rows.x["sae.resid.1"].float(), expected, atol=1e-5)
