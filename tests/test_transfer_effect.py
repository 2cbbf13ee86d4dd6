"""Pasting an adapter by its effect on the last layer (``actlab.transfer.effect_paste``), on known answers.

The recipient is the donor in another orthonormal basis (``known_pairs.rotated_copy``: h' = h Q), so the
right paste of any donor edit makes the recipient's last layer change by the donor's change times Q.
For an adapter *at* the last layer that change is affine in the activation there, and the regression must
recover it exactly; for one in the middle the change is not affine (it passes through later layers), and
the regression is checked against the answer on rows it did not see.
"""

from __future__ import annotations

import pytest
import torch

import actlab
from actlab.errors import ActlabError
from actlab.experiments.genre_data import default_profile_prompts
from actlab.experiments.known_pairs import rotated_copy
from actlab.interventions.adapter_train import init_adapter
from actlab.interventions.types import LowRankAdapter
from actlab.linalg import LAMBDA_GRID
from actlab.transfer import fit_converters, paste_between, profile_model
from actlab.transfer.effect_paste import edited_last_layer, paste_effect
from tiny_models import ByteTokenizer, tiny_hf_model


@pytest.fixture(scope="module")
def pair():
    donor = actlab.load(tiny_hf_model("llama"), tokenizer=ByteTokenizer())
    recipient, q = rotated_copy(donor, seed=1)
    texts = default_profile_prompts()[::40][:60]
    d_prof, r_prof = (profile_model(m, texts, positions="all") for m in (donor, recipient))
    converters = fit_converters(d_prof, r_prof, lambdas=LAMBDA_GRID)  # the whole grid: C_DR ≈ Q here
    return donor, recipient, q, d_prof, r_prof, converters


def _adapter(model, site: str, scale: float, seed: int = 0) -> LowRankAdapter:
    """A random adapter whose change is ~``scale`` of the stream it edits."""
    a = init_adapter(model, site, rank=3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    a.W = a.R + scale * torch.randn(a.R.shape, generator=gen)
    a.b = scale * torch.randn(a.rank, generator=gen)
    return a


def test_an_adapter_at_the_last_layer_pastes_exactly(pair):
    donor, recipient, q, d_prof, r_prof, converters = pair
    last = donor.n_layers - 1
    edit = _adapter(donor, f"resid.{last}", 0.5)
    pasted = paste_effect(donor, recipient, edit, converters, d_prof, r_prof, calibrate=False)
    assert pasted.site == f"resid.{recipient.n_layers - 1}" and pasted.params["method"] == "effect"
    want = edit.delta(d_prof.acts[last]) @ q
    got = pasted.delta(r_prof.acts[last])
    # an affine change regressed on the activation it is a function of: exact up to float32 rounding
    assert float((got - want).norm() / want.norm()) < 1e-3
    assert pasted.params["effect_r2"] > 0.999
    calibrated = paste_effect(donor, recipient, edit, converters, d_prof, r_prof)
    assert calibrated.params["scale_calibration"] == pytest.approx(1.0, abs=1e-3)  # sizes already agree


def test_a_middle_layer_adapter_pastes_its_downstream_change(pair):
    donor, recipient, q, d_prof, r_prof, converters = pair
    edit = _adapter(donor, "resid.1", 0.2, seed=2)
    pasted = paste_effect(donor, recipient, edit, converters, d_prof, r_prof, calibrate=False)
    # rows it was not fitted on: new texts, and the answer is the donor's own last-layer change, rotated
    texts = default_profile_prompts()[7::40][:30]
    d_new, r_new = (profile_model(m, texts, positions="all") for m in (donor, recipient))
    last = donor.n_layers - 1
    want = (edited_last_layer(donor, edit, d_new) - d_new.acts[last]) @ q
    got = pasted.delta(r_new.acts[last])
    r2 = 1 - float(((got - want) ** 2).sum() / ((want - want.mean(0)) ** 2).sum())
    # not exact (the change passes through nonlinear layers), but most of it is predicted, as the fit said
    # (measured: R² 0.953 on these new texts, 0.956 reported by the fit)
    assert r2 > 0.5 and abs(r2 - pasted.params["effect_r2"]) < 0.2, (r2, pasted.params["effect_r2"])
    with recipient.edit(pasted):  # and it is an ordinary recipient edit: applying it moves the last layer so
        moved = recipient.collect(texts, f"resid.{last}", positions="all").acts[f"resid.{last}"]
    torch.testing.assert_close(moved - r_new.acts[last], got, atol=1e-4, rtol=1e-4)


def test_paste_between_pastes_adapters_by_effect_and_vectors_in_closed_form(pair):
    donor, recipient, *_ = pair
    texts = default_profile_prompts()[::40][:60]
    adapter = _adapter(donor, "resid.1", 0.2)
    by_effect = paste_between(donor, recipient, adapter, texts)
    assert by_effect.pasted.params["method"] == "effect" and by_effect.pasted.site == f"resid.{recipient.n_layers - 1}"
    by_weights = paste_between(donor, recipient, adapter, texts, adapter_paste="weights")
    assert by_weights.pasted.site == "resid.1" and "method" not in by_weights.pasted.params or \
        by_weights.pasted.params.get("method") != "effect"
    vector = actlab.interventions.SteeringVector("resid.1", vector=torch.ones(donor.d_model), model=donor.identity())
    assert paste_between(donor, recipient, vector, texts).pasted.site == "resid.1"
    with pytest.raises(ActlabError, match="adapter_paste must be one of"):
        paste_between(donor, recipient, adapter, texts, adapter_paste="logits")


def test_effect_paste_refuses_mismatched_inputs(pair):
    donor, recipient, q, d_prof, r_prof, converters = pair
    edit = _adapter(donor, "resid.1", 0.2)
    partial = fit_converters(d_prof, r_prof, layer_map={0: 0, 1: 1})
    with pytest.raises(ActlabError, match="recipient's last layer"):
        paste_effect(donor, recipient, edit, partial, d_prof, r_prof)
    other = profile_model(recipient, default_profile_prompts()[1::40][:20], positions="all")
    with pytest.raises(ActlabError, match="different texts"):
        paste_effect(donor, recipient, edit, converters, d_prof, other)
