"""Logit lens and fitted (linear-shortcut) lens: what each layer already predicts.

The logit lens (nostalgebraist, 2020) decodes an intermediate residual stream ``resid.i``
directly with the model's final norm and unembedding. "Jump to Conclusions" (Din et al., 2023)
instead fits a linear map ``A_i: resid.i -> resid.{L-1}`` by least squares and decodes
``A_i(resid.i)``; the tuned lens (Belrose et al., 2023) is the same idea trained on KL. Both are
compared per layer with the model's own output distribution on held-out reservoir tokens.

``Decoder`` (final norm, then LM head, then Gemma's logit softcapping) is shared with the neuron
readout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actlab.analyses.base import ProfileData, Skipped
from actlab.analyses.linearity import _floats, explained, fit_affine, require_sites, split_indices
from actlab.errors import ActlabError


class Decoder:
    """Map residual vectors [n, d_model] to the model's logits [n, vocab] (float32).

    final norm (the ``final`` site's module; OPT's ``project_out`` after it when present) ->
    output embeddings (LM head) -> ``tanh`` softcapping when ``config.final_logit_softcapping``
    is set (Gemma 2/3). Decoding ``resid.{L-1}`` reproduces the model's own logits.
    """

    def __init__(self, model):
        if not model.has_lm_head:
            raise ActlabError(f"{model.sitemap.model_class} has no LM head; there is nothing to decode with")
        hf = model.hf
        self.norm = None
        self.project_out = None
        if "final" in model.sitemap:
            path = model.sitemap["final"].module_path
            self.norm = hf.get_submodule(path)
            parent = hf.get_submodule(path.rsplit(".", 1)[0]) if "." in path else hf
            project = getattr(parent, "project_out", None)
            self.project_out = project if isinstance(project, torch.nn.Module) else None
        self.head = hf.get_output_embeddings()
        cfg = getattr(hf.config, "text_config", None) or hf.config
        cap = getattr(cfg, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.dtype = model.dtype
        self.device = model.device

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (and projection) applied to ``h``: the LM head's input."""
        h = h.to(self.device, self.dtype)
        with torch.no_grad():
            if self.norm is not None:
                h = self.norm(h)
            if self.project_out is not None:
                h = self.project_out(h)
        return h

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head (and softcapping) applied to already-normed vectors."""
        with torch.no_grad():
            out = self.head(normed.to(self.device, self.dtype)).float()
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.cpu()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(self.normed(h))


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
        return {
            "layers": list(self.layers),
            "top1_logit": _floats(self.top1_logit),
            "top1_fitted": _floats(self.top1_fitted),
            "kl_logit": _floats(self.kl_logit),
            "kl_fitted": _floats(self.kl_fitted),
            "fit_r2": _floats(self.fit_r2),
            "fitted_beats_logit": list(self.fitted_beats_logit),
            "ridge": _floats(self.ridge),
            "n_train": self.n_train,
            "n_test": self.n_test,
        }

    def figures(self) -> list:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8.0, 3.4))
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
        fig.tight_layout()
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
    train, test = split_indices(n, eval_tokens, seed)
    last = samples[sites[-1]]
    fits = [fit_affine(samples[s][train], last[train], ridge) for s in sites]
    fit_r2 = [explained(f(samples[s][test]), last[test]) for f, s in zip(fits, sites)]
    decoder = Decoder(model)
    chunk = max(16, min(1024, (1 << 23) // max(1, decoder.vocab_size)))
    agree = {k: [0] * n_layers for k in ("logit", "fitted")}
    kl = {k: [0.0] * n_layers for k in ("logit", "fitted")}
    for start in range(0, test.numel(), chunk):
        rows = test[start : start + chunk]
        lp_model = torch.log_softmax(decoder(last[rows]), -1)
        p_model = lp_model.exp()
        top_model = lp_model.argmax(-1)
        for i, site in enumerate(sites):
            h = samples[site][rows]
            for kind, vec in (("logit", h), ("fitted", fits[i](h).float())):
                lp = torch.log_softmax(decoder(vec), -1)
                agree[kind][i] += int((lp.argmax(-1) == top_model).sum())
                kl[kind][i] += float((p_model * (lp_model - lp)).sum(-1).clamp(min=0).sum())
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


__all__ = ["Decoder", "LensResult", "lenses"]
