"""How good an SAE is on a set of activations: reconstruction (MSE, FVU, cosine) and sparsity (L0, dead, dense).

Computed in chunks under ``no_grad`` in eval mode (BatchTopK then uses its learned threshold, as at
inference), with sums accumulated in float64 so the numbers do not depend on the chunk size.
"""

from __future__ import annotations

import torch

from actlab.errors import ActlabError
from actlab.sae.model import SparseAutoencoder

__all__ = ["evaluate_sae"]


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor | None = None, *, chunk: int = 8192,
                 dense_above: float = 0.1) -> dict:
    """``fvu`` (residual sum of squares over the total about the mean), ``mse`` (per element), ``l0`` (mean
    active latents per row), ``dead_fraction`` (latents that never fire on ``x``), ``dense_fraction``
    (firing on more than ``dense_above`` of rows), ``cosine`` (mean cosine of each row with its
    reconstruction), ``density`` (each latent's firing rate, a list) and ``n`` (rows). A transcoder
    is scored against its targets ``y``."""
    sae.check_input(x)
    if sae.transcoder:
        if y is None:
            raise ActlabError("a transcoder is scored against its targets: evaluate_sae(sae, inputs, targets)")
        sae.check_target(y)
        if y.shape[0] != x.shape[0]:
            raise ActlabError(f"{x.shape[0]} inputs but {y.shape[0]} targets")
    y = x if y is None else y
    if x.shape[0] < 2 or not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all()):
        raise ActlabError("evaluate_sae needs at least 2 rows of finite activations")
    was_training = sae.training
    sae.eval()
    x, y = x.float(), y.float()
    mean = y.mean(0, dtype=torch.float64)
    rss = tss = cos = l0 = 0.0
    fires = torch.zeros(sae.n_latents, dtype=torch.int64)
    try:
        for part, target in zip(x.split(chunk), y.split(chunk)):
            recon, z = sae(part)
            rss += float((recon - target).double().pow(2).sum())
            tss += float((target.double() - mean).pow(2).sum())
            cos += float(torch.nn.functional.cosine_similarity(recon, target, dim=1, eps=1e-12).double().sum())
            active = z > 0
            l0 += float(active.sum())
            fires += active.sum(0)
    finally:
        sae.train(was_training)
    n = x.shape[0]
    return {"fvu": rss / max(tss, 1e-300), "mse": rss / (n * sae.d_out), "l0": l0 / n,
            "density": (fires.double() / n).tolist(),
            "dead_fraction": float((fires == 0).float().mean()),
            "dense_fraction": float((fires > dense_above * n).float().mean()), "cosine": cos / n, "n": n}
