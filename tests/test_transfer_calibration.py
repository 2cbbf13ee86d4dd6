"""Effect calibration of pasted edits: KL on the predictions, matched between donor and recipient."""

from __future__ import annotations

import itertools

import pytest
import torch

from actlab.errors import ActlabError
from actlab.interventions.types import AffineMap, SteeringVector
from actlab.transfer.calibration import _scaled, calibrate_effect, calibration_ids, mean_kl, mean_shift
from tiny_models import tiny_model

TEXTS = [f"text number {i} says something about the weather and the sea" for i in range(12)]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_model("llama")


def _affine(model, seed: int = 0, size: float = 1.0) -> AffineMap:
    gen = torch.Generator().manual_seed(seed)
    d = model.sites["resid.1"]
    return AffineMap(site="resid.1", coef=1.0, positions="all", model=model.identity(), params={},
                     bias=size * torch.randn(d, generator=gen), U=size * torch.randn(d, 2, generator=gen) / d**0.5,
                     V=torch.linalg.qr(torch.randn(d, 2, generator=gen))[0])


def test_mean_kl_is_the_per_token_kl_of_the_edited_predictions(llama):
    ids = calibration_ids(llama, TEXTS, n_texts=4, n_tokens=16)
    assert ids.shape == (4, 16)
    edit = _affine(llama)
    with torch.no_grad():
        p = torch.log_softmax(llama(ids).logits.double(), -1)
        with llama.edit(edit):
            q = torch.log_softmax(llama(ids).logits.double(), -1)
    want = torch.nn.functional.kl_div(p, q, log_target=True, reduction="none").sum(-1).mean()  # KL(q ‖ p)
    assert mean_kl(llama, edit, ids) == pytest.approx(float(want), rel=1e-4)
    zero = _scaled(edit, 0.0)
    assert mean_kl(llama, zero, ids) == pytest.approx(0.0, abs=1e-6)


def test_a_paste_at_the_wrong_scale_is_brought_back_to_the_donor_effect(llama):
    """Donor and recipient the same model, the 'paste' the donor edit at half (or twice) its size: the
    calibration must find the factor back (2, or 0.5), since only that scale gives the donor's KL."""
    edit = _affine(llama, size=0.01)  # the tiny model's stream has norm ~0.1: stay where KL grows with the scale
    ids = calibration_ids(llama, TEXTS)
    target = mean_kl(llama, edit, ids)
    b = mean_shift(llama, edit, ids)
    for (shrink, want), measure in itertools.product(((0.5, 2.0), (2.0, 0.5)), ("kl", "shift")):
        out = calibrate_effect(llama, llama, edit, _scaled(edit, shrink), TEXTS, measure=measure, steps=6)
        record = out.params["effect_calibration"]
        assert record["target"] == pytest.approx(target if measure == "kl" else float(b @ b), rel=1e-4)
        assert record["factor"] == pytest.approx(want, rel=0.02)
        assert mean_kl(llama, out, ids) == pytest.approx(target, rel=0.03)
        assert torch.allclose(out.V, edit.V)  # directions untouched, only the size
        assert torch.allclose(out.bias, edit.bias * shrink * record["factor"], atol=1e-6)


def test_vectors_scale_too_and_bad_input_is_refused(llama):
    vec = SteeringVector(site="resid.1", vector=torch.ones(llama.sites["resid.1"]), coef=1.0, positions="all",
                         model=llama.identity(), params={})
    assert torch.equal(_scaled(vec, 3.0).vector, 3 * vec.vector)
    # the shift sums to zero over the vocabulary (a change of a distribution)
    assert abs(float(mean_shift(llama, _affine(llama), calibration_ids(llama, TEXTS)).sum())) < 1e-6
    # a paste that moves the predictions against the donor's way is left alone (no scale can fix a direction)
    edit = _affine(llama, size=0.01)
    flipped = calibrate_effect(llama, llama, edit, _scaled(edit, -1.0), TEXTS)
    assert flipped.params["effect_calibration"]["factor"] == 1.0 and flipped.params["effect_calibration"]["before"] < 0
    with pytest.raises(ActlabError, match="'shift' or 'kl'"):
        calibrate_effect(llama, llama, edit, edit, TEXTS, measure="size")
    with pytest.raises(ActlabError, match="no calibration text"):
        calibration_ids(llama, ["short"], n_tokens=32)


def test_paste_between_calibrates_a_pasted_map_by_its_effect(tmp_path):
    """The pipeline option: the pasted map's KL on the recipient ends at the donor edit's KL on the donor."""
    import actlab
    from actlab.transfer import paste_between
    from tiny_models import ByteTokenizer, tiny_hf_model

    torch.manual_seed(1)
    donor = actlab.load(tiny_hf_model("gpt2"), tokenizer=ByteTokenizer())
    recipient = actlab.load(tiny_hf_model("qwen2"), tokenizer=ByteTokenizer())
    edit = _affine(donor, size=0.01)
    texts = TEXTS * 5
    result = paste_between(donor, recipient, edit, texts, cache_dir=tmp_path, calibrate_effect="kl")
    record = result.pasted.params["effect_calibration"]
    target = mean_kl(donor, edit, calibration_ids(donor, texts))
    assert record["measure"] == "kl" and record["target"] == pytest.approx(target, rel=1e-4)
    assert mean_kl(recipient, result.pasted, calibration_ids(recipient, texts)) == pytest.approx(record["reached"], rel=1e-4)
    assert "effect_calibration" not in paste_between(donor, recipient, edit, texts, cache_dir=tmp_path).pasted.params
    with pytest.raises(ActlabError, match="calibrate_effect must be"):
        paste_between(donor, recipient, edit, texts, cache_dir=tmp_path, calibrate_effect="size")
