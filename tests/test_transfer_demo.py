"""Command-V on the demo pair: the evaluation runs end to end and moves the recipient the right way.

The slow tests run ``actlab.experiments.transfer_eval.evaluate_transfer`` on demo-llama (donor, 4 × 256) →
demo-gpt2 (recipient, 6 × 192) and back, and assert behaviour in the right direction (a significant genre
effect, a random control that does far less, a bounded perplexity cost, the layer maps). How *much* of
the direct effect the paste carries is measured, not asserted, here: the matrix in docs/transfer.md
(``benchmarks/transfer_matrix.py``). The known-answer checks of the evaluation code are in
``tests/test_transfer_known.py`` (a rotated copy, a fine-tuned copy).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import actlab
from actlab.datasets import profile_texts
from actlab.interventions import LowRankAdapter
from actlab.transfer import match_layers_by_depth
from actlab.experiments.genre_data import split_setup
from actlab.experiments.transfer_controls import random_adapter_like
from actlab.experiments.transfer_eval import default_site, evaluate_transfer
from actlab.experiments.transfer_results import TransferEvaluation

PROFILE = profile_texts()[::4]  # a quarter of the default profile (27k tokens): the tests check the code


# ------------------------------------------------------------------------------------ fast
def test_default_site_is_the_middle_layer():
    assert default_site(SimpleNamespace(n_layers=4)) == "resid.1"  # demo-llama: depth 2/4
    assert default_site(SimpleNamespace(n_layers=6)) == "resid.2"  # demo-gpt2: depth 3/6
    assert default_site(SimpleNamespace(n_layers=1)) == "resid.0"
    # and the two middles match each other by relative depth, in both directions
    assert match_layers_by_depth(4, 6)[1] == 2 and match_layers_by_depth(6, 4)[2] == 1


def test_random_adapter_matches_the_size_of_the_change():
    gen = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0].T.contiguous()
    trained = LowRankAdapter("resid.1", R=R, W=R + 0.3 * torch.randn(4, 32, generator=gen),
                             b=torch.randn(4, generator=gen))
    rnd = random_adapter_like(trained, seed=3)
    torch.testing.assert_close(rnd.R @ rnd.R.T, torch.eye(4), atol=1e-5, rtol=0)
    assert float((rnd.W - rnd.R).norm()) == pytest.approx(float((trained.W - trained.R).norm()), rel=1e-5)
    assert float(rnd.b.norm()) == pytest.approx(float(trained.b.norm()), rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(rnd.R.flatten(), R.flatten(), dim=0))) < 0.5


# ------------------------------------------------------------------------------------ slow
MODELS = {}


def demo(name: str):
    from actlab.models.loading import zoo_models

    if name not in zoo_models():
        pytest.skip(f"{name} is not in the zoo (scripts/train_demo_models.py {name})")
    if name not in MODELS:
        MODELS[name] = actlab.load(name)
    return MODELS[name]


@pytest.fixture(scope="module")
def profile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("transfer-profiles")


@pytest.fixture(scope="module")
def llama_to_gpt2(profile_cache) -> TransferEvaluation:
    # defaults: scripture contrast passages of the evaluation split, donor resid.1 → recipient resid.2,
    # coefficient 0.5, 40 prompts × 4 samples, all-token profiles of a quarter of the profile documents (27k
    # tokens: the evaluation code is what is tested here, not the default's numbers), λ ≥ 0.1; ~30 s
    return evaluate_transfer(demo("demo-llama"), demo("demo-gpt2"), kind="vector", donor_check=False,
                             n_eval_prompts=40, cache_dir=profile_cache, profile_prompts=PROFILE)


@pytest.mark.slow
def test_pasted_vector_moves_the_recipient_like_its_own(llama_to_gpt2):
    r = llama_to_gpt2
    lines = "\n".join(r.summary_lines())
    assert (r.donor_site, r.recipient_site) == ("resid.1", "resid.2"), lines
    c = r.conditions
    # the comparison is meaningful: the recipient's own vector moves the rate well clear of the noise
    assert c["direct"].effect >= 0.2 and c["direct"].effect > 5 * c["direct"].effect_se, lines
    assert c["pasted"].effect > 5 * c["pasted"].effect_se, lines
    # the pasted vector points the recipient's own way (the matrix measures cosines 0.9–0.99)
    assert r.diagnostics["cosine_pasted_direct"] > 0.8, lines
    assert r.settings["split"] == "eval" and r.positions == "all"


@pytest.mark.slow
def test_random_pasted_vector_of_the_same_norm_does_nothing(llama_to_gpt2):
    r = llama_to_gpt2
    lines = "\n".join(r.summary_lines())
    # a random vector of the pasted one's size (4 draws: 2 directions and their negatives) does far less
    assert abs(r.conditions["random"].effect) < r.conditions["pasted"].effect / 4, lines


@pytest.mark.slow
def test_pasted_vector_costs_little_perplexity(llama_to_gpt2):
    c = llama_to_gpt2.conditions
    # the pasted vector costs about what the recipient's own costs (matrix: within a few per cent)
    assert c["pasted"].perplexity < 1.2 * c["none"].perplexity
    assert c["pasted"].perplexity <= c["direct"].perplexity * 1.1


@pytest.mark.slow
def test_deattenuation_brings_the_pasted_vector_to_the_recipients_length(profile_cache):
    """No generation: the same vector pasted with and without de-attenuation, against the recipient's
    own mean-difference vector at the matched layer."""
    from actlab.interventions.fit import fit_steering
    from actlab.transfer import cached_profile, paste
    from actlab.transfer import fit_paste_converters

    donor, recipient = demo("demo-llama"), demo("demo-gpt2")
    prompts = PROFILE
    conv = fit_paste_converters(cached_profile(donor, prompts, positions="all", cache_dir=profile_cache),
                                cached_profile(recipient, prompts, positions="all", cache_dir=profile_cache))
    contrast = split_setup("scripture", "tune", 0).contrast
    v = fit_steering(donor, contrast, "resid.1")["resid.1"]
    own = fit_steering(recipient, contrast, "resid.2")["resid.2"].vector
    plain = paste(v, conv, recipient, deattenuate=False).vector
    fixed = paste(v, conv, recipient)
    gain = fixed.params["deattenuation"]["gains"][0]
    # ridge regression shrinks the plain paste; the de-attenuated one is longer by exactly the gain and
    # closer to the recipient's own length, in the same direction
    assert 1.0 < gain <= 1.5
    assert float(fixed.vector.norm() / plain.norm()) == pytest.approx(gain, rel=1e-3)
    assert abs(float(fixed.vector.norm() / own.norm()) - 1) < abs(float(plain.norm() / own.norm()) - 1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(fixed.vector, plain, dim=0) > 0.9999 and cos(fixed.vector, own, dim=0) > 0.8


@pytest.mark.slow
def test_result_serialises_and_draws(llama_to_gpt2, tmp_path):
    r = llama_to_gpt2
    d = r.to_dict()
    assert set(d["conditions"]) == {"none", "random", "pasted", "direct"}
    assert len(d["converters"]) == 4 and all(0.5 < p["r2_to_recipient"] < 1 for p in d["converters"])
    assert d["compute"]["converter_fit_seconds"] > 0 and d["compute"]["paste_gflop"] > 0  # speed: benchmarks/
    r.save(tmp_path / "r.json")
    r.figure(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert any("pasted/direct" in line for line in r.summary_lines())


@pytest.mark.slow
def test_paste_from_the_deeper_model_into_the_shallower(profile_cache):
    # demo-gpt2 (6 layers) → demo-llama (4): the reverse of the above, on the cached profiles, smaller
    donor, recipient = demo("demo-gpt2"), demo("demo-llama")
    r = evaluate_transfer(donor, recipient, kind="vector", n_eval_prompts=40, n_random=2, donor_check=False,
                          cache_dir=profile_cache, profile_prompts=PROFILE)
    lines = "\n".join(r.summary_lines())
    assert r.settings["layer_map"] == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 3}
    assert (r.donor_site, r.recipient_site) == ("resid.2", "resid.1"), lines
    pasted = r.conditions["pasted"]
    assert pasted.effect >= 0.1 and pasted.effect > 4 * pasted.effect_se, lines  # the right direction
    assert pasted.perplexity < 1.2 * r.conditions["none"].perplexity, lines


def test_transfer_config_takes_keywords_and_refuses_unknown_ones():
    from actlab.errors import ActlabError
    from actlab.experiments.transfer_eval import TransferEvalConfig

    config = TransferEvalConfig.with_overrides(None, {"kind": "adapter", "n_random": 2})
    assert (config.kind, config.n_random, config.resolved_coef) == ("adapter", 2, 1.0)
    assert config.to_dict()["converter_lambdas"] == (0.1, 0.3, 1.0, 3.0, 10.0)
    with pytest.raises(ActlabError, match="unknown TransferEvalConfig"):
        evaluate_transfer(None, None, n_randoms=2)  # refused before any model is touched
    with pytest.raises(ActlabError, match="kind must be"):
        evaluate_transfer(None, None, kind="lora")
