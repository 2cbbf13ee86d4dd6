"""The Command-V evaluation's random controls: an edit of the same kind and size, with no learned direction.

A random intervention is made in the *donor* (a ``random_like`` vector of the donor vector's norm; for
adapters a random orthonormal ``R`` with ``W − R`` and ``b`` of the trained adapter's norms), pasted
through the same converters, then rescaled so that its mean ``‖Δ‖`` on the recipient's profile rows
equals the pasted intervention's. Draws come in antithetic pairs (``r`` and ``−r``): the random
distribution is symmetric, so first-order effects cancel and what is left is the effect of *any* edit
of that size — which is what the control is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from actlab.errors import ActlabError
from actlab.interventions.base import Intervention
from actlab.interventions.types import LowRankAdapter, SteeringVector

__all__ = ["random_adapter_like", "random_in_donor", "mean_delta_norm", "RandomControls",
           "random_controls"]


def random_adapter_like(adapter: LowRankAdapter, seed: int = 0) -> LowRankAdapter:
    """A random adapter of the same size of change: random orthonormal ``R`` (same rank and width),
    ``W = R + G`` with ``‖G‖ = ‖W − R‖`` of ``adapter`` and a random ``b`` with its norm. (Matching
    ``‖W‖`` itself would not do: a trained adapter has ``W ≈ R``, and a random ``W`` of that norm would
    be a far larger edit.)"""
    from actlab.interventions.adapter_train import orthonormal_rows

    gen = torch.Generator().manual_seed(seed)
    rank, width = adapter.R.shape
    R = orthonormal_rows(rank, width, seed)
    G = torch.randn(rank, width, generator=gen)
    G = G / G.norm().clamp_min(1e-12) * (adapter.W.float() - adapter.R.float()).norm()
    b = torch.randn(rank, generator=gen)
    b = b / b.norm().clamp_min(1e-12) * adapter.b.float().norm()
    return LowRankAdapter(site=adapter.site, R=R, W=R + G, b=b, coef=adapter.coef, positions=adapter.positions,
                          model=adapter.model, params={"method": "random", "seed": seed})


def random_in_donor(item: Intervention, seed: int) -> Intervention:
    """A random intervention of ``item``'s kind and norms, in the donor's space."""
    from actlab.interventions.fit import random_like

    if isinstance(item, SteeringVector):
        return random_like(item, seed=seed)
    if isinstance(item, LowRankAdapter):
        return random_adapter_like(item, seed=seed)
    raise ActlabError(f"no random control for a {item.kind}")


def mean_delta_norm(item: Intervention, h: torch.Tensor) -> float:
    """Mean ``‖coef · Δ(h)‖`` over the rows of ``h``."""
    with torch.no_grad():
        return float((item.coef * item.delta(h)).norm(dim=-1).mean())


@dataclass
class RandomControls:
    edits: list[Intervention]  # n_random pasted, rescaled random interventions (antithetic pairs)
    raw_sizes: list[float]  # each draw's mean ‖Δ‖ on the recipient rows before rescaling
    target_size: float  # the pasted intervention's mean ‖Δ‖ there


def random_controls(donor_edit: Intervention, pasted: Intervention, h_r: torch.Tensor,
                    paste_fn: Callable[[Intervention], Intervention], *, n_random: int, seed: int) -> RandomControls:
    """``n_random`` random donor interventions pasted like ``donor_edit`` (by ``paste_fn``) and matched to
    ``pasted``'s size on the recipient profile rows ``h_r`` at its site (module docstring)."""
    target_size = mean_delta_norm(pasted, h_r)
    randoms: list[Intervention] = []
    raw_sizes: list[float] = []
    for j in range((n_random + 1) // 2):
        rnd = paste_fn(random_in_donor(donor_edit, seed + 7919 * (j + 1)))
        size = mean_delta_norm(rnd, h_r)
        raw_sizes.append(size)
        rnd = rnd.scaled(target_size / size if size > 0 else 1.0)
        randoms += [rnd, rnd.scaled(-1.0)][: n_random - len(randoms)]  # antithetic pairs: r and −r
    return RandomControls(randoms, raw_sizes, target_size)
