"""CETT: the cumulative error of tail truncation (Sparsing Law, Luo et al., 2024).

For one MLP layer with activations ``a`` (the input of the down projection, ``[n, d_mlp]``) and
down-projection weight ``W`` (``[d_model, d_mlp]``, ``[out, in]`` as ``nn.Linear``; column j is
``w_out,j``), neuron j's contribution on a token is ``c_j = |a_j| * ||w_out,j||``. Truncating the
neurons with ``c_j < eps`` leaves an error ``sum_{j: c_j < eps} a_j w_out,j`` in the MLP output;

    CETT(eps) = || sum_{j: c_j < eps} a_j w_out,j || / || sum_j a_j w_out,j ||

per token (0 for a token whose MLP output is 0; the down projection's bias is not part of either
sum, truncation never changes it), and the layer's value is the mean over tokens. For a shared
target ``tau``, a layer's threshold is the largest ``eps`` with mean CETT(eps) <= tau, found by
binary search over the layer's sorted contributions (``inf`` when even truncating everything
stays within ``tau``). The search assumes mean CETT grows with ``eps``; it does when every
contribution vector points into the same half-space, and in practice on trained models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from actlab.errors import ActlabError

__all__ = ["CettCurve", "ContributionThreshold", "calibrate_threshold", "cett", "contributions", "mean_cett", "output_norms"]


def _check(acts: torch.Tensor, down: torch.Tensor) -> None:
    if acts.ndim != 2 or down.ndim != 2 or acts.shape[1] != down.shape[1]:
        raise ActlabError(
            f"CETT needs activations [n, d_mlp] and the down projection [d_model, d_mlp] ([out, in], as "
            f"model.anatomy.mlp_parts(i).down gives it); got {tuple(acts.shape)} and {tuple(down.shape)}"
        )


def output_norms(down: torch.Tensor) -> torch.Tensor:
    """``||w_out,j||`` for every neuron j: the column norms of the ``[d_model, d_mlp]`` down projection."""
    return down.double().norm(dim=0)


def contributions(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``c[t, j] = |a[t, j]| * ||w_out,j||``, ``[n, d_mlp]`` (float64)."""
    _check(acts, down)
    return acts.double().abs() * output_norms(down)


def cett(acts: torch.Tensor, down: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-token CETT of truncating the neurons whose contribution is below ``threshold``, ``[n]``."""
    _check(acts, down)
    a, w = acts.double(), down.double()
    c = a.abs() * w.norm(dim=0)
    return _ratio(a, w, c, threshold, (a @ w.T).norm(dim=-1))


def _ratio(a, w, c, threshold, full_norm) -> torch.Tensor:
    """Per-token CETT; ``c`` (float64) decides the truncation, the tail is summed in ``a``'s dtype."""
    tail = (torch.where(c < threshold, a, torch.zeros_like(a)) @ w.T).double()
    return torch.where(full_norm > 0, tail.norm(dim=-1) / full_norm.clamp(min=1e-300), torch.zeros_like(full_norm))


def mean_cett(acts: torch.Tensor, down: torch.Tensor, threshold: float) -> float:
    """Mean over tokens of ``cett(acts, down, threshold)``."""
    return float(cett(acts, down, threshold).mean())


def calibrate_threshold(acts: torch.Tensor, down: torch.Tensor, target: float) -> float:
    """The largest contribution threshold whose mean CETT on ``acts`` is at most ``target``.

    Candidates are the distinct contributions (a threshold equal to a contribution truncates the
    ones strictly below it) and ``inf`` (truncate everything); the smallest candidate truncates
    nothing, so some candidate always qualifies for ``target >= 0``. ``CettCurve`` does the same
    for many targets on one layer, sharing the evaluations (and, by default, to a resolution of
    1/4096 of the candidates).
    """
    return CettCurve(acts, down, resolution=None).threshold(target)


class CettCurve:
    """Mean CETT of one layer as a function of the threshold, evaluated lazily and cached.

    ``threshold(target)`` is a binary search over the sorted candidate thresholds, run until the
    bracket holds at most ``1 / resolution`` of them (``None``: to one candidate, the exact largest);
    it returns the bracket's passing end, so its mean CETT is always within the target. Every index
    it evaluates is remembered, and a later search starts from the tightest bracket the cache
    already holds, so calibrating many targets on one layer costs little more than one.
    """

    def __init__(self, acts: torch.Tensor, down: torch.Tensor, resolution: int | None = 4096):
        _check(acts, down)
        # the truncation is decided in float64; the CETT sums run in float32 (relative error ~1e-6)
        self.a, self.w = acts.float(), down.float()
        self.c = acts.double().abs() * output_norms(down)
        self.full = (acts.double() @ down.double().T).norm(dim=-1)
        self.candidates = torch.cat([torch.unique(self.c.flatten()), torch.tensor([math.inf], dtype=torch.float64)])
        self.cache: dict[int, float] = {0: 0.0}  # the smallest candidate truncates nothing
        # stop when the bracket holds at most 1/resolution of the candidates (exact with None or few candidates)
        self.width = 1 if resolution is None else max(1, self.candidates.numel() // int(resolution))

    def at(self, k: int) -> float:
        """Mean CETT at candidate ``k``."""
        if k not in self.cache:
            self.cache[k] = float(_ratio(self.a, self.w, self.c, float(self.candidates[k]), self.full).mean())
        return self.cache[k]

    def threshold(self, target: float) -> float:
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target >= 0):
            raise ActlabError(f"the CETT target must be a number >= 0 (a fraction of the MLP output norm), "
                              f"not {target!r}")
        top = self.candidates.numel() - 1
        if self.at(top) <= target:
            return math.inf
        lo = max(k for k, v in self.cache.items() if v <= target)
        hi = min(k for k, v in self.cache.items() if v > target and k > lo)
        while hi - lo > self.width:  # invariant: candidate lo passes, candidate hi fails
            mid = (lo + hi) // 2
            if self.at(mid) <= target:
                lo = mid
            else:
                hi = mid
        return float(self.candidates[lo])


@dataclass
class ContributionThreshold:
    """Engine edit for an ``mlp.hidden`` site: zero neuron j where ``|a_j| * norms[j] < threshold``
    (``norms`` None: where ``|a_j| < threshold``, the plain magnitude rule).

    ``norms`` is ``output_norms(down)`` of that layer. While it runs it counts, over real
    (non-padding) tokens, the entries left exactly zero: ``measured_sparsity`` is the sparsity the
    model ran with (1 minus the activation ratio).
    """

    site: str
    threshold: float
    norms: torch.Tensor | None = None
    n_zero: int = field(default=0, repr=False)
    n_total: int = field(default=0, repr=False)

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        if self.threshold > 0:
            c = h.abs() if self.norms is None else h.abs() * self.norms.to(device=h.device, dtype=h.dtype)
            h = torch.where(c < self.threshold, torch.zeros_like(h), h)
        rows = h.reshape(-1, h.shape[-1])
        if h.ndim == 3 and state.batch_size == h.shape[0] and state.length == h.shape[1]:
            rows = h[state.token_mask().to(h.device)]
        self.n_zero += int((rows == 0).sum())
        self.n_total += int(rows.numel())
        return h

    @property
    def measured_sparsity(self) -> float:
        return self.n_zero / self.n_total if self.n_total else math.nan
