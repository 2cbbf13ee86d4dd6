"""Paste an input-dependent edit by what it does to the donor's last layer, not by its weights.

The closed-form paste (``paste.py``) maps an adapter's read and write directions through the middle-layer
converters. That works for a steering vector, whose direction is one the two models share, but a trained
adapter reads and writes mostly where the other model does not follow (round-trip correlations 0.25–0.6 on
the demo pair), and the pasted adapter then moves the recipient as far as the donor's moves the donor but
not toward the behaviour (docs/transfer.md, issue #12).

``paste_effect`` uses what the converters predict well instead: activations. On the profile texts it runs
the donor with and without its edit and takes the change at the donor's last layer ``δ_D`` (everything the
edit does downstream, through attention to later tokens too, is in it), maps it into the recipient's last
layer with the last-layer converter, ``T = δ_D C_DR``, and fits by ridge regression the affine edit of the
recipient's last layer that predicts ``T`` from the recipient's own activation there. The result is an
``AffineMap`` at the recipient's ``resid.{L−1}``, an ordinary intervention; no gradient is taken. Its size is
then set like ``calibrate_scale`` does: the mean ``‖Δ‖/‖h‖`` of the donor's last-layer change (regression
shrinks a prediction by its R², so without this the paste is about half as large).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from actlab.errors import ActlabError
from actlab.interventions.base import Composition, Intervention
from actlab.interventions.types import AffineMap
from actlab.linalg import LAMBDA_GRID, fit_ridge
from actlab.transfer.converters import ConverterSet
from actlab.transfer.paste import scaled_item
from actlab.transfer.profiles import ActivationProfile

__all__ = ["paste_effect", "edited_last_layer"]


def edited_last_layer(model, edit: Intervention | Composition, profile: ActivationProfile,
                      batch_size: int = 16) -> torch.Tensor:
    """[rows, d] the model's last-layer residual on the profile's texts with ``edit`` on, row for row as in
    ``profile`` (same texts, same positions)."""
    site = f"resid.{model.n_layers - 1}"
    with model.edit(edit):
        batch = model.collect(list(profile.prompts), site, positions=profile.positions, batch_size=batch_size,
                              description=f"{model.name} with the edit")
    out = batch.acts[site].float()
    if out.shape != profile.acts[model.n_layers - 1].shape:
        raise ActlabError(f"the edited run gave {tuple(out.shape)} rows, the profile {tuple(profile.acts[model.n_layers - 1].shape)}: "
                          "profile the donor again on these texts")
    if not torch.isfinite(out).all():
        raise ActlabError(f"{model.name} with the edit has NaN/inf activations on the profile texts: the edit is too large")
    return out


def _rel_size(delta: torch.Tensor, h: torch.Tensor) -> float:
    return float((delta.norm(dim=1) / h.norm(dim=1).clamp_min(1e-12)).mean())


def _as_affine_map(weight: torch.Tensor, bias: torch.Tensor, site: str, identity: dict) -> AffineMap:
    """``h ↦ h W + b`` with ``W`` stored as its thin SVD factors (``U = A S``, ``V = B``), dropping null directions."""
    a, s, bh = torch.linalg.svd(weight.double(), full_matrices=False)
    keep = s > s.max() * 1e-6 if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return AffineMap(site=site, bias=bias.float(), U=(a[:, keep] * s[keep]).float().contiguous(),
                     V=bh[keep].T.float().contiguous(), model=identity)


def paste_effect(donor, recipient, donor_edit: Intervention | Composition, converters: ConverterSet,
                 donor_profile: ActivationProfile, recipient_profile: ActivationProfile, *,
                 lambdas=LAMBDA_GRID, calibrate: bool = True, batch_size: int = 16) -> AffineMap:
    """The recipient edit at its last layer whose change there predicts the donor edit's (module docstring).

    ``params`` records ``method`` ("effect"), the held-out ``effect_r2`` of the regression (the share of the
    mapped donor change it reproduces: the paste's expected fidelity), λ, the sizes and the calibration."""
    start = time.perf_counter()
    d_last, r_last = donor.n_layers - 1, recipient.n_layers - 1
    if converters.layer_map.get(d_last) != r_last:
        raise ActlabError(f"the converters map donor layer {d_last} to {converters.layer_map.get(d_last)}, not to the "
                          f"recipient's last layer {r_last}: fit them with the last layers matched (the default map)")
    if donor_profile.prompts_hash != recipient_profile.prompts_hash or donor_profile.positions != recipient_profile.positions:
        raise ActlabError("the donor and recipient profiles were made on different texts or positions; profile both "
                          "on the same texts")
    h_d, h_r = donor_profile.acts[d_last], recipient_profile.acts[r_last]
    delta = edited_last_layer(donor, donor_edit, donor_profile, batch_size).double() - h_d.double()
    target = delta @ converters.to_recipient[d_last].weight.double()
    fit = fit_ridge(h_r, target, lambdas=lambdas)
    bias = fit.y_mean - fit.x_mean @ fit.weight
    params = {"method": "effect", "effect_r2": round(float(fit.r2), 4), "lambda": fit.lam,
              "donor_site": f"resid.{d_last}", "donor_rel_change": round(_rel_size(delta, h_d.double()), 4),
              "expected_ratio": round(max(0.0, float(fit.r2)) ** 0.5, 4)}
    pasted = _as_affine_map(fit.weight, bias, f"resid.{r_last}", recipient.identity())
    have = _rel_size(pasted.delta(h_r.float()).double(), h_r.double())
    params["pasted_rel_change_before_calibration"] = round(have, 4)
    if calibrate and have > 0:
        factor = params["donor_rel_change"] / have
        pasted = scaled_item(pasted, factor)
        params["scale_calibration"] = round(factor, 4)
    params["seconds"] = round(time.perf_counter() - start, 3)
    return dataclasses.replace(pasted, params=params)
