"""Fitting steering vectors from contrast sets: mean difference (CAA), PCA, dimension-level (AUSteer).

Each method returns a ``SteeringVector`` per site whose coefficient 1 moves the activation by
about the size of the positive/negative difference, so dose-response curves of the methods
share one axis.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from actlab.engine.config import positive_int
from actlab.engine.likelihood import encode_lm_data, mean_nll
from actlab.errors import ActlabError
from actlab.interventions.contrast import Aggregate, ContrastSet, example_activations
from actlab.interventions.types import SteeringVector
from actlab.linalg import held_out_count, split_indices
from actlab.models.inputs import text_list

Method = Literal["mean-diff", "pca", "dims"]
METHODS = ("mean-diff", "pca", "dims", "affine")


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """CAA: mean(pos) - mean(neg)."""
    return pos.mean(0) - neg.mean(0)


def pca_direction(pos: torch.Tensor, neg: torch.Tensor, paired: bool) -> tuple[torch.Tensor, float]:
    """First principal component of the differences, oriented and scaled like the mean difference.

    Pairs give differences pos_i - neg_i (repeng's recipe); unpaired sets use pos_i - mean(neg)
    and mean(pos) - neg_j. Returns the vector and the fraction of difference variance it explains.
    """
    if paired and pos.shape[0] == neg.shape[0]:
        diffs = pos - neg
    else:
        diffs = torch.cat([pos - neg.mean(0), pos.mean(0) - neg])
    if diffs.shape[0] < 2:
        direction = diffs[0] / diffs[0].norm().clamp_min(1e-12)
        explained = 1.0
    else:
        # the leading right-singular vector of the raw differences keeps the shared shift in view
        _, s, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
        direction = vh[0].float()
        explained = float((s[0] ** 2) / (s**2).sum())
    mean_diff = mean_difference(pos, neg)
    scale = float(mean_diff @ direction)
    if scale < 0:
        direction, scale = -direction, -scale
    return direction * scale, explained


def dimension_scores(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Standardised mean difference per dimension (Cohen's d with pooled std)."""
    pooled = ((pos.var(0, unbiased=False) + neg.var(0, unbiased=False)) / 2).sqrt().clamp_min(1e-6)
    return (pos.mean(0) - neg.mean(0)) / pooled


def dimension_vector(pos: torch.Tensor, neg: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AUSteer-style: the mean difference kept only on the m dimensions with the largest |score|."""
    scores = dimension_scores(pos, neg)
    m = max(1, min(int(m), scores.numel()))
    dims = torch.topk(scores.abs(), m).indices.sort().values
    vector = torch.zeros_like(scores)
    diff = mean_difference(pos, neg)
    vector[dims] = diff[dims]
    return vector, dims


def _check_dims(dims, width: int | None) -> None:
    """``dims`` (the dimensions --method dims keeps) is None (the default) or 1..width."""
    if dims is None:
        return
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ActlabError(f"dims must be a positive number of dimensions, not {dims!r} (omit it for d_model/16)")
    if width is not None and dims > width:
        raise ActlabError(f"dims={dims} is more than the site's {width} dimensions; give at most {width}")


def fit_steering(
    model,
    contrast: ContrastSet,
    sites: str | Sequence[str],
    *,
    method: Method = "mean-diff",
    aggregate: Aggregate = "mean",
    dims: int | None = None,
    positions: str = "all",
    batch_size: int = 16,
) -> dict[str, SteeringVector]:
    """Fit one steering vector per site (a layer sweep when ``sites`` selects several)."""
    if not isinstance(contrast, ContrastSet):
        raise ActlabError(f"contrast must be a ContrastSet (e.g. ContrastSet(pos_texts, neg_texts)), not "
                          f"{type(contrast).__name__}")
    contrast.validate()
    names = model.resolve(sites)
    if method not in ("mean-diff", "pca", "dims"):
        hint = "; fit affine maps with interventions.affine_fit.fit_affine" if method == "affine" else ""
        raise ActlabError(f"unknown method {method!r}; choose one of mean-diff, pca, dims{hint}")
    _check_dims(dims, model.sites[names[0]] if method == "dims" else None)
    positive_int(batch_size, "batch_size")
    pos = example_activations(model, contrast.pos, names, prompts=contrast.prompts, aggregate=aggregate,
                              batch_size=batch_size)
    neg = example_activations(model, contrast.neg, names, prompts=contrast.prompts, aggregate=aggregate,
                              batch_size=batch_size)
    out: dict[str, SteeringVector] = {}
    for site in names:
        p, n = pos[site], neg[site]
        params: dict = {"method": method, "aggregate": aggregate, "n_pos": p.shape[0], "n_neg": n.shape[0],
                        "mean_diff_norm": float(mean_difference(p, n).norm()),
                        "resid_norm": float(torch.cat([p, n]).norm(dim=1).mean())}
        if method == "mean-diff":
            vector = mean_difference(p, n)
        elif method == "pca":
            vector, explained = pca_direction(p, n, contrast.paired)
            params["explained_variance"] = explained
        else:
            m = dims if dims is not None else max(1, p.shape[1] // 16)
            vector, chosen = dimension_vector(p, n, m)
            params["dims"] = chosen.tolist()
        out[site] = SteeringVector(site=site, vector=vector.float(), positions=positions, model=model.identity(),
                                   params=params)
    return out


def random_like(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A random direction with the same norm and site: the control every steering claim needs."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.width, generator=gen)
    r = r / r.norm() * vector.vector.norm()
    return SteeringVector(site=vector.site, vector=r, coef=vector.coef, positions=vector.positions,
                          model=vector.model, params={"method": "random", "seed": seed})


def steering_vector(model, pos: Sequence[str], neg: Sequence[str], site: str, *, method: Method = "mean-diff",
                    **kwargs) -> SteeringVector:
    """Convenience: one vector at one site from two lists of texts (``actlab.steering_vector``)."""
    contrast = ContrastSet(text_list(pos, "pos", single_ok=False), text_list(neg, "neg", single_ok=False))
    names = model.resolve(site)
    if len(names) != 1:
        raise ActlabError(f"steering_vector fits one site; '{site}' selects {len(names)} (use fit_steering for a sweep)")
    return fit_steering(model, contrast, names, method=method, **kwargs)[names[0]]


def contrast_split(contrast: ContrastSet, holdout: float = 0.25, seed: int = 0) -> tuple[ContrastSet, ContrastSet]:
    """Fit / held-out parts of a contrast set (pairs stay together; unpaired sides split alike)."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[list[int], list[int]]:
        """(fit, held-out) in reading order; fewer than 4 examples: both parts are everything."""
        kept, held = split_indices(n, held_out_count(n, holdout, min_n=4, at_least=1), gen)
        return kept.tolist(), (held if len(held) else kept).tolist()

    if contrast.paired:
        fit_idx, held_idx = split(len(contrast.pos))
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        return (ContrastSet(pick(contrast.pos, fit_idx), pick(contrast.neg, fit_idx), pick(contrast.prompts, fit_idx)),
                ContrastSet(pick(contrast.pos, held_idx), pick(contrast.neg, held_idx), pick(contrast.prompts, held_idx)))
    pf, ph = split(len(contrast.pos))
    nf, nh = split(len(contrast.neg))
    return (ContrastSet([contrast.pos[i] for i in pf], [contrast.neg[i] for i in nf]),
            ContrastSet([contrast.pos[i] for i in ph], [contrast.neg[i] for i in nh]))


def preference_gap(model, contrast: ContrastSet, edit=None, batch_size: int = 16) -> float:
    """Mean log-likelihood per token of the positive examples minus that of the negatives (nats), under ``edit``.

    For pairs only the completions count (given their prompt), so this is how much more the model
    prefers to continue each prompt the positive way.
    """
    def loss(side) -> float:
        data = list(zip(contrast.prompts, side)) if contrast.paired else list(side)
        examples = encode_lm_data(model, data)[1]
        return mean_nll(model, examples, batch_size=batch_size, prompt_length_known=contrast.paired)

    with model.edit(*([edit] if edit is not None else [])):
        loss_pos = loss(contrast.pos)
        loss_neg = loss(contrast.neg)
    return loss_neg - loss_pos


def sweep_layers(model, contrast: ContrastSet, sites: str | Sequence[str] = "resid.*", *, method: Method = "mean-diff",
                 coef: float = 1.0, holdout: float = 0.25, seed: int = 0, **fit_kwargs) -> list[dict]:
    """Which layer steers best: fit on part of the contrast set, score on the rest.

    The score is the rise of ``preference_gap`` (positive minus negative log-likelihood per token,
    on held-out examples) when the layer's vector is added at ``coef``: a model-agnostic measure
    that needs no classifier. Rows are sorted best first.
    """
    fit_part, held = contrast_split(contrast, holdout, seed)
    vectors = fit_steering(model, fit_part, sites, method=method, **fit_kwargs)
    base = preference_gap(model, held)
    rows = []
    for site, vec in vectors.items():
        gap = preference_gap(model, held, vec * coef)
        rows.append({"site": site, "gain": gap - base, "gap": gap, "base_gap": base, "vector": vec,
                     "norm": float(vec.vector.norm())})
    return sorted(rows, key=lambda r: -r["gain"])
