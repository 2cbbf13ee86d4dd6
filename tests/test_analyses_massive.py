"""Massive activations: planted outliers are found where they were put, ablations do what they say."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from actlab.analyses.base import ProfileData, collect_profile_data
from actlab.analyses.massive import MassiveCriterion, MassiveResult, MassiveSet, massive_activations
from actlab.analyses.massive_criterion import massive_mask, sequence_median
from actlab.errors import ActlabError
from actlab.engine.batch import TokenBatch
from actlab.engine.reservoir import Reservoir
from actlab.stats import StatsSink
from test_analyses_sparsity import DOCS, check_protocol, demo_texts, load_demo, load_tiny

CHANNEL, POSITION, BUMP = 7, 2, 500.0


@dataclass
class Plant:
    """Adds ``value`` to one channel at one absolute position (a planted massive activation)."""

    site: str
    channel: int
    position: int
    value: float

    def __call__(self, h, state):
        h = h.clone()
        cols = state.columns
        if self.position in cols.tolist():
            h[:, self.position - int(cols[0]), self.channel] += self.value
        return h


def test_planted_massive_activation_found_and_ablated():
    model = load_tiny("llama")
    with model.edit(Plant("resid.1", CHANNEL, POSITION, BUMP)):
        data = collect_profile_data(model, DOCS, eval_texts=DOCS[:4])
        res = massive_activations(model, data, prompts=DOCS, ablation_texts=DOCS[:4])
        # the zero ablation removes exactly the planted entries: compare with a direct capture
        with model.capture("resid.1") as plain:
            model(DOCS[:2])
        zero = MassiveSet("resid.1", [CHANNEL], [0.0], cutoff=100 * res.median_abs[1])
        with model.edit(zero), model.capture("resid.1") as cap:
            model(DOCS[:2])
    assert isinstance(res, MassiveResult)
    assert res.layers == [0, 1, 2]
    assert res.first_appearance == {CHANNEL: 1}
    assert res.massive_layers == [1, 2] and res.top1_ratio[0] < 100
    assert [e["channel"] for e in res.massive_channels[1]] == [CHANNEL] and 0 not in res.massive_channels
    top = res.top[1][0]
    assert (top["channel"], top["position"]) == (CHANNEL, POSITION)
    assert top["ratio"] > 100 and abs(top["value"]) > BUMP - 5
    median = float(np.median(data.samples["resid.1"].abs().numpy()))
    assert res.median_abs[1] == pytest.approx(median)
    assert top["ratio"] == pytest.approx(abs(top["value"]) / median)
    token_id = model.tokenize([DOCS[top["doc_id"]]])[0][0, POSITION]
    assert top["token_id"] == int(token_id)
    # input invariance: every prompt has its maximum in the planted channel and position
    inv = res.invariance[1]
    assert inv["modal_channel"] == CHANNEL and inv["modal_channel_frac"] == 1.0
    assert inv["position_counts"] == {POSITION: len(DOCS)}
    # ablation at the first layer, on the planted entries only
    ab = res.ablation
    assert ab["ran"] and [(e["layer"], e["channel"]) for e in ab["entries"]] == [(1, CHANNEL)]
    assert ab["n_set_zero"] == ab["n_set_mean"] == 4  # one planted entry per ablation text
    assert ab["entries"][0]["mean_value"] == pytest.approx(BUMP, rel=0.02)
    assert ab["zero_ppl"] != ab["base_ppl"]
    assert abs(ab["mean_rise_pct"]) < abs(ab["zero_rise_pct"])
    x, y = plain["resid.1"], cap["resid.1"]
    assert float(y[:, POSITION, CHANNEL].abs().max()) == 0.0
    x[:, POSITION, CHANNEL] = 0.0
    assert torch.equal(x, y)
    assert zero.n_set == 2
    check_protocol(res)


def test_synthetic_profile_without_model():
    gen = torch.Generator().manual_seed(1)
    n, width = 300, 24
    acts = {f"resid.{i}": torch.randn(n, width, generator=gen) for i in range(3)}
    acts["resid.2"][123, 5] = -1000.0  # doc 6, position 3 (20 tokens per doc)
    batch = TokenBatch(acts=acts, token_ids=torch.arange(n) % 50, doc_ids=torch.arange(n) // 20,
                       positions=torch.arange(n) % 20)
    stats, samples = StatsSink({s: width for s in acts}), Reservoir(n)
    stats.consume(batch)
    samples.consume(batch)
    data = ProfileData(stats=stats, samples=samples, n_tokens=n)
    default = massive_activations(None, data)  # the paper's per-sequence rule needs whole sequences: none here
    assert default.rule == "paper" and default.massive_layers == [] and "needs whole sequences" in default.ablation["note"]
    res = massive_activations(None, data, criterion=MassiveCriterion.corpus_ratio(100))
    assert res.rule == "corpus ratio" and "corpus median" in res.headline()
    assert res.massive_layers == [2] and res.first_appearance == {5: 2}
    ratio = pytest.approx(res.top[2][0]["ratio"])
    assert res.massive_channels == {2: [{"channel": 5, "absmax": 1000.0, "ratio": ratio, "median": "corpus"}]}
    top = res.top[2][0]
    assert (top["value"], top["channel"], top["doc_id"], top["position"], top["token_id"]) == (-1000.0, 5, 6, 3, 23)
    ref_median = float(np.median(np.abs(acts["resid.2"].numpy())))
    assert top["ratio"] == pytest.approx(1000.0 / ref_median, rel=1e-6)
    assert res.top1_ratio[0] < 10 and res.n_prompts == 0
    # an absolute bound above the planted value removes it
    assert massive_activations(None, data, criterion=MassiveCriterion.corpus_ratio(100, min_abs=1000)).massive_layers == []
    assert not res.ablation["ran"] and "LM head" in res.ablation["note"]
    check_protocol(res)


def test_nothing_massive_on_random_model():
    model = load_tiny("gpt2")
    data = collect_profile_data(model, DOCS, eval_texts=DOCS[:2])
    res = massive_activations(model, data, prompts=DOCS[:3])
    assert res.massive_layers == [] and not res.ablation["ran"]
    assert "nothing to ablate" in res.ablation["note"]
    assert res.n_prompts == 3 and all(inv for inv in res.invariance)
    assert "none" in res.headline()
    check_protocol(res)


def test_bert_runs_but_skips_ablation():
    model = load_tiny("bert")
    data = collect_profile_data(model, DOCS, eval_texts=DOCS[:2])
    res = massive_activations(model, data, prompts=DOCS[:3], threshold=2.0)  # low bar: something is flagged
    assert isinstance(res, MassiveResult) and res.layers == [0, 1, 2]
    assert res.first_appearance  # flagged ...
    assert not res.ablation["ran"] and "encoder" in res.ablation["note"]  # ... but no perplexity on an encoder
    with model.capture("resid.*") as cap:
        model(DOCS[:3])
    mask = cap.mask.bool()
    for j, site in enumerate(res.sites):
        a = cap[site].abs()
        chans = [int(a[b][mask[b]].flatten().argmax()) % a.shape[-1] for b in range(3)]
        assert res.invariance[j]["channel_counts"] == {c: chans.count(c) for c in set(chans)}
    check_protocol(res)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-gpt2", "demo-llama"])
def test_demo_models_massive_report(name):
    model = load_demo(name)
    docs, evals = demo_texts()
    data = collect_profile_data(model, docs[:48], eval_texts=evals, reservoir_size=2048)
    res = massive_activations(model, data, prompts=docs[:16])
    assert isinstance(res, MassiveResult) and res.layers == list(range(model.n_layers))
    assert all(r > 1 for r in res.top1_ratio)
    assert res.n_prompts == 16 and all(inv["modal_channel_frac"] > 0 for inv in res.invariance)
    if res.ablation["ran"]:
        assert res.ablation["n_set_zero"] > 0
    check_protocol(res)


def test_paper_criterion_on_planted_values_either_side_of_each_bound():
    """|x| > 100 and > 1000x the sequence median, each bound tested alone with the other one satisfied."""
    paper = MassiveCriterion.paper()
    assert (paper.min_abs, paper.min_ratio, paper.median, paper.name) == (100.0, 1000.0, "sequence", "paper")
    low = torch.full((10, 50), 0.05)  # median 0.05: the ratio bound is 50, so only the absolute bound decides
    low[1, 3], low[2, 4], low[3, 5] = 99.0, 101.0, -101.0
    mask, over_abs, over_ratio, med = massive_mask(low, paper)
    assert med == pytest.approx(0.05) and sequence_median(low) == pytest.approx(float(np.median(low.abs().numpy())))
    assert mask.nonzero().tolist() == [[2, 4], [3, 5]] and bool(over_ratio[1, 3]) and not bool(over_abs[1, 3])
    one = torch.ones(10, 50)  # median 1: the ratio bound is 1000, above the absolute one
    one[0, 0], one[5, 7] = 999.0, -1001.0
    mask, over_abs, over_ratio, med = massive_mask(one, paper)
    assert med == 1.0 and mask.nonzero().tolist() == [[5, 7]]
    assert bool(over_abs[0, 0]) and not bool(over_ratio[0, 0])
    # the corpus rule takes the ratio to a given median instead of the sequence's own
    loose = MassiveCriterion.corpus_ratio(100)
    assert massive_mask(one, loose, corpus_median=5.0)[0].nonzero().tolist() == [[0, 0], [5, 7]]
    assert massive_mask(one, loose, corpus_median=10.0)[0].nonzero().tolist() == [[5, 7]]
    with pytest.raises(ActlabError, match="min_ratio"):
        MassiveCriterion(min_ratio=-1)
    with pytest.raises(ActlabError, match="median"):
        MassiveCriterion(median="layer")


@dataclass
class SetEntry:
    """Sets one channel at one absolute position to ``value`` (a planted massive activation of known size)."""

    site: str
    channel: int
    position: int
    value: float

    def __call__(self, h, state):
        h = h.clone()
        cols = state.columns.tolist()
        if self.position in cols:
            h[:, cols.index(self.position), self.channel] = self.value
        return h


def test_ablation_effect_on_a_planted_massive_channel_is_the_known_one():
    """Every massive entry is exactly PLANTED, so setting it to its mean changes nothing, and setting it to
    zero gives the perplexity of the model whose planted entry is 0 (computed directly)."""
    model, planted = load_tiny("llama"), 20000.0
    texts = DOCS[:4]
    with model.edit(SetEntry("resid.1", CHANNEL, POSITION, planted)):
        data = collect_profile_data(model, DOCS, eval_texts=texts)
        res = massive_activations(model, data, prompts=DOCS, ablation_texts=texts)
        base = actlab_perplexity(model, texts)
    with model.edit(SetEntry("resid.1", CHANNEL, POSITION, 0.0)):
        zeroed = actlab_perplexity(model, texts)
    assert res.rule == "paper" and res.first_appearance == {CHANNEL: 1} and 1 in res.massive_layers
    assert "paper rule" in res.headline() and res.massive_channels[1][0]["median"] == "sequence"
    assert res.bounds[1]["n_massive"] >= len(DOCS) and res.bounds[0]["n_massive"] == 0
    ab = res.ablation
    assert ab["ran"] and ab["entries"][0]["mean_value"] == planted and ab["entries"][0]["n_mean_tokens"] == len(DOCS)
    assert ab["n_set_zero"] == ab["n_set_mean"] == len(texts)  # one planted entry per text
    assert ab["base_ppl"] == pytest.approx(base, rel=1e-6)
    assert ab["mean_ppl"] == pytest.approx(base, rel=1e-6)  # set to its own value
    assert ab["zero_ppl"] == pytest.approx(zeroed, rel=1e-6) and zeroed != pytest.approx(base, rel=1e-3)
    check_protocol(res)


def actlab_perplexity(model, texts):
    from actlab.evals.perplexity import perplexity

    return float(perplexity(model, list(texts)))
