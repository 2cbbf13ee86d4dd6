"""`steer fit --site resid.*`: the classifier-free layer sweep (held-out preference gap)."""

import pytest

import actlab
from actlab.datasets.genres import contrast_pairs
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.fit import contrast_split, preference_gap, random_like, sweep_layers
from actlab.models.loading import zoo_models


def test_split_keeps_pairs_together_and_disjoint():
    c = ContrastSet([f"p{i}" for i in range(12)], [f"n{i}" for i in range(12)], [f"q{i}" for i in range(12)])
    fit, held = contrast_split(c, 0.25)
    assert len(held.pos) == 3 and len(fit.pos) == 9 and not set(fit.prompts) & set(held.prompts)
    assert all(p[1:] == n[1:] == q[1:] for p, n, q in zip(held.pos, held.neg, held.prompts))


@pytest.mark.slow
@pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models absent")
def test_sweep_ranks_layers_by_held_out_preference_gain():
    model = actlab.load("demo-llama")
    rows = contrast_pairs("scripture")[:48]
    contrast = ContrastSet([r["pos"] for r in rows], [r["neg"] for r in rows], [r["prompt"] for r in rows])
    result = sweep_layers(model, contrast, "resid.*")
    assert [r["gain"] for r in result] == sorted((r["gain"] for r in result), reverse=True)
    assert all(r["gain"] > 0 for r in result)  # every layer's vector favours the positive continuations
    _, held = contrast_split(contrast)
    best = result[0]
    random_gain = preference_gap(model, held, random_like(best["vector"])) - best["base_gap"]
    assert abs(random_gain) < 0.25 * best["gain"]  # a random vector of the same norm does far less
