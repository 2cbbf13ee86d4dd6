"""An SAE inside the model (issue #13): latents as a site, splices with and without the error term,
latent edits as intervention files, and the spliced LM loss on known answers."""

from __future__ import annotations

import pytest
import torch

from actlab.engine.edits import SetChannels
from actlab.errors import ActlabError
from actlab.interventions import LatentEdit, latent_direction, latent_edit, load_interventions
from actlab.sae import SparseAutoencoder
from actlab.sae.splice import attach, reconstruction
from actlab.sae.spliced import spliced_loss

TEXTS = ["the cat sat on the mat and looked around", "a quick brown fox jumps over the lazy dog today",
         "numbers one two three four five six seven"]


def random_sae(d, n=64, k=8, seed=0, **kw):
    sae = SparseAutoencoder(d, n, "topk", k, seed=seed, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae.eval()


def identity_sae(d):
    """relu(x) - relu(-x) = x: a ReLU SAE with W_enc = [I, -I] and W_dec = [I; -I] reconstructs exactly."""
    sae = SparseAutoencoder(d, 2 * d, "relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def logits(model, texts=TEXTS):
    ids, mask = model.tokenize(texts)
    return model(ids, attention_mask=mask).logits


def test_attached_sae_is_a_site_and_changes_nothing(llama):
    sae = random_sae(llama.d_model)
    clean = logits(llama)
    with attach(llama, sae, "resid.1"):
        assert llama.sites["sae.resid.1"] == 64
        with llama.capture(["resid.1", "sae.resid.1"]) as cap:
            spliced = logits(llama)
        z, h = cap["sae.resid.1"], cap["resid.1"]
    assert torch.equal(spliced, clean)  # the error term is kept: exactly nothing changes
    assert torch.allclose(z, sae.encode(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], 64))
    assert int((z[0, 0] > 0).sum()) <= 8
    assert "sae.resid.1" not in llama.sites  # detached with the block


def test_unattached_latent_site_says_how_to_attach(llama):
    with pytest.raises(ActlabError, match="attach"):
        llama.resolve(["sae.resid.1"])
    with pytest.raises(ActlabError, match="width"):
        attach(llama, random_sae(llama.d_model + 1), "resid.1")


def test_clamping_a_latent_adds_its_decoder_direction(llama):
    """Clamp latent j to v: the site changes by exactly (v - z_j) W_dec[j] / input_scale at every token."""
    sae = random_sae(llama.d_model)
    with llama.capture("resid.1") as cap:
        logits(llama)
    h = cap["resid.1"].reshape(-1, llama.d_model)
    j, value = int(sae.encode(h).gt(0).sum(0).argmax()), 3.0
    expected = (value - sae.encode(h)[:, j:j + 1]) * sae.W_dec[j].detach() / sae.input_scale
    with attach(llama, sae, "resid.1"), llama.edit(SetChannels("sae.resid.1", [j], value)):
        with llama.capture("resid.1") as cap2:
            logits(llama)
    got = cap2["resid.1"].reshape(-1, llama.d_model) - h
    assert torch.allclose(got, expected, atol=1e-4)


def test_latent_edit_file_matches_the_site_edit_and_round_trips(llama, tmp_path):
    sae = random_sae(llama.d_model)
    with llama.capture("resid.1") as cap:
        logits(llama)
    active = sae.encode(cap["resid.1"].reshape(-1, llama.d_model)).gt(0).sum(0).topk(2).indices.tolist()
    with attach(llama, sae, "resid.1"), llama.edit(SetChannels("sae.resid.1", active, 0.0)):
        via_site = logits(llama)
    edit = latent_edit(sae, "resid.1", active, 0.0, model=llama)
    edit.save(tmp_path / "ablate.safetensors")
    loaded = load_interventions(tmp_path / "ablate.safetensors", llama)
    assert isinstance(loaded, LatentEdit) and loaded.mode == "clamp"
    with llama.edit(loaded):
        via_file = logits(llama)
    clean = logits(llama)
    assert torch.allclose(via_file, via_site, atol=1e-5)
    assert (via_file - clean).abs().max() > 1e-3  # ablating active latents changes the model
    with llama.edit(loaded * 0.0):  # coef scales the clamp value; 0 is still the ablation
        assert torch.allclose(logits(llama), via_file, atol=1e-5)


def test_add_mode_equals_steering_along_the_decoder_row(llama):
    sae = random_sae(llama.d_model)
    with llama.edit(latent_edit(sae, "resid.1", [5], 2.0, mode="add")):
        added = logits(llama)
    with llama.edit(latent_direction(sae, "resid.1", 5, scale=2.0)):
        steered = logits(llama)
    assert torch.allclose(added, steered, atol=1e-4)


def test_transcoder_latent_edit_writes_to_the_mlp_output(llama):
    tc = random_sae(llama.d_model, d_out=llama.d_model, skip=True, seed=3)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.01, generator=torch.Generator().manual_seed(4))
    with llama.capture(["mlp.in.1", "mlp.1"]) as cap:
        logits(llama)
    x, y = (cap[s].reshape(-1, llama.d_model) for s in ("mlp.in.1", "mlp.1"))
    j = int(tc.encode(x).gt(0).sum(0).argmax())
    with llama.edit(latent_edit(tc, "mlp.1", [j], 0.0)), llama.capture("mlp.1") as cap2:
        logits(llama)
    expected = -tc.encode(x)[:, j:j + 1] * tc.W_dec[j].detach() / tc.output_scale
    assert torch.allclose(cap2["mlp.1"].reshape(-1, llama.d_model) - y, expected, atol=1e-4)
    with attach(llama, tc, "mlp.1"), llama.capture("sae.mlp.1") as cap3:
        logits(llama)
    assert torch.allclose(cap3["sae.mlp.1"].reshape(-1, 64), tc.encode(x), atol=1e-5)


def test_spliced_loss_known_answers(llama):
    """An exact SAE recovers 100% with KL 0; an SAE that outputs zeros is the zero-ablation (0% of it)."""
    exact = spliced_loss(llama, identity_sae(llama.d_model), "resid.1", TEXTS)
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["kl"] == pytest.approx(0.0, abs=1e-6)
    assert exact["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_zero"] > exact["ce_clean"] and exact["tokens"] > 10
    null = identity_sae(llama.d_model)
    with torch.no_grad():
        null.W_dec.zero_()
    zero = spliced_loss(llama, null, "resid.1", TEXTS)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero"], abs=1e-5)
    assert zero["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-4)


def test_transcoder_splice_replaces_the_mlp(llama):
    tc = random_sae(llama.d_model, d_out=llama.d_model, seed=5)
    with llama.capture("mlp.in.1") as cap:
        logits(llama)
    with llama.edit(reconstruction(tc, "mlp.1")), llama.capture("mlp.1") as out:
        logits(llama)
    x = cap["mlp.in.1"].reshape(-1, llama.d_model)
    assert torch.allclose(out["mlp.1"].reshape(-1, llama.d_model), tc(x)[0], atol=1e-5)
