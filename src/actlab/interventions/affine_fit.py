"""LinEAS-style affine steering: per-site affine maps fitted end to end by backpropagation.

``fit_affine`` learns one :class:`AffineMap` per site, ``h <- h + h*diag + (h U) Vᵀ + bias``, so
that the model's token activations on the *source* texts (the contrast set's negatives) match,
dimension by dimension, the token distribution of the *target* texts (the positives). All maps are
active together during the forward pass, so a map at an early layer is fitted knowing what the
later maps do (the "end-to-end" of LinEAS, Rodriguez et al. 2025) rather than layer by layer.

Recipe:

1. Target token activations of every site are computed once (no grad, real tokens only; for
   paired sets the shared prompt's tokens are left out) and reduced to per-dimension quantiles
   (or means and standard deviations).
2. The maps start as the identity (``diag = 0``, ``bias = 0``; with ``rank > 0`` the low-rank part
   ``U`` has random orthonormal columns and ``V = 0``). Their tensors are leaves that require grad
   (the bias is learnt in units of the site's target scale, so one learning rate suits models whose
   activations differ in size); the model's weights are frozen for the duration of the fit and
   their ``requires_grad`` flags restored afterwards. Adam with a cosine decay to ``lr / 10``.
3. Every step runs the model on ``batch_size`` random source texts with *all* maps applied through
   ``model.edit``; grad-keeping readers take each site's edited activations (the forward stops
   after the last site). The loss is the sum over sites of a per-dimension distributional
   distance, divided by the site's typical target standard deviation so sites of different scale
   weigh alike:

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

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from actlab.engine.batching import pad
from actlab.engine.edits import POSITION_MODES
from actlab.engine.hooks import StopForward
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.interventions.base import Composition
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.types import AffineMap

Loss = Literal["wasserstein", "moments"]
LOSSES = ("wasserstein", "moments")


# --------------------------------------------------------------------------------------- helpers
@contextmanager
def frozen_weights(model) -> Iterator[None]:
    """Turn off ``requires_grad`` on every weight of the model; restore the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class EncodedTexts:
    """Token ids of some examples and, per example, the first position the loss looks at."""

    ids: list[list[int]]
    starts: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "EncodedTexts":
        return EncodedTexts([self.ids[i] for i in index], [self.starts[i] for i in index])


def encode_texts(model, texts: Sequence[str], prompts: Sequence[str] | None = None,
                 max_tokens_per_text: int | None = 64) -> EncodedTexts:
    """Tokenise like ``example_activations``: prompt (with special tokens) + text, prompt excluded."""
    if model.tokenizer is None:
        raise ActlabError("this model has no tokenizer: load it with tokenizer=... to fit on texts")
    tok = model.tokenizer
    limit = model.max_length
    ids_all, starts = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ActlabError(f"example {i} is a {type(text).__name__}, not a string")
        prompt = prompts[i] if prompts is not None else ""
        ids_prompt = list(tok([prompt], add_special_tokens=True)["input_ids"][0]) if prompt else []
        ids_text = list(tok([text], add_special_tokens=not prompt)["input_ids"][0])
        if max_tokens_per_text is not None:
            ids_text = ids_text[:max_tokens_per_text]
        ids = (ids_prompt + ids_text)[:limit]
        if len(ids) <= len(ids_prompt):
            raise ActlabError(f"example {i} has no tokens after its prompt: {text[:40]!r}")
        ids_all.append(ids)
        starts.append(len(ids_prompt))
    return EncodedTexts(ids_all, starts)


def site_tokens(model, enc: EncodedTexts, sites: Sequence[str], *, grad: bool,
                batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{site: [n_tokens, width]}`` float32 activations of the examples' scored tokens.

    Any edits active on the model apply. With ``grad`` the tensors stay in the autograd graph
    (one batch only, to keep the graph small); the forward stops after the last site is read.
    """
    sites = list(sites)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    current: dict[str, torch.Tensor] = {}
    keep_box: dict[str, torch.Tensor] = {}

    def reader(site: str, h: torch.Tensor, state) -> None:
        sel = h[keep_box["keep"]]
        current[site] = sel.float() if grad else sel.detach().float()
        if len(current) == len(sites):
            raise StopForward

    handles = [model.hooks.add_reader(s, reader) for s in sites]
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            for i in range(0, len(enc), batch_size):
                ids, mask = pad(enc.ids[i : i + batch_size], model.pad_token_id, side="right")
                starts = torch.tensor(enc.starts[i : i + batch_size]).unsqueeze(1)
                keep = mask.bool() & (torch.arange(ids.shape[1]).unsqueeze(0) >= starts)
                keep_box["keep"] = keep.to(model.device)
                current.clear()
                try:
                    model.hf(**model.forward_inputs(ids, mask))
                except StopForward:
                    pass
                missing = [s for s in sites if s not in current]
                if missing:
                    raise ActlabError(f"the forward pass never reached site(s) {', '.join(missing)}")
                for s in sites:
                    parts[s].append(current[s] if grad else current[s].cpu())
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(parts[s]) if len(parts[s]) > 1 else parts[s][0] for s in sites}


def quantile_levels(n: int) -> torch.Tensor:
    """Mid-point grid (k + 0.5) / n, k = 0..n-1."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def quantiles(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per-column quantiles ``[len(levels), width]`` of ``x`` ``[n, width]``; differentiable in ``x``."""
    xs = x.sort(dim=0).values
    n = xs.shape[0]
    pos = levels.to(x.device) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return xs[lo] * (1 - w) + xs[hi] * w


@dataclass
class TargetStats:
    """What the loss compares a site's source tokens with."""

    q: torch.Tensor  # [n_quantiles, width]
    mean: torch.Tensor  # [width]
    std: torch.Tensor  # [width]
    scale: float  # mean target std: the unit distances are measured in

    @classmethod
    def of(cls, y: torch.Tensor, levels: torch.Tensor, scale: float | None = None) -> "TargetStats":
        y = y.float()
        std = y.std(0, unbiased=False)
        s = float(std.mean()) if scale is None else scale
        return cls(quantiles(y, levels), y.mean(0), std, max(s, 1e-6))

    def to(self, device) -> "TargetStats":
        return TargetStats(self.q.to(device), self.mean.to(device), self.std.to(device), self.scale)


def w1_distance(x: torch.Tensor, target: TargetStats, levels: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the 1-D Wasserstein-1 distance (quantile grid), in activation units."""
    return (quantiles(x, levels) - target.q).abs().mean()


def site_loss(x: torch.Tensor, target: TargetStats, levels: torch.Tensor, loss: str) -> torch.Tensor:
    """The per-site term of the objective, in units of the target scale."""
    if loss == "wasserstein":
        return w1_distance(x, target, levels) / target.scale
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return ((mean - target.mean) ** 2 + (std - target.std) ** 2).mean() / target.scale**2


def _orthonormal(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(r))


# ----------------------------------------------------------------------------------- the fit
def _holdout(n: int, val_fraction: float, gen: torch.Generator, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices in random order: ``val_fraction`` of ``n`` held out, none when ``n < min_n``."""
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(n * val_fraction)) if n >= min_n else 0
    return perm[n_val:], perm[:n_val]


def _check_common(model, sites, rank, steps, lr, l1, loss, n_quantiles, positions, val_fraction) -> list[str]:
    names = model.resolve(sites)
    if not names:
        raise ActlabError(f"no site matches {sites!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ActlabError(f"steps must be a positive integer, not {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ActlabError(f"lr must be a positive number, not {lr!r}")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise ActlabError(f"l1 must be a number >= 0, not {l1!r}")
    if loss not in LOSSES:
        raise ActlabError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if positions not in POSITION_MODES:
        raise ActlabError(f"positions must be one of {POSITION_MODES}, not {positions!r}")
    if n_quantiles < 2:
        raise ActlabError(f"n_quantiles must be at least 2, not {n_quantiles}")
    if not (0 <= val_fraction < 1):
        raise ActlabError(f"val_fraction must be in [0, 1), not {val_fraction}")
    for s in names:
        width = model.sites[s]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or rank > width:
            raise ActlabError(f"rank must be an integer from 0 (diagonal only) to the width of '{s}' ({width}), "
                              f"not {rank!r}")
    return names


def fit_affine(
    model,
    contrast: ContrastSet,
    sites: str | Sequence[str],
    *,
    rank: int = 0,
    steps: int = 150,
    lr: float = 5e-2,
    l1: float = 0.0,
    loss: Loss = "wasserstein",
    max_tokens_per_text: int = 64,
    val_fraction: float = 0.2,
    eval_every: int = 10,
    patience: int = 5,
    batch_size: int = 16,
    n_quantiles: int = 48,
    seed: int = 0,
    positions: str = "all",
    progress: bool = False,
) -> Composition:
    """Fit LinEAS-style affine maps (one per site, jointly) moving ``contrast.neg`` toward ``contrast.pos``.

    ``rank`` 0 fits a diagonal scale + bias per site; ``rank > 0`` adds a rank-``rank`` term
    ``(h U) Vᵀ``. Returns a :class:`Composition` of :class:`AffineMap` (in site order) whose
    ``params`` record the final loss, the best held-out loss and per-site Wasserstein-1 distances
    before and after the fit (``w1_before`` / ``w1_after``, activation units, mean over dimensions).
    """
    contrast.validate()
    names = _check_common(model, sites, rank, steps, lr, l1, loss, n_quantiles, positions, val_fraction)
    gen = torch.Generator().manual_seed(seed)
    src = encode_texts(model, contrast.neg, contrast.prompts, max_tokens_per_text)
    tgt = encode_texts(model, contrast.pos, contrast.prompts, max_tokens_per_text)

    def split(n: int) -> tuple[list[int], list[int]]:
        kept, held = _holdout(n, val_fraction, gen, min_n=5)
        return sorted(kept.tolist()), sorted(held.tolist())

    if contrast.paired:
        train_i, val_i = split(len(src))
        src_train, src_val = src.subset(train_i), src.subset(val_i)
        tgt_train, tgt_val = tgt.subset(train_i), tgt.subset(val_i)
    else:
        s_tr, s_va = split(len(src))
        t_tr, t_va = split(len(tgt))
        if not s_va or not t_va:
            s_tr, s_va, t_tr, t_va = list(range(len(src))), [], list(range(len(tgt))), []
        src_train, src_val, tgt_train, tgt_val = src.subset(s_tr), src.subset(s_va), tgt.subset(t_tr), tgt.subset(t_va)
    with frozen_weights(model):
        targets = site_tokens(model, tgt_train, names, grad=False, batch_size=batch_size)
        targets_val = site_tokens(model, tgt_val, names, grad=False, batch_size=batch_size) if len(tgt_val) else None
    composition = _fit(model, names, src_train, src_val if len(src_val) else None, targets, targets_val,
                       rank=rank, steps=steps, lr=lr, l1=l1, loss=loss, eval_every=eval_every, patience=patience,
                       batch_size=batch_size, n_quantiles=n_quantiles, gen=gen, positions=positions,
                       progress=progress)
    for item in composition:
        item.params.update({"n_pos": len(contrast.pos), "n_neg": len(contrast.neg), "paired": contrast.paired})
    return composition


def fit_affine_to_targets(
    model,
    source: Sequence[str],
    targets: dict[str, torch.Tensor],
    *,
    source_prompts: Sequence[str] | None = None,
    rank: int = 0,
    steps: int = 150,
    lr: float = 5e-2,
    l1: float = 0.0,
    loss: Loss = "wasserstein",
    max_tokens_per_text: int = 64,
    val_fraction: float = 0.2,
    eval_every: int = 10,
    patience: int = 5,
    batch_size: int = 16,
    n_quantiles: int = 48,
    seed: int = 0,
    positions: str = "all",
    progress: bool = False,
) -> Composition:
    """Fit affine maps so the model's activations on ``source`` texts match given target tokens.

    ``targets`` maps site names to ``[n_tokens, width]`` activation samples (any origin, e.g. another
    corpus or a synthetic transform); held-out tokens for early stopping are drawn at random.
    """
    if not source:
        raise ActlabError("no source texts given: pass at least one")
    if not targets:
        raise ActlabError("no targets given: pass {site: [n_tokens, width] tensor}")
    names = _check_common(model, list(targets), rank, steps, lr, l1, loss, n_quantiles, positions, val_fraction)
    if sorted(names) != sorted(targets):
        raise ActlabError(f"targets must be keyed by site names, e.g. {names[0]}, not {list(targets)}")
    gen = torch.Generator().manual_seed(seed)
    tgt_train, tgt_val = {}, {}
    for s in names:
        y = torch.as_tensor(targets[s]).float().cpu()
        if y.ndim != 2 or y.shape[1] != model.sites[s] or y.shape[0] < 2:
            raise ActlabError(f"targets['{s}'] must be [n_tokens >= 2, {model.sites[s]}], not {tuple(y.shape)}")
        kept, held = _holdout(y.shape[0], val_fraction, gen, min_n=10)
        tgt_train[s], tgt_val[s] = y[kept], y[held]
    enc = encode_texts(model, source, source_prompts, max_tokens_per_text)
    kept, held = _holdout(len(enc), val_fraction, gen, min_n=5)
    use_val = len(held) > 0 and all(t.shape[0] > 1 for t in tgt_val.values())
    src_train = enc.subset(sorted(kept.tolist()) if use_val else range(len(enc)))
    src_val = enc.subset(sorted(held.tolist())) if use_val else None
    return _fit(model, names, src_train, src_val, tgt_train, tgt_val if use_val else None, rank=rank, steps=steps,
                lr=lr, l1=l1, loss=loss, eval_every=eval_every, patience=patience, batch_size=batch_size,
                n_quantiles=n_quantiles, gen=gen, positions=positions, progress=progress)


def _fit(model, names, src_train: EncodedTexts, src_val: EncodedTexts | None, targets, targets_val, *, rank, steps,
         lr, l1, loss, eval_every, patience, batch_size, n_quantiles, gen, positions, progress) -> Composition:
    start_time = time.perf_counter()
    device = model.device
    levels = quantile_levels(n_quantiles)
    for name, group in (("target", targets), ("held-out target", targets_val or {})):
        for s, y in group.items():
            if not torch.isfinite(y).all():
                raise ActlabError(f"the {name} activations at '{s}' contain NaN or inf; check the model and inputs")
    stats = {s: TargetStats.of(targets[s], levels).to(device) for s in names}
    stats_val = ({s: TargetStats.of(targets_val[s], levels, stats[s].scale).to(device) for s in names}
                 if targets_val is not None and src_val is not None else None)

    # ------------------------------------------------------------------ parameters
    # The bias is learnt in units of the site's target scale (bias = scale * unit_bias), so one lr
    # suits models whose activations differ in size by orders of magnitude; every leaf is dimensionless.
    maps: list[AffineMap] = []
    unit_biases: list[torch.Tensor] = []
    leaves: list[torch.Tensor] = []
    weights: list[float] = []  # l1 weight of each leaf: 1 / width, matching the per-dimension mean of the loss
    identity = model.identity()
    for s in names:
        d = model.sites[s]
        diag = torch.zeros(d, device=device, requires_grad=True)
        unit_bias = torch.zeros(d, device=device, requires_grad=True)
        U = V = None
        leaves += [diag, unit_bias]
        weights += [1.0 / d, 1.0 / d]
        if rank > 0:
            U = _orthonormal(d, rank, gen).to(device).requires_grad_(True)
            V = torch.zeros(d, rank, device=device, requires_grad=True)
            leaves += [U, V]
            weights += [1.0 / d, 1.0 / d]
        unit_biases.append(unit_bias)
        # the maps act on every token while fitted; ``positions`` is stamped on the result
        maps.append(AffineMap(site=s, bias=unit_bias.detach() * stats[s].scale, diag=diag, U=U, V=V,
                              model=identity))
    opt = torch.optim.Adam(leaves, lr=lr)
    beta2, eps = opt.defaults["betas"][1], opt.defaults["eps"]
    # cosine decay to lr / 10 over the requested steps: large moves first, a precise finish
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k, steps) / steps)))

    def sync() -> None:
        """Point the maps' biases at the current (graph-connected when grad is on) scaled leaves."""
        for m, ub in zip(maps, unit_biases):
            m.bias = ub * stats[m.site].scale

    # one map: the edited activation is map(h) of the unedited h, so h is computed once
    single = len(names) == 1
    cached_train = cached_val = None
    with frozen_weights(model):
        if single:
            cached_train = site_tokens(model, src_train, names, grad=False, batch_size=batch_size)
            cached_train = {s: t.to(device) for s, t in cached_train.items()}
            if stats_val is not None:
                cached_val = {s: t.to(device) for s, t in
                              site_tokens(model, src_val, names, grad=False, batch_size=batch_size).items()}

        def edited(enc: EncodedTexts | None, cached, *, grad: bool, index=None) -> dict[str, torch.Tensor]:
            with torch.enable_grad() if grad else torch.no_grad():
                sync()
            if cached is not None:
                with torch.enable_grad() if grad else torch.no_grad():
                    return {m.site: m.apply(cached[m.site]).float() for m in maps}
            sub = enc if index is None else enc.subset(index)
            with model.edit(*maps):
                return site_tokens(model, sub, names, grad=grad, batch_size=len(sub) if grad else batch_size)

        def distance(acts, st) -> torch.Tensor:
            return sum(site_loss(acts[s], st[s], levels, loss) for s in names)

        def penalty() -> torch.Tensor:
            return sum(w * p.detach().abs().sum() for p, w in zip(leaves, weights))

        def w1(acts, st) -> dict[str, float]:
            return {s: float(w1_distance(acts[s].detach(), st[s], levels)) for s in names}

        with torch.no_grad():
            before_train = edited(src_train, cached_train, grad=False)
        w1_before = w1(before_train, stats)
        best_val = math.inf
        best_step = 0
        best_state = [p.detach().clone() for p in leaves]
        val_before = None
        if stats_val is not None:
            with torch.no_grad():
                val_before = float(distance(edited(src_val, cached_val, grad=False), stats_val))
            best_val = val_before
        bad_evals = 0
        step = 0
        final_loss = math.nan
        n_train = len(src_train)
        with progress_bar("fitting affine maps", steps, unit="step", enabled=progress) as bar:
            for step in range(1, steps + 1):
                index = None
                if cached_train is None and n_train > batch_size:
                    index = sorted(torch.randperm(n_train, generator=gen)[:batch_size].tolist())
                acts = edited(src_train, cached_train, grad=True, index=index)
                objective = distance(acts, stats)
                if not torch.isfinite(objective):
                    raise ActlabError(f"the affine fit's loss became {float(objective)} at step {step}; "
                                      "check the inputs for NaN/inf or lower lr")
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                if l1 > 0:
                    _proximal_l1(opt, leaves, weights, opt.param_groups[0]["lr"] * l1, beta2, eps)
                sched.step()
                with torch.no_grad():
                    final_loss = float(objective) + (l1 * float(penalty()) if l1 > 0 else 0.0)
                bar.advance(1)
                if stats_val is not None and (step % max(1, eval_every) == 0 or step == steps):
                    with torch.no_grad():
                        val = float(distance(edited(src_val, cached_val, grad=False), stats_val))
                    if l1 > 0:
                        val += l1 * float(penalty())
                    bar.update(description=f"fitting affine maps (held-out {val:.4f})")
                    if val < best_val - 1e-7:
                        best_val, best_step, bad_evals = val, step, 0
                        best_state = [p.detach().clone() for p in leaves]
                    else:
                        bad_evals += 1
                        if patience and bad_evals >= patience:
                            break
        if stats_val is None:
            best_state = [p.detach().clone() for p in leaves]
            best_step = step
        with torch.no_grad():
            for p, b in zip(leaves, best_state):
                p.copy_(b)
            sync()
            after_train = edited(src_train, cached_train, grad=False)
            w1_after = w1(after_train, stats)
            w1_val_after = None
            if stats_val is not None:
                w1_val_after = w1(edited(src_val, cached_val, grad=False), stats_val)

    n_params = sum(p.numel() for p in leaves)
    n_zero = sum(int((p == 0).sum()) for p in leaves)
    params = {
        "method": "affine", "loss": loss, "rank": rank, "l1": l1, "lr": lr, "steps": steps, "steps_run": step,
        "best_step": best_step, "seed": int(gen.initial_seed()), "sites": list(names),
        "n_quantiles": n_quantiles, "final_loss": final_loss,
        "val_loss_before": val_before, "val_loss": best_val if stats_val is not None else None,
        "w1_before": w1_before, "w1_after": w1_after, "w1_val_after": w1_val_after,
        "target_scale": {s: stats[s].scale for s in names},
        "n_source_train": n_train, "n_source_val": len(src_val) if src_val is not None else 0,
        "zero_fraction": n_zero / max(1, n_params), "seconds": time.perf_counter() - start_time,
    }
    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().cpu().clone(memory_format=torch.contiguous_format)

    out = []
    for m in maps:
        out.append(AffineMap(site=m.site, bias=own(m.bias), diag=own(m.diag), U=own(m.U), V=own(m.V),
                             positions=positions, model=identity, params=copy.deepcopy(params)))
    return Composition(out)


def _proximal_l1(opt: torch.optim.Adam, leaves, weights, strength: float, beta2: float, eps: float) -> None:
    """Soft-threshold each parameter by ``strength * weight / (sqrt(v̂) + eps)``: the prox of l1 in Adam's metric."""
    with torch.no_grad():
        for p, weight in zip(leaves, weights):
            state = opt.state.get(p)
            if not state or "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + eps
            threshold = strength * weight / denom
            p.copy_(torch.sign(p) * (p.abs() - threshold).clamp_min(0))
