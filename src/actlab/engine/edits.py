"""The simplest edits, applied through the same hooks as captures: add a vector, set channels,
replace a site's output by a function of its input.

Richer interventions (steering vectors with metadata, affine maps, low-rank adapters) build on
the same ``Edit`` protocol: a callable ``(h, state) -> new h`` with a ``site`` attribute.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

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
        channels = self.channels.to(h.device)  # the site's device: a split model's sites live on several
        cols = column_mask(state, self.positions)
        if cols is None:
            new[..., channels] = values
        else:
            cols = cols.to(h.device)
            sub = new[:, cols]
            sub[..., channels] = values
            new[:, cols] = sub
        return new


# ----------------------------------------------------------------------------------- replace
def default_input_site(site: str) -> str:
    """The site whose activation feeds ``site`` in the same forward pass.

    ``resid.i`` is fed by ``resid.{i-1}`` (``embed`` for block 0) and ``mlp.i`` by ``mlp.in.i``;
    other sites have no single input, so ``Replace`` needs ``input_site=`` for them.
    """
    match = re.fullmatch(r"(resid|mlp)\.(\d+)", site)
    if match is None:
        raise ActlabError(f"'{site}' has no default input site (only resid.i and mlp.i do); "
                          "pass input_site=... to say which site feeds it")
    kind, layer = match.group(1), int(match.group(2))
    if kind == "mlp":
        return f"mlp.in.{layer}"
    return "embed" if layer == 0 else f"resid.{layer - 1}"


class StoreInput:
    """Edit that leaves its site unchanged and remembers the activation for the paired replacement.
    The slot is keyed by thread: one ``Replace`` can serve forward passes in several threads at once."""

    def __init__(self, site: str, slot: dict):
        self.site = site
        self.slot = slot

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        self.slot[threading.get_ident()] = h
        return h


def _weights_device(fn) -> torch.device | None:
    """Where a module ``fn`` keeps its weights (None for a plain function, or weights on the meta device): its
    input goes there. A plain function runs on the replaced site's device."""
    if not isinstance(fn, torch.nn.Module):
        return None
    for tensor in itertools.chain(fn.parameters(), fn.buffers()):
        return None if tensor.device.type == "meta" else tensor.device
    return None


class _ReplaceOutput:
    """Edit that sets its site to ``fn`` of the input stored earlier in the same forward pass."""

    def __init__(self, site: str, input_site: str, slot: dict, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.site = site
        self.input_site = input_site
        self.slot = slot
        self.fn = fn

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = self.slot.pop(threading.get_ident(), None)
        if x is None or x.shape[:-1] != h.shape[:-1]:
            raise ActlabError(f"replacing '{self.site}': its input '{self.input_site}' was not seen in this "
                              "forward pass (the input site must run before the replaced site)")
        new = self.fn(x.to(_weights_device(self.fn) or h.device))  # a model split over devices: see docs/devices.md
        if new.shape != h.shape:
            raise ActlabError(f"replacing '{self.site}': fn returned shape {tuple(new.shape)}, the site has "
                              f"{tuple(h.shape)}")
        return new.to(h.device, h.dtype)


@dataclass
class Replace:
    """Replace the output of ``site`` by ``fn(x)``, ``x`` the activation of its input site in the same pass.

    The splice a linearised block, a sparse autoencoder or a transcoder needs: ``fn`` sees the
    (already edited) input ``[batch, seq, width_in]`` and returns ``[batch, seq, width]``. Use it like
    any edit, ``with model.edit(Replace("mlp.1", transcoder)): ...``. It is two engine edits: one at
    the input site that stores ``x`` (leaving it unchanged) and one at ``site`` that replaces it.
    """

    site: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_site: str | None = None
    _slot: dict = field(default_factory=dict, init=False, repr=False)  # thread id -> input

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ActlabError(f"Replace needs a callable fn(x) -> new activation, not {type(self.fn).__name__}")
        if self.input_site is None:
            self.input_site = default_input_site(self.site)
        if self.input_site == self.site:
            raise ActlabError(f"Replace: '{self.site}' cannot be its own input site")

    def edits(self) -> list:
        """The two engine edits (store the input, replace the output) sharing one slot."""
        return [StoreInput(self.input_site, self._slot),
                _ReplaceOutput(self.site, self.input_site, self._slot, self.fn)]
