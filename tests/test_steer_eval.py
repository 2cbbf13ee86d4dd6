"""Steering evaluation: the machinery on a tiny model (fast) and the claims on the demo models (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import actlab
from actlab.errors import ActlabError
from actlab.interventions import SteeringVector
from actlab.interventions.contrast import ContrastSet
from actlab.experiments.genre_data import genre_setup
from actlab.experiments.steering_eval import dose_response, layer_sweep
from actlab.experiments.steering_results import DoseResponse, LayerSweep, spearman
from tiny_models import ByteTokenizer, tiny_config


# ------------------------------------------------------------------------ tiny-model machinery
Tok = ByteTokenizer  # takes single strings and HF-style truncation arguments
class TokenClassifier:
    """'hit' when a continuation contains the token id ``token`` (ByteTokenizer decodes to ids)."""

    genres = ["hit", "miss"]

    def __init__(self, token: int):
        self.token = str(token)

    def predict(self, texts):
        return ["hit" if self.token in t.split() else "miss" for t in texts]


TOKEN = 40


@pytest.fixture(scope="module")
def peaky():
    """A tiny Llama with large weights, so its next-token distribution is sharp and steerable."""
    cfg = tiny_config("llama")
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    return actlab.load(T.LlamaForCausalLM(cfg).eval(), tokenizer=Tok())


def toward_token(model, scale=20.0):
    w = model.hf.get_output_embeddings().weight[TOKEN].detach()
    return SteeringVector(site="resid.2", vector=w / w.norm() * scale, model=model.identity())


PROMPTS = ["hello there", "abc", "the cat"]
NEUTRAL = ["some neutral text here", "more text to score"]


def test_dose_response_on_a_planted_direction(peaky, tmp_path):
    vec = toward_token(peaky)
    dr = dose_response(peaky, {"toward": vec}, [-4, 2, 4, 8], target_genre="hit", prompts=PROMPTS,
                       neutral_texts=NEUTRAL, max_new_tokens=8, samples_per_prompt=2, classifier=TokenClassifier(TOKEN))
    assert dr.coefs == [-4, 0, 2, 4, 8]  # 0 added, sorted
    assert dr.methods == ["toward"] and set(dr.curves) == {"toward", "random"}
    assert dr.curves["toward"].at(0) is dr.baseline and dr.curves["random"].at(0) is dr.baseline
    assert dr.baseline.n == 6 and len(dr.baseline.samples) == 3
    rates = dr.rates("toward")
    assert rates[-1] == 1.0 and rates[-1] - dr.baseline.rate >= 0.8
    assert spearman(dr.coefs, rates) > 0.8
    s = dr.summary()
    m = s["methods"]["toward"]
    assert m["effect"] == m["rate_at_best"] - s["baseline_rate"] and m["effect"] >= 0.8
    assert m["ppl_ratio_at_best"] <= 2.0 and m["best_coef"] > 0
    assert s["random"]["control_of"] == "toward" and s["random"]["effect"] < m["effect"] / 3
    assert abs(dr.curves["random"].norm - dr.curves["toward"].norm) < 1e-3
    # perplexity rises with the size of the edit
    ppl = dr.perplexities("toward")
    assert ppl[-1] > ppl[1]
    # JSON round trip, table and figure
    data = json.loads(json.dumps(dr.to_dict()))
    back = DoseResponse.from_dict(data)
    assert back.rates("toward") == rates and back.summary()["methods"]["toward"]["effect"] == m["effect"]
    assert "| toward |" in dr.table()
    fig = dr.figure(tmp_path / "dr.png")
    assert (tmp_path / "dr.png").stat().st_size > 5000 and len(fig.axes) == 2
    # the shared seed makes reruns identical
    again = dose_response(peaky, {"toward": vec}, [2], target_genre="hit", prompts=PROMPTS, neutral_texts=NEUTRAL,
                          max_new_tokens=8, samples_per_prompt=2, classifier=TokenClassifier(TOKEN),
                          include_random=False)
    assert again.curves["toward"].at(2).samples == dr.curves["toward"].at(2).samples


def test_layer_sweep_reports_the_best_layer(peaky, tmp_path):
    w = peaky.hf.get_output_embeddings().weight[TOKEN].detach()
    contrast = ContrastSet(pos=["aaaa bbb", "aab ab", "ba ab"], neg=["zzz yy", "zy zy zz", "yzy"])
    sweep = layer_sweep(peaky, contrast, "resid.*", coef=4.0, target_genre="hit", prompts=PROMPTS,
                        neutral_texts=NEUTRAL, max_new_tokens=6, classifier=TokenClassifier(TOKEN),
                        include_random=True)
    assert [r.site for r in sweep.layers] == ["resid.0", "resid.1", "resid.2"]
    assert sweep.best_site in {"resid.0", "resid.1", "resid.2"}
    ok = [r for r in sweep.layers if r.ppl_ratio <= sweep.max_ppl_ratio]
    if ok:
        assert sweep.best.effect == max(r.effect for r in ok)
    assert all(r.random_rate is not None and r.effect == r.rate - sweep.baseline.rate for r in sweep.layers)
    back = LayerSweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert back.best_site == sweep.best_site and "**best**" in sweep.table()
    sweep.figure(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").is_file()
    assert w.shape[0] == peaky.d_model


def test_evaluation_refuses_bad_input(peaky):
    vec = toward_token(peaky)
    common = dict(target_genre="hit", prompts=PROMPTS, neutral_texts=NEUTRAL, classifier=TokenClassifier(TOKEN))
    with pytest.raises(ActlabError, match="NaN or inf"):
        dose_response(peaky, {"v": vec}, [1, float("nan")], **common)
    with pytest.raises(ActlabError, match="unknown genre"):
        dose_response(peaky, {"v": vec}, [1], **(common | {"target_genre": "poetry"}))
    with pytest.raises(ActlabError, match="no prompts"):
        dose_response(peaky, {"v": vec}, [1], **(common | {"prompts": []}))
    with pytest.raises(ActlabError, match="no interventions"):
        dose_response(peaky, {}, [1], **common)
    with pytest.raises(ActlabError, match="reserved"):
        dose_response(peaky, {"random": vec}, [1], **common)
    with pytest.raises(ActlabError, match="greedy"):
        dose_response(peaky, {"v": vec}, [1], do_sample=False, samples_per_prompt=2, **common)
    with pytest.raises(ActlabError, match="width"):
        dose_response(peaky, {"v": SteeringVector(site="resid.1", vector=torch.ones(7))}, [1], **common)


def test_fit_methods_fits_every_available_method(peaky):
    from actlab.experiments.genre_eval import fit_methods

    contrast = ContrastSet(pos=["aaaa bbb", "aab ab", "ba ab", "abab", "bbba"],
                           neg=["zzz yy", "zy zy zz", "yzy", "zzy", "yyz"], prompts=["p ", "q ", "r ", "s ", "t "])
    out = fit_methods(peaky, contrast, "resid.1", affine={"steps": 5}, adapter={"steps": 5})
    assert list(out)[:3] == ["mean-diff", "pca", "dims"]
    assert all(out[m].site == "resid.1" for m in ("mean-diff", "pca", "dims"))
    if "affine" in out:
        assert {e.kind for e in out["affine"].edits()} == {"affine"}
    if "adapter" in out:
        assert out["adapter"].kind == "low_rank_adapter"
    with pytest.raises(ActlabError, match="unknown method"):
        fit_methods(peaky, contrast, "resid.1", ["magic"])


def test_scoring_config_is_the_keywords(peaky):
    """One ScoringConfig or its fields as keywords: the same points; unknown settings are refused."""
    from actlab.experiments.genre_scoring import GenreScorer, ScoringConfig

    vec = toward_token(peaky)
    scoring = ScoringConfig(prompts=PROMPTS, neutral_texts=NEUTRAL, max_new_tokens=6, classifier=TokenClassifier(TOKEN))
    a = dose_response(peaky, {"v": vec}, [2], scoring, target_genre="hit", include_random=False)
    b = dose_response(peaky, {"v": vec}, [2], target_genre="hit", include_random=False, prompts=PROMPTS,
                      neutral_texts=NEUTRAL, max_new_tokens=6, classifier=TokenClassifier(TOKEN))
    assert a.curves["v"].at(2).samples == b.curves["v"].at(2).samples and a.rates("v") == b.rates("v")
    scored = GenreScorer(peaky, "hit", scoring).score([vec * 2, vec * 2])  # pooled: per-row hits kept per edit
    assert len(scored.hits) == 2 and scored.n == 2 * len(PROMPTS)
    assert scored.rate == pytest.approx(a.curves["v"].at(2).rate)
    with pytest.raises(ActlabError, match="unknown ScoringConfig"):
        dose_response(peaky, {"v": vec}, [1], scoring, target_genre="hit", max_tokens=4)
    with pytest.raises(ActlabError, match="unknown setting"):
        layer_sweep(peaky, ContrastSet(pos=["aa"], neg=["zz"]), "resid.0", scoring, target_genre="hit", lr=1.0)


def test_spearman():
    assert spearman([0, 1, 2, 3], [0.1, 0.2, 0.2, 0.9]) > 0.9
    assert spearman([0, 1, 2], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2], [1, 1, 1]) != spearman([0, 1, 2], [1, 1, 1])  # nan for a constant side


def test_genre_setup_keeps_fit_and_evaluation_apart():
    setup = genre_setup("scripture", n_fit=64, n_prompts=16, n_neutral=32)
    assert len(setup.contrast.pos) == 64 and setup.contrast.paired
    assert len(setup.prompts) == 16 and len(set(setup.prompts)) == 16
    assert len(setup.neutral_texts) == 32
    with pytest.raises(ActlabError, match="unknown genre"):
        genre_setup("poetry")


# ------------------------------------------------------------------------ demo models (slow)
DEMO = {}  # filled in below


def demo(name: str):
    from actlab.models.loading import zoo_models

    if name not in zoo_models():
        pytest.skip(f"{name} is not in the zoo yet (scripts/train_demo_models.py {name})")
    if name not in DEMO:
        DEMO[name] = actlab.load(name)
    return DEMO[name]


# Measured with `actlab steer eval MODEL --genre techdoc` (docs/steering.md): the unedited techdoc
# rate on its pairs' prompts is 0.06 (demo-llama) / 0.00 (demo-gpt2), and one mean difference at
# resid.0 takes it to 0.88 / 0.81 (the sweep picks resid.0 on demo-llama and resid.1 on demo-gpt2,
# within noise of resid.0). With the baseline at the floor, steering *away* is checked on scripture
# (test_demo_negative_coefficient_steers_away), whose unedited rate is mid-range.
TARGET = "techdoc"
SITE = "resid.0"
COEFS = [-1.0, 0.0, 0.5, 1.0, 2.0]


@pytest.fixture(scope="module", params=["demo-llama", "demo-gpt2"])
def demo_dose(request):
    from actlab.interventions.fit import fit_steering

    model = demo(request.param)
    setup = genre_setup(TARGET)
    vec = fit_steering(model, setup.contrast, SITE, method="mean-diff")[SITE]
    return dose_response(model, {"mean-diff": vec}, COEFS, target_genre=TARGET, prompts=setup.prompts,
                         neutral_texts=setup.neutral_texts, max_new_tokens=24, n_random=2)


@pytest.mark.slow
def test_demo_genre_rate_rises_with_the_coefficient(demo_dose):
    rates = demo_dose.rates("mean-diff")
    summary = demo_dose.summary()["methods"]["mean-diff"]
    assert spearman(demo_dose.coefs, rates) > 0.8, demo_dose.table()
    assert rates[-1] - demo_dose.baseline.rate >= 0.5, demo_dose.table()
    assert rates[0] <= demo_dose.baseline.rate, demo_dose.table()  # never toward the genre
    assert summary["effect"] >= 0.5


@pytest.mark.slow
def test_demo_negative_coefficient_steers_away():
    """Scripture starts mid-range on its pairs' prompts, so a negative coefficient has room to act."""
    from actlab.interventions.fit import fit_steering

    model = demo("demo-llama")
    setup = genre_setup("scripture")
    vec = fit_steering(model, setup.contrast, "resid.1", method="mean-diff")["resid.1"]
    dr = dose_response(model, {"mean-diff": vec}, [-1.0, 0.0], target_genre="scripture", prompts=setup.prompts,
                       neutral_texts=setup.neutral_texts[:4], max_new_tokens=24, n_random=1)
    away, base = dr.rates("mean-diff")
    # measured: 0.56 unedited → 0.12 at −1 (16 prompts; the make demo tour shows the same)
    assert base >= 0.3 and away <= base - 0.25, dr.table()


@pytest.mark.slow
def test_demo_random_vector_of_the_same_norm_moves_far_less(demo_dose):
    summary = demo_dose.summary()
    effect = summary["methods"]["mean-diff"]["effect"]
    random = demo_dose.curves["random"]
    assert random.norm == pytest.approx(demo_dose.curves["mean-diff"].norm, rel=1e-4)
    moved = max(abs(r - demo_dose.baseline.rate) for r in random.rates)
    assert moved < effect / 3, demo_dose.table()


@pytest.mark.slow
def test_demo_perplexity_degrades_gracefully(demo_dose):
    summary = demo_dose.summary()["methods"]["mean-diff"]
    assert summary["coef_reaching_80pct"] is not None, demo_dose.table()
    assert summary["ppl_ratio_reaching_80pct"] < 2.0, demo_dose.table()
    ppl = dict(zip(demo_dose.coefs, demo_dose.perplexities("mean-diff")))
    assert ppl[0.5] < 1.2 * ppl[0.0] and ppl[2.0] > ppl[0.0]  # small edits are nearly free; cost grows


@pytest.mark.slow
def test_demo_layer_sweep_finds_a_steering_layer():
    model = demo("demo-llama")
    setup = genre_setup(TARGET, n_prompts=12)
    sweep = layer_sweep(model, setup.contrast, "resid.*", coef=1.0, target_genre=TARGET, prompts=setup.prompts,
                        neutral_texts=setup.neutral_texts[:16], max_new_tokens=16)
    assert len(sweep.layers) == model.n_layers
    assert sweep.best.effect >= 0.4 and sweep.best.ppl_ratio < 1.5, sweep.table()
