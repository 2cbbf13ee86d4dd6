"""Sparse autoencoders: TopK, BatchTopK and JumpReLU, one module with a ``kind``.

One class (not three) so that the file format, the trainer and the metrics see a single shape of
object: ``W_enc [d_in, n]``, ``b_enc [n]``, ``W_dec [n, d_in]`` with unit-norm rows, ``b_dec [d_in]``,
plus the per-kind state (``threshold`` for BatchTopK, ``log_threshold`` for JumpReLU) and an
``input_scale`` (inputs are scaled to unit mean squared norm before encoding and the scale is
undone on decode, so thresholds and learning rates do not depend on the model's activation scale).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actlab.errors import ActlabError

__all__ = ["KINDS", "SparseAutoencoder"]

KINDS = ("topk", "batchtopk", "jumprelu")


class _JumpStep(torch.autograd.Function):
    """Heaviside step H(pre - θ) with a straight-through gradient for θ only (rectangle kernel of width ε).

    Used for the L0 penalty: d/dθ H(pre - θ) ≈ -(1/ε)·rect((pre - θ)/ε); ``pre`` gets no gradient
    from the penalty, as in the JumpReLU paper."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        rect = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype)
        return None, (-(grad * rect) / ctx.eps).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre - θ): the exact gradient for ``pre``, the rectangle-kernel estimate for θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        on = (pre > theta).to(pre.dtype)
        rect = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype)
        return grad * on, (-(grad * rect) * theta / ctx.eps).sum(0), None


class SparseAutoencoder(nn.Module):
    """``forward(x) -> (recon, latents)``; ``encode`` / ``decode`` for the two halves.

    BatchTopK keeps the ``k·batch`` largest activations of the whole batch in training mode
    (``sae.train()``) and, in eval mode, every activation above the single ``threshold`` the
    trainer estimated (the BatchTopK paper's inference rule), so a token's latents do not depend
    on the other tokens of its batch. JumpReLU keeps activations above a learned per-latent
    threshold; ``bandwidth`` is the width of the straight-through estimator's kernel.
    """

    def __init__(self, d_in: int, n_latents: int, kind: str = "topk", k: int | None = 32, *,
                 bandwidth: float = 0.001, init_threshold: float = 0.001, seed: int = 0):
        super().__init__()
        _check_shape(d_in, n_latents, kind, k)
        self.d_in, self.n_latents, self.kind = d_in, n_latents, kind
        self.k = int(k) if kind != "jumprelu" else None
        self.bandwidth = float(bandwidth)
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(n_latents, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # the decoder's transpose: a good start for both
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))
        if kind == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))
            self.register_buffer("threshold_count", torch.zeros(()))
        if kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold)))

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """What rebuilds this module (the file header's ``config``)."""
        return {"d_in": self.d_in, "n_latents": self.n_latents, "kind": self.kind, "k": self.k,
                "bandwidth": self.bandwidth}

    @property
    def thresholds(self) -> torch.Tensor | None:
        """The inference threshold(s): [n] for JumpReLU, a scalar for BatchTopK, None for TopK."""
        if self.kind == "jumprelu":
            return self.log_threshold.exp()
        return self.threshold if self.kind == "batchtopk" else None

    # ------------------------------------------------------------------ the two halves
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of scaled, decoder-bias-centred inputs (also the AuxK loss's input)."""
        self.check_input(x)
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse latents [batch, n_latents] (nonnegative)."""
        return self.activate(self.pre_activations(x))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The kind's sparsifying nonlinearity on pre-activations."""
        if self.kind == "topk":
            return _keep_topk(pre.relu(), self.k)
        if self.kind == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.bandwidth)
        if self.training:
            flat = pre.relu().reshape(-1)
            kept = min(self.k * pre.shape[0], flat.numel())
            values, index = flat.topk(kept, sorted=False)
            return torch.zeros_like(flat).scatter(0, index, values).reshape(pre.shape)
        return pre * (pre > self.threshold).to(pre.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the input's own scale."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def l0_penalty(self, pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU's sparsity loss: mean active latents per row, with a gradient for the thresholds."""
        return _JumpStep.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(1).mean()

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def update_threshold(self, z: torch.Tensor) -> None:
        """BatchTopK: fold this batch's smallest kept activation into the threshold: a plain mean over
        the first 100 batches, then an exponential mean over about the last 100 (early batches,
        made by a barely trained encoder, should not weigh on the final threshold)."""
        if self.kind != "batchtopk":
            return
        kept = z[z > 0]
        if kept.numel():
            self.threshold_count += 1
            rate = 1.0 / float(min(self.threshold_count.item(), 100.0))
            self.threshold += (kept.min() - self.threshold) * rate

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (so latent magnitudes carry the scale, not the dictionary)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove each decoder row's gradient component along the row (the step then mostly rotates it)."""
        g = self.W_dec.grad
        if g is not None:
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_in:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ActlabError(f"the SAE expects activations of shape [batch, {self.d_in}], not {shape}; "
                              "read the site the SAE was trained on")


def _keep_topk(acts: torch.Tensor, k: int) -> torch.Tensor:
    values, index = acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter(-1, index, values)


def _check_shape(d_in, n_latents, kind, k) -> None:
    for name, value in (("d_in", d_in), ("n_latents", n_latents)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ActlabError(f"{name} must be a positive integer, not {value!r}")
    if kind not in KINDS:
        raise ActlabError(f"SAE kind must be one of {KINDS}, not {kind!r}")
    if kind != "jumprelu":
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_latents:
            raise ActlabError(f"k must be an integer from 1 to n_latents ({n_latents}) for a {kind} SAE, not {k!r}; "
                              "lower k or widen the dictionary")
