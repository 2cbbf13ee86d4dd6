"""The CETT rule (actlab.sparse.cett) against hand-computed values, a brute-force scan, and a real MLP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actlab.analyses.ppl_sparsity import PplSparsityResult, ppl_sparsity
from actlab.errors import ActlabError
from actlab.sparse.cett import CettCurve, ContributionThreshold, calibrate_threshold, cett, contributions, output_norms
from test_analyses_sparsity import DOCS, check_protocol, load_tiny, synthetic_data

# a layer whose neurons write orthogonal directions: W = diag(1, 2, 4, 2), so ||w_out,j|| = (1, 2, 4, 2)
W = torch.diag(torch.tensor([1.0, 2.0, 4.0, 2.0]))
# token 1: contributions (1, 2, 2, 4), output (1, -2, 2, 4), norm 5; token 2: contributions (3, 0, 0, 0), norm 3
A = torch.tensor([[1.0, -1.0, 0.5, 2.0], [3.0, 0.0, 0.0, 0.0]])


def test_cett_of_a_layer_with_known_contributions():
    assert contributions(A, W).tolist() == [[1, 2, 2, 4], [3, 0, 0, 0]]
    assert output_norms(W).tolist() == [1, 2, 4, 2]
    # the tail is orthogonal, so CETT = sqrt(sum of truncated c^2) / 5 for token 1; token 2 is 0 or 1
    for eps, per_token in [(1.0, [0.0, 0.0]), (2.0, [0.2, 0.0]), (3.0, [0.6, 0.0]), (4.0, [0.6, 1.0]),
                           (math.inf, [1.0, 1.0])]:
        assert cett(A, W, eps).tolist() == pytest.approx(per_token, abs=1e-12)
    # mean CETT by threshold: 0 (eps <= 1), 0.1 (2), 0.3 (3), 0.8 (4), 1 (inf): the largest eps within target
    for target, eps in [(0.0, 1.0), (0.05, 1.0), (0.1, 2.0), (0.29, 2.0), (0.3, 3.0), (0.5, 3.0), (0.8, 4.0),
                        (0.99, 4.0), (1.0, math.inf)]:
        assert calibrate_threshold(A, W, target) == eps, target


def test_zero_output_token_counts_zero_and_bad_inputs_raise():
    assert cett(torch.zeros(1, 4), W, math.inf).tolist() == [0.0]
    with pytest.raises(ActlabError, match="down projection"):
        cett(A, W[:, :3], 1.0)
    with pytest.raises(ActlabError, match="CETT target"):
        calibrate_threshold(A, W, -0.1)


def _brute_force(a: np.ndarray, w: np.ndarray, target: float) -> float:
    """Largest candidate threshold within ``target``, by a plain scan, token by token."""
    c = np.abs(a) * np.linalg.norm(w, axis=0)
    best = -1.0
    for eps in list(np.unique(c)) + [math.inf]:
        values = []
        for t in range(a.shape[0]):
            full = np.linalg.norm(w @ a[t])
            tail = np.linalg.norm(w @ np.where(c[t] < eps, a[t], 0.0))
            values.append(tail / full if full > 0 else 0.0)
        if np.mean(values) <= target:
            best = max(best, eps)
    return best


@pytest.mark.parametrize("target", [0.02, 0.1, 0.35, 0.7])
def test_calibration_matches_a_brute_force_scan(target):
    gen = torch.Generator().manual_seed(0)
    # non-negative activations and weights: every contribution vector lies in the positive orthant, so
    # truncating more can only grow the tail and mean CETT is monotone (the binary search's assumption)
    a = torch.rand(12, 6, generator=gen) * (torch.rand(12, 6, generator=gen) > 0.3)
    w = torch.rand(5, 6, generator=gen)
    assert calibrate_threshold(a, w, target) == pytest.approx(_brute_force(a.double().numpy(), w.double().numpy(),
                                                                           target), rel=1e-12)


def test_resolution_keeps_the_threshold_within_target_and_near_the_exact_one():
    gen = torch.Generator().manual_seed(1)
    a, w = torch.randn(200, 64, generator=gen).relu(), torch.randn(16, 64, generator=gen)
    exact, coarse = CettCurve(a, w, resolution=None), CettCurve(a, w, resolution=64)
    cand = exact.candidates
    for target in (0.05, 0.2, 0.05):  # repeated: the second search reuses the cache
        e, c = exact.threshold(target), coarse.threshold(target)
        assert c <= e and float(cett(a, w, c).mean()) <= target
        i_e, i_c = int(torch.searchsorted(cand, e)), int(torch.searchsorted(cand, c))
        assert i_e - i_c <= cand.numel() // 64


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_contribution_threshold_removes_exactly_the_truncated_tail(arch):
    """Zeroing neurons at mlp.hidden.1 changes mlp.1 by minus their summed contributions a_j w_out,j."""
    model = load_tiny(arch)
    down = model.anatomy.mlp_parts(1).down  # [d_model, d_mlp]; GPT-2's Conv1D transposed by the anatomy
    with model.capture(["mlp.hidden.1", "mlp.1"]) as plain:
        model(DOCS[:3])
    x = plain.flat("mlp.hidden.1").float()
    eps = float(contributions(x, down).flatten().median())
    edit = ContributionThreshold("mlp.hidden.1", eps, output_norms(down).float())
    with model.edit(edit), model.capture(["mlp.hidden.1", "mlp.1"]) as cut:
        model(DOCS[:3])
    truncated = contributions(x, down) < eps
    assert torch.equal(cut.flat("mlp.hidden.1"), torch.where(truncated, torch.zeros_like(x), x))
    tail = torch.where(truncated, x, torch.zeros_like(x)).double() @ down.double().T
    change = (cut.flat("mlp.1").double() - plain.flat("mlp.1").double())
    torch.testing.assert_close(change, -tail, atol=1e-4, rtol=1e-4)
    # the relative size of that change is the CETT the rule computes
    full = plain.flat("mlp.1").double() - (0 if mlp_bias(model) is None else mlp_bias(model).double())
    per_token = change.norm(dim=-1) / full.norm(dim=-1)
    assert per_token.mean() == pytest.approx(float(cett(x, down, eps).mean()), rel=1e-3)
    assert edit.measured_sparsity == pytest.approx(float((cut.flat("mlp.hidden.1") == 0).double().mean()))


def mlp_bias(model):
    return model.anatomy.mlp_parts(1).down_bias


def test_ppl_sparsity_cett_rule_uses_calibrated_thresholds():
    data = synthetic_data()  # 400 tokens, two layers of 16 neurons: fewer than calibration_tokens, so all of them
    gen = torch.Generator().manual_seed(2)
    downs = {s: torch.randn(8, 16, generator=gen) for s in ("mlp.hidden.0", "mlp.hidden.1")}
    calls = []

    def evaluate(level, thresholds):  # perplexity rises as 400 (tau - 0.3)^2 percent above tau = 0.3
        calls.append((level, thresholds))
        return 10.0 * (1 + 4 * max(0.0, level - 0.3) ** 2)

    res = ppl_sparsity(None, data, ps=(1, 5), steps=8, evaluate=evaluate, down_weights=downs)
    assert isinstance(res, PplSparsityResult) and res.rule == "cett" and "CETT rule" in res.headline()
    for r in res.levels:
        exact = 0.3 + math.sqrt(r["p"] / 400)
        assert r["level"] <= exact < r["next_level"] and r["next_level"] - r["level"] == pytest.approx(2.0 ** -8)
        for site, t in zip(res.sites, r["thresholds"]):
            acts = data.samples[site].float()
            assert t == calibrate_threshold(acts, downs[site], r["level"])
            c = contributions(acts, downs[site])
            assert r["sparsity_per_layer"][res.sites.index(site)] == pytest.approx(float((c < t).double().mean()))
        assert r["activation_ratio"] == pytest.approx(1 - r["sparsity"])
    assert calls[0] == (0.0, {}) and len({c[0] for c in calls}) == len(calls)
    check_protocol(res)
    with pytest.raises(ActlabError, match="down projections"):
        ppl_sparsity(None, data, evaluate=evaluate)
    with pytest.raises(ActlabError, match="rule"):
        ppl_sparsity(None, data, evaluate=evaluate, rule="median")
