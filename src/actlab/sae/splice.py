"""An SAE inside the model: its latents as a site of their own, and splices of its reconstruction.

``attach(model, sae, "resid.2")`` adds the virtual site ``sae.resid.2``: capture, record or stream
it like any site, and edit it (``SetChannels``, ``NeuronClamp``, ``AddVector`` at that site act on
the latents). Edits keep the SAE's error term — the site becomes ``h + decode(z') - decode(z)`` —
so attaching changes nothing until a latent is edited. A transcoder attaches at its MLP
(``attach(model, tc, "mlp.2")``: latents computed from ``mlp.in.2``, site ``sae.mlp.2``; read-only).

``reconstruction(sae, site)`` is the other splice: the site replaced by the reconstruction itself,
error dropped — what the spliced language-model loss measures.
"""

from __future__ import annotations

import torch

from actlab.engine.edits import Replace, default_input_site
from actlab.engine.hooks import ForwardState, Handle
from actlab.errors import ActlabError
from actlab.sae.model import SparseAutoencoder

__all__ = ["SAEView", "attach", "latent_site", "reconstruction", "Reconstruct"]


def latent_site(site: str) -> str:
    """The name of the latents of an SAE attached to ``site``."""
    return f"sae.{site}"


def _flat(sae: SparseAutoencoder, h: torch.Tensor) -> torch.Tensor:
    """The site's rows on the SAE's device and dtype (a split model's sites live on several devices)."""
    return h.reshape(-1, h.shape[-1]).to(sae.W_enc.device, sae.W_enc.dtype)


class SAEView:
    """The ``SiteView`` of an attached SAE (engine.hooks): readers see the latents, edits act on them."""

    def __init__(self, sae: SparseAutoencoder, site: str):
        self.sae, self.site = sae, site

    def apply(self, h: torch.Tensor, state: ForwardState, edits: list, readers: list,
              site: str) -> tuple[torch.Tensor, bool]:
        sae = self.sae
        if h.shape[-1] != sae.d_in:
            raise ActlabError(f"the SAE attached to '{self.site}' reads width {sae.d_in}, the site has {h.shape[-1]}")
        x = _flat(sae, h)
        with torch.set_grad_enabled(torch.is_grad_enabled() and h.requires_grad):
            z = sae.encode(x)
            latents = z.view(*h.shape[:-1], sae.n_latents)
            edited = latents
            for edit in edits:
                edited = edit(edited, state)
            for reader in readers:
                reader(site, edited, state)
            if not edits:
                return h, False
            if sae.transcoder:
                raise ActlabError(f"'{site}' is a transcoder's latents: they can be read, not edited in place; edit "
                                  "them with a LatentEdit intervention (actlab.interventions.latent_edit)")
            new = edited.reshape(-1, sae.n_latents)
            delta = sae.decode(new, x) - sae.decode(z, x)
        return h + delta.view(h.shape).to(h.device, h.dtype), True


def attach(model, sae: SparseAutoencoder, site: str, *, name: str | None = None) -> Handle:
    """Make the latents of ``sae`` (trained on ``site``; a transcoder: on ``mlp.in.i`` for ``mlp.i``) the site
    ``sae.{site}`` of ``model`` until the handle is removed (also a context manager)."""
    if not isinstance(sae, SparseAutoencoder):
        raise ActlabError(f"attach needs a SparseAutoencoder (actlab.sae.load_sae), not {type(sae).__name__}")
    if sae.transcoder and not site.startswith("mlp."):
        raise ActlabError(f"a transcoder attaches at the MLP output it predicts (mlp.i), not '{site}'")
    read_at = default_input_site(site) if sae.transcoder else site
    if read_at not in model.sites:
        model.resolve([read_at])  # the unknown-site error, with the model's sites
    width = model.sites[read_at]
    if width != sae.d_in:
        raise ActlabError(f"the SAE reads width {sae.d_in}, but {model.name}'s '{read_at}' has width {width}; "
                          "it was trained on another site or model")
    return model.add_view(name or latent_site(site), read_at, SAEView(sae.eval(), site), sae.n_latents)


class Reconstruct:
    """Engine edit: the site replaced by the SAE's reconstruction (error term dropped)."""

    def __init__(self, sae: SparseAutoencoder, site: str):
        self.sae, self.site = sae, site

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        recon, _ = self.sae(_flat(self.sae, h))
        return recon.view(h.shape).to(h.device, h.dtype)


def reconstruction(sae: SparseAutoencoder, site: str):
    """The edit that splices the reconstruction into ``site``: ``Reconstruct`` for an SAE, a ``Replace`` of
    ``mlp.i`` by the transcoder's prediction from ``mlp.in.i`` for a transcoder."""
    sae.eval()
    if not sae.transcoder:
        return Reconstruct(sae, site)

    def predict(x: torch.Tensor) -> torch.Tensor:
        out, _ = sae(_flat(sae, x))
        return out.view(*x.shape[:-1], sae.d_out).to(x.device)

    return Replace(site, predict)
