"""Activation sparsity, lazy neurons and dead neurons of the MLP hidden layer (``mlp.hidden.*``).

Two analyses of issue #4, both computed from one profiling pass (``ProfileData``) and both
valid on encoders and decoders alike:

* ``activation_sparsity``: per layer, the fraction of MLP neurons that are exactly zero, or
  below the stats threshold ``eps`` in magnitude, on a token; how that fraction is spread over
  tokens; and top-k keep-rate curves (how much of a token's activation mass its k largest
  neurons carry). After "The Lazy Neuron Phenomenon" (Li et al., ICLR 2023).
* ``dead_neurons``: per layer, the neurons never active (``|x| >= eps`` on no token of the
  corpus) and those active on fewer than ``rare`` of the tokens, with the dead ids. After
  "Neurons in Large Language Models: Dead, N-gram, Positional" (Voita et al., 2023).

Small helpers shared with ``ppl_sparsity`` and ``massive`` (figures, stats access, perplexity)
live here too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from actlab.analyses.base import ProfileData, Skipped

__all__ = [
    "SparsityResult",
    "DeadNeuronResult",
    "activation_sparsity",
    "dead_neurons",
    "topk_keep_rate",
    "DEFAULT_KEEP_FRACTIONS",
]

# Fractions of d_mlp at which the top-k keep rate is evaluated.
DEFAULT_KEEP_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------- shared helpers
def new_figure(width: float = 6.4, height: float = 3.6):
    """A matplotlib Figure bound to an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def integer_xaxis(ax) -> None:
    """Whole-number ticks on the x axis (layers)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def layer_index(site: str) -> int:
    """``mlp.hidden.3`` -> 3."""
    return int(site.rsplit(".", 1)[1])


def sites_of_kind(data: ProfileData, model, kind: str) -> list[str]:
    """Sites ``{kind}.{i}`` present in the profile (stats or reservoir), ordered by layer."""
    pattern = re.compile(rf"^{re.escape(kind)}\.(\d+)$")
    names: set[str] = set()
    for container in (getattr(data.samples, "acts", {}) or {}, _stats_names(data.stats)):
        names.update(s for s in container if pattern.match(s))
    if not names and model is not None:
        names = {s for s in model.sites if pattern.match(s)}
    return sorted(names, key=layer_index)


def _stats_names(stats) -> list[str]:
    if stats is None:
        return []
    for attr in ("sites", "stats"):
        value = getattr(stats, attr, None)
        if isinstance(value, dict):
            return list(value)
        if isinstance(value, (list, tuple)):
            return list(value)
    if isinstance(stats, dict):
        return list(stats)
    try:
        return list(stats.keys())
    except Exception:
        return []


def site_stats(stats, site: str):
    """The ChannelStats of one site from a StatsSink (or a plain dict), or None when absent."""
    if stats is None:
        return None
    for attr in ("stats", "sites"):
        value = getattr(stats, attr, None)
        if isinstance(value, dict) and site in value:
            return value[site]
    try:
        return stats[site]
    except Exception:
        return None


def stats_eps(stats, site: str | None = None, default: float = 1e-3) -> float:
    st = site_stats(stats, site) if site is not None else None
    for source in (st, stats):
        eps = getattr(source, "eps", None)
        if isinstance(eps, (int, float)):
            return float(eps)
    return default


def reservoir_acts(data: ProfileData, site: str) -> torch.Tensor | None:
    acts = getattr(data.samples, "acts", {}) or {}
    x = acts.get(site)
    return None if x is None or x.shape[0] == 0 else x.float()


def perplexity(model, texts: Sequence[str], batch_size: int = 8) -> float:
    """Token-weighted perplexity of ``texts`` (``actlab.evals.perplexity``; active edits apply)."""
    from actlab.evals.perplexity import perplexity as shared

    return float(shared(model, list(texts), batch_size=batch_size))


def decode_token(tokenizer, token_id: int) -> str:
    """The text of one token id ('' when it cannot be decoded)."""
    if tokenizer is None or token_id is None or int(token_id) < 0:
        return ""
    try:
        if hasattr(tokenizer, "decode"):
            return str(tokenizer.decode([int(token_id)]))
        return str(tokenizer.batch_decode([[int(token_id)]])[0])
    except Exception:
        return ""


def _f(x) -> float | None:
    """A JSON-able float (None for NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


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
        return {
            "layers": self.layers,
            "sites": self.sites,
            "d_mlp": self.d_mlp,
            "eps": self.eps,
            "source": self.source,
            "n_tokens": self.n_tokens,
            "n_reservoir": self.n_reservoir,
            "zero_frac": [_f(v) for v in self.zero_frac],
            "small_frac": [_f(v) for v in self.small_frac],
            "mean_zero_frac": _f(np.nanmean(self.zero_frac)) if self.layers else None,
            "mean_small_frac": _f(np.nanmean(self.small_frac)) if self.layers else None,
            "token_hist_edges": [_f(v) for v in self.token_hist_edges],
            "token_hist": self.token_hist,
            "token_zero_quantiles": self.token_zero_quantiles,
            "keep_fractions": self.keep_fractions,
            "keep_k": self.keep_k,
            "keep_l1": [[_f(v) for v in row] for row in self.keep_l1],
            "keep_l2": [[_f(v) for v in row] for row in self.keep_l2],
        }

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
        if not self.layers:
            return []
        figs = []
        fig = new_figure()
        ax = fig.add_subplot()
        ax.plot(self.layers, [100 * v for v in self.zero_frac], "o-", label="exactly 0")
        ax.plot(self.layers, [100 * v for v in self.small_frac], "s--", label=f"|x| < {self.eps:g}")
        ax.set_xlabel("layer")
        integer_xaxis(ax)
        ax.set_ylabel("% of MLP neurons per token")
        ax.set_ylim(0, 100)
        ax.set_title("MLP activation sparsity")
        ax.legend()
        figs.append(fig)

        if self.token_hist and any(sum(h) for h in self.token_hist):
            fig = new_figure()
            ax = fig.add_subplot()
            edges = np.asarray(self.token_hist_edges)
            centers = 100 * (edges[:-1] + edges[1:]) / 2
            cmap = _cmap(len(self.layers))
            for i, layer in enumerate(self.layers):
                h = np.asarray(self.token_hist[i], dtype=float)
                if h.sum() > 0:
                    ax.plot(centers, h / h.sum(), color=cmap(i), label=f"layer {layer}")
            ax.set_xlabel(f"% of neurons with |x| < {self.eps:g} on the token")
            ax.set_ylabel("fraction of tokens")
            ax.set_title("Per-token sparsity distribution")
            _legend(ax, len(self.layers))
            figs.append(fig)

        if self.keep_l1:
            fig = new_figure()
            ax = fig.add_subplot()
            cmap = _cmap(len(self.layers))
            xs = [100 * f for f in self.keep_fractions]
            for i, layer in enumerate(self.layers):
                ax.plot(xs, [100 * v for v in self.keep_l1[i]], "o-", ms=3, color=cmap(i), label=f"layer {layer}")
            ax.plot([0, 100], [0, 100], ":", color="grey", label="uniform")
            ax.set_xlabel("top-k neurons kept (% of d_mlp)")
            ax.set_ylabel("% of the token's L1 mass kept")
            ax.set_title("Top-k keep rate")
            _legend(ax, len(self.layers) + 1)
            figs.append(fig)
        return figs


def _cmap(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return lambda i: cmap(i / max(n - 1, 1))


def _legend(ax, n: int) -> None:
    ax.legend(fontsize="small", ncol=1 if n <= 8 else 2)


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


# --------------------------------------------------------------------------- dead neurons
@dataclass
class DeadNeuronResult:
    """Per-layer dead and rarely-active MLP neurons (see ``dead_neurons``)."""

    layers: list[int]
    sites: list[str]
    d_mlp: list[int]
    eps: float
    rare: float
    n_tokens: list[int]
    dead: list[int]  # neurons with |x| >= eps on no token
    rare_count: list[int]  # neurons active on > 0 but < rare of the tokens
    dead_ids: list[list[int]]
    rare_ids: list[list[int]]
    active_frac_quantiles: list[dict[str, float]]  # per layer p1/p50/p99 of the per-neuron active fraction
    source: str = "stats"
    key: str = "dead_neurons"
    title: str = "Dead and rarely-active neurons"
    explanation: str = (
        "MLP neurons that never fire. A neuron counts as active on a token when |x| >= eps; it is "
        "dead when it is active on no profiled token, and rare when it is active on some but fewer "
        "than a fraction `rare` (0.1% by default) of the tokens. The bars show, per layer, the share "
        "of MLP neurons that are dead and rare. Dead neurons waste parameters and can be pruned "
        "without changing the model on this data; 'Neurons in Large Language Models: Dead, N-gram, "
        "Positional' (Voita et al., 2023) found that in OPT models many neurons of the first layers "
        "are dead. ReLU models can have truly dead neurons; gated (SwiGLU) models almost never do. "
        "With few profiled tokens, 'rare' cannot be told apart from 'dead' (see n_tokens)."
    )

    @property
    def dead_frac(self) -> list[float]:
        return [d / w if w else math.nan for d, w in zip(self.dead, self.d_mlp)]

    @property
    def rare_frac(self) -> list[float]:
        return [r / w if w else math.nan for r, w in zip(self.rare_count, self.d_mlp)]

    def headline(self) -> str:
        total = sum(self.d_mlp)
        if not total:
            return "no MLP layers"
        return (f"{sum(self.dead)} dead ({100 * sum(self.dead) / total:.2f}%), "
                f"{sum(self.rare_count)} rare of {total} neurons")

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.d_mlp)
        return {
            "layers": self.layers,
            "sites": self.sites,
            "d_mlp": self.d_mlp,
            "eps": self.eps,
            "rare": self.rare,
            "source": self.source,
            "n_tokens": self.n_tokens,
            "rare_resolvable": [n * self.rare >= 1 for n in self.n_tokens],
            "dead": self.dead,
            "rare_count": self.rare_count,
            "dead_frac": [_f(v) for v in self.dead_frac],
            "rare_frac": [_f(v) for v in self.rare_frac],
            "total_dead": sum(self.dead),
            "total_rare": sum(self.rare_count),
            "total_neurons": total,
            "total_dead_frac": _f(sum(self.dead) / total) if total else None,
            "dead_ids": self.dead_ids,
            "rare_ids": self.rare_ids,
            "active_frac_quantiles": self.active_frac_quantiles,
        }

    def table(self):
        cols = ["layer", "neurons", "dead", "dead %", f"rare (<{100 * self.rare:g}%)", "rare %",
                "active-frac p1/p50/p99 %"]
        rows = []
        for i, layer in enumerate(self.layers):
            q = self.active_frac_quantiles[i]
            rows.append([layer, self.d_mlp[i], self.dead[i], round(100 * self.dead_frac[i], 2), self.rare_count[i],
                         round(100 * self.rare_frac[i], 2),
                         "/".join(f"{100 * q[k]:.1f}" for k in ("p1", "p50", "p99")) if q else ""])
        return cols, rows

    def figures(self) -> list:
        if not self.layers:
            return []
        fig = new_figure()
        ax = fig.add_subplot()
        x = np.asarray(self.layers, dtype=float)
        ax.bar(x - 0.2, [100 * v for v in self.dead_frac], width=0.4, label="dead")
        ax.bar(x + 0.2, [100 * v for v in self.rare_frac], width=0.4, label=f"rare (< {100 * self.rare:g}% of tokens)")
        ax.set_xlabel("layer")
        integer_xaxis(ax)
        ax.set_ylabel("% of MLP neurons")
        ax.set_title(f"Dead and rare neurons (active: |x| >= {self.eps:g})")
        ax.legend()
        return [fig]


def dead_neurons(data: ProfileData, model=None, rare: float = 1e-3) -> DeadNeuronResult | Skipped:
    """Per layer, MLP neurons never active (|x| >= eps on no token) and active on < ``rare`` of tokens.

    Counts come from the streaming stats (every profiled token); a site missing from the stats
    falls back to the reservoir sample (then "dead" only means "not active in the sample").
    """
    sites = sites_of_kind(data, model, "mlp.hidden")
    title = DeadNeuronResult.title
    if not sites:
        return Skipped("dead_neurons", title,
                       "the profile holds no mlp.hidden sites (this model has no MLP hidden site)",
                       DeadNeuronResult.explanation)
    eps = stats_eps(data.stats, sites[0])
    out: dict[str, list] = {k: [] for k in ("layers", "d_mlp", "n", "dead", "rare", "dead_ids", "rare_ids", "q")}
    source = "stats"
    for site in sites:
        st = site_stats(data.stats, site)
        if st is not None and st.count > 0:
            active = st.active.to(torch.float64)
            n = int(st.count)
        else:
            x = reservoir_acts(data, site)
            if x is None:
                continue
            source = "reservoir"
            active = (x.abs() >= eps).sum(0).to(torch.float64)
            n = int(x.shape[0])
        frac = active / n
        dead_mask = active == 0
        rare_mask = (~dead_mask) & (frac < rare)
        out["layers"].append(layer_index(site))
        out["d_mlp"].append(int(active.shape[0]))
        out["n"].append(n)
        out["dead"].append(int(dead_mask.sum()))
        out["rare"].append(int(rare_mask.sum()))
        out["dead_ids"].append(torch.nonzero(dead_mask).flatten().tolist())
        out["rare_ids"].append(torch.nonzero(rare_mask).flatten().tolist())
        q = np.quantile(frac.numpy(), [0.01, 0.5, 0.99])
        out["q"].append({"p1": float(q[0]), "p50": float(q[1]), "p99": float(q[2])})
    return DeadNeuronResult(
        layers=out["layers"], sites=[f"mlp.hidden.{i}" for i in out["layers"]], d_mlp=out["d_mlp"], eps=eps,
        rare=float(rare), n_tokens=out["n"], dead=out["dead"], rare_count=out["rare"], dead_ids=out["dead_ids"],
        rare_ids=out["rare_ids"], active_frac_quantiles=out["q"], source=source,
    )
