"""The SAE trainer's per-tensor rates (the encoder's and its bias's scales of the decoder's rate) and the
revival of silent latents."""

from __future__ import annotations

import copy

import pytest
import torch

from actlab.errors import ActlabError
from actlab.sae import SAETrainConfig, SparseAutoencoder, train_sae
from actlab.sae.model import encoder_input
from actlab.sae.train import SAETrainer, _Adam

torch.set_num_threads(1)


def test_adam_scales_multiply_each_tensors_step_exactly():
    # The same gradients, one optimiser with scales and one without: W_enc's and b_enc's steps are the scaled
    # ones (0.5 and 0.25 are powers of two: the products are exact), every other tensor's the same.
    def stepped(scales):
        sae = SparseAutoencoder(4, 8, "topk", 2)
        with torch.no_grad():
            for p in sae.parameters():
                p.zero_()
        g = torch.Generator().manual_seed(1)
        for p in sae.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        _Adam(sae, True, scales).step(1e-3)
        return {k: v.detach().clone() for k, v in sae.named_parameters()}

    plain, scaled = stepped(None), stepped({"W_enc": 0.5, "b_enc": 0.25})
    assert torch.equal(scaled["W_enc"], plain["W_enc"] * 0.5)
    assert torch.equal(scaled["b_enc"], plain["b_enc"] * 0.25)
    assert torch.equal(scaled["W_dec"], plain["W_dec"]) and torch.equal(scaled["b_dec"], plain["b_dec"])
    assert not torch.equal(plain["b_enc"], torch.zeros(8))


def test_encoder_bias_scale_zero_keeps_the_bias_at_zero_and_the_defaults_train_it():
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(2))
    options = dict(n_latents=64, k=4, batch_size=256, steps=5)
    frozen = train_sae(x, 16, encoder_bias_lr_scale=0.0, **options).sae
    assert torch.equal(frozen.b_enc.detach(), torch.zeros(64))
    default = train_sae(x, 16, **options).sae
    assert not torch.equal(default.b_enc.detach(), torch.zeros(64))
    config = SAETrainConfig()
    assert config.encoder_lr_scale == 0.5 and config.encoder_bias_lr_scale == pytest.approx(1 / 12)
    assert config.learning_rate(0) == pytest.approx(2.4e-3 / 2 ** -1.0)  # 4,096 latents: 2.4e-3 / sqrt(1/4)


@pytest.mark.parametrize("field, value", [("encoder_lr_scale", 0.0), ("encoder_lr_scale", -1.0),
                                          ("encoder_bias_lr_scale", -0.1), ("encoder_bias_lr_scale", True),
                                          ("revive_after", -1), ("revive_after", 0.5)])
def test_bad_scales_are_clear_errors(field, value):
    with pytest.raises(ActlabError, match=field):
        SAETrainConfig(**{field: value}).validate()


def _one_step(kind: str, revive_after: int, silent: list[int], x: torch.Tensor):
    """(the SAE before, the SAE after) one step on ``x`` whose latents ``silent`` have been silent 10**6 tokens."""
    trainer = SAETrainer(x, 16, SAETrainConfig(n_latents=64, k=4, kind=kind, batch_size=256, steps=3,
                                               revive_after=revive_after))
    with torch.no_grad():
        trainer.run.sae.b_enc[silent] -= 3.0  # far below any row's k-th value
    before = copy.deepcopy(trainer.run.sae)
    trainer.run.since_fired[silent] = 10 ** 6
    trainer.step((x, x))
    return before, trainer.run.sae


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_a_silent_latents_bias_rises_by_exactly_what_its_best_token_lacked(kind):
    # Two runs from the same start on the same batch, one reviving: they differ only in the silent latents'
    # b_enc, by the gap computed here from dense pre-activations with the weights before the step.
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    silent = [5, 17, 40]
    start, plain = _one_step(kind, 0, silent, x)
    _, revived = _one_step(kind, 1000, silent, x)
    revived_params = dict(revived.named_parameters())
    for name, value in plain.named_parameters():
        if name != "b_enc":
            assert torch.equal(value, revived_params[name]), name
    with torch.no_grad():
        pre = encoder_input(start, x) @ start.W_enc + start.b_enc
        if kind == "topk":  # a latent fires where it beats its row's k-th value (and 0)
            threshold = pre.topk(4, dim=1).values[:, -1:].clamp_min(0)
        else:  # BatchTopK: the batch's (k * rows)-th value
            threshold = pre.reshape(-1).topk(4 * 256).values[-1].clamp_min(0)
        gap = (pre[:, silent] - threshold).amax(0)
    assert bool((gap < 0).all()), gap  # these latents miss on every token of the batch
    delta = (revived.b_enc - plain.b_enc).detach()
    others = [j for j in range(64) if j not in silent]
    assert torch.equal(delta[others], torch.zeros(len(others)))
    torch.testing.assert_close(delta[silent], -gap, atol=1e-6, rtol=1e-5)


def test_revival_keeps_every_latent_of_an_overcomplete_dictionary_firing_on_held_out_tokens():
    # 32 atoms with Zipf frequencies, 256 latents: without revival some latents fall silent for good; with it a
    # latent silent for 4,096 tokens is raised until it fires, so every latent fires on 65k fresh tokens.
    g = torch.Generator().manual_seed(4)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
    freq = 1.0 / torch.arange(1, 33).float()

    def sample(n):
        on = torch.rand(n, 32, generator=g) < (freq / freq.sum() * 3).clamp_max(1)
        return (on.float() * (torch.rand(n, 32, generator=g) + 0.5)) @ atoms + 0.01 * torch.randn(n, 16, generator=g)

    train, test = sample(65536), sample(65536)
    dead = {}
    for after in (0, 4096):
        sae = train_sae(train, 16, revive_after=after, n_latents=256, k=4, batch_size=1024, steps=192).sae
        with torch.no_grad():
            dead[after] = int(((sae(test)[1] > 0).sum(0) == 0).sum())
    assert dead[4096] == 0 and dead[0] >= 3, dead

