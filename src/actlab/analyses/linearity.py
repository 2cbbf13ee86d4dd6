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

This module also holds the small fitting helpers the other analyses share (``fit_affine``,
``split_indices``, ``log_perplexity``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from actlab.analyses.base import ProfileData
from actlab.errors import ActlabError

# ----------------------------------------------------------------------------- shared fitting helpers

#: ridge used when the system is well conditioned (relative to the mean eigenvalue 1 of the
#: standardized Gram matrix): numerically negligible, it only guards the solve
RIDGE_TINY = 1e-6
#: ridge used when the system is ill-conditioned (fewer than 2 samples per input dimension or a
#: condition number above ``COND_LIMIT``)
RIDGE_ILL = 1e-3
COND_LIMIT = 1e8


@dataclass
class AffineFit:
    """``y ~ x @ weight + bias`` fitted by (ridge) least squares."""

    weight: torch.Tensor  # [d_in, d_out] float64
    bias: torch.Tensor  # [d_out] float64
    ridge: float  # lambda used, relative to the standardized Gram matrix (mean eigenvalue 1)
    condition: float  # condition number of the standardized Gram matrix
    n: int  # samples it was fitted on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight + self.bias


def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> AffineFit:
    """Least-squares affine map from ``x`` [n, d_in] to ``y`` [n, d_out], in float64.

    Inputs are centered and every input column scaled to unit variance before solving
    ``(Z^T Z / n + lambda I) A = Z^T Y / n``, so ``lambda`` is relative to the mean eigenvalue (1)
    of the standardized Gram matrix and the huge-variance "massive activation" channels do not
    dominate the regularization. With ``ridge=None`` lambda is ``RIDGE_TINY`` (1e-6) for a
    well-conditioned system and ``RIDGE_ILL`` (1e-3) when n < 2 d_in or the condition number
    exceeds 1e8. Constant input columns are ignored.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ActlabError(f"fit_affine needs [n, d] inputs with the same n; got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    if n < 2:
        raise ActlabError("fit_affine needs at least two samples")
    x = x.double()
    y = y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    sd = xc.pow(2).mean(0).sqrt()
    live = sd > 1e-12 * max(float(sd.max()), 1e-300)
    scale = torch.where(live, sd, torch.ones_like(sd))
    z = xc / scale
    z[:, ~live] = 0.0
    gram = z.T @ z / n
    eig = torch.linalg.eigvalsh(gram[live][:, live]) if bool(live.any()) else torch.ones(1, dtype=torch.float64)
    condition = float(eig[-1] / eig[0].clamp(min=1e-300)) if float(eig[-1]) > 0 else math.inf
    if ridge is None:
        ridge = RIDGE_ILL if (n < 2 * d or condition > COND_LIMIT) else RIDGE_TINY
    system = gram + ridge * torch.eye(d, dtype=torch.float64)
    a = torch.linalg.solve(system, z.T @ yc / n)
    weight = a / scale.unsqueeze(1)
    weight[~live] = 0.0
    bias = my - mx @ weight
    return AffineFit(weight=weight, bias=bias, ridge=float(ridge), condition=condition, n=n)


def explained(pred: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - ||pred - y||_F^2 / ||y - mean(y)||_F^2``: the linearity score of normalised data."""
    y = y.double()
    sst = float((y - y.mean(0)).pow(2).sum())
    if sst <= 0:
        return float("nan")
    return 1.0 - float((pred.double() - y).pow(2).sum()) / sst


def linearity_score(x: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> float:
    """The paper's in-sample score: center, scale to unit Frobenius norm, fit A, ``1 - ||XA - Y||^2``."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    x = x / x.norm().clamp(min=1e-300)
    y = y / y.norm().clamp(min=1e-300)
    fit = fit_affine(x, y, ridge)
    return 1.0 - float((fit(x) - y).pow(2).sum())


def heldout_linearity(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                      ridge: float | None = None) -> tuple[float, AffineFit]:
    """Score of an affine map fitted on ``train`` rows and applied to ``test`` rows.

    Normalising ``Y`` to unit Frobenius norm after centering makes the paper's ``1 - ||XA - Y||^2``
    equal to ``1 - SSE / SST``; on held-out rows that is what is returned (the map's bias is
    fitted too, so the centering uses the training means).
    """
    fit = fit_affine(x[train], y[train], ridge)
    return explained(fit(x[test]), y[test]), fit


def split_indices(n: int, n_test: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (seeded) split of ``range(n)`` into train and test rows; test is half by default."""
    if n < 4:
        raise ActlabError(f"the reservoir holds only {n} tokens; profile more text (at least a few hundred tokens)")
    n_test = n // 2 if n_test is None else max(1, min(int(n_test), n - 2))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values


def log_perplexity(model, texts: Sequence[str], batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss (nats) on ``texts``, with any active edits applied."""
    from actlab.evals.perplexity import perplexity

    return math.log(perplexity(model, list(texts), batch_size=batch_size))


def block_input_site(model, i: int) -> str:
    return "embed" if i == 0 else f"resid.{i - 1}"


def require_sites(data: ProfileData, sites: Sequence[str], what: str) -> None:
    missing = [s for s in sites if s not in data.samples.acts]
    if missing:
        raise ActlabError(
            f"{what} needs the sites {', '.join(missing)} in the profile reservoir; collect the profile data "
            "with collect_profile_data(model, docs) (default sites) or include them in sites="
        )


# ----------------------------------------------------------------------------- the replacement edit

class _StoreInput:
    """Edit that leaves the block input unchanged and remembers it for the replacement."""

    def __init__(self, site: str, slot: dict):
        self.site = site
        self.slot = slot

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        self.slot["h"] = h
        return h


class _ReplaceOutput:
    """Edit that sets the block output to the affine map of the stored block input."""

    def __init__(self, site: str, slot: dict, weight: torch.Tensor, bias: torch.Tensor):
        self.site = site
        self.slot = slot
        self.weight = weight
        self.bias = bias

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        x = self.slot.get("h")
        if x is None or x.shape[:-1] != h.shape[:-1]:
            raise ActlabError(f"linear replacement of '{self.site}': the block input was not seen in this forward pass")
        w = self.weight.to(h.device, h.dtype)
        b = self.bias.to(h.device, h.dtype)
        self.slot["h"] = None
        return (x.to(h.dtype) @ w + b).reshape(h.shape)


@dataclass
class LinearReplacement:
    """Replace block ``layer`` by an affine map of its input: ``resid.i <- h_in @ weight + bias``.

    ``h_in`` is ``resid.{i-1}`` (``embed`` for block 0) of the same forward pass. Use it like any
    edit: ``with model.edit(LinearReplacement(...)): ...``. It is two engine edits: one at the block
    input that stores ``h_in`` (and leaves it unchanged), one at ``resid.i`` that replaces the
    block output.
    """

    layer: int
    weight: torch.Tensor  # [d_model, d_model]
    bias: torch.Tensor  # [d_model]
    input_site: str = ""

    def __post_init__(self) -> None:
        if not self.input_site:
            self.input_site = "embed" if self.layer == 0 else f"resid.{self.layer - 1}"
        self.site = f"resid.{self.layer}"

    @classmethod
    def from_fit(cls, layer: int, fit: AffineFit) -> "LinearReplacement":
        return cls(layer=layer, weight=fit.weight.float(), bias=fit.bias.float())

    def edits(self) -> list:
        slot: dict = {}
        return [_StoreInput(self.input_site, slot), _ReplaceOutput(self.site, slot, self.weight, self.bias)]


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
        text = f"most linear block {self.most_linear}: {self.score[self.most_linear]:.3f}"
        text += f" (least: block {self.least_linear}, {self.score[self.least_linear]:.3f})"
        d_most, d_least = self.delta(self.most_linear), self.delta(self.least_linear)
        if d_most is not None and d_least is not None:
            text += f"; replaced by its linear fit: Δloss {d_most:+.3f} vs {d_least:+.3f} nats"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "score": _floats(self.score),
            "score_residual_removed": _floats(self.score_residual_removed),
            "score_in_sample": _floats(self.score_in_sample),
            "score_residual_removed_in_sample": _floats(self.score_residual_removed_in_sample),
            "ridge": _floats(self.ridge),
            "condition": _floats(self.condition),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "most_linear": self.most_linear,
            "least_linear": self.least_linear,
            "base_loss": _float(self.base_loss),
            "base_perplexity": _float(math.exp(self.base_loss)) if self.base_loss is not None else None,
            "replaced_loss": {str(k): _float(v) for k, v in self.replaced_loss.items()},
            "replaced_delta": {str(k): _float(self.delta(k)) for k in self.replaced_loss},
            "replacement_note": self.replacement_note,
        }

    def figures(self) -> list:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.layers, self.score, "o-", label="block output (held-out)")
        ax.plot(self.layers, self.score_residual_removed, "s-", label="residual removed: output − input (held-out)")
        ax.plot(self.layers, self.score_in_sample, ":", color="gray", label="block output (in-sample, as in the paper)")
        ax.set_xlabel("block")
        ax.set_ylabel("linearity score (1 = linear)")
        ax.set_ylim(min(0.0, min(_finite(self.score_residual_removed + self.score), default=0.0)) - 0.02, 1.02)
        ax.set_xticks(self.layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title("Layer linearity (Razzhigaev et al. 2024)")
        fig.tight_layout()
        figs = [fig]
        if self.replaced_loss and self.base_loss is not None:
            fig2 = Figure(figsize=(4.8, 3.0))
            ax2 = fig2.add_subplot(1, 1, 1)
            blocks = sorted(self.replaced_loss)
            deltas = [self.delta(b) for b in blocks]
            colors = ["tab:green" if b == self.most_linear else "tab:red" if b == self.least_linear else "tab:gray"
                      for b in blocks]
            ax2.bar([str(b) for b in blocks], deltas, color=colors)
            ax2.set_xlabel("block replaced by its linear fit")
            ax2.set_ylabel("Δ loss (nats/token)")
            ax2.set_title("green: most linear, red: least linear")
            ax2.grid(alpha=0.3, axis="y")
            fig2.tight_layout()
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


def _float(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _floats(values) -> list:
    return [_float(v) for v in values]


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


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
    n_layers = model.n_layers
    require_sites(data, ["embed"] + [f"resid.{i}" for i in range(n_layers)], "layer_linearity")
    samples = data.samples
    n = len(samples)
    train, test = split_indices(n, seed=seed)
    layers = list(range(n_layers))
    score, score_rr, score_in, score_rr_in, ridges, conds = [], [], [], [], [], []
    fits = {}
    for i in layers:
        x = samples[block_input_site(model, i)].double()
        y = samples[f"resid.{i}"].double()
        s, fit = heldout_linearity(x, y, train, test, ridge)
        s_rr, _ = heldout_linearity(x, y - x, train, test, ridge)
        score.append(s)
        score_rr.append(s_rr)
        score_in.append(linearity_score(x, y, ridge))
        score_rr_in.append(linearity_score(x, y - x, ridge))
        ridges.append(fit.ridge)
        conds.append(fit.condition)
        fits[i] = x, y
    ranked = sorted(layers, key=lambda i: (-score[i] if math.isfinite(score[i]) else math.inf))
    most, least = ranked[0], ranked[-1]
    result = LinearityResult(
        key="linearity",
        title="Layer linearity",
        explanation=EXPLANATION,
        layers=layers,
        score=score,
        score_residual_removed=score_rr,
        score_in_sample=score_in,
        score_residual_removed_in_sample=score_rr_in,
        ridge=ridges,
        condition=conds,
        n_train=int(train.numel()),
        n_test=int(test.numel()),
        most_linear=most,
        least_linear=least,
    )
    texts = list(eval_texts) if eval_texts is not None else list(data.eval_texts)
    if replace == "none":
        result.replacement_note = "not run (replace='none')"
    elif not model.has_lm_head:
        result.replacement_note = "not run: the model has no LM head, so there is no loss to compare"
    elif not texts:
        result.replacement_note = "not run: no evaluation texts were given"
    else:
        chosen = layers if replace == "all" else sorted({most, least})
        result.base_loss = log_perplexity(model, texts, batch_size)
        for i in chosen:
            x, y = fits[i]
            edit = LinearReplacement.from_fit(i, fit_affine(x, y, ridge))  # fitted on every sampled token
            with model.edit(edit):
                result.replaced_loss[i] = log_perplexity(model, texts, batch_size)
        result.replacement_note = (
            f"block replaced by the affine map fitted on all {n} sampled tokens; loss = log-perplexity on "
            f"{len(texts)} evaluation texts"
        )
    return result


__all__ = [
    "AffineFit", "LinearReplacement", "LinearityResult", "explained", "fit_affine",
    "heldout_linearity", "layer_linearity", "linearity_score", "log_perplexity", "split_indices",
]
