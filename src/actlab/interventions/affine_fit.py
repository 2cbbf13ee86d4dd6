"""LinEAS-style affine steering: per-site affine maps fitted end to end by backpropagation.

``fit_affine`` learns one :class:`AffineMap` per site, ``h <- h + h*diag + (h U) Vᵀ + bias``, so
that the model's token activations on the *source* texts (the contrast set's negatives) match,
dimension by dimension, the token distribution of the *target* texts (the positives). All maps are
active together during the forward pass, so a map at an early layer is fitted knowing what the
later maps do (the "end-to-end" of LinEAS, Rodriguez et al. 2025) rather than layer by layer.

Recipe (options in :class:`AffineFitConfig`, saved as ``params["config"]``):

1. Target token activations of every site are computed once (no grad, real tokens only; for
   paired sets the shared prompt's tokens are left out) and reduced to per-dimension quantiles
   (or means and standard deviations), see ``affine_loss``.
2. The maps start as the identity (``diag = 0``, ``bias = 0``; with ``rank > 0`` the low-rank part
   ``U`` has random orthonormal columns and ``V = 0``). Their tensors are leaves that require grad
   (the bias is learnt in units of the site's target scale, see ``affine_params``); the model's
   weights are frozen for the duration of the fit and their ``requires_grad`` flags restored
   afterwards. Adam with a cosine decay to ``lr / 10``.
3. Every step runs the model on ``batch_size`` random source texts with *all* maps applied through
   ``model.edit``; the engine's runner returns each site's edited activations with their graph (the
   forward stops after the last site). The loss is the sum over sites of a per-dimension
   distributional distance, divided by the site's typical target standard deviation so sites of
   different scale weigh alike:

   * ``"wasserstein"``: 1-D Wasserstein-1 distance of every dimension, computed by comparing
     quantiles on a fixed grid of ``n_quantiles`` levels (sorting + linear interpolation, which is
     differentiable), averaged over dimensions;
   * ``"moments"``: squared difference of means plus squared difference of standard deviations,
     averaged over dimensions.

4. Sparsity: ``l1 > 0`` adds ``l1 / width * (|diag|₁ + |bias / scale|₁ + |U|₁ + |V|₁)`` per site (the
   bias in units of the site's target scale, the sum divided by the width like the loss is
   averaged over dimensions, so ``l1`` means the same for every model: a dimension's parameter is
   worth keeping when it lowers that dimension's distance, in target-scale units, by more than
   ``l1`` times its size; with the Wasserstein loss ``l1`` near 1 zeroes everything, 0.1-0.5 is the
   useful range). It is applied as the proximal step in Adam's diagonal metric (soft-thresholding
   by ``lr * l1 / width / (sqrt(v̂) + eps)``) after every Adam step, which gives exact zeros rather
   than parameters jittering around zero; ``params["zero_fraction"]`` reports them.
5. Early stopping: a fraction of the examples is held out; the held-out distance is evaluated every
   ``eval_every`` steps and the best maps are kept (``patience`` evaluations without improvement
   stop the fit).

With a single site the edited activation is simply ``map(h)`` of the unedited one, so the source
activations are computed once and the steps skip the model entirely (mathematically the same
objective, far cheaper). ``fit_affine_to_targets`` fits maps to arbitrary given target activations
(e.g. synthetic ones) with the same machinery.
"""

from __future__ import annotations

from typing import Sequence

import torch

from actlab.engine.grad import frozen_weights
from actlab.errors import ActlabError
from actlab.interventions.affine_config import AffineFitConfig
from actlab.interventions.affine_data import encode_texts, holdout, site_tokens, split_sorted
from actlab.interventions.affine_loop import Source, run_fit
from actlab.interventions.base import Composition
from actlab.interventions.contrast import ContrastSet

__all__ = ["AffineFitConfig", "fit_affine", "fit_affine_to_targets"]


def _sites(model, sites, config: AffineFitConfig) -> list[str]:
    names = model.resolve(sites)
    if not names:
        raise ActlabError(f"no site matches {sites!r}")
    config.check_rank(model, names)
    return names


def fit_affine(model, contrast: ContrastSet, sites: str | Sequence[str], config: AffineFitConfig | None = None, *,
               progress: bool = False, **overrides) -> Composition:
    """Fit LinEAS-style affine maps (one per site, jointly) moving ``contrast.neg`` toward ``contrast.pos``.

    Options: ``config`` and/or keywords of :class:`AffineFitConfig` (``rank``, ``steps``, ``lr``, ``l1``,
    ``loss``, ...). Returns a :class:`Composition` of :class:`AffineMap` (in site order) whose
    ``params`` record the final loss, the best held-out loss and per-site Wasserstein-1 distances
    before and after the fit (``w1_before`` / ``w1_after``, activation units, mean over dimensions).
    """
    config = AffineFitConfig.with_overrides(config, overrides)
    contrast.validate()
    names = _sites(model, sites, config)
    gen = torch.Generator().manual_seed(config.seed)
    src = encode_texts(model, contrast.neg, contrast.prompts, config.max_tokens_per_text)
    tgt = encode_texts(model, contrast.pos, contrast.prompts, config.max_tokens_per_text)
    if contrast.paired:
        train_i, val_i = split_sorted(len(src), config.val_fraction, gen)
        s_tr, s_va, t_tr, t_va = train_i, val_i, train_i, val_i
    else:
        s_tr, s_va = split_sorted(len(src), config.val_fraction, gen)
        t_tr, t_va = split_sorted(len(tgt), config.val_fraction, gen)
        if not s_va or not t_va:
            s_tr, s_va, t_tr, t_va = list(range(len(src))), [], list(range(len(tgt))), []
    tgt_train, tgt_val = tgt.subset(t_tr), tgt.subset(t_va)
    with frozen_weights(model):
        targets = site_tokens(model, tgt_train, names, grad=False, batch_size=config.batch_size)
        targets_val = (site_tokens(model, tgt_val, names, grad=False, batch_size=config.batch_size)
                       if len(tgt_val) else None)
    src_val = src.subset(s_va)
    composition = run_fit(model, names, Source(src.subset(s_tr), targets),
                          Source(src_val, targets_val) if len(src_val) else None, config, gen, progress)
    for item in composition:
        item.params.update({"n_pos": len(contrast.pos), "n_neg": len(contrast.neg), "paired": contrast.paired})
    return composition


def fit_affine_to_targets(model, source: Sequence[str], targets: dict[str, torch.Tensor],
                          config: AffineFitConfig | None = None, *, source_prompts: Sequence[str] | None = None,
                          progress: bool = False, **overrides) -> Composition:
    """Fit affine maps so the model's activations on ``source`` texts match given target tokens.

    ``targets`` maps site names to ``[n_tokens, width]`` activation samples (any origin, e.g. another
    corpus or a synthetic transform); held-out tokens for early stopping are drawn at random.
    """
    config = AffineFitConfig.with_overrides(config, overrides)
    if not source:
        raise ActlabError("no source texts given: pass at least one")
    if not targets:
        raise ActlabError("no targets given: pass {site: [n_tokens, width] tensor}")
    names = _sites(model, list(targets), config)
    if sorted(names) != sorted(targets):
        raise ActlabError(f"targets must be keyed by site names, e.g. {names[0]}, not {list(targets)}")
    gen = torch.Generator().manual_seed(config.seed)
    tgt_train, tgt_val = {}, {}
    for s in names:
        y = torch.as_tensor(targets[s]).float().cpu()
        if y.ndim != 2 or y.shape[1] != model.sites[s] or y.shape[0] < 2:
            raise ActlabError(f"targets['{s}'] must be [n_tokens >= 2, {model.sites[s]}], not {tuple(y.shape)}")
        kept, held = holdout(y.shape[0], config.val_fraction, gen, min_n=10)
        tgt_train[s], tgt_val[s] = y[kept], y[held]
    enc = encode_texts(model, source, source_prompts, config.max_tokens_per_text)
    kept, held = holdout(len(enc), config.val_fraction, gen, min_n=5)
    use_val = len(held) > 0 and all(t.shape[0] > 1 for t in tgt_val.values())
    train = Source(enc.subset(sorted(kept.tolist()) if use_val else range(len(enc))), tgt_train)
    val = Source(enc.subset(sorted(held.tolist())), tgt_val) if use_val else None
    return run_fit(model, names, train, val, config, gen, progress)

