"""Activation sparsity and lazy neurons of the MLP hidden layer (``mlp.hidden.*``).

``activation_sparsity``: per layer, the fraction of MLP neurons that are exactly zero, or below
the stats threshold ``eps`` in magnitude, on a token; how that fraction is spread over tokens; and
top-k keep-rate curves (how much of a token's activation mass its k largest neurons carry). After
"The Lazy Neuron Phenomenon" (Li et al., ICLR 2023). Computed from one profiling pass
(``ProfileData``), valid on encoders and decoders alike. Dead neurons are ``actlab.analyses.dead``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from actlab.analyses.base import (
    ProfileData, Skipped, layer_index, pick, reservoir_acts, site_stats, sites_of_kind, stats_eps,
)
from actlab.analyses.figures import drawn, integer_xaxis, layer_colors, legend, new_axes
from actlab.report.serialize import to_jsonable

__all__ = ["DEFAULT_KEEP_FRACTIONS", "SparsityResult", "activation_sparsity", "keep_ks", "topk_keep_rate"]

# Fractions of d_mlp at which the top-k keep rate is evaluated.
DEFAULT_KEEP_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------- top-k keep rate
def topk_keep_rate(x: torch.Tensor, ks: Sequence[int], power: int = 1, chunk: int = 4096) -> np.ndarray:
    """Mean over tokens of the share of each token's activation mass held by its top-k neurons.

    For token t with neurons ``x_t``, mass ``m_tj = |x_tj| ** power`` (power 1 = L1, 2 = squared
    L2), ``keep_t(k) = sum of the k largest m_tj / sum_j m_tj`` (1 when the token's mass is 0).
    Returns ``[len(ks)]``: ``keep(k)`` averaged over the tokens (rows) of ``x``.
    """
    ks = [int(k) for k in ks]
    width = x.shape[1]
    if any(k < 1 or k > width for k in ks):
        raise ValueError(f"every k must lie in [1, {width}], got {ks}")
    idx = torch.tensor([k - 1 for k in ks])
    total = torch.zeros(len(ks), dtype=torch.float64)
    n = x.shape[0]
    for start in range(0, n, chunk):
        m = x[start : start + chunk].double().abs()
        if power != 1:
            m = m.pow(power)
        cum = torch.sort(m, dim=1, descending=True).values.cumsum(1)
        mass = cum[:, -1:]
        keep = torch.where(mass > 0, cum[:, idx] / mass.clamp(min=1e-300), torch.ones_like(cum[:, idx]))
        total += keep.sum(0)
    return (total / max(n, 1)).numpy()


def keep_ks(width: int, fractions: Sequence[float]) -> list[int]:
    """k = round(fraction * width), at least 1 and at most width."""
    return [min(width, max(1, int(round(f * width)))) for f in fractions]


# --------------------------------------------------------------------------- sparsity
@dataclass
class SparsityResult:
    """Per-layer MLP activation sparsity (see ``activation_sparsity``)."""

    layers: list[int]
    sites: list[str]
    d_mlp: int
    eps: float
    n_tokens: list[int]  # tokens seen by the stats, per layer
    zero_frac: list[float]  # mean over tokens of the fraction of neurons exactly 0
    small_frac: list[float]  # ... with |x| < eps
    token_hist_edges: list[float]  # bin edges on [0, 1] of the per-token near-zero fraction
    token_hist: list[list[int]]  # [layer][bin] token counts (|x| < eps), whole corpus
    token_zero_quantiles: list[dict[str, float]]  # per layer p10/p50/p90 of per-token exact-zero fraction (reservoir)
    keep_fractions: list[float]
    keep_k: list[int]
    keep_l1: list[list[float]]  # [layer][k]: mean share of a token's L1 mass in its top-k neurons
    keep_l2: list[list[float]]  # [layer][k]: same with squared magnitudes (energy)
    n_reservoir: int
    source: str = "stats"  # "stats" (whole corpus) or "reservoir" (sample only)
    key: str = "sparsity"
    title: str = "Activation sparsity and lazy neurons"
    explanation: str = (
        "How many MLP neurons are silent on a token. For every layer we count the fraction of the "
        "MLP hidden units (the input of the down projection) that are exactly zero, and that are "
        "smaller than eps in magnitude, averaged over all profiled tokens, and show how that fraction "
        "varies from token to token. The keep-rate curves show, for the k largest neurons of each "
        "token (k as a fraction of the MLP width), the share of the token's total |activation| (L1 "
        "mass) they hold, averaged over sampled tokens: a curve that rises steeply means a few "
        "neurons do almost all the work even when the others are not exactly zero. 'The Lazy Neuron "
        "Phenomenon' (Li et al., ICLR 2023) found that trained ReLU transformers are extremely "
        "sparse (a few percent of neurons non-zero per token); gated SwiGLU/GELU models are almost "
        "never exactly zero, so look at the |x| < eps and keep-rate numbers there."
    )

    def headline(self) -> str:
        if not self.layers:
            return "no MLP layers"
        z = 100 * float(np.nanmean(self.zero_frac))
        s = 100 * float(np.nanmean(self.small_frac))
        return f"{z:.1f}% exact-zero, {s:.1f}% |x|<{self.eps:g} (mean over layers)"

    def keep_at(self, fraction: float, norm: str = "l1") -> list[float]:
        """Per-layer keep rate at the grid fraction closest to ``fraction``."""
        j = int(np.argmin(np.abs(np.asarray(self.keep_fractions) - fraction)))
        curves = self.keep_l1 if norm == "l1" else self.keep_l2
        return [row[j] for row in curves]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            **pick(self, "layers", "sites", "d_mlp", "eps", "source", "n_tokens", "n_reservoir", "zero_frac",
                   "small_frac"),
            "mean_zero_frac": np.nanmean(self.zero_frac) if self.layers else None,
            "mean_small_frac": np.nanmean(self.small_frac) if self.layers else None,
            **pick(self, "token_hist_edges", "token_hist", "token_zero_quantiles", "keep_fractions", "keep_k",
                   "keep_l1", "keep_l2"),
        })

    def table(self):
        cols = ["layer", "exact zero %", f"|x|<{self.eps:g} %", "per-token zero % p10/p50/p90",
                "top-10% keep (L1) %"]
        keep10 = self.keep_at(0.1) if self.keep_l1 else [math.nan] * len(self.layers)
        rows = []
        for i, layer in enumerate(self.layers):
            q = self.token_zero_quantiles[i]
            rows.append([
                layer,
                round(100 * self.zero_frac[i], 2),
                round(100 * self.small_frac[i], 2),
                "/".join(f"{100 * q[k]:.1f}" for k in ("p10", "p50", "p90")) if q else "",
                round(100 * keep10[i], 2),
            ])
        return cols, rows

    def figures(self) -> list:
        return drawn(self._fraction_figure, self._token_histogram_figure, self._keep_rate_figure) if self.layers else []

    def _fraction_figure(self):
        """Exact-zero and near-zero fractions per layer."""
        fig, ax = new_axes()
        ax.plot(self.layers, [100 * v for v in self.zero_frac], "o-", label="exactly 0")
        ax.plot(self.layers, [100 * v for v in self.small_frac], "s--", label=f"|x| < {self.eps:g}")
        ax.set_xlabel("layer")
        integer_xaxis(ax)
        ax.set_ylabel("% of MLP neurons per token")
        ax.set_ylim(0, 100)
        ax.set_title("MLP activation sparsity")
        ax.legend()
        return fig

    def _token_histogram_figure(self):
        """How the near-zero fraction spreads over tokens, per layer (None without the stats histogram)."""
        if not (self.token_hist and any(sum(h) for h in self.token_hist)):
            return None
        fig, ax = new_axes()
        edges = np.asarray(self.token_hist_edges)
        centers = 100 * (edges[:-1] + edges[1:]) / 2
        cmap = layer_colors(len(self.layers))
        for i, layer in enumerate(self.layers):
            h = np.asarray(self.token_hist[i], dtype=float)
            if h.sum() > 0:
                ax.plot(centers, h / h.sum(), color=cmap(i), label=f"layer {layer}")
        ax.set_xlabel(f"% of neurons with |x| < {self.eps:g} on the token")
        ax.set_ylabel("fraction of tokens")
        ax.set_title("Per-token sparsity distribution")
        legend(ax, len(self.layers))
        return fig

    def _keep_rate_figure(self):
        """Share of a token's L1 mass in its top-k neurons (None without reservoir curves)."""
        if not self.keep_l1:
            return None
        fig, ax = new_axes()
        cmap = layer_colors(len(self.layers))
        xs = [100 * f for f in self.keep_fractions]
        for i, layer in enumerate(self.layers):
            ax.plot(xs, [100 * v for v in self.keep_l1[i]], "o-", ms=3, color=cmap(i), label=f"layer {layer}")
        ax.plot([0, 100], [0, 100], ":", color="grey", label="uniform")
        ax.set_xlabel("top-k neurons kept (% of d_mlp)")
        ax.set_ylabel("% of the token's L1 mass kept")
        ax.set_title("Top-k keep rate")
        legend(ax, len(self.layers) + 1)
        return fig


def activation_sparsity(
    data: ProfileData,
    model=None,
    *,
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
) -> SparsityResult | Skipped:
    """Per-layer MLP sparsity, its per-token distribution and top-k keep-rate curves.

    Whole-corpus numbers (exact-zero and ``|x| < eps`` fractions, the per-token histogram) come
    from ``data.stats``; the per-token quantiles and keep-rate curves from the reservoir
    ``data.samples``. A site the stats lack falls back to the reservoir (``source`` says so).
    """
    sites = sites_of_kind(data, model, "mlp.hidden")
    title = SparsityResult.title
    if not sites:
        return Skipped("sparsity", title, "the profile holds no mlp.hidden sites (this model has no MLP hidden site)",
                       SparsityResult.explanation)
    eps = stats_eps(data.stats, sites[0])
    fractions = [float(f) for f in keep_fractions]
    layers, n_tokens, zero, small, hists, quants, l1, l2 = [], [], [], [], [], [], [], []
    edges: list[float] = []
    d_mlp = 0
    n_res = 0
    source = "stats"
    ks: list[int] = []
    for site in sites:
        st = site_stats(data.stats, site)
        x = reservoir_acts(data, site)
        if st is None and x is None:
            continue
        layers.append(layer_index(site))
        width = int(getattr(st, "width", 0) or (x.shape[1] if x is not None else 0))
        d_mlp = max(d_mlp, width)
        if st is not None and st.count > 0:
            n_tokens.append(int(st.count))
            zero.append(float(st.zeros.sum()) / (st.count * st.width))
            small.append(float(st.small.sum()) / (st.count * st.width))
            hists.append([int(v) for v in st.sparsity_hist.tolist()])
            if not edges:
                edges = [float(v) for v in st.sparsity_edges.tolist()]
        else:  # reservoir fallback: only a sample of tokens
            source = "reservoir"
            n_tokens.append(int(x.shape[0]))
            zero.append(float((x == 0).double().mean()))
            small.append(float((x.abs() < eps).double().mean()))
            hists.append([])
        if x is not None:
            n_res = max(n_res, int(x.shape[0]))
            per_token = (x == 0).double().mean(1).numpy()
            p10, p50, p90 = np.quantile(per_token, [0.1, 0.5, 0.9])
            quants.append({"p10": float(p10), "p50": float(p50), "p90": float(p90), "mean": float(per_token.mean())})
            ks = keep_ks(x.shape[1], fractions)
            l1.append([float(v) for v in topk_keep_rate(x, ks, power=1)])
            l2.append([float(v) for v in topk_keep_rate(x, ks, power=2)])
        else:
            quants.append({})
            l1.append([math.nan] * len(fractions))
            l2.append([math.nan] * len(fractions))
    if not edges:
        bins = max((len(h) for h in hists), default=0)
        edges = list(np.linspace(0, 1, bins + 1)) if bins else []
    return SparsityResult(
        layers=layers, sites=[f"mlp.hidden.{i}" for i in layers], d_mlp=d_mlp, eps=eps, n_tokens=n_tokens,
        zero_frac=zero, small_frac=small, token_hist_edges=edges, token_hist=hists,
        token_zero_quantiles=quants, keep_fractions=fractions, keep_k=ks or keep_ks(max(d_mlp, 1), fractions),
        keep_l1=l1, keep_l2=l2, n_reservoir=n_res, source=source,
    )
