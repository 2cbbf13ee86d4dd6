"""Module redundancy: how little each attention / MLP sub-layer changes the residual stream.

"What Matters in Transformers? Not All Attention Is Needed" (He et al., 2024) scores every
sub-layer by the cosine similarity between its input and its output (high similarity = the
sub-layer barely changes the hidden state = redundant) and shows that many attention sub-layers
of trained LLMs can be dropped with little loss. Here the similarity is averaged over the profile
reservoir's tokens, and the k most redundant attention sub-layers are dropped (their output set
to zero, so the residual connection passes the input through) and the perplexity compared with
dropping k random ones (the mean and spread over several distinct draws) and the k least redundant ones.

Definitions of a sub-layer's input X and output Y, from the reservoir sites:

* sequential pre-LN blocks (Llama, GPT-2, Gemma, ...): attention X = ``resid.{i-1}`` (``embed``
  for block 0), Y = X + ``attn.i``; MLP X = X_attn + ``attn.i``, Y = ``resid.i``.
* parallel residual (GPT-NeoX ``use_parallel_residual``, Phi-1/2, GPT-J, Falcon ``parallel_attn``):
  both sub-layers read the same X = ``resid.{i-1}``; attention Y = X + ``attn.i``, MLP Y = X + ``mlp.i``.
* post-LN blocks (BERT family): attention X = ``resid.{i-1}``,
  Y = X + ``attn.i`` (the sum that enters the attention LayerNorm); MLP X = LN_attn(X + ``attn.i``)
  (recomputed with the block's attention-output LayerNorm), Y = that + ``mlp.i`` (the sum that
  enters the output LayerNorm). The LayerNorms themselves are not part of either sub-layer.

Which definition applies, and the post-LN block's LayerNorm, are the model anatomy's
(``model.anatomy.structure``, ``model.anatomy.post_attn_norm(i)``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from actlab.analyses.base import ProfileData, block_input_site, log_perplexity, pick, require_sites
from actlab.analyses.figures import new_axes
from actlab.engine.config import positive_int
from actlab.errors import ActlabError
from actlab.report.serialize import to_jsonable

def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Average over rows of cos(x_row, y_row)."""
    x, y = x.double(), y.double()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-30)
    return float(cos.mean())


class ZeroSite:
    """Edit that sets a site to zero (drops an attention or MLP sub-layer: the residual passes through)."""

    def __init__(self, site: str):
        self.site = site

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        return torch.zeros_like(h)

    def __repr__(self) -> str:
        return f"ZeroSite({self.site!r})"


def drop_attention(layers: Sequence[int]) -> list[ZeroSite]:
    """Edits dropping the attention sub-layers of ``layers`` (``with model.edit(drop_attention([3, 5])): ...``)."""
    return [ZeroSite(f"attn.{i}") for i in layers]


@dataclass
class RedundancyResult:
    key: str
    title: str
    explanation: str
    layers: list[int]
    attn_cos: list[float]  # mean cos(input, output) of the attention sub-layer, per block
    mlp_cos: list[float]
    structure: str  # 'sequential', 'parallel' or 'post-ln'
    ranking: list[int]  # attention sub-layers, most redundant first
    base_perplexity: float | None = None
    drops: list[dict] = field(default_factory=list)  # {k, strategy, layers, perplexity}; random: + spread, draws
    note: str = ""

    def drop(self, k: int, strategy: str) -> dict | None:
        for d in self.drops:
            if d["k"] == k and d["strategy"] == strategy:
                return d
        return None

    def headline(self) -> str:
        top = self.ranking[0]
        text = f"most redundant attention: block {top} (cos {self.attn_cos[top]:.3f})"
        ks = sorted({d["k"] for d in self.drops})
        if ks and self.base_perplexity is not None:
            k = max(ks)
            most, rand = self.drop(k, "most"), self.drop(k, "random")
            text += f"; drop {k}: ppl {self.base_perplexity:.2f} → {most['perplexity']:.2f}"
            if rand is not None:
                text += (f" (random {k}: {rand['perplexity']:.2f} ± {rand['perplexity_std']:.2f} over "
                         f"{len(rand['draws'])} draws; {rand['most_vs_random']})")
        return text

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            **pick(self, "layers", "attn_cos", "mlp_cos", "structure", "ranking", "base_perplexity"),
            "drops": self.drops,
            "note": self.note,
        })

    def figures(self) -> list:
        figs = []
        fig, ax = new_axes(6.0, 3.4, layout="tight")
        ax.plot(self.layers, self.attn_cos, "o-", label="attention")
        ax.plot(self.layers, self.mlp_cos, "s-", label="MLP")
        ax.set_xlabel("block")
        ax.set_ylabel("mean cos(input, output)")
        ax.set_xticks(self.layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Sub-layer redundancy (He et al. 2024): higher = changes less")
        figs.append(fig)
        if self.drops and self.base_perplexity is not None:
            fig2, ax2 = new_axes(5.2, 3.4, layout="tight")
            for strategy, marker in (("most", "o-"), ("random", "^--"), ("least", "s:")):
                pts = sorted((d["k"], d["perplexity"]) for d in self.drops if d["strategy"] == strategy)
                if pts:
                    ax2.plot([0] + [p[0] for p in pts], [self.base_perplexity] + [p[1] for p in pts], marker,
                             label=f"{strategy} redundant" if strategy != "random" else "random")
            ax2.set_xlabel("attention sub-layers dropped (k)")
            ax2.set_ylabel("perplexity")
            ax2.set_yscale("log")
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=8)
            figs.append(fig2)
        return figs

    def table(self):
        cols = ["k", "strategy", "dropped attention blocks", "perplexity", "× base", "random spread (sd; min–max)"]
        rows = []
        for d in self.drops:
            ratio = d["perplexity"] / self.base_perplexity if self.base_perplexity else None
            blocks = ("; ".join(",".join(map(str, r["layers"])) for r in d["draws"]) if "draws" in d
                      else ", ".join(map(str, d["layers"])))
            spread = (f"{d['perplexity_std']:.3f}; {d['perplexity_min']:.3f}–{d['perplexity_max']:.3f}"
                      if "draws" in d else "")
            rows.append([d["k"], d["strategy"], blocks, round(d["perplexity"], 3),
                         None if ratio is None else round(ratio, 3), spread])
        return cols, rows


EXPLANATION = (
    "Which sub-layers barely change the hidden state? Following 'What Matters in Transformers? Not All Attention Is "
    "Needed' (He et al., 2024), each attention and MLP sub-layer is scored by the cosine similarity between its "
    "input and its output (input plus what the sub-layer adds to the residual stream), averaged over sampled tokens: "
    "close to 1 means the sub-layer is nearly an identity and likely redundant. The table drops the k attention "
    "sub-layers with the highest similarity (their output set to zero, so the residual passes through) and reports "
    "the perplexity on held-out text next to dropping k random ones (the mean over several distinct random draws, "
    "with its spread) and the k least redundant ones; if similarity "
    "identifies redundancy, the 'most redundant' line stays lowest."
)


def _cosines(model, data: ProfileData, structure: str) -> tuple[list[float], list[float], str]:
    """Per block: mean cos(input, output) of the attention and of the MLP sub-layer, and a note."""
    s = data.samples
    attn_cos, mlp_cos = [], []
    note = ""
    for i in range(model.n_layers):
        x = s[block_input_site(model, i)].double()
        attn = s[f"attn.{i}"].double()
        attn_cos.append(mean_cosine(x, x + attn))
        if structure == "sequential":
            mlp_cos.append(mean_cosine(x + attn, s[f"resid.{i}"].double()))
        elif structure == "parallel":
            mlp_cos.append(mean_cosine(x, x + s[f"mlp.{i}"].double()))
        else:
            norm = model.anatomy.post_attn_norm(i)
            if norm is None:
                mlp_cos.append(float("nan"))
                note = "post-LN block without a recognisable attention LayerNorm: MLP similarity not computed"
                continue
            with torch.no_grad():
                p = next(norm.parameters(), None)
                mid = norm((x + attn).to(p.dtype if p is not None else torch.float32)).double()
            mlp_cos.append(mean_cosine(mid, mid + s[f"mlp.{i}"].double()))
    return attn_cos, mlp_cos, note


def _random_subsets(n_layers: int, k: int, draws: int, gen: torch.Generator) -> list[list[int]]:
    """``draws`` distinct random k-subsets of the blocks (all of them, in order, when there are no more)."""
    if math.comb(n_layers, k) <= draws:
        return [list(c) for c in itertools.combinations(range(n_layers), k)]
    seen: list[list[int]] = []
    while len(seen) < draws:
        chosen = sorted(torch.randperm(n_layers, generator=gen)[:k].tolist())
        if chosen not in seen:
            seen.append(chosen)
    return seen


def _compare(most: float, ppls: list[float]) -> str:
    """How the most-redundant drop compares with the random draws."""
    mean, std = statistics.fmean(ppls), statistics.pstdev(ppls)
    if most < min(ppls):
        return f"lower than all {len(ppls)} random draws"
    if most < mean - std:
        return "lower than the random mean by more than one standard deviation"
    if most < mean:
        return "lower than the random mean, within one standard deviation"
    return "not lower than the random mean"


def _drop_experiment(model, result: RedundancyResult, texts: list[str], ks: list[int], seed: int,
                     batch_size: int, draws: int) -> None:
    """Perplexity with the k most / random (several draws) / least redundant attention sub-layers dropped."""
    n_layers = len(result.layers)

    def ppl(chosen):
        with model.edit(drop_attention(chosen)):
            return math.exp(log_perplexity(model, texts, batch_size))

    result.base_perplexity = math.exp(log_perplexity(model, texts, batch_size))
    gen = torch.Generator().manual_seed(seed)
    for k in ks:
        most = {"k": k, "strategy": "most", "layers": sorted(result.ranking[:k])}
        most["perplexity"] = ppl(most["layers"])
        runs = [{"layers": chosen, "perplexity": ppl(chosen)} for chosen in _random_subsets(n_layers, k, draws, gen)]
        values = [r["perplexity"] for r in runs]
        rand = {"k": k, "strategy": "random", "layers": sorted({i for r in runs for i in r["layers"]}),
                "perplexity": statistics.fmean(values), "perplexity_std": statistics.pstdev(values),
                "perplexity_min": min(values), "perplexity_max": max(values), "draws": runs,
                "most_vs_random": _compare(most["perplexity"], values)}
        least = {"k": k, "strategy": "least", "layers": sorted(result.ranking[-k:])}
        least["perplexity"] = ppl(least["layers"])
        result.drops += [most, rand, least]


def module_redundancy(
    model,
    data: ProfileData,
    eval_texts: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 2, 4),
    *,
    seed: int = 0,
    batch_size: int = 8,
    random_draws: int = 5,
) -> RedundancyResult:
    """Input/output cosine of every attention and MLP sub-layer, and perplexity when dropping attention.

    The dropping experiment runs on models with an LM head when ``eval_texts`` (default
    ``data.eval_texts``) are given, for every ``k`` in ``ks`` smaller than the number of layers. The
    random baseline is the mean over ``random_draws`` distinct seeded draws of k blocks (every k-subset
    when there are no more than that), reported with its standard deviation, range and draws.
    """
    positive_int(random_draws, "random_draws")
    n_layers = model.n_layers
    structure = model.anatomy.structure
    needed = ["embed"] + [f"resid.{i}" for i in range(n_layers)] + [f"attn.{i}" for i in range(n_layers)]
    if structure != "sequential":
        needed += [f"mlp.{i}" for i in range(n_layers)]
    require_sites(data, needed, "module_redundancy")
    attn_cos, mlp_cos, note = _cosines(model, data, structure)
    layers = list(range(n_layers))
    ranking = sorted(layers, key=lambda i: -attn_cos[i])
    result = RedundancyResult(key="redundancy", title="Module redundancy", explanation=EXPLANATION, layers=layers,
                              attn_cos=attn_cos, mlp_cos=mlp_cos, structure=structure, ranking=ranking, note=note)
    texts = list(eval_texts) if eval_texts is not None else list(data.eval_texts)
    ks = sorted({int(k) for k in ks if 0 < int(k) < n_layers})
    if not model.has_lm_head:
        result.note = (note + "; " if note else "") + "dropping not run: the model has no LM head"
    elif not texts:
        result.note = (note + "; " if note else "") + "dropping not run: no evaluation texts were given"
    elif not ks:
        raise ActlabError(f"ks must hold at least one k in 1..{n_layers - 1}; got {list(ks)}")
    else:
        _drop_experiment(model, result, texts, ks, seed, batch_size, random_draws)
    return result


__all__ = ["RedundancyResult", "ZeroSite", "drop_attention", "mean_cosine", "module_redundancy"]
