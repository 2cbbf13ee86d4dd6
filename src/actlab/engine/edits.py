"""The simplest edits, applied through the same hooks as captures: add a vector, set channels.

Richer interventions (steering vectors with metadata, affine maps, low-rank adapters) build on
the same ``Edit`` protocol: a callable ``(h, state) -> new h`` with a ``site`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.engine.hooks import ForwardState
from actlab.errors import ActlabError

POSITION_MODES = ("all", "prompt", "generated")


def column_mask(state: ForwardState, positions: str) -> torch.Tensor | None:
    """[length] bool of columns to edit in this call, or None for every column.

    "prompt"/"generated" compare absolute columns with the prompt length set by generate;
    outside generate every token counts as prompt. Absolute columns make edits identical with
    and without a KV cache.
    """
    if positions == "all":
        return None
    if positions not in POSITION_MODES:
        raise ActlabError(f"positions must be one of {POSITION_MODES}, not {positions!r}")
    columns = state.columns
    if state.prompt_length is None:
        is_prompt = torch.ones_like(columns, dtype=torch.bool)
    else:
        is_prompt = columns < state.prompt_length
    return is_prompt if positions == "prompt" else ~is_prompt


def check_finite(value: float | torch.Tensor, what: str) -> None:
    tensor = torch.as_tensor(value)
    if not torch.isfinite(tensor).all():
        raise ActlabError(f"{what} contains NaN or inf; pass finite numbers")


@dataclass
class AddVector:
    """h <- h + coef * vector at the chosen columns."""

    site: str
    vector: torch.Tensor
    coef: float = 1.0
    positions: str = "all"

    def __post_init__(self) -> None:
        check_finite(self.coef, "the coefficient")
        check_finite(self.vector, "the vector")
        if self.positions not in POSITION_MODES:
            raise ActlabError(f"positions must be one of {POSITION_MODES}, not {self.positions!r}")

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if h.shape[-1] != self.vector.shape[-1]:
            raise ActlabError(
                f"vector for '{self.site}' has width {self.vector.shape[-1]} but the site has width {h.shape[-1]}"
            )
        delta = (self.coef * self.vector).to(h.device, h.dtype)
        cols = column_mask(state, self.positions)
        if cols is None:
            return h + delta
        return h + delta * cols.to(h.device, h.dtype).unsqueeze(-1)


@dataclass
class SetChannels:
    """h[..., channels] <- values at the chosen columns (clamps, zero or mean ablation)."""

    site: str
    channels: torch.Tensor
    values: torch.Tensor | float = 0.0
    positions: str = "all"

    def __post_init__(self) -> None:
        self.channels = torch.as_tensor(self.channels, dtype=torch.long).reshape(-1)
        self.values = torch.as_tensor(self.values, dtype=torch.float32)
        check_finite(self.values, "the clamp values")

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if int(self.channels.max()) >= h.shape[-1] or int(self.channels.min()) < -h.shape[-1]:
            raise ActlabError(f"channel index out of range for '{self.site}' (width {h.shape[-1]})")
        new = h.clone()
        values = self.values.to(h.device, h.dtype).expand(len(self.channels)) if self.values.ndim == 0 else self.values.to(h.device, h.dtype)
        cols = column_mask(state, self.positions)
        if cols is None:
            new[..., self.channels] = values
        else:
            cols = cols.to(h.device)
            sub = new[:, cols]
            sub[..., self.channels] = values
            new[:, cols] = sub
        return new
