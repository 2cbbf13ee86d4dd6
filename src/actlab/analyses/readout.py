"""Neuron readout: which tokens each MLP neuron promotes, read through the unembedding.

An MLP neuron j of block i writes ``a_j * w_j`` into the residual stream, where ``w_j`` is its
output weight vector (column j of the down projection, from the model anatomy's ``mlp_parts``).
Decoding ``w_j`` like a residual vector -- the linear part of the final norm, then the LM head --
gives the tokens the neuron pushes up when it fires (Geva et al. 2022, "Transformer Feed-Forward
Layers Build Predictions by Promoting Concepts in the Vocabulary Space"; Dar et al. 2023,
"Analyzing Transformers in Embedding Space"). One matrix multiply per layer, no data needed.

The linear part of the final norm is ``(norm(w) - norm(-w)) / 2``: the norm's gain applied to
the centered (LayerNorm) and RMS-normalised vector, with the LayerNorm bias removed. Normalising
every neuron's vector to the same scale makes the peakedness score comparable across neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from actlab.analyses.base import Skipped, decode_token
from actlab.analyses.figures import new_axes


def neuron_output_vectors(model, layer: int) -> torch.Tensor:
    """[d_mlp, d_model]: row j is the vector neuron j of ``layer`` adds to the residual per unit activation
    (an ActlabError when the block has no MLP down projection)."""
    return model.anatomy.mlp_parts(layer).down.T


@dataclass
class ReadoutResult:
    key: str
    title: str
    explanation: str
    layers: list[int]
    d_mlp: int
    layer: torch.Tensor  # [N] block of each neuron (all neurons, layer-major)
    neuron: torch.Tensor  # [N] index inside the block
    top_ids: torch.Tensor  # [N, top_tokens] most promoted token ids
    top_probs: torch.Tensor  # [N, top_tokens] their softmax probabilities
    entropy: torch.Tensor  # [N] entropy (nats) of the decoded distribution
    token_text: dict[int, str] = field(default_factory=dict)
    normed: bool = True

    @property
    def score(self) -> torch.Tensor:
        """Interpretability score: probability of the top token (peakedness of the readout)."""
        return self.top_probs[:, 0]

    @property
    def ranking(self) -> torch.Tensor:
        """Row indices, most interpretable (highest top-token probability) first."""
        return torch.argsort(self.score, descending=True, stable=True)

    def tokens(self, row: int) -> list[str]:
        return [self.token_text.get(int(t), str(int(t))) for t in self.top_ids[row]]

    def top(self, n: int = 20) -> list[dict]:
        out = []
        for rank, row in enumerate(self.ranking[:n].tolist(), 1):
            out.append({"rank": rank, "layer": int(self.layer[row]), "neuron": int(self.neuron[row]),
                        "top_token_ids": self.top_ids[row].tolist(), "top_tokens": self.tokens(row),
                        "score": float(self.score[row]), "entropy": float(self.entropy[row])})
        return out

    def layer_mean_score(self) -> list[float]:
        return [float(self.score[self.layer == i].mean()) for i in self.layers]

    def headline(self) -> str:
        best = self.top(1)[0]
        return (f"most peaked neuron L{best['layer']}.{best['neuron']} → {best['top_tokens'][0]!r} "
                f"(p={best['score']:.2f}); median top-token p {float(self.score.median()):.3f}")

    def to_dict(self) -> dict[str, Any]:
        score = self.score
        rows = [[int(self.layer[r]), int(self.neuron[r]), self.top_ids[r].tolist(), self.tokens(r),
                 round(float(score[r]), 6), round(float(self.entropy[r]), 6)] for r in range(self.layer.numel())]
        return {
            "layers": list(self.layers),
            "d_mlp": self.d_mlp,
            "normed": self.normed,
            "score": "probability of the top token after decoding the neuron's output vector",
            "layer_mean_score": [round(v, 6) for v in self.layer_mean_score()],
            "top": self.top(20),
            "neurons": {"columns": ["layer", "neuron", "top_token_ids", "top_tokens", "score", "entropy"],
                        "rows": rows},
        }

    def figures(self) -> list:
        fig, ax = new_axes(6.0, 3.4, layout="tight")
        data = [self.score[self.layer == i].numpy() for i in self.layers]
        ax.boxplot(data, positions=self.layers, widths=0.6, showfliers=True, flierprops={"markersize": 2})
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("top-token probability per neuron")
        ax.grid(alpha=0.3, axis="y")
        ax.set_title("How peaked each neuron's vocabulary readout is")
        return [fig]

    def table(self):
        cols = ["rank", "neuron", "top tokens", "top-token prob", "entropy"]
        rows = [[t["rank"], f"L{t['layer']}.{t['neuron']}", " · ".join(repr(s) for s in t["top_tokens"]),
                 round(t["score"], 4), round(t["entropy"], 3)] for t in self.top(20)]
        return cols, rows


EXPLANATION = (
    "What does each MLP neuron write? A neuron adds its output weight vector to the residual stream, scaled by its "
    "activation; decoding that vector with the model's final norm and unembedding, as the logit lens decodes a "
    "hidden state, lists the tokens the neuron promotes when it fires (Geva et al., 2022, 'Transformer Feed-Forward "
    "Layers Build Predictions by Promoting Concepts in the Vocabulary Space'). The score is the probability of the "
    "top token in that decoded distribution: a neuron whose readout concentrates on one or a few related tokens is "
    "easy to read, a flat one is not. The table lists the 20 most peaked neurons; the plot shows the spread of the "
    "score per block (later blocks usually read out more sharply)."
)


def neuron_readout(model, top_tokens: int = 10, *, normed: bool = True) -> ReadoutResult | Skipped:
    """Top tokens promoted by every MLP neuron, and a peakedness ranking.

    ``normed=True`` decodes the linear part of the final norm applied to the vector (every
    neuron on the same scale); ``normed=False`` feeds the raw vector to the LM head.
    """
    title = "Neuron readout"
    if not model.has_lm_head:
        return Skipped(key="readout", title=title, explanation=EXPLANATION,
                       reason=f"{model.sitemap.model_class} has no LM head (an encoder); neuron outputs cannot be decoded")
    layers = [i for i in range(model.n_layers) if f"mlp.hidden.{i}" in model.sitemap]
    if not layers:
        return Skipped(key="readout", title=title, explanation=EXPLANATION,
                       reason=f"no MLP down projection found in {model.sitemap.model_class}")
    anatomy = model.anatomy
    k = max(1, min(int(top_tokens), anatomy.vocab_size))
    chunk = max(16, (1 << 23) // max(1, anatomy.vocab_size))
    layer_ids, neuron_ids, ids_all, probs_all, ent_all = [], [], [], [], []
    for i in layers:
        vectors = neuron_output_vectors(model, i)
        for start in range(0, vectors.shape[0], chunk):
            w = vectors[start : start + chunk]
            with torch.no_grad():
                if normed:  # the linear part of the final norm: its gain, without a LayerNorm bias
                    w = (anatomy.normed(w) - anatomy.normed(-w)) / 2
                logp = torch.log_softmax(anatomy.unembed(w).cpu(), -1)
            top_lp, top_id = logp.topk(k, dim=-1)
            ids_all.append(top_id)
            probs_all.append(top_lp.exp())
            ent_all.append(-(logp.exp() * logp).sum(-1))
            layer_ids.append(torch.full((w.shape[0],), i, dtype=torch.long))
            neuron_ids.append(torch.arange(start, start + w.shape[0]))
    top_ids = torch.cat(ids_all)
    cache = {t: decode_token(model.tokenizer, t, fallback=str(t)) for t in torch.unique(top_ids).tolist()}
    return ReadoutResult(
        key="readout",
        title=title,
        explanation=EXPLANATION,
        layers=layers,
        d_mlp=int(model.d_mlp or 0),
        layer=torch.cat(layer_ids),
        neuron=torch.cat(neuron_ids),
        top_ids=top_ids,
        top_probs=torch.cat(probs_all),
        entropy=torch.cat(ent_all),
        token_text=cache,
        normed=normed,
    )


__all__ = ["ReadoutResult", "neuron_output_vectors", "neuron_readout"]
