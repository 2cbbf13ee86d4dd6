"""Layer linearity (Razzhigaev et al. 2024) and the logit / fitted lenses (Din et al. 2023)."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

import actlab
from actlab.analyses.affine import fit_affine, heldout_linearity, linearity_score, reservoir_split
from actlab.analyses.base import ProfileData, Skipped, default_profile_sites, log_perplexity
from actlab.analyses.lenses import LensResult, lenses
from actlab.analyses.linearity import LinearReplacement, block_fit, layer_linearity
from actlab.engine.edits import Replace
from actlab.engine.reservoir import Reservoir
from tiny_models import ByteTokenizer, tiny_hf_model


TextTokenizer = ByteTokenizer  # takes single strings and HF-style truncation arguments
def make_model(arch):
    return actlab.load(tiny_hf_model(arch), tokenizer=TextTokenizer())


def random_texts(n, length=40, seed=0):
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     .,"
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def profile(model, texts, eval_texts=()):
    res = Reservoir(100_000, seed=0)  # larger than the corpus: every token is kept
    model.run(texts, default_profile_sites(model), [res])
    return ProfileData(stats=None, samples=res, eval_texts=list(eval_texts), n_tokens=len(res))


def synthetic(acts):
    res = Reservoir(10**6)
    n = next(iter(acts.values())).shape[0]
    res.acts = dict(acts)
    res.keys = torch.rand(n)
    res.token_ids = torch.zeros(n, dtype=torch.long)
    return ProfileData(stats=None, samples=res)


# ------------------------------------------------------------------------------------------ linearity

def test_exactly_linear_scores_one_and_nonlinear_scores_lower():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    m = torch.randn(16, 16, generator=g)
    y_lin = x @ m + 3.0
    y_nonlin = torch.tanh(2 * x @ m) + 0.5 * (x @ m) ** 2
    train, test = reservoir_split(2000, seed=0)
    assert heldout_linearity(x, y_lin, train, test)[0] == pytest.approx(1.0, abs=1e-6)
    assert linearity_score(x, y_lin) == pytest.approx(1.0, abs=1e-6)
    assert heldout_linearity(x, y_nonlin, train, test)[0] < 0.6
    # the analysis on synthetic profile data: block 0 linear, block 1 not
    data = synthetic({"embed": x, "resid.0": y_lin, "resid.1": y_nonlin})
    stub = SimpleNamespace(n_layers=2, has_lm_head=False)
    result = layer_linearity(stub, data)
    assert result.score[0] == pytest.approx(1.0, abs=1e-6)
    assert result.score_residual_removed[0] == pytest.approx(1.0, abs=1e-6)
    assert result.score[1] < 0.6 and result.score_residual_removed[1] < 0.6
    assert (result.most_linear, result.least_linear) == (0, 1)
    assert result.replaced_loss == {} and "no LM head" in result.replacement_note


def test_fit_affine_ridge_only_when_ill_conditioned():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g)
    assert fit_affine(x, x).ridge == 1e-6
    torch.testing.assert_close(fit_affine(x, x).weight, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    few = torch.randn(10, 8, generator=g)  # fewer than two samples per dimension
    assert fit_affine(few, few).ridge == 1e-3
    collinear = torch.cat([x, x[:, :1] * (1 + 1e-7)], 1)
    assert fit_affine(collinear, x).ridge == 1e-3


def test_linear_replacement_makes_block_exactly_linear():
    model = make_model("llama")
    texts = random_texts(30)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(model.d_model, model.d_model, generator=g) / model.d_model ** 0.5
    b = torch.randn(model.d_model, generator=g)
    edit = LinearReplacement(1, w, b)
    with model.edit(edit):
        with model.capture(["resid.0", "resid.1"]) as cap:
            model(texts[:3])
        data = profile(model, texts)
    torch.testing.assert_close(cap.flat("resid.1"), cap.flat("resid.0") @ w + b, rtol=1e-5, atol=1e-5)
    result = layer_linearity(model, data, replace="none")
    assert result.score[1] == pytest.approx(1.0, abs=1e-5)
    assert result.score_residual_removed[1] == pytest.approx(1.0, abs=1e-4)
    assert result.most_linear == 1
    assert max(result.score_residual_removed[0], result.score_residual_removed[2]) < 0.99


def test_linearity_replacement_loss_on_tiny_decoder():
    model = make_model("gpt2")
    data = profile(model, random_texts(40), eval_texts=random_texts(6, seed=1))
    result = layer_linearity(model, data)
    assert set(result.replaced_loss) == {result.most_linear, result.least_linear}
    assert result.base_loss == pytest.approx(log_perplexity(model, data.eval_texts))
    assert not model.hooks.active  # the replacement edits were removed
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["n_train"] + payload["n_test"] == len(data.samples)
    assert len(result.figures()) == 2 and result.table()[1][0][0] == 0
    assert "Razzhigaev" in result.explanation and "most linear" in result.headline()


def test_replacing_a_block_with_its_linear_fit_gives_linearitys_number():
    """The engine's Replace(resid.i, affine fit of its input) costs exactly the loss layer_linearity reports."""
    model = make_model("llama")
    data = profile(model, random_texts(40), eval_texts=random_texts(6, seed=1))
    result = layer_linearity(model, data, replace="all")
    assert sorted(result.replaced_loss) == result.layers
    for i in result.layers:
        x = data.samples["embed" if i == 0 else f"resid.{i - 1}"]
        fit = fit_affine(x, data.samples[f"resid.{i}"])  # on every reservoir token, in float64
        torch.testing.assert_close(fit.weight, block_fit(model, data, i).weight, rtol=0, atol=0)
        with model.edit(Replace(f"resid.{i}", fit)):
            loss = log_perplexity(model, data.eval_texts)
        assert loss == pytest.approx(result.replaced_loss[i], rel=1e-6)
        assert abs(loss - result.base_loss) > 1e-4  # the replacement changed the model
    assert not model.hooks.active


def test_linearity_runs_on_encoder_without_replacement():
    model = make_model("bert")
    result = layer_linearity(model, profile(model, random_texts(40)), eval_texts=["abc def"])
    assert len(result.score) == model.n_layers and result.base_loss is None
    assert "no LM head" in result.replacement_note


# ------------------------------------------------------------------------------------------- lenses

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "opt", "gpt_neox"])
def test_decoder_reproduces_model_logits_and_last_layer_lens_is_exact(arch):
    model = make_model(arch)
    last = f"resid.{model.n_layers - 1}"
    texts = random_texts(40)
    with model.capture(last) as cap:
        out = model(texts[:4])
    mask = cap.mask.bool()
    with torch.no_grad():
        logits = model.anatomy.decode(cap.flat(last))
    assert torch.equal(logits.argmax(-1), out.logits[mask].argmax(-1))
    torch.testing.assert_close(logits, out.logits[mask].float(), rtol=1e-4, atol=1e-4)

    result = lenses(model, profile(model, texts))
    assert isinstance(result, LensResult)
    assert result.top1_logit[-1] == 1.0  # 100% agreement with the model at the last layer
    assert result.kl_logit[-1] == pytest.approx(0.0, abs=1e-5)
    assert result.top1_fitted[-1] == 1.0  # the fitted map at the last layer is the identity
    assert result.kl_fitted[-1] == pytest.approx(0.0, abs=1e-4)
    assert result.fit_r2[-1] == pytest.approx(1.0, abs=1e-6)


def test_fitted_lens_at_last_layer_is_near_identity():
    model = make_model("llama")
    data = profile(model, random_texts(40))
    h = data.samples[f"resid.{model.n_layers - 1}"]
    fit = fit_affine(h, h)
    torch.testing.assert_close(fit.weight, torch.eye(model.d_model, dtype=torch.float64), atol=1e-4, rtol=0)
    assert float(fit.bias.abs().max()) < 1e-4


def test_lenses_report_members_and_encoder_skip():
    model = make_model("llama")
    result = lenses(model, profile(model, random_texts(40)), eval_tokens=300)
    assert result.n_test == 300
    payload = json.loads(json.dumps(result.to_dict()))
    assert len(payload["top1_logit"]) == model.n_layers == len(payload["kl_fitted"])
    assert all(0 <= v <= 1 for v in payload["top1_fitted"])
    assert len(result.figures()) == 1 and len(result.table()[1]) == model.n_layers
    assert "Din et al." in result.explanation and "fitted lens" in result.headline()
    bert = make_model("bert")
    skipped = lenses(bert, profile(bert, random_texts(20)))
    assert isinstance(skipped, Skipped) and "LM head" in skipped.reason
    assert skipped.to_dict()["skipped"] is True


# ----------------------------------------------------------------------------------- demo models

def demo_data(name):
    from actlab.models.loading import zoo_models

    if name not in zoo_models():
        pytest.skip(f"{name} is not in the model zoo yet (scripts/train_demo_models.py exports it)")
    from importlib.resources import files

    model = actlab.load(name)
    lines = files("actlab.datasets").joinpath("genres/heldout.jsonl").read_text().splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    random.Random(0).shuffle(docs)
    from actlab.analyses.base import collect_profile_data

    data = collect_profile_data(model, docs[:400], eval_texts=docs[400:460], reservoir_size=4096)
    return model, data


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-gpt2", "demo-llama"])
def test_demo_fitted_lens_beats_logit_lens_before_the_last_layer(name):
    model, data = demo_data(name)
    result = lenses(model, data)
    assert result.top1_logit[-1] == 1.0
    for i in result.layers[:-1]:
        assert result.top1_fitted[i] > result.top1_logit[i] or result.kl_fitted[i] < result.kl_logit[i], (
            f"layer {i}: fitted {result.top1_fitted[i]:.3f}/{result.kl_fitted[i]:.3f} vs "
            f"logit {result.top1_logit[i]:.3f}/{result.kl_logit[i]:.3f}")
    lin = layer_linearity(model, data)
    assert all(s > 0.5 for s in lin.score)
    assert lin.delta(lin.most_linear) < lin.delta(lin.least_linear)
