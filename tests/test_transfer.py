"""Command-V: layer matching, ridge converters, closed-form paste, and exactness under a change of basis."""

import copy

import pytest
import torch

import actlab
from actlab.errors import ActlabError
from actlab.experiments.known_pairs import rotated_copy
from actlab.interventions import AffineMap, LowRankAdapter, SteeringVector, load_interventions
from actlab.transfer import (
    ActivationProfile, ConverterSet, adapter_as_affine, fit_converters, fit_linear_map, match_layers_by_depth,
    parse_layer_map, paste, profile_model,
)
from tiny_models import ByteTokenizer, tiny_hf_model

PROMPTS = [f"prompt number {i} says {'ab' * (i % 5)} and {i * 7 % 13}" for i in range(120)]


def test_depth_matching_both_directions():
    deep_to_shallow = match_layers_by_depth(8, 4)
    assert deep_to_shallow == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 3}  # ties go to the shallower layer
    shallow_to_deep = match_layers_by_depth(4, 8)
    assert shallow_to_deep == {0: 1, 1: 3, 2: 5, 3: 7}
    assert match_layers_by_depth(6, 4)[5] == 3 and match_layers_by_depth(4, 6)[3] == 5
    # keys are always donor layers, values recipient layers (the reference code swapped them)
    assert set(match_layers_by_depth(3, 7)) == {0, 1, 2} and max(match_layers_by_depth(3, 7).values()) == 6
    assert parse_layer_map("0:0, 2:3", 4, 5) == {0: 0, 2: 3}
    with pytest.raises(ActlabError, match="recipient 0..4"):
        parse_layer_map("0:9", 4, 5)


def test_ridge_recovers_an_affine_relation_and_reports_heldout_r2():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=gen) * 3 + 5
    w = torch.randn(10, 6, generator=gen)
    y = x @ w + 2.0
    fit = fit_linear_map(x, y)
    torch.testing.assert_close(fit(x), y, rtol=1e-4, atol=1e-3)
    assert fit.r2 > 0.9999 and fit.lam <= 1e-4
    noisy = fit_linear_map(x, y + torch.randn(300, 6, generator=gen) * 20)
    assert 0 < noisy.r2 < 0.9 and noisy.lam > 0  # noise: held-out R² says so, and λ is never zero


def test_paste_is_exact_under_a_change_of_basis():
    donor = actlab.load(tiny_hf_model("llama"), tokenizer=ByteTokenizer())
    recipient, q = rotated_copy(donor)  # the same function, residual stream h Q
    with donor.capture("resid.1") as a, recipient.capture("resid.1") as b:
        donor("check the basis"), recipient("check the basis")
    torch.testing.assert_close(a["resid.1"] @ q, b["resid.1"], rtol=1e-4, atol=1e-5)

    # every token (same tokenizer, so rows align): the random tiny model's last tokens span too few directions
    converters = fit_converters(profile_model(donor, PROMPTS, positions="all"), profile_model(recipient, PROMPTS, positions="all"))
    assert converters.layer_map == {0: 0, 1: 1, 2: 2}
    assert all(row["r2_to_recipient"] > 0.9999 for row in converters.report())
    gen = torch.Generator().manual_seed(1)
    rank = 3
    R = torch.linalg.qr(torch.randn(32, rank, generator=gen))[0].T.contiguous()
    adapter = LowRankAdapter("resid.1", R=R, W=torch.randn(rank, 32, generator=gen), b=torch.randn(rank, generator=gen),
                             model=donor.identity()) * 2.0
    vector = SteeringVector("resid.0", vector=torch.randn(32, generator=gen), model=donor.identity())
    for donor_edit in (adapter, vector, adapter + vector):
        pasted = paste(donor_edit, converters, recipient)
        with donor.edit(donor_edit):
            want = donor("the pasted edit must act the same").logits
        with recipient.edit(pasted):
            got = recipient("the pasted edit must act the same").logits
        plain = recipient("the pasted edit must act the same").logits
        effect = (want - plain).abs().max()
        assert effect > 1e-2  # the edit really does something
        # float32 profiles and matmuls: the pasted edit matches to ~1e-4 of the logits' scale
        assert (got - want).abs().max() < 1e-3 * max(1.0, float(effect)), (got - want).abs().max()


def test_adapter_as_affine_has_the_same_delta():
    gen = torch.Generator().manual_seed(2)
    R = torch.linalg.qr(torch.randn(16, 4, generator=gen))[0].T.contiguous()
    adapter = LowRankAdapter("resid.0", R=R, W=torch.randn(4, 16, generator=gen), b=torch.randn(4, generator=gen))
    h = torch.randn(5, 16, generator=gen)
    torch.testing.assert_close(adapter_as_affine(adapter).delta(h), adapter.delta(h), rtol=1e-5, atol=1e-5)


def test_cross_width_paste_saves_and_reloads(tmp_path):
    donor = actlab.load(tiny_hf_model("gpt2"), tokenizer=ByteTokenizer())
    recipient = actlab.load(tiny_hf_model("qwen2"), tokenizer=ByteTokenizer())
    donor_prof, recipient_prof = profile_model(donor, PROMPTS[:60]), profile_model(recipient, PROMPTS[:60])
    donor_prof.save(tmp_path / "d.safetensors")
    loaded = ActivationProfile.load(tmp_path / "d.safetensors")
    assert loaded.prompts_hash == donor_prof.prompts_hash and torch.equal(loaded.acts[1], donor_prof.acts[1])
    conv = fit_converters(loaded, recipient_prof, layer_map={1: 2})
    conv.save(tmp_path / "c.safetensors")
    conv2 = ConverterSet.load(tmp_path / "c.safetensors")
    assert torch.equal(conv2.to_recipient[1].weight, conv.to_recipient[1].weight)
    assert conv2.to_recipient[1].weight.abs().sum() > 0  # never the all-zero matrices of the reference loader
    affine = AffineMap("resid.1", bias=torch.randn(32), diag=torch.randn(32) * 0.1, model=donor.identity())
    pasted = paste(affine, conv2, recipient)
    assert pasted.site == "resid.2" and pasted.width == recipient.d_model
    pasted.save(tmp_path / "p.safetensors")
    again = load_interventions(tmp_path / "p.safetensors", recipient)
    with pytest.raises(ActlabError, match="paste"):
        load_interventions(tmp_path / "p.safetensors", donor)
    with recipient.edit(again):
        recipient("it applies")
    with pytest.raises(ActlabError, match="different prompts"):
        fit_converters(donor_prof, profile_model(recipient, PROMPTS[60:]))


def test_deattenuation_restores_the_length_regression_loses_to_noise():
    """Both models read a shared latent z through noise: h_D = z + ε_D, h_R = z Q + ε_R (Q orthogonal).
    A donor shift v of z is the recipient shift v Q. The ridge converter shrinks it by the reliability
    var(z)/(var(z) + σ²) = 0.5 along v (round trip 0.25); the geometric-mean correction, gain
    1/√0.25 = 2, brings the length back to ≈ 1 (sampling error with 6000 rows: a few percent) without
    turning the direction; the default cap of 1.5 stops it at 1.5× the plain paste."""
    gen = torch.Generator().manual_seed(3)
    n, d, sigma = 6000, 12, 1.0
    z = torch.randn(n, d, generator=gen)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    h_d = z + sigma * torch.randn(n, d, generator=gen)
    h_r = z @ q + sigma * torch.randn(n, d, generator=gen)

    def prof(h, name):
        return ActivationProfile(acts={0: h}, model={"model_name": name}, prompts=[str(i) for i in range(n)],
                                 positions="last", row_prompt=torch.arange(n))

    conv = fit_converters(prof(h_d, "donor"), prof(h_r, "recipient"), lambdas=[1e-3])
    v = torch.randn(d, generator=gen)
    truth = v @ q
    plain = paste(SteeringVector("resid.0", vector=v), conv, deattenuate=False).vector
    fixed = paste(SteeringVector("resid.0", vector=v), conv, max_gain=3.0).vector  # the gain needed here is 2
    capped = paste(SteeringVector("resid.0", vector=v), conv).vector  # the default cap, 1.5
    assert abs(plain.norm() / truth.norm() - 0.5) < 0.05  # attenuated by the reliability
    assert abs(fixed.norm() / truth.norm() - 1.0) < 0.06  # restored
    assert capped.norm() / plain.norm() == pytest.approx(1.5, rel=1e-4)
    cos = torch.nn.functional.cosine_similarity
    assert cos(fixed, truth, dim=0) > 0.99 and cos(fixed, plain, dim=0) > 0.9999  # only the length changes
    # an adapter's write subspace is restored the same way; the gain never exceeds max_gain
    R = torch.linalg.qr(torch.randn(d, 2, generator=gen))[0].T.contiguous()
    adapter = LowRankAdapter("resid.0", R=R, W=torch.randn(2, d, generator=gen), b=torch.randn(2, generator=gen))
    capped = paste(adapter, conv, max_gain=1.2)
    assert all(1.0 <= g <= 1.2 + 1e-6 for g in capped.params["deattenuation"]["gains"])
    with pytest.raises(ActlabError, match="max_gain"):
        paste(adapter, conv, max_gain=0.5)
    # the expected effect ratio reads the same maths off the converters: the shared correlation along the
    # vector is the reliability (0.5 here), so the plain paste is expected to carry 0.5 of the length (as
    # measured above), the paste de-attenuated with room (gain 2 ≤ 3) all of it, the capped one 0.5 × 1.5
    vec = SteeringVector("resid.0", vector=v)
    rho = paste(vec, conv, deattenuate=False).params["shared_correlations"][0]
    assert abs(rho - 0.5) < 0.05
    assert paste(vec, conv, deattenuate=False).params["expected_ratio"] == pytest.approx(rho, abs=1e-4)
    assert paste(vec, conv, max_gain=3.0).params["expected_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert paste(vec, conv).params["expected_ratio"] == pytest.approx(1.5 * rho, abs=1e-3)


def test_calibration_gives_a_pasted_adapter_the_donors_relative_size():
    """``calibrate_scale``: a pasted affine edit is rescaled (in its weights, coefficient untouched) so its mean
    |Δ|/|h| on the recipient's rows equals the donor edit's on the donor's; a vector is left alone."""
    from actlab.transfer import calibrate_scale
    from actlab.transfer.profiles import ActivationProfile

    gen = torch.Generator().manual_seed(3)
    n, d = 400, 8
    h_d = torch.randn(n, d, generator=gen) * 3 + 1
    h_r = h_d @ torch.randn(d, 6, generator=gen) + 0.3 * torch.randn(n, 6, generator=gen)

    def prof(h, name):
        return ActivationProfile(acts={0: h}, model={"model_name": name}, prompts=[str(i) for i in range(n)],
                                 positions="last", row_prompt=torch.arange(n))

    d_prof, r_prof = prof(h_d, "donor"), prof(h_r, "recipient")
    conv = fit_converters(d_prof, r_prof, lambdas=[0.1])
    R = torch.linalg.qr(torch.randn(d, 2, generator=gen))[0].T.contiguous()
    adapter = LowRankAdapter("resid.0", R=R, W=torch.randn(2, d, generator=gen), b=torch.randn(2, generator=gen)) * 0.7
    pasted = paste(adapter, conv)
    fixed = calibrate_scale(adapter, pasted, d_prof, r_prof)

    def rel(edit, h):
        return float(((edit.coef * edit.delta(h)).norm(dim=-1) / h.norm(dim=-1)).mean())

    assert fixed.coef == pasted.coef == pytest.approx(0.7)
    assert rel(fixed, h_r) == pytest.approx(rel(adapter, h_d), rel=1e-5)
    factor = fixed.params["scale_calibration"]
    assert factor == pytest.approx(rel(adapter, h_d) / rel(pasted, h_r), rel=1e-3) and abs(factor - 1) > 0.01
    torch.testing.assert_close(fixed.delta(h_r), pasted.delta(h_r) * factor, rtol=1e-3, atol=1e-4)
    vec = SteeringVector("resid.0", vector=torch.randn(d, generator=gen))
    assert torch.equal(calibrate_scale(vec, paste(vec, conv), d_prof, r_prof).vector, paste(vec, conv).vector)


def test_profile_cache_tells_retrained_weights_apart(tmp_path):
    """Same config, other weights (a fine-tune, a retrain): a cached profile must not be reused."""
    from actlab.transfer import cached_profile

    model = actlab.load(tiny_hf_model("llama"), tokenizer=ByteTokenizer())
    first = cached_profile(model, PROMPTS[:20], cache_dir=tmp_path)
    again = cached_profile(model, PROMPTS[:20], cache_dir=tmp_path)
    assert torch.equal(first.acts[0], again.acts[0]) and len(list(tmp_path.rglob("*.safetensors"))) == 1
    retrained_hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        retrained_hf.get_input_embeddings().weight.mul_(2.0)
    retrained = actlab.load(retrained_hf, tokenizer=ByteTokenizer())
    assert retrained.config_hash == model.config_hash
    other = cached_profile(retrained, PROMPTS[:20], cache_dir=tmp_path)
    assert not torch.allclose(other.acts[0], first.acts[0])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_the_paste_floor_is_set_once():
    from actlab.linalg import LAMBDA_GRID
    from actlab.transfer import MIN_LAMBDA, PASTE_LAMBDAS

    assert MIN_LAMBDA == 0.1
    assert PASTE_LAMBDAS == (0.1, 0.3, 1.0, 3.0, 10.0)
    assert set(PASTE_LAMBDAS) <= set(LAMBDA_GRID) and min(PASTE_LAMBDAS) == MIN_LAMBDA


def test_converters_are_the_shared_ridge_fit():
    from actlab.linalg import fit_ridge

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 8, generator=gen)
    y = x @ torch.randn(8, 5, generator=gen) + 0.5 * torch.randn(200, 5, generator=gen)
    ours, shared = fit_linear_map(x, y, seed=2), fit_ridge(x, y, seed=2)
    assert (ours.lam, ours.r2, ours.train_r2) == (shared.lam, shared.r2, shared.train_r2)
    torch.testing.assert_close(ours.weight, shared.weight.float())


def test_paste_between_is_profiles_converters_paste(tmp_path):
    """The one-call pipeline (``actlab paste run``) gives what its steps give one by one."""
    from actlab.transfer import PasteConfig, cached_profile, paste_between

    donor = actlab.load(tiny_hf_model("gpt2"), tokenizer=ByteTokenizer())
    recipient = actlab.load(tiny_hf_model("qwen2"), tokenizer=ByteTokenizer())
    vector = SteeringVector("resid.1", vector=torch.randn(32, generator=torch.Generator().manual_seed(5)),
                            model=donor.identity())
    result = paste_between(donor, recipient, vector, PROMPTS[:60], PasteConfig(cache_dir=tmp_path), max_gain=1.2)
    assert result.positions == "all" and not result.notes  # "auto": the two byte tokenizers agree
    d_prof = cached_profile(donor, PROMPTS[:60], positions="all", cache_dir=tmp_path)
    r_prof = cached_profile(recipient, PROMPTS[:60], positions="all", cache_dir=tmp_path)
    conv = fit_converters(d_prof, r_prof, min_lambda=0.1)
    want = paste(vector, conv, recipient, max_gain=1.2)
    assert result.pasted.site == want.site and torch.equal(result.pasted.vector, want.vector)
    assert result.converters.extra["lambda_grid"] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert result.rows[0]["donor_site"] == "resid.1" and set(result.seconds) == {
        "donor_profile", "recipient_profile", "converters", "paste"}
    with pytest.raises(ActlabError, match="unknown PasteConfig"):
        paste_between(donor, recipient, vector, PROMPTS[:60], min_lamda=0.1)


def test_auto_positions_fall_back_to_the_last_token_across_tokenizers():
    """"auto" profiles every token only when both tokenizers cut the prompts alike; "all" across
    different tokenizers is refused (rows would not align), "last" is always allowed."""
    from types import SimpleNamespace

    from actlab.transfer.profiles import resolve_positions

    class Shifted(ByteTokenizer):
        def __call__(self, texts, **kw):
            out = super().__call__(texts, **kw)
            out["input_ids"] = [[t + 1 for t in ids] for ids in out["input_ids"]]
            return out

    a = SimpleNamespace(name="a", tokenizer=ByteTokenizer())
    b = SimpleNamespace(name="b", tokenizer=ByteTokenizer())
    c = SimpleNamespace(name="c", tokenizer=Shifted())
    assert resolve_positions("auto", a, b, PROMPTS[:5]) == ("all", None)
    positions, note = resolve_positions("auto", a, c, PROMPTS[:5])
    assert positions == "last" and "tokenize differently" in note
    assert resolve_positions("last", a, c, PROMPTS[:5]) == ("last", None)
    with pytest.raises(ActlabError, match="tokenize the profile prompts differently"):
        resolve_positions("all", a, c, PROMPTS[:5])
    with pytest.raises(ActlabError, match="auto, all, last"):
        resolve_positions("every", a, b, PROMPTS[:5])
