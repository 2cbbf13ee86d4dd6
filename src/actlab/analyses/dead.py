"""Dead and rarely-active MLP neurons (``mlp.hidden.*``), after "Neurons in Large Language Models:
Dead, N-gram, Positional" (Voita et al., 2023).

Per layer, the neurons never active (``|x| >= eps`` on no token of the corpus) and those active on
fewer than ``rare`` of the tokens, with their ids. Counted by the streaming stats of one profiling
pass, so "dead" means dead on every profiled token, on encoders and decoders alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actlab.analyses.base import (
    ProfileData, Skipped, layer_index, pick, reservoir_acts, site_stats, sites_of_kind, stats_eps,
)
from actlab.analyses.figures import integer_xaxis, new_axes
from actlab.report.serialize import to_jsonable

__all__ = ["DeadNeuronResult", "dead_neurons"]


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
        return to_jsonable({
            **pick(self, "layers", "sites", "d_mlp", "eps", "rare", "source", "n_tokens"),
            "rare_resolvable": [n * self.rare >= 1 for n in self.n_tokens],
            **pick(self, "dead", "rare_count", "dead_frac", "rare_frac"),
            "total_dead": sum(self.dead),
            "total_rare": sum(self.rare_count),
            "total_neurons": total,
            "total_dead_frac": sum(self.dead) / total if total else None,
            **pick(self, "dead_ids", "rare_ids", "active_frac_quantiles"),
        })

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
        fig, ax = new_axes()
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
