"""Paste a donor intervention into a recipient: Δ_R(h_R) = Δ_D(C_RD(h_R)) · C_DR.

Every additive intervention actlab has is affine in h, so the pasted one has a closed form in
the recipient's own space and is an ordinary Intervention (saved, composed, applied as usual):

- steering vector v:           Δ_R = v C_DR (a constant: a SteeringVector)
- affine Δ_D = h·diag + hUVᵀ + b, with h_D = h_R C + c (C = C_RD weight, c its offset):
      Δ_R = h_R (C·diag) C_DR + h_R (C U)(C_DRᵀ V)ᵀ + (c·diag + c U Vᵀ + b) C_DR  (an AffineMap)
- low-rank adapter Rᵀ(W h + b − R h) is the affine map with U = (W − R)ᵀ, V = Rᵀ, bias = b R.

Differences map through the converter's weight only: offsets cancel in h' − h.

**De-attenuation** (``deattenuate=True``, the default). C_DR is a regression of h_R on h_D, so the
change it predicts for a donor shift δ is E[Δh_R | Δh_D = δ], which is shrunk wherever h_D varies in
ways h_R does not follow (errors in variables) and by the ridge penalty: measured on the demo pair,
a pasted steering vector pointed the right way (cosine 0.94 with the recipient's own) but was only
0.79 as long. The round trip u ↦ u C_DR C_RD multiplies a direction by the product of the two
regressions' slopes along it (for one variable, b_yx·b_xy = ρ²), so dividing the forward map by the
square root of that round trip gives the geometric-mean ("reduced major axis") slope, which is
symmetric in the two models and unbiased by noise on either side. It is applied on the subspace the
donor edit writes to (the vector's direction; an adapter's ``R`` rows and bias), with the gain
capped at ``max_gain``. Under an exact change of basis the round trip is the identity and nothing
changes. The input side (h_R C + c) needs no correction: for an affine edit, feeding the regression's
E[h_D | h_R] gives E[Δ_D | h_R] exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from actlab.errors import ActlabError
from actlab.interventions.base import Composition, Intervention
from actlab.interventions.types import AffineMap, LowRankAdapter, SteeringVector
from actlab.transfer.converters import ConverterSet


def _donor_layer(site: str) -> int:
    if not site.startswith("resid."):
        raise ActlabError(f"only residual-stream interventions (resid.{{i}}) can be pasted, not '{site}'")
    return int(site.split(".")[1])


def adapter_as_affine(adapter: LowRankAdapter) -> AffineMap:
    """The LoReFT adapter written as an affine map with the same delta."""
    R, W, b = adapter.R.float(), adapter.W.float(), adapter.b.float()
    return AffineMap(site=adapter.site, coef=adapter.coef, positions=adapter.positions, model=adapter.model,
                     params=dict(adapter.params), bias=b @ R, U=(W - R).T.contiguous(), V=R.T.contiguous())


DEFAULT_MAX_GAIN = 1.5  # chosen on the tuning prompts: see docs/transfer.md


def _edit_subspace(directions: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis [d_D, k] of the span of ``directions`` ([k, d_D] rows), or None if they are all zero."""
    d = directions.double()
    d = d[d.norm(dim=1) > 0]
    if d.shape[0] == 0:
        return None
    u, s, _ = torch.linalg.svd(d.T, full_matrices=False)
    return u[:, s > s.max() * 1e-6]


def _round_trip(converters: ConverterSet, donor_layer: int,
                directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Q, eigenvalues, eigenvectors)`` of the round trip u ↦ u C_DR C_RD restricted to the span of
    ``directions`` (Q its orthonormal basis), or None when the directions are all zero."""
    Q = _edit_subspace(directions)
    if Q is None:
        return None
    C_dr = converters.to_recipient[donor_layer].weight.double()
    C_rd = converters.to_donor[donor_layer].weight.double()
    K = Q.T @ C_dr @ C_rd @ Q
    evals, evecs = torch.linalg.eigh((K + K.T) / 2)
    return Q, evals, evecs


def shared_basis(converters: ConverterSet, donor_layer: int, m: int) -> torch.Tensor:
    """[m, d_D]: the donor directions the recipient follows best (orthonormal rows), the top-``m``
    eigenvectors of the round trip u ↦ u C_DR C_RD over the whole donor space. A donor edit kept inside
    them writes where the converters can carry it (docs/transfer.md, session 23)."""
    if donor_layer not in converters.layer_map:
        raise ActlabError(f"no converter for donor layer {donor_layer}; converters cover donor layers "
                          f"{sorted(converters.layer_map)}")
    width = converters.to_recipient[donor_layer].weight.shape[0]
    if not 1 <= m <= width:
        raise ActlabError(f"a shared subspace needs 1 to {width} directions, not {m}")
    Q, evals, evecs = _round_trip(converters, donor_layer, torch.eye(width))
    return (Q @ evecs[:, evals.argsort(descending=True)[:m]]).T.float().contiguous()


def shared_correlations(converters: ConverterSet, donor_layer: int, directions: torch.Tensor) -> list[float]:
    """√ of the round trip u ↦ u C_DR C_RD's eigenvalues on the span of ``directions``: per direction, how
    much of the donor's variation there the recipient follows (1 under a change of basis; for one variable
    the correlation ρ, since b_yx·b_xy = ρ²)."""
    trip = _round_trip(converters, donor_layer, directions)
    return [] if trip is None else [round(float(x), 4) for x in trip[1].clamp(0.0, 1.0).sqrt()]


def expected_ratio(shared: list[float], gains: list[float] | None) -> float:
    """The fraction of the donor edit's length the paste carries, per direction ρ·g capped at 1, averaged:
    the plain paste carries ρ along a direction both models read with equal reliability, the de-attenuated
    one ρ·g (1 unless the gain cap binds). docs/transfer.md compares it with measured effect ratios."""
    if not shared:
        return 1.0
    gains = gains or [1.0] * len(shared)
    return round(sum(min(1.0, r * g) for r, g in zip(shared, gains)) / len(shared), 4)


def deattenuated_map(converters: ConverterSet, donor_layer: int, directions: torch.Tensor,
                     max_gain: float = DEFAULT_MAX_GAIN) -> tuple[torch.Tensor, list[float]]:
    """C_DR with its gain restored on the span of ``directions`` ([k, d_D] rows): returns the
    [d_D, d_R] output map and the gains applied (1/√ of the round trip's eigenvalues, ≤ ``max_gain``),
    in the order of ``shared_correlations``."""
    C_dr = converters.to_recipient[donor_layer].weight.double()
    trip = _round_trip(converters, donor_layer, directions)
    if trip is None:
        return C_dr.float(), []
    Q, evals, evecs = trip
    gains = evals.clamp(min=1.0 / max_gain**2, max=1.0).rsqrt()
    P = Q @ evecs @ torch.diag(gains - 1) @ evecs.T @ Q.T  # I + P scales the subspace, leaves the rest
    return (C_dr + P @ C_dr).float(), [round(float(g), 4) for g in gains]


def _write_directions(item: SteeringVector | AffineMap) -> torch.Tensor:
    """The directions an additive edit writes to, as rows: a vector's direction, an affine map's V columns and bias."""
    if isinstance(item, SteeringVector):
        return item.vector.float()[None]
    if item.diag is not None:  # writes everywhere
        return torch.eye(item.width)
    return item.bias.float()[None] if item.V is None else torch.cat([item.V.float().T, item.bias.float()[None]])


def _paste_one(item: Intervention, converters: ConverterSet, recipient_identity: dict, deattenuate: bool = True,
               max_gain: float = DEFAULT_MAX_GAIN) -> Intervention:
    d = _donor_layer(item.site)
    if d not in converters.layer_map:
        raise ActlabError(f"no converter for donor layer {d}; converters cover donor layers {sorted(converters.layer_map)}"
                          " (fit them with a --map that includes it)")
    r = converters.layer_map[d]
    to_d, to_r = converters.to_donor[d], converters.to_recipient[d]
    C, C_dr = to_d.weight.float(), to_r.weight.float()  # [d_R, d_D], [d_D, d_R]
    c = to_d.y_mean.float() - to_d.x_mean.float() @ C  # h_D = h_R C + c
    params = {
        "pasted_from": {"model": item.model, "site": item.site, "kind": item.kind, "params": item.params},
        "converter_r2_to_donor": to_d.r2, "converter_r2_to_recipient": to_r.r2,
    }
    site = f"resid.{r}"
    if isinstance(item, SteeringVector) and item.norm_preserving:
        raise ActlabError("a norm-preserving steering vector is not affine and cannot be pasted exactly; "
                          "paste the plain vector and set norm_preserving on the result")
    if isinstance(item, LowRankAdapter):
        item = adapter_as_affine(item)
    if not isinstance(item, (SteeringVector, AffineMap)):
        raise ActlabError(f"cannot paste a {item.kind}: only steering vectors, affine maps and low-rank adapters "
                          "act on the residual stream additively")
    writes = _write_directions(item)
    shared, gains = shared_correlations(converters, d, writes), None
    if deattenuate:
        C_dr, gains = deattenuated_map(converters, d, writes, max_gain)
        params["deattenuation"] = {"max_gain": max_gain, "gains": gains}
    params["shared_correlations"] = shared
    params["expected_ratio"] = expected_ratio(shared, gains)
    if isinstance(item, SteeringVector):
        return SteeringVector(site=site, vector=item.vector.float() @ C_dr, coef=item.coef, positions=item.positions,
                              model=recipient_identity, params=params)
    Us, Vs = [], []
    bias_d = item.bias.float().clone()
    if item.diag is not None:
        diag = item.diag.float()
        Us.append(C * diag)
        Vs.append(C_dr.T)
        bias_d = bias_d + c * diag
    if item.U is not None:
        U, V = item.U.float(), item.V.float()
        Us.append(C @ U)
        Vs.append(C_dr.T @ V)
        bias_d = bias_d + (c @ U) @ V.T
    return AffineMap(site=site, coef=item.coef, positions=item.positions, model=recipient_identity, params=params,
                     bias=bias_d @ C_dr, U=torch.cat(Us, 1) if Us else None, V=torch.cat(Vs, 1) if Vs else None)


def paste(intervention: Intervention | Composition, converters: ConverterSet, recipient=None, *,
          deattenuate: bool = True, max_gain: float = DEFAULT_MAX_GAIN) -> Intervention | Composition:
    """The donor ``intervention`` expressed as a recipient intervention (same coefficient and positions).

    ``deattenuate`` restores the gain the regression converters lose along the edit's directions
    (module docstring); ``False`` gives the plain Δ_D(h_R C + c) C_DR of the Command-V paper."""
    donor_hash = converters.donor.get("config_hash")
    items = intervention.edits()
    for item in items:
        made_for = item.model.get("config_hash")
        if made_for and donor_hash and made_for != donor_hash:
            raise ActlabError(f"the intervention was made for {item.model.get('model_name')}, but the converters' donor "
                              f"is {converters.donor.get('model_name')}")
    identity = recipient.identity() if recipient is not None else converters.recipient
    if recipient is not None and converters.recipient.get("config_hash") not in (None, recipient.config_hash):
        raise ActlabError(f"these converters were fitted for recipient {converters.recipient.get('model_name')}, "
                          f"not {recipient.name}")
    if not max_gain >= 1.0:
        raise ActlabError(f"max_gain must be at least 1 (1 turns the de-attenuation off), not {max_gain}")
    pasted = [_paste_one(item, converters, identity, deattenuate, max_gain) for item in items]
    return pasted[0] if len(pasted) == 1 else Composition(pasted)


def mean_rel_change(item: Intervention, h: torch.Tensor) -> float:
    """Mean ``‖coef · Δ(h)‖ / ‖h‖`` over the rows of ``h``: how far the edit moves the stream it edits."""
    with torch.no_grad():
        return float(((item.coef * item.delta(h)).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).mean())


def scaled_item(item: Intervention, factor: float) -> Intervention:
    """An additive edit with its change multiplied by ``factor``, in the weights (so coefficient 1 stays
    "the donor's edit"): an affine map's bias, diagonal and U, a steering vector's vector."""
    if isinstance(item, AffineMap):
        return dataclasses.replace(item, bias=item.bias * factor, diag=None if item.diag is None else item.diag * factor,
                                   U=None if item.U is None else item.U * factor)
    if isinstance(item, SteeringVector):
        return dataclasses.replace(item, vector=item.vector * factor)
    raise ActlabError(f"cannot scale a {item.kind}: only steering vectors and affine maps")


def calibrate_scale(donor_edit, pasted, donor_profile, recipient_profile) -> Intervention | Composition:
    """Pasted affine edits (adapters) rescaled so that their mean ‖Δ‖/‖h‖ on the recipient's profile rows equals
    the donor edit's on the donor's; steering vectors are left to the de-attenuated converters.

    Why: an adapter's write subspace is found by the LM loss from a random start and lies mostly in directions
    the other model does not share (round-trip correlations 0.25–0.6 on the demo pair, so the de-attenuation
    gain is capped), and then the converters cannot tell how long the pasted change should be — llama → gpt2
    pastes came out at half the donor's relative size, gpt2 → llama at 1.3×. The size of an edit relative to
    the stream it edits is the scale both models agree on. A vector's direction is shared (ρ ≈ 0.8–0.95) and
    its de-attenuated length already matches the recipient's own (docs/transfer.md)."""
    out = []
    for d_item, r_item in zip(donor_edit.edits(), pasted.edits()):
        if isinstance(r_item, AffineMap):
            h_d = donor_profile.acts[int(d_item.site.split(".")[1])]
            h_r = recipient_profile.acts[int(r_item.site.split(".")[1])]
            have = mean_rel_change(r_item, h_r)
            factor = mean_rel_change(d_item, h_d) / have if have > 0 else 1.0
            r_item = scaled_item(r_item, factor)
            r_item = dataclasses.replace(r_item, params=dict(r_item.params) | {"scale_calibration": round(factor, 4)})
        out.append(r_item)
    return out[0] if len(out) == 1 else Composition(out)


def predicted_effect(donor_edit, pasted, donor_profile, recipient_profile, converters: ConverterSet) -> list[dict]:
    """Per pasted item: mean ‖Δ‖/‖h‖ on the profile rows, in the donor and (pasted) in the recipient.

    Similar ratios mean the paste moves the recipient about as far, relative to its own stream,
    as the original moves the donor.
    """
    rows = []
    for d_item, r_item in zip(donor_edit.edits(), pasted.edits()):
        d_layer, r_layer = int(d_item.site.split(".")[1]), int(r_item.site.split(".")[1])
        h_d, h_r = donor_profile.acts[d_layer], recipient_profile.acts[r_layer]
        donor_rel = mean_rel_change(d_item, h_d)
        if r_item.params.get("method") == "effect":  # pasted by its change at the last layer: compare there
            d_layer = int(r_item.params["donor_site"].split(".")[1])
            donor_rel = r_item.params["donor_rel_change"]
        rows.append({"donor_site": d_item.site, "recipient_site": r_item.site, "kind": d_item.kind,
                     "donor_rel_norm": donor_rel, "recipient_rel_norm": mean_rel_change(r_item, h_r),
                     "expected_ratio": r_item.params.get("expected_ratio"),
                     "r2_to_donor": converters.to_donor[d_layer].r2,
                     "r2_to_recipient": converters.to_recipient[d_layer].r2})
    return rows
