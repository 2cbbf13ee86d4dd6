"""The trainable tensors of an affine fit: one map per site, as dimensionless leaves.

The bias is learnt in units of the site's target scale (``bias = scale * unit_bias``), so one
learning rate suits models whose activations differ in size by orders of magnitude. The l1 weight of
every leaf is ``1 / width``, matching the per-dimension mean of the loss.
"""

from __future__ import annotations

import copy

import torch

from actlab.interventions.affine_loss import TargetStats
from actlab.interventions.base import Composition
from actlab.interventions.types import AffineMap


def _orthonormal(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(r))


class AffineLeaves:
    """The maps being fitted (acting on every token), their leaves and the l1 weights of the leaves."""

    def __init__(self, model, names: list[str], stats: dict[str, TargetStats], rank: int, gen: torch.Generator):
        device = model.device
        self.stats = stats
        self.identity = model.identity()
        self.maps: list[AffineMap] = []
        self.unit_biases: list[torch.Tensor] = []
        self.leaves: list[torch.Tensor] = []
        self.weights: list[float] = []
        for s in names:
            d = model.sites[s]
            diag = torch.zeros(d, device=device, requires_grad=True)
            unit_bias = torch.zeros(d, device=device, requires_grad=True)
            U = V = None
            self.leaves += [diag, unit_bias]
            self.weights += [1.0 / d, 1.0 / d]
            if rank > 0:
                U = _orthonormal(d, rank, gen).to(device).requires_grad_(True)
                V = torch.zeros(d, rank, device=device, requires_grad=True)
                self.leaves += [U, V]
                self.weights += [1.0 / d, 1.0 / d]
            self.unit_biases.append(unit_bias)
            self.maps.append(AffineMap(site=s, bias=unit_bias.detach() * stats[s].scale, diag=diag, U=U, V=V,
                                       model=self.identity))

    def sync(self) -> None:
        """Point the maps' biases at the current (graph-connected when grad is on) scaled leaves."""
        for m, ub in zip(self.maps, self.unit_biases):
            m.bias = ub * self.stats[m.site].scale

    def penalty(self) -> torch.Tensor:
        return sum(w * p.detach().abs().sum() for p, w in zip(self.leaves, self.weights))

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.leaves]

    def restore(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, b in zip(self.leaves, state):
                p.copy_(b)
            self.sync()

    def zero_fraction(self) -> float:
        n_params = sum(p.numel() for p in self.leaves)
        return sum(int((p == 0).sum()) for p in self.leaves) / max(1, n_params)

    def proximal_l1(self, opt: torch.optim.Adam, strength: float) -> None:
        """Soft-threshold each leaf by ``strength * weight / (sqrt(v̂) + eps)``: the prox of l1 in Adam's metric."""
        beta2, eps = opt.defaults["betas"][1], opt.defaults["eps"]
        with torch.no_grad():
            for p, weight in zip(self.leaves, self.weights):
                state = opt.state.get(p)
                if not state or "exp_avg_sq" not in state:
                    continue
                step = float(state["step"])
                denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + eps
                threshold = strength * weight / denom
                p.copy_(torch.sign(p) * (p.abs() - threshold).clamp_min(0))

    def export(self, positions: str, params: dict) -> Composition:
        """Frozen CPU copies of the maps, stamped with ``positions`` and the fit's ``params``."""
        def own(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().float().cpu().clone(memory_format=torch.contiguous_format)

        return Composition(AffineMap(site=m.site, bias=own(m.bias), diag=own(m.diag), U=own(m.U), V=own(m.V),
                                     positions=positions, model=self.identity, params=copy.deepcopy(params))
                           for m in self.maps)
