"""The affine fit's objective: per-dimension distances between a site's source and target tokens.

Distances are differentiable in the source activations (quantiles by sorting + linear
interpolation), measured in units of the target's typical standard deviation so sites of
different scale weigh alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Loss = Literal["wasserstein", "moments"]
LOSSES = ("wasserstein", "moments")


def quantile_levels(n: int) -> torch.Tensor:
    """Mid-point grid (k + 0.5) / n, k = 0..n-1."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def quantiles(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per-column quantiles ``[len(levels), width]`` of ``x`` ``[n, width]``; differentiable in ``x``."""
    xs = x.sort(dim=0).values
    n = xs.shape[0]
    pos = levels.to(x.device) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return xs[lo] * (1 - w) + xs[hi] * w


@dataclass
class TargetStats:
    """What the loss compares a site's source tokens with."""

    q: torch.Tensor  # [n_quantiles, width]
    mean: torch.Tensor  # [width]
    std: torch.Tensor  # [width]
    scale: float  # mean target std: the unit distances are measured in

    @classmethod
    def of(cls, y: torch.Tensor, levels: torch.Tensor, scale: float | None = None) -> "TargetStats":
        y = y.float()
        std = y.std(0, unbiased=False)
        s = float(std.mean()) if scale is None else scale
        return cls(quantiles(y, levels), y.mean(0), std, max(s, 1e-6))

    def to(self, device) -> "TargetStats":
        return TargetStats(self.q.to(device), self.mean.to(device), self.std.to(device), self.scale)


def w1_distance(x: torch.Tensor, target: TargetStats, levels: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the 1-D Wasserstein-1 distance (quantile grid), in activation units."""
    return (quantiles(x, levels) - target.q).abs().mean()


def site_loss(x: torch.Tensor, target: TargetStats, levels: torch.Tensor, loss: str) -> torch.Tensor:
    """The per-site term of the objective, in units of the target scale."""
    if loss == "wasserstein":
        return w1_distance(x, target, levels) / target.scale
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return ((mean - target.mean) ** 2 + (std - target.std) ** 2).mean() / target.scale**2
