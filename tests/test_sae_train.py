"""The SAE trainer's per-tensor rates: the encoder's and its bias's scales of the (decoder's) rate."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ActlabError
from actlab.sae import SAETrainConfig, SparseAutoencoder, train_sae
from actlab.sae.train import _Adam

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
    assert config.encoder_lr_scale == 0.5 and config.encoder_bias_lr_scale == pytest.approx(1 / 9)
    assert config.learning_rate(0) == pytest.approx(1.8e-3 / 2 ** -1.0)  # 4,096 latents: 1.8e-3 / sqrt(1/4)


@pytest.mark.parametrize("field, value", [("encoder_lr_scale", 0.0), ("encoder_lr_scale", -1.0),
                                          ("encoder_bias_lr_scale", -0.1), ("encoder_bias_lr_scale", True)])
def test_bad_scales_are_clear_errors(field, value):
    with pytest.raises(ActlabError, match=field):
        SAETrainConfig(**{field: value}).validate()
