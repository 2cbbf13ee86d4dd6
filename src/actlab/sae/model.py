"""Sparse autoencoders: TopK, BatchTopK and JumpReLU, one module with a ``kind``.

One class (not three) so that the file format, the trainer and the metrics see a single shape of
object: ``W_enc [d_in, n]``, ``b_enc [n]``, ``W_dec [n, d_out]`` with unit-norm rows, ``b_dec [d_out]``,
plus the per-kind state (``threshold`` for BatchTopK, ``log_threshold`` for JumpReLU) and an
``input_scale`` (inputs are scaled to unit mean squared norm before encoding and the scale is
undone on decode, so thresholds and learning rates do not depend on the model's activation scale).

A **transcoder** is the same module with a target of its own (``d_out``; it reads ``mlp.in.i`` and
predicts ``mlp.i``): it does not subtract ``b_dec`` from its input (input and output live in
different spaces), and it scales its target by ``output_scale``. ``skip=True`` adds a linear skip
connection ``W_skip [d_in, d_out]`` (initialised at zero) to the reconstruction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actlab.errors import ActlabError

__all__ = ["KINDS", "SparseAutoencoder"]

KINDS = ("topk", "batchtopk", "jumprelu", "relu")
TRAINABLE_KINDS = ("topk", "batchtopk", "jumprelu")  # "relu" (L1-trained SAEs) is read from other libraries


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
                 d_out: int | None = None, skip: bool = False, bandwidth: float = 0.001,
                 init_threshold: float = 0.001, seed: int = 0):
        super().__init__()
        _check_shape(d_in, n_latents, kind, k)
        if d_out is not None and (isinstance(d_out, bool) or not isinstance(d_out, int) or d_out < 1):
            raise ActlabError(f"d_out must be a positive integer (a transcoder's output width) or None, not {d_out!r}")
        self.d_in, self.n_latents, self.kind = d_in, n_latents, kind
        self.transcoder = d_out is not None
        self.d_out = d_out if d_out is not None else d_in
        self.skip = bool(skip)
        self.k = int(k) if kind in ("topk", "batchtopk") else None
        self.bandwidth = float(bandwidth)
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(n_latents, self.d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if self.transcoder:  # no shared space: a random encoder of the same scale
            w_enc = torch.randn(d_in, n_latents, generator=gen) / math.sqrt(d_in)
        else:  # the decoder's transpose: a good start for both
            w_enc = w_dec.t().clone()
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out))
        self.register_buffer("input_scale", torch.ones(()))
        if self.transcoder:
            self.register_buffer("output_scale", torch.ones(()))
        if kind == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))
            self.register_buffer("threshold_count", torch.zeros(()))
        if kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold)))

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """What rebuilds this module (the file header's ``config``)."""
        config = {"d_in": self.d_in, "n_latents": self.n_latents, "kind": self.kind, "k": self.k,
                  "bandwidth": self.bandwidth}
        if self.transcoder:
            config["d_out"] = self.d_out
        if self.skip:
            config["skip"] = True
        return config

    @property
    def target_scale(self) -> torch.Tensor:
        """The factor that takes the target (the input, or a transcoder's output site) to training scale."""
        return self.output_scale if self.transcoder else self.input_scale

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
        if self.transcoder:
            return (x * self.input_scale) @ self.W_enc + self.b_enc
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
        if self.kind == "relu":
            return pre.relu()
        if self.training:
            flat = pre.relu().reshape(-1)
            kept = min(self.k * pre.shape[0], flat.numel())
            values, index = flat.topk(kept, sorted=False)
            return torch.zeros_like(flat).scatter(0, index, values).reshape(pre.shape)
        return pre * (pre > self.threshold).to(pre.dtype)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in the target's own scale (``x``, the input, is needed with a skip connection)."""
        return self.decode_scaled(z, x) / self.target_scale

    def decode_scaled(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in training scale (what the loss compares with ``target * target_scale``)."""
        out = z @ self.W_dec + self.b_dec
        if self.skip:
            if x is None:
                raise ActlabError("this SAE has a skip connection: decode(z, x) needs the input x as well")
            out = out + (x * self.input_scale) @ self.W_skip
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z, x), z

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

    def check_target(self, y: torch.Tensor) -> None:
        if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[1] != self.d_out:
            shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ActlabError(f"the transcoder's target should have shape [batch, {self.d_out}], not {shape}")

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
    if kind in ("topk", "batchtopk"):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_latents:
            raise ActlabError(f"k must be an integer from 1 to n_latents ({n_latents}) for a {kind} SAE, not {k!r}; "
                              "lower k or widen the dictionary")
