"""Layer linearity: how well a linear map explains each block (Razzhigaev et al. 2024).

"Your Transformer is Secretly Linear" (Razzhigaev et al., 2024) measures, for every block, how
much of the block output is a linear function of its input: both are centered and scaled to unit
Frobenius norm, the least-squares map A is fitted, and the score is ``1 - ||X A - Y||_F^2``
(1.0 = exactly linear). Because the residual stream carries the block input through unchanged,
the same score is also reported for the block's *contribution* ``Y - X`` alone.

Here the map is fitted on one random half of the profile reservoir and scored on the other half
(an in-sample score, as in the paper, is reported next to it), with a ridge term when the
normal equations are ill-conditioned. The most linear block is then replaced by its fitted
affine map inside the running model (``LinearReplacement``) and the change in loss on held-out
texts is compared with replacing the least linear block.

The fits themselves (``fit_affine``, ``heldout_linearity``, ``linearity_score``) live in
``actlab.analyses.affine``, shared with the lenses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from actlab.analyses.affine import AffineFit, fit_affine, heldout_linearity, linearity_score, reservoir_split
from actlab.analyses.base import ProfileData, block_input_site, log_perplexity, pick, require_sites
from actlab.analyses.figures import finite, new_axes
from actlab.engine.edits import Replace, default_input_site
from actlab.errors import ActlabError
from actlab.report.serialize import to_jsonable

# ----------------------------------------------------------------------------- the replacement edit

@dataclass
class LinearReplacement:
    """Replace block ``layer`` by an affine map of its input: ``resid.i <- h_in @ weight + bias``.

    ``h_in`` is ``resid.{i-1}`` (``embed`` for block 0) of the same forward pass. Use it like any
    edit: ``with model.edit(LinearReplacement(...)): ...``. It is the engine's ``Replace`` edit at
    ``resid.i`` with this map as its function (computed in the activation's dtype).
    """

    layer: int
    weight: torch.Tensor  # [d_model, d_model]
    bias: torch.Tensor  # [d_model]
    input_site: str = ""

    def __post_init__(self) -> None:
        self.site = f"resid.{self.layer}"
        self.input_site = self.input_site or default_input_site(self.site)

    @classmethod
    def from_fit(cls, layer: int, fit: AffineFit) -> "LinearReplacement":
        return cls(layer=layer, weight=fit.weight.float(), bias=fit.bias.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.device, x.dtype) + self.bias.to(x.device, x.dtype)

    def edits(self) -> list:
        return Replace(self.site, self, self.input_site).edits()


# ----------------------------------------------------------------------------- the analysis

@dataclass
class LinearityResult:
    key: str
    title: str
    explanation: str
    layers: list[int]
    score: list[float]  # held-out linearity of resid.i given its input
    score_residual_removed: list[float]  # held-out linearity of resid.i - input given the input
    score_in_sample: list[float]  # the paper's in-sample score (fit and score on every token)
    score_residual_removed_in_sample: list[float]
    ridge: list[float]
    condition: list[float]
    n_train: int
    n_test: int
    most_linear: int
    least_linear: int
    base_loss: float | None = None  # log-perplexity on eval texts, nats/token
    replaced_loss: dict[int, float] = field(default_factory=dict)  # block -> loss with it replaced
    replacement_note: str = ""

    def delta(self, layer: int) -> float | None:
        if self.base_loss is None or layer not in self.replaced_loss:
            return None
        return self.replaced_loss[layer] - self.base_loss

    def headline(self) -> str:
        m, l = self.most_linear, self.least_linear
        text = f"held-out affine R²: most linear block {m}: {self.score[m]:.3f}"
        text += f" (least: block {l}, {self.score[l]:.3f}; paper's in-sample score {self.score_in_sample[m]:.3f} / "
        text += f"{self.score_in_sample[l]:.3f})"
        d_most, d_least = self.delta(self.most_linear), self.delta(self.least_linear)
        if d_most is not None and d_least is not None:
            text += f"; replaced by its linear fit: Δloss {d_most:+.3f} vs {d_least:+.3f} nats"
        return text

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            **pick(self, "layers", "score", "score_residual_removed", "score_in_sample",
                   "score_residual_removed_in_sample", "ridge", "condition", "n_train", "n_test", "most_linear",
                   "least_linear", "base_loss"),
            "base_perplexity": math.exp(self.base_loss) if self.base_loss is not None else None,
            "replaced_loss": self.replaced_loss,
            "replaced_delta": {k: self.delta(k) for k in self.replaced_loss},
            "replacement_note": self.replacement_note,
        })

    def figures(self) -> list:
        fig, ax = new_axes(6.4, 3.6, layout="tight")
        ax.plot(self.layers, self.score, "o-", label="block output (held-out)")
        ax.plot(self.layers, self.score_residual_removed, "s-", label="residual removed: output − input (held-out)")
        ax.plot(self.layers, self.score_in_sample, ":", color="gray", label="block output (in-sample, as in the paper)")
        ax.set_xlabel("block")
        ax.set_ylabel("linearity score (1 = linear)")
        ax.set_ylim(min(0.0, min(finite(self.score_residual_removed + self.score), default=0.0)) - 0.02, 1.02)
        ax.set_xticks(self.layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title("Layer linearity (Razzhigaev et al. 2024)")
        figs = [fig]
        if self.replaced_loss and self.base_loss is not None:
            fig2, ax2 = new_axes(4.8, 3.0, layout="tight")
            blocks = sorted(self.replaced_loss)
            deltas = [self.delta(b) for b in blocks]
            colors = ["tab:green" if b == self.most_linear else "tab:red" if b == self.least_linear else "tab:gray"
                      for b in blocks]
            ax2.bar([str(b) for b in blocks], deltas, color=colors)
            ax2.set_xlabel("block replaced by its linear fit")
            ax2.set_ylabel("Δ loss (nats/token)")
            ax2.set_title("green: most linear, red: least linear")
            ax2.grid(alpha=0.3, axis="y")
            figs.append(fig2)
        return figs

    def table(self):
        cols = ["block", "linearity", "residual removed", "in-sample", "Δ loss if replaced"]
        rows = []
        for i, layer in enumerate(self.layers):
            d = self.delta(layer)
            rows.append([layer, round(self.score[i], 4), round(self.score_residual_removed[i], 4),
                         round(self.score_in_sample[i], 4), None if d is None else round(d, 4)])
        return cols, rows


EXPLANATION = (
    "How linear is each transformer block? Following 'Your Transformer is Secretly Linear' (Razzhigaev et al., "
    "2024), the block input X (the residual stream before the block) and output Y (after it) of sampled tokens are "
    "centered and scaled to unit Frobenius norm, a least-squares linear map A is fitted, and the score is "
    "1 − ||XA − Y||², so 1.0 means the block acts exactly linearly on these tokens. Here A is fitted on one random "
    "half of the sampled tokens and scored on the other half (the paper's in-sample score is the dotted line). "
    "Because the residual connection copies X into Y, scores near 1 are expected; the second line removes that "
    "copy and scores the block's own contribution Y − X, which is much less linear. Each bar below shows how much "
    "the loss on held-out text rises when a block is replaced by its fitted linear map: replacing the most linear "
    "block should cost far less than replacing the least linear one."
)


def block_fit(model, data: ProfileData, layer: int, ridge: float | None = None) -> AffineFit:
    """The affine map ``resid.{layer-1} -> resid.{layer}`` fitted on every reservoir token: what the
    replacement check swaps the block for."""
    samples = data.samples
    return fit_affine(samples[block_input_site(model, layer)].double(), samples[f"resid.{layer}"].double(), ridge)


def _block_scores(model, data: ProfileData, train: torch.Tensor, test: torch.Tensor,
                  ridge: float | None) -> dict[str, list[float]]:
    """Per block: held-out and in-sample linearity of the output and of the residual-removed contribution."""
    out: dict[str, list[float]] = {k: [] for k in ("score", "rr", "in", "rr_in", "ridge", "condition")}
    for i in range(model.n_layers):
        x = data.samples[block_input_site(model, i)].double()
        y = data.samples[f"resid.{i}"].double()
        s, fit = heldout_linearity(x, y, train, test, ridge)
        out["score"].append(s)
        out["rr"].append(heldout_linearity(x, y - x, train, test, ridge)[0])
        out["in"].append(linearity_score(x, y, ridge))
        out["rr_in"].append(linearity_score(x, y - x, ridge))
        out["ridge"].append(fit.ridge)
        out["condition"].append(fit.condition)
    return out


def _replacement_check(model, data: ProfileData, result: LinearityResult, texts: list[str], replace: str,
                       ridge: float | None, batch_size: int) -> None:
    """Fill ``base_loss`` / ``replaced_loss`` (or say why not) on ``result``."""
    if replace == "none":
        result.replacement_note = "not run (replace='none')"
        return
    if not model.has_lm_head:
        result.replacement_note = "not run: the model has no LM head, so there is no loss to compare"
        return
    if not texts:
        result.replacement_note = "not run: no evaluation texts were given"
        return
    chosen = result.layers if replace == "all" else sorted({result.most_linear, result.least_linear})
    result.base_loss = log_perplexity(model, texts, batch_size)
    for i in chosen:
        with model.edit(LinearReplacement.from_fit(i, block_fit(model, data, i, ridge))):
            result.replaced_loss[i] = log_perplexity(model, texts, batch_size)
    result.replacement_note = (
        f"block replaced by the affine map fitted on all {len(data.samples)} sampled tokens; loss = log-perplexity "
        f"on {len(texts)} evaluation texts"
    )


def layer_linearity(
    model,
    data: ProfileData,
    eval_texts: Sequence[str] | None = None,
    *,
    ridge: float | None = None,
    replace: str = "extremes",
    seed: int = 0,
    batch_size: int = 8,
) -> LinearityResult:
    """Linearity score of every block on the profile reservoir, and the cost of linearising one.

    ``eval_texts`` (default ``data.eval_texts``) are used for the loss check; without texts or without
    an LM head that part is left out. ``replace="extremes"`` replaces the most and the least linear
    block, ``"all"`` every block in turn, ``"none"`` none.
    """
    if replace not in ("extremes", "all", "none"):
        raise ActlabError(f"replace must be 'extremes', 'all' or 'none', not {replace!r}")
    layers = list(range(model.n_layers))
    require_sites(data, ["embed"] + [f"resid.{i}" for i in layers], "layer_linearity")
    train, test = reservoir_split(len(data.samples), seed=seed)
    sc = _block_scores(model, data, train, test, ridge)
    score = sc["score"]
    ranked = sorted(layers, key=lambda i: (-score[i] if math.isfinite(score[i]) else math.inf))
    result = LinearityResult(
        key="linearity", title="Layer linearity", explanation=EXPLANATION, layers=layers, score=score,
        score_residual_removed=sc["rr"], score_in_sample=sc["in"], score_residual_removed_in_sample=sc["rr_in"],
        ridge=sc["ridge"], condition=sc["condition"], n_train=int(train.numel()), n_test=int(test.numel()),
        most_linear=ranked[0], least_linear=ranked[-1],
    )
    texts = list(eval_texts) if eval_texts is not None else list(data.eval_texts)
    _replacement_check(model, data, result, texts, replace, ridge, batch_size)
    return result


__all__ = ["LinearReplacement", "LinearityResult", "block_fit", "layer_linearity"]
