"""The intervention types: steering vector, affine map, neuron clamp, low-rank residual adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from actlab.errors import ActlabError
from actlab.interventions.base import Intervention, register


@register
@dataclass
class SteeringVector(Intervention):
    """h <- h + coef * v (CAA, PCA and dimension-level steering all produce one of these).

    With ``norm_preserving`` the edited vector is rescaled to the norm ``h`` had, so only the
    direction changes. Dimension-level (AUSteer-style) vectors are simply zero outside the
    chosen dimensions; ``params["dims"]`` lists them.
    """

    kind: ClassVar[str] = "steering_vector"
    tensor_names: ClassVar[tuple[str, ...]] = ("vector",)
    vector: torch.Tensor = None
    norm_preserving: bool = False

    def __post_init__(self) -> None:
        if self.vector is None or self.vector.ndim != 1:
            raise ActlabError("a steering vector must be a 1-D tensor of the site's width")
        self.norm_preserving = bool(self.params.get("norm_preserving", self.norm_preserving))
        self.params["norm_preserving"] = self.norm_preserving
        super().__post_init__()

    @property
    def width(self) -> int:
        return int(self.vector.shape[0])

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.vector.to(h.device, h.dtype).expand_as(h)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        new = h + self.coef * self.vector.to(h.device, h.dtype)
        if self.norm_preserving:
            new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return new


@register
@dataclass
class AffineMap(Intervention):
    """h <- h + coef * (h A + b) with A = diag(d) + U Vᵀ (either part optional): LinEAS-style maps."""

    kind: ClassVar[str] = "affine"
    tensor_names: ClassVar[tuple[str, ...]] = ("bias", "diag", "U", "V")
    bias: torch.Tensor = None
    diag: torch.Tensor | None = None
    U: torch.Tensor | None = None  # [d, r]
    V: torch.Tensor | None = None  # [d, r]

    def __post_init__(self) -> None:
        if self.bias is None:
            raise ActlabError("an affine map needs a bias vector (zeros if none)")
        if (self.U is None) != (self.V is None):
            raise ActlabError("an affine map's low-rank part needs both U and V")
        super().__post_init__()

    @property
    def width(self) -> int:
        return int(self.bias.shape[0])

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        out = self.bias.to(h.device, h.dtype).expand_as(h)
        if self.diag is not None:
            out = out + h * self.diag.to(h.device, h.dtype)
        if self.U is not None:
            out = out + (h @ self.U.to(h.device, h.dtype)) @ self.V.to(h.device, h.dtype).T
        return out


@register
@dataclass
class NeuronClamp(Intervention):
    """h[..., neurons] <- values (a clamp, zero- or mean-ablation) at ``mlp.hidden.{i}`` or any site.

    Not additive: ``coef`` scales the clamp values (coef 0 zero-ablates the neurons).
    """

    kind: ClassVar[str] = "neuron_clamp"
    tensor_names: ClassVar[tuple[str, ...]] = ("neurons", "values")
    additive: ClassVar[bool] = False
    neurons: torch.Tensor = None
    values: torch.Tensor = None
    site_width: int = 0

    def __post_init__(self) -> None:
        self.neurons = torch.as_tensor(self.neurons).long().reshape(-1)
        self.values = torch.as_tensor(self.values, dtype=torch.float32).reshape(-1)
        if self.values.numel() == 1 and self.neurons.numel() > 1:
            self.values = self.values.expand(self.neurons.numel()).clone()
        if self.values.numel() != self.neurons.numel():
            raise ActlabError(f"{self.neurons.numel()} neurons but {self.values.numel()} values: give one value each")
        self.site_width = int(self.params.get("site_width", self.site_width))
        self.params["site_width"] = self.site_width
        super().__post_init__()

    @property
    def width(self) -> int:
        return self.site_width

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"neurons": self.neurons.clone(), "values": self.values.float().clone()}

    def __call__(self, h, state):
        if int(self.neurons.max()) >= h.shape[-1]:
            raise ActlabError(f"neuron {int(self.neurons.max())} is out of range for '{self.site}' (width {h.shape[-1]})")
        return super().__call__(h, state) if self.site_width else self._clamped(h)

    def _clamped(self, h: torch.Tensor) -> torch.Tensor:
        new = h.clone()
        new[..., self.neurons.to(h.device)] = (self.coef * self.values).to(h.device, h.dtype)
        return new

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self._clamped(h)


@register
@dataclass
class LowRankAdapter(Intervention):
    """A rank-r residual adapter (LoReFT form): h <- h + coef * Rᵀ (W h + b − R h).

    R [r, d] spans the edited subspace (orthonormal rows after training), W [r, d] and b [r] say
    what the subspace coordinates should become. This is the donor intervention Command-V pastes.
    """

    kind: ClassVar[str] = "low_rank_adapter"
    tensor_names: ClassVar[tuple[str, ...]] = ("R", "W", "b")
    R: torch.Tensor = None
    W: torch.Tensor = None
    b: torch.Tensor = None

    def __post_init__(self) -> None:
        if self.R is None or self.W is None or self.b is None:
            raise ActlabError("a low-rank adapter needs R, W and b")
        if self.R.shape != self.W.shape or self.b.shape != (self.R.shape[0],):
            raise ActlabError(f"adapter shapes disagree: R {tuple(self.R.shape)}, W {tuple(self.W.shape)}, "
                              f"b {tuple(self.b.shape)}")
        super().__post_init__()

    @property
    def width(self) -> int:
        return int(self.R.shape[1])

    @property
    def rank(self) -> int:
        """Dimension of the edited subspace (rows of R)."""
        return int(self.R.shape[0])

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        R, W, b = (t.to(h.device, h.dtype) for t in (self.R, self.W, self.b))
        return (h @ W.T + b - h @ R.T) @ R
