"""Logit lens and fitted (linear-shortcut) lens: what each layer already predicts.

The logit lens (nostalgebraist, 2020) decodes an intermediate residual stream ``resid.i``
directly with the model's final norm and unembedding. "Jump to Conclusions" (Din et al., 2023)
instead fits a linear map ``A_i: resid.i -> resid.{L-1}`` by least squares and decodes
``A_i(resid.i)``; the tuned lens (Belrose et al., 2023) is the same idea trained on KL. Both are
compared per layer with the model's own output distribution on held-out reservoir tokens.

Decoding (final norm, OPT's ``project_out``, LM head, Gemma's logit softcapping) is the model
anatomy's ``decode``, shared with the neuron readout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab import linalg
from actlab.analyses.affine import fit_affine, reservoir_split
from actlab.analyses.base import ProfileData, Skipped, pick, require_sites
from actlab.analyses.figures import new_figure
from actlab.report.serialize import to_jsonable


@dataclass
class LensResult:
    key: str
    title: str
    explanation: str
    layers: list[int]
    top1_logit: list[float]  # fraction of held-out tokens whose lens argmax = model argmax
    top1_fitted: list[float]
    kl_logit: list[float]  # mean KL(model || lens), nats
    kl_fitted: list[float]
    fit_r2: list[float]  # held-out explained fraction of resid.{L-1} by the fitted map
    ridge: list[float]
    n_train: int
    n_test: int

    @property
    def fitted_beats_logit(self) -> list[bool]:
        """Per layer: the fitted lens has higher top-1 agreement or lower KL than the logit lens."""
        return [f > g or kf < kg for f, g, kf, kg in zip(self.top1_fitted, self.top1_logit, self.kl_fitted, self.kl_logit)]

    def headline(self) -> str:
        inner = self.layers[:-1] or self.layers
        k = len(inner)
        mean = lambda xs: sum(xs[:k]) / k  # noqa: E731
        wins = sum(self.fitted_beats_logit[:k])
        return (f"mean top-1 agreement, layers 0–{inner[-1]}: logit lens {100 * mean(self.top1_logit):.0f}% · "
                f"fitted lens {100 * mean(self.top1_fitted):.0f}% (fitted better at {wins}/{k})")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(pick(self, "layers", "top1_logit", "top1_fitted", "kl_logit", "kl_fitted", "fit_r2",
                                "fitted_beats_logit", "ridge", "n_train", "n_test"))

    def figures(self) -> list:
        fig = new_figure(8.0, 3.4, layout="tight")
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.plot(self.layers, [100 * v for v in self.top1_logit], "o-", label="logit lens")
        ax1.plot(self.layers, [100 * v for v in self.top1_fitted], "s-", label="fitted lens")
        ax1.set_ylabel("top-1 agreement with the model (%)")
        ax1.set_ylim(-2, 102)
        kl_floor = 1e-6
        ax2.plot(self.layers, [max(v, kl_floor) for v in self.kl_logit], "o-", label="logit lens")
        ax2.plot(self.layers, [max(v, kl_floor) for v in self.kl_fitted], "s-", label="fitted lens")
        ax2.set_yscale("log")
        ax2.set_ylabel("KL(model ‖ lens), nats")
        for ax in (ax1, ax2):
            ax.set_xlabel("layer (resid.i)")
            ax.set_xticks(self.layers)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Logit lens vs fitted linear lens (Din et al. 2023)", fontsize=10)
        return [fig]

    def table(self):
        cols = ["layer", "top-1 logit lens", "top-1 fitted lens", "KL logit lens", "KL fitted lens", "fit R²"]
        rows = [[layer, round(self.top1_logit[i], 4), round(self.top1_fitted[i], 4), round(self.kl_logit[i], 4),
                 round(self.kl_fitted[i], 4), round(self.fit_r2[i], 4)] for i, layer in enumerate(self.layers)]
        return cols, rows


EXPLANATION = (
    "What does each layer already 'know' about the model's next-token prediction? The logit lens (nostalgebraist, "
    "2020) decodes the residual stream after layer i directly with the model's final norm and unembedding. The "
    "fitted lens, after 'Jump to Conclusions' (Din et al., 2023; compare the tuned lens of Belrose et al., 2023), "
    "first maps that residual with a linear map (with bias) fitted by least squares to predict the last layer's "
    "residual, then decodes it. Maps are fitted on part of the sampled tokens and evaluated on the rest. Left: how "
    "often the lens's top token equals the model's own top token; right: KL divergence from the model's "
    "distribution to the lens's (lower is better). Both lenses are exact at the last layer; a fitted lens far above "
    "the logit lens at early layers means the early residual stream holds the prediction in a different basis than "
    "the one the unembedding reads."
)


def lenses(
    model,
    data: ProfileData,
    eval_tokens: int | None = None,
    *,
    ridge: float | None = None,
    seed: int = 0,
) -> LensResult | Skipped:
    """Logit lens and fitted lens at every ``resid.i``, scored against the model's output.

    ``eval_tokens`` reservoir tokens (default: half the reservoir, at most 1024) are held out for
    scoring; the maps ``resid.i -> resid.{L-1}`` are fitted (``fit_affine``) on the others.
    """
    if not model.has_lm_head:
        return Skipped(key="lenses", title="Logit lens and fitted lens", explanation=EXPLANATION,
                       reason=f"{model.sitemap.model_class} has no LM head (an encoder); there are no logits to decode")
    n_layers = model.n_layers
    sites = [f"resid.{i}" for i in range(n_layers)]
    require_sites(data, sites, "lenses")
    samples = data.samples
    n = len(samples)
    if eval_tokens is None:
        eval_tokens = min(n // 2, 1024)
    train, test = reservoir_split(n, eval_tokens, seed)
    last = samples[sites[-1]]
    fits = [fit_affine(samples[s][train], last[train], ridge) for s in sites]
    fit_r2 = [linalg.r2_score(f(samples[s][test]), last[test]) for f, s in zip(fits, sites)]
    agree, kl = _score_lenses(model.anatomy, data, sites, fits, test)
    m = test.numel()
    return LensResult(
        key="lenses",
        title="Logit lens and fitted lens",
        explanation=EXPLANATION,
        layers=list(range(n_layers)),
        top1_logit=[a / m for a in agree["logit"]],
        top1_fitted=[a / m for a in agree["fitted"]],
        kl_logit=[v / m for v in kl["logit"]],
        kl_fitted=[v / m for v in kl["fitted"]],
        fit_r2=fit_r2,
        ridge=[f.ridge for f in fits],
        n_train=int(train.numel()),
        n_test=int(m),
    )


def _score_lenses(anatomy, data: ProfileData, sites: list[str], fits: list, test: torch.Tensor):
    """Per layer and lens kind: how many ``test`` tokens agree with the model's top token, and the summed KL."""
    samples = data.samples
    last = samples[sites[-1]]

    def decode(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return anatomy.decode(h).cpu()

    chunk = max(16, min(1024, (1 << 23) // max(1, anatomy.vocab_size)))
    agree = {k: [0] * len(sites) for k in ("logit", "fitted")}
    kl = {k: [0.0] * len(sites) for k in ("logit", "fitted")}
    for start in range(0, test.numel(), chunk):
        rows = test[start : start + chunk]
        lp_model = torch.log_softmax(decode(last[rows]), -1)
        p_model = lp_model.exp()
        top_model = lp_model.argmax(-1)
        for i, site in enumerate(sites):
            h = samples[site][rows]
            for kind, vec in (("logit", h), ("fitted", fits[i](h).float())):
                lp = torch.log_softmax(decode(vec), -1)
                agree[kind][i] += int((lp.argmax(-1) == top_model).sum())
                kl[kind][i] += float((p_model * (lp_model - lp)).sum(-1).clamp(min=0).sum())
    return agree, kl


__all__ = ["LensResult", "lenses"]
