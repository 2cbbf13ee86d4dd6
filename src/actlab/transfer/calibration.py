"""Calibrate a pasted edit by what it does to the recipient's predictions, not by its size.

Why: two models move their residual streams by different relative amounts for the same behaviour. On the
demo pair, demo-gpt2's own adapters change its stream by 0.29–0.47 of its norm and demo-llama's by
0.19–0.26 for the same genres, so a paste sized to the donor's relative change (``calibrate_scale``) came
out too small in demo-gpt2 and too large in demo-llama (pasted/direct 0.12–0.65 one way, 1.2–1.45 the
other: docs/transfer.md). What both models share is their output space (the same tokenizer), so the
scale both agree on is the edit's effect on the next-token distribution: the mean per-token
KL(p_edited ‖ p) over calibration texts, or better the part of the change of the average next-token
distribution that goes the donor edit's way. ``calibrate_effect`` scales the pasted edit until that is the
same in the recipient as in the donor: a few forward passes, no gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from actlab.errors import ActlabError
from actlab.interventions.base import Composition, Intervention
from actlab.transfer.paste import scaled_item

DEFAULT_TEXTS = 64  # calibration texts, spread evenly over the profile texts ...
DEFAULT_TOKENS = 32  # ... each cut to this many tokens, so the batch needs no padding


def calibration_ids(model, texts: Sequence[str], n_texts: int = DEFAULT_TEXTS, n_tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """[n, n_tokens] token ids: ``n_texts`` texts of at least ``n_tokens`` tokens, spread evenly over ``texts``
    (which may be ordered by kind), cut to that length."""
    long = [ids[:n_tokens] for ids in (model.tokenizer(t)["input_ids"] for t in texts) if len(ids) >= n_tokens]
    step = max(1, len(long) // n_texts)
    rows = long[::step][:n_texts]
    if not rows:
        raise ActlabError(f"no calibration text has {n_tokens} tokens; give longer texts")
    return torch.tensor(rows)


def mean_kl(model, edit, ids: torch.Tensor, plain: torch.Tensor | None = None) -> float:
    """Mean per-token KL(p_edited ‖ p) in nats over ``ids``; ``plain`` the unedited log-probabilities if known."""
    with torch.no_grad():
        if plain is None:
            plain = torch.log_softmax(model(ids).logits.float(), -1)
        with model.edit(edit):
            edited = torch.log_softmax(model(ids).logits.float(), -1)
    return float((edited.exp() * (edited - plain)).sum(-1).mean())


def mean_shift(model, edit, ids: torch.Tensor, plain: torch.Tensor | None = None) -> torch.Tensor:
    """[vocab]: the edit's change of the average next-token distribution over ``ids`` (mean of q − p): which
    tokens it makes more likely, and by how much."""
    with torch.no_grad():
        if plain is None:
            plain = torch.softmax(model(ids).logits.float(), -1)
        with model.edit(edit):
            edited = torch.softmax(model(ids).logits.float(), -1)
    return (edited - plain).reshape(-1, edited.shape[-1]).double().mean(0)


def _scaled(edit: Intervention | Composition, factor: float) -> Intervention | Composition:
    """``edit`` with every additive change multiplied by ``factor`` (in the weights: coefficients stay)."""
    out = [scaled_item(item, factor) for item in edit.edits()]
    return out[0] if len(out) == 1 else Composition(out)


def _solve_scale(measure, target: float, first: float, steps: int, max_factor: float) -> tuple[float, float]:
    """(s, measure(s)) with measure(s) ≈ target, for a measure growing as a power of s (2 to start, then the
    power seen between the last two evaluations); s within [1/max_factor, max_factor]."""
    s, value, power = 1.0, first, 2.0
    for _ in range(steps):
        if not value > 0:
            break
        new_s = min(max_factor, max(1.0 / max_factor, s * (target / value) ** (1.0 / power)))
        if abs(math.log(new_s / s)) < 1e-3:
            break
        new_value = measure(new_s)
        if new_value > 0 and value > 0 and new_value != value:
            power = min(4.0, max(0.5, math.log(new_value / value) / math.log(new_s / s)))
        s, value = new_s, new_value
    return s, value


def calibrate_effect(donor, recipient, donor_edit, pasted, texts: Sequence[str], *, measure: str = "shift",
                     steps: int = 3, max_factor: float = 4.0) -> Intervention | Composition:
    """``pasted`` rescaled so that it does to the recipient's predictions what ``donor_edit`` does to the
    donor's, on calibration ``texts``; each item's ``params["effect_calibration"]`` records how.

    ``measure="shift"`` (the default) matches the part of the change of the average next-token distribution
    that goes the donor's way: ⟨b_R(s), b_D⟩ = ⟨b_D, b_D⟩ with b = mean(q − p) (``mean_shift``), so changes
    the donor did not make (noise of an imperfect paste) neither count for nor against it. ``"kl"`` matches
    the mean KL(q ‖ p) instead (counts all change). Both need the same vocabulary (a shared tokenizer)."""
    if measure not in ("shift", "kl"):
        raise ActlabError(f"measure must be 'shift' or 'kl', not {measure!r}")
    d_ids, r_ids = calibration_ids(donor, texts), calibration_ids(recipient, texts)
    with torch.no_grad():
        r_logits = recipient(r_ids).logits.float()
    if measure == "kl":
        target, plain = mean_kl(donor, donor_edit, d_ids), torch.log_softmax(r_logits, -1)
        score = lambda s: mean_kl(recipient, _scaled(pasted, s), r_ids, plain)  # noqa: E731
    else:
        b_d, plain = mean_shift(donor, donor_edit, d_ids), torch.softmax(r_logits, -1)
        if b_d.shape != plain.shape[-1:]:
            raise ActlabError(f"the donor predicts {b_d.numel():,} tokens and the recipient {plain.shape[-1]:,}: "
                              "effect calibration needs a shared vocabulary (use calibrate='size')")
        target = float(b_d @ b_d)
        score = lambda s: float(mean_shift(recipient, _scaled(pasted, s), r_ids, plain) @ b_d)  # noqa: E731
    first = score(1.0)
    record = {"measure": measure, "target": target, "before": first}
    if not (target > 0 and first > 0 and math.isfinite(target) and math.isfinite(first)):
        return _recorded(pasted, record | {"factor": 1.0, "reached": first})  # the paste goes the wrong way: leave it
    s, reached = _solve_scale(score, target, first, steps, max_factor)
    return _recorded(_scaled(pasted, s), record | {"factor": s, "reached": reached})


def _recorded(edit: Intervention | Composition, record: dict) -> Intervention | Composition:
    out = [dataclasses.replace(item, params=dict(item.params) | {"effect_calibration": record}) for item in edit.edits()]
    return out[0] if len(out) == 1 else Composition(out)
