"""Command-V: layer matching, ridge converters, closed-form paste, and exactness under a change of basis."""

import copy

import pytest
import torch
from torch import nn

import actlab
from actlab.errors import ActlabError
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


def _rotated_copy(hf, seed=0):
    """The same tiny Llama with its residual stream in another orthonormal basis: h' = h Q.

    RMSNorm gains are folded into the linear layers that read the normalised stream, so the norm
    commutes with Q; every weight reading the residual becomes W Q, every weight writing it Qᵀ W.
    """
    donor = copy.deepcopy(hf)
    d = donor.config.hidden_size
    with torch.no_grad():
        for layer in donor.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight.mul_(layer.input_layernorm.weight)
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight.mul_(layer.post_attention_layernorm.weight)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        donor.lm_head.weight = nn.Parameter(donor.lm_head.weight * donor.model.norm.weight)
        donor.model.norm.weight.fill_(1.0)
    recipient = copy.deepcopy(donor)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        recipient.model.embed_tokens.weight.copy_(donor.model.embed_tokens.weight @ q)
        for layer in recipient.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj):
                lin.weight.copy_(lin.weight @ q)
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_(q.T @ lin.weight)
        recipient.lm_head.weight = nn.Parameter(donor.lm_head.weight @ q)
    return donor, recipient, q


def test_paste_is_exact_under_a_change_of_basis():
    hf = copy.deepcopy(tiny_hf_model("llama"))
    hf.config.tie_word_embeddings = False
    donor_hf, recipient_hf, q = _rotated_copy(hf)
    donor = actlab.load(donor_hf, tokenizer=ByteTokenizer())
    recipient = actlab.load(recipient_hf, tokenizer=ByteTokenizer())
    recipient.name = "rotated"
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
    d_prof = cached_profile(donor, PROMPTS[:60], cache_dir=tmp_path)
    r_prof = cached_profile(recipient, PROMPTS[:60], cache_dir=tmp_path)
    conv = fit_converters(d_prof, r_prof, min_lambda=0.1)
    want = paste(vector, conv, recipient, max_gain=1.2)
    assert result.pasted.site == want.site and torch.equal(result.pasted.vector, want.vector)
    assert result.converters.extra["lambda_grid"] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert result.rows[0]["donor_site"] == "resid.1" and set(result.seconds) == {
        "donor_profile", "recipient_profile", "converters", "paste"}
    with pytest.raises(ActlabError, match="unknown PasteConfig"):
        paste_between(donor, recipient, vector, PROMPTS[:60], min_lamda=0.1)
