"""``shared_basis``: the donor directions a recipient follows, from the converters' round trip."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ActlabError
from actlab.transfer.converters import fit_converters
from actlab.transfer.paste import shared_basis, shared_correlations
from actlab.transfer.profiles import ActivationProfile


def _profile(h: torch.Tensor, name: str) -> ActivationProfile:
    n = h.shape[0]
    return ActivationProfile(acts={0: h}, model={"model_name": name}, prompts=[str(i) for i in range(n)],
                             positions="last", row_prompt=torch.arange(n))


def test_the_shared_basis_is_the_span_the_recipient_follows():
    # The recipient carries a rotation of the donor's plane (e0, e1) (noise 0.1) and nothing of the other
    # six donor dimensions: the round trip is ~1 on the plane and ~0 off it, so the top-2 basis is the plane.
    g = torch.Generator().manual_seed(0)
    n = 4000
    h_d = torch.randn(n, 8, generator=g)
    rot = torch.linalg.qr(torch.randn(2, 2, generator=g))[0]
    h_r = torch.cat([h_d[:, :2] @ rot + 0.1 * torch.randn(n, 2, generator=g), torch.randn(n, 5, generator=g)], 1)
    conv = fit_converters(_profile(h_d, "donor"), _profile(h_r, "recipient"), lambdas=[1e-3])
    basis = shared_basis(conv, 0, 2)
    assert basis.shape == (2, 8)
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    plane = torch.eye(8)[:2]
    assert torch.allclose((basis @ plane.T).norm(dim=0), torch.ones(2), atol=0.02)  # spans e0, e1
    inside, outside = shared_correlations(conv, 0, basis), shared_correlations(conv, 0, torch.eye(8)[2:])
    assert min(inside) > 0.98 and max(outside) < 0.1
    with pytest.raises(ActlabError, match="1 to 8 directions"):
        shared_basis(conv, 0, 9)
    with pytest.raises(ActlabError, match="no converter for donor layer 3"):
        shared_basis(conv, 3, 2)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_shared_subspace_is_a_clear_error(value):
    from actlab.experiments.transfer_eval import TransferEvalConfig

    with pytest.raises(ActlabError, match="adapter_shared_subspace"):
        TransferEvalConfig(adapter_shared_subspace=value).validate()
