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
import warnings

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
        return torch.addmm(self.b_enc, encoder_input(self, x), self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse latents [batch, n_latents] (nonnegative)."""
        return self.activate(self.pre_activations(x))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The kind's sparsifying nonlinearity on pre-activations."""
        if self.kind == "topk":
            return _keep_topk(pre, self.k)
        if self.kind == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.bandwidth)
        if self.kind == "relu":
            return pre.relu()
        if self.training:  # relu after the selection: the kept values are the same, one pass fewer
            flat = pre.reshape(-1)
            values, index = flat.topk(min(self.k * pre.shape[0], flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter(0, index, values.relu()).reshape(pre.shape)
        return pre * (pre > self.threshold).to(pre.dtype)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in the target's own scale (``x``, the input, is needed with a skip connection)."""
        return self.decode_scaled(z, x) / self.target_scale

    def decode_scaled(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in training scale (what the loss compares with ``target * target_scale``)."""
        return _bias_and_skip(self, z @ self.W_dec, x)

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


def _keep_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense TopK latents: relu of each row's k largest pre-activations (relu after the selection keeps the
    same values as selecting on relu(pre): fewer than k positive ones are padded with zeros either way)."""
    values, index = _topk(pre, k)
    return torch.zeros_like(pre).scatter(-1, index, values.relu())


def _bias_and_skip(sae: SparseAutoencoder, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    out = out + sae.b_dec
    if sae.skip:
        if x is None:
            raise ActlabError("this SAE has a skip connection: decode(z, x) needs the input x as well")
        out = out + (x * sae.input_scale) @ sae.W_skip
    return out


def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=-1, sorted=False)`` for long rows, about 1.4x faster: the latents are cut into
    strided blocks (block j holds latents j, j + w, j + 2w, ...); a row's top k lie in its k blocks with
    the largest maxima (an element of any other block is below k block maxima), so the top k is taken
    among those k·m candidates. The same values (and, but for ties, indices) as ``torch.topk``."""
    rows, n = pre.shape
    m = 1
    while m * 2 <= math.isqrt(n // max(k, 1)) and n % (m * 2) == 0:
        m *= 2
    if m < 4:
        return pre.topk(k, dim=-1, sorted=False)
    width = n // m
    blocks = pre.view(rows, m, width).amax(1).topk(k, dim=-1, sorted=False).indices
    cols = (blocks.unsqueeze(-1) + width * torch.arange(m, device=pre.device)).view(rows, k * m)
    values, j = pre.gather(1, cols).topk(k, dim=-1, sorted=False)
    return values, cols.gather(1, j)


# ------------------------------------------------------------------ the trainer's sparse path
_CHUNK = 1 << 21  # pre-activations are made this many at a time (8 MB): no 32 MB temporaries to page in


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns once that CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseCode(torch.autograd.Function):
    """``(out, values)``: ``values = relu(picked)``, the pre-activations ``picked`` (computed without a graph
    from ``xc @ W_enc + b_enc``) at the kept places of a CSR pattern ``crow``, ``col`` over [batch, n], and
    ``out = Σ values·W_dec[col]`` per row (no bias). The backward touches only the kept places: the values'
    gradient is a sampled product, W_dec's and W_enc's are sparse products sharing one latent-major sort, and
    ``b_dec`` (None for a transcoder) gets the encoder side of its gradient through ``xc = x·s - b_dec``."""

    @staticmethod
    def forward(ctx, picked, crow, col, xc, W_enc, b_enc, b_dec, W_dec):
        values = picked.relu()
        out = _csr(crow, col, values, (xc.shape[0], W_dec.shape[0])) @ W_dec
        ctx.save_for_backward(crow, col, values, xc, W_enc, W_dec)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(values)
        return out, values

    @staticmethod
    def backward(ctx, grad, _):
        crow, col, values, xc, W_enc, W_dec = ctx.saved_tensors
        batch, n = xc.shape[0], W_dec.shape[0]
        kept = _csr(crow, col, values, (batch, n))
        g_values = torch.sparse.sampled_addmm(kept, grad, W_dec.t(), beta=0.0).values() * (values > 0)
        narrow = torch.int16 if n <= 1 << 15 else torch.int32  # the same stable order, a faster sort
        order = col.to(narrow).argsort(stable=True)  # latent-major; rows stay ascending within a latent
        row = torch.repeat_interleave(crow.diff())[order]
        by_latent = torch.zeros(n + 1, dtype=crow.dtype, device=crow.device)
        by_latent[1:] = torch.bincount(col, minlength=n).cumsum(0)
        g_dec = _csr(by_latent, row, values[order], (n, batch)) @ grad
        g_enc = (_csr(by_latent, row, g_values[order], (n, batch)) @ xc).t()
        g_b_enc = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, col, g_values)
        g_b_dec = -(W_enc @ g_b_enc) if ctx.has_b_dec else None
        return None, None, None, None, g_enc, g_b_enc, g_b_dec, g_dec


def encoder_input(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """What the encoder multiplies: the scaled input, less ``b_dec`` for an SAE (not for a transcoder)."""
    return x * sae.input_scale if sae.transcoder else x * sae.input_scale - sae.b_dec


def sparse_decode(sae: SparseAutoencoder, xc: torch.Tensor, code: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ relu(pre)·W_dec over a code's kept places, their values)``, with sparse gradients (``_SparseCode``);
    ``code`` is ``(picked pre-activations, crow, col)``."""
    return _SparseCode.apply(*code, xc, sae.W_enc, sae.b_enc, None if sae.transcoder else sae.b_dec, sae.W_dec)


def topk_code(parts: list, latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A code from row chunks' ``(values, index)`` top-k results (indices into ``latents`` if given)."""
    values, index = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
    col = (latents[index] if latents is not None else index).reshape(-1)
    return values.reshape(-1), torch.arange(0, col.numel() + 1, index.shape[1], device=col.device), col


def pick_topk(pre: torch.Tensor, latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code of each row's k largest pre-activations among ``latents``."""
    return topk_code([_topk(pre.index_select(1, latents), k)], latents)


def sparse_forward(sae: SparseAutoencoder, x: torch.Tensor, aux: tuple[torch.Tensor, int] | None = None,
                   revive: torch.Tensor | None = None) -> tuple:
    """A TopK / BatchTopK SAE's training forward without dense latents: ``(recon in training scale, kept values,
    their latents, aux code, encoder input, gaps)``, the same reconstruction and gradients as
    ``decode_scaled(activate(pre_activations(x)), x)``. ``aux = (dead latents, k)`` also picks each row's top k
    dead latents (the AuxK loss's code, else None). ``revive`` (latent indices) also gives, for each of them, how
    far its best pre-activation of the batch fell short of firing (≤ 0 where it would fire; else ``gaps`` is
    None). TopK makes the pre-activations a chunk of rows at a time."""
    with torch.no_grad():
        xc = encoder_input(sae, x)
        rows = max(1, _CHUNK // sae.n_latents) if sae.kind == "topk" else x.shape[0]
        main, extra, gaps = [], [], None
        buffer = torch.empty(min(rows, x.shape[0]), sae.n_latents, dtype=xc.dtype, device=xc.device)
        for part in xc.split(rows):
            pre = torch.addmm(sae.b_enc, part, sae.W_enc, out=buffer[:part.shape[0]])
            if aux is not None:
                extra.append(_topk(pre.index_select(1, aux[0]), aux[1]))
            if sae.kind == "topk":
                main.append(_topk(pre, sae.k))
                if revive is not None:  # a latent fires where it beats the row's k-th value and 0
                    gap = (pre.index_select(1, revive) - main[-1][0].amin(1, keepdim=True).clamp_min(0)).amax(0)
                    gaps = gap if gaps is None else torch.maximum(gaps, gap)
        if sae.kind == "topk":
            code = topk_code(main)
        else:  # BatchTopK: the batch's k·batch largest, in row order
            n = pre.shape[1]
            values, flat = pre.view(-1).topk(min(sae.k * pre.shape[0], pre.numel()), sorted=False)
            if revive is not None:  # here a latent fires where it beats the batch's smallest kept value and 0
                gaps = pre.index_select(1, revive).amax(0) - values.amin().clamp_min(0)
            flat, order = flat.sort()
            crow = torch.zeros(pre.shape[0] + 1, dtype=torch.int64, device=pre.device)
            crow[1:] = torch.bincount(flat // n, minlength=pre.shape[0]).cumsum(0)
            code = (values[order], crow, flat % n)
    out, values = sparse_decode(sae, xc, code)
    return (_bias_and_skip(sae, out, x), values, code[2], topk_code(extra, aux[0]) if aux is not None else None,
            xc, gaps)


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
