"""Edits of SAE latents as ordinary intervention files: clamp, add to or scale chosen latents.

A ``LatentEdit`` carries its SAE (the file holds the SAE's tensors, so ``--edit latent.safetensors``
needs nothing else) and keeps the SAE's error term: the site becomes ``h + decode(z') − decode(z)``,
so only the edited latents' decoder directions change the model. For a transcoder the latents are
computed from ``mlp.in.i`` and the change is added to ``mlp.i``.

Steering *along* a latent is a plain steering vector: ``latent_direction`` gives it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

from actlab.engine.edits import StoreInput, column_mask, default_input_site
from actlab.errors import ActlabError
from actlab.interventions.base import Intervention, register
from actlab.interventions.types import SteeringVector
from actlab.sae.model import SparseAutoencoder

__all__ = ["LATENT_MODES", "LatentEdit", "latent_direction", "latent_edit"]

LATENT_MODES = ("clamp", "add", "scale")
_STATE = ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale", "output_scale", "threshold", "threshold_count",
          "log_threshold", "W_skip")


@register
@dataclass
class LatentEdit(Intervention):
    """``z[latents]`` set to (``clamp``), increased by (``add``) or multiplied by (``scale``) ``coef * values``.

    Not additive (it depends on the latents of each token); ``coef`` scales the values, so a clamp at
    coef 0 ablates the latents. ``params["sae"]`` is the SAE's config, ``params["mode"]`` the mode.
    """

    kind: ClassVar[str] = "sae_latent"
    tensor_names: ClassVar[tuple[str, ...]] = ("latents", "values") + _STATE
    additive: ClassVar[bool] = False
    latents: torch.Tensor = None
    values: torch.Tensor = None
    W_enc: torch.Tensor = None
    b_enc: torch.Tensor = None
    W_dec: torch.Tensor = None
    b_dec: torch.Tensor = None
    input_scale: torch.Tensor = None
    output_scale: torch.Tensor = None
    threshold: torch.Tensor = None
    threshold_count: torch.Tensor = None
    log_threshold: torch.Tensor = None
    W_skip: torch.Tensor = None

    def __post_init__(self) -> None:
        mode = self.params.get("mode", "clamp")
        if mode not in LATENT_MODES:
            raise ActlabError(f"a latent edit's mode is one of {LATENT_MODES}, not {mode!r}")
        config = self.params.get("sae")
        if not isinstance(config, dict):
            raise ActlabError("a latent edit needs its SAE's config in params['sae']; make it with latent_edit()")
        sae = SparseAutoencoder(**{k: config[k] for k in ("d_in", "n_latents", "kind", "k") if k in config},
                                d_out=config.get("d_out"), skip=bool(config.get("skip", False)))
        state = {name: getattr(self, name) for name in sae.state_dict()}
        if any(v is None for v in state.values()):
            raise ActlabError(f"a latent edit needs the SAE tensors {sorted(state)}; make it with latent_edit()")
        try:
            sae.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()})
        except RuntimeError as e:
            raise ActlabError(f"the latent edit's SAE tensors do not fit its config ({str(e)[:120]})") from None
        self.sae = sae.eval()
        self.latents = torch.as_tensor(self.latents).long().reshape(-1)
        self.values = torch.as_tensor(self.values, dtype=torch.float32).reshape(-1)
        if self.values.numel() == 1 and self.latents.numel() > 1:
            self.values = self.values.expand(self.latents.numel()).clone()
        if self.values.numel() != self.latents.numel() or not self.latents.numel():
            raise ActlabError(f"{self.latents.numel()} latents but {self.values.numel()} values: give one value each")
        if int(self.latents.max()) >= sae.n_latents or int(self.latents.min()) < 0:
            raise ActlabError(f"latent {int(self.latents.max())} is out of range: the SAE has {sae.n_latents} latents")
        self._slot: dict = {}
        super().__post_init__()

    @property
    def mode(self) -> str:
        return self.params.get("mode", "clamp")

    @property
    def width(self) -> int:
        return self.sae.d_out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"latents": self.latents.clone(), "values": self.values.float().clone()}
        out.update({k: v.detach().float().clone() for k, v in self.sae.state_dict().items()})
        return out

    def edits(self) -> list:
        if self.sae.transcoder:
            return [StoreInput(default_input_site(self.site), self._slot), self]
        return [self]

    def changed(self, x: torch.Tensor) -> torch.Tensor:
        """The change the edit adds for inputs ``x`` [..., d_in] (the site's own tensor for an SAE)."""
        sae = self.sae
        flat = x.reshape(-1, sae.d_in).to(sae.W_enc.device, torch.float32)
        with torch.no_grad():
            z = sae.encode(flat)
            new = z.clone()
            index, values = self.latents.to(z.device), (self.coef * self.values).to(z.device)
            if self.mode == "clamp":
                new[:, index] = values
            elif self.mode == "add":
                new[:, index] += values
            else:
                new[:, index] *= values
            delta = sae.decode(new, flat) - sae.decode(z, flat)
        return delta.view(*x.shape[:-1], sae.d_out).to(x.device)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if self.sae.transcoder:
            return h  # its input comes from mlp.in.i: see __call__
        return h + self.changed(h).to(h.dtype)

    def __call__(self, h, state):
        if not self.sae.transcoder:
            return super().__call__(h, state)
        x = self._slot.pop(threading.get_ident(), None)
        if x is None or x.shape[:-1] != h.shape[:-1]:
            raise ActlabError(f"the transcoder edit at '{self.site}' did not see its input "
                              f"'{default_input_site(self.site)}' in this forward pass")
        new = h + self.changed(x).to(h.dtype)
        cols = column_mask(state, self.positions)
        if cols is None:
            return new
        return torch.where(cols.to(h.device).view(1, -1, 1), new, h)


def latent_edit(sae: SparseAutoencoder, site: str, latents, values=0.0, *, mode: str = "clamp",
                model=None, coef: float = 1.0, positions: str = "all") -> LatentEdit:
    """A ``LatentEdit`` of ``sae`` (attached at ``site``: the SAE's site, or ``mlp.i`` for a transcoder);
    ``model`` records which model it is for. ``values`` 0 with mode clamp ablates the latents."""
    state = {k: v.detach().float().clone() for k, v in sae.state_dict().items()}
    identity = model.identity() if model is not None else {}
    return LatentEdit(site=site, coef=coef, positions=positions, model=identity,
                      params={"sae": sae.config(), "mode": mode}, latents=latents, values=values, **state)


def latent_direction(sae: SparseAutoencoder, site: str, latent: int, *, scale: float | None = None,
                     model=None) -> SteeringVector:
    """A steering vector along latent ``latent``'s decoder direction, in the site's own scale. ``scale`` is
    the latent activation it stands for (default 1: one unit of the latent)."""
    if sae.transcoder:
        raise ActlabError("a transcoder's decoder writes to mlp.i: steer there with latent_edit(..., mode='add')")
    if not 0 <= int(latent) < sae.n_latents:
        raise ActlabError(f"latent {latent} is out of range: the SAE has {sae.n_latents} latents")
    vector = sae.W_dec.detach()[int(latent)].float() / float(sae.input_scale) * (1.0 if scale is None else scale)
    identity = model.identity() if model is not None else {}
    return SteeringVector(site=site, vector=vector.clone(), model=identity,
                          params={"method": "sae_latent", "latent": int(latent)})
