"""The affine fit's optimisation: Adam + cosine decay + proximal l1, held-out early stopping.

``run_fit`` is given encoded source examples and target activations (train and held-out) and
returns the fitted maps; how they were obtained (a contrast set, given targets) is the callers' job
(``affine_fit``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from actlab.engine.grad import frozen_weights, grad_mode
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.interventions.affine_config import AffineFitConfig
from actlab.interventions.affine_data import EncodedTexts, site_tokens
from actlab.interventions.affine_loss import TargetStats, quantile_levels, site_loss, w1_distance
from actlab.interventions.affine_params import AffineLeaves
from actlab.interventions.base import Composition


@dataclass
class Source:
    """Source examples and the target activations they are moved toward (one split: train or held-out)."""

    enc: EncodedTexts
    targets: dict[str, torch.Tensor]
    stats: dict[str, TargetStats] | None = None
    cached: dict[str, torch.Tensor] | None = None  # unedited source tokens (one-site fast path)


class _Objective:
    """Edited source activations and their distance to the targets."""

    def __init__(self, model, names: list[str], leaves: AffineLeaves, config: AffineFitConfig):
        self.model = model
        self.names = names
        self.leaves = leaves
        self.config = config
        self.levels = quantile_levels(config.n_quantiles)

    def edited(self, src: Source, *, grad: bool, index=None) -> dict[str, torch.Tensor]:
        with grad_mode(grad):
            self.leaves.sync()
            if src.cached is not None:
                return {m.site: m.apply(src.cached[m.site]).float() for m in self.leaves.maps}
        sub = src.enc if index is None else src.enc.subset(index)
        with self.model.edit(*self.leaves.maps):
            return site_tokens(self.model, sub, self.names, grad=grad,
                               batch_size=len(sub) if grad else self.config.batch_size)

    def distance(self, acts, stats) -> torch.Tensor:
        return sum(site_loss(acts[s], stats[s], self.levels, self.config.loss) for s in self.names)

    def w1(self, acts, stats) -> dict[str, float]:
        return {s: float(w1_distance(acts[s].detach(), stats[s], self.levels)) for s in self.names}

    def held_out(self, val: Source) -> float:
        """The held-out distance (plus the l1 term when sparsity is on)."""
        with torch.no_grad():
            value = float(self.distance(self.edited(val, grad=False), val.stats))
        return value + (self.config.l1 * float(self.leaves.penalty()) if self.config.l1 > 0 else 0.0)


@dataclass
class _Best:
    value: float
    step: int
    state: list[torch.Tensor]
    steps_run: int = 0
    final_loss: float = math.nan


def _prepare(model, names: list[str], train: Source, val: Source | None, config: AffineFitConfig) -> None:
    """Check the targets, reduce them to statistics, cache the source tokens when one site is fitted."""
    device = model.device
    levels = quantile_levels(config.n_quantiles)
    for name, src in (("target", train), ("held-out target", val)):
        for s, y in (src.targets if src is not None else {}).items():
            if not torch.isfinite(y).all():
                raise ActlabError(f"the {name} activations at '{s}' contain NaN or inf; check the model and inputs")
    train.stats = {s: TargetStats.of(train.targets[s], levels).to(device) for s in names}
    if val is not None:
        val.stats = {s: TargetStats.of(val.targets[s], levels, train.stats[s].scale).to(device) for s in names}


def _cache_sources(model, names: list[str], sources, batch_size: int) -> None:
    """One map: the edited activation is map(h) of the unedited h, so h is computed once."""
    for src in sources:
        if src is not None:
            src.cached = {s: t.to(model.device)
                          for s, t in site_tokens(model, src.enc, names, grad=False, batch_size=batch_size).items()}


def _descend(obj: _Objective, train: Source, val: Source | None, best: _Best, gen: torch.Generator,
             progress: bool) -> None:
    """The optimisation steps; ``best`` is updated in place (held-out early stopping)."""
    cfg, leaves = obj.config, obj.leaves
    opt = torch.optim.Adam(leaves.leaves, lr=cfg.lr)
    # cosine decay to lr / 10 over the requested steps: large moves first, a precise finish
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k, cfg.steps) / cfg.steps)))
    bad_evals = 0
    n_train = len(train.enc)
    with progress_bar("fitting affine maps", cfg.steps, unit="step", enabled=progress) as bar:
        for step in range(1, cfg.steps + 1):
            best.steps_run = step
            index = None
            if train.cached is None and n_train > cfg.batch_size:
                index = sorted(torch.randperm(n_train, generator=gen)[: cfg.batch_size].tolist())
            objective = obj.distance(obj.edited(train, grad=True, index=index), train.stats)
            if not torch.isfinite(objective):
                raise ActlabError(f"the affine fit's loss became {float(objective)} at step {step}; "
                                  "check the inputs for NaN/inf or lower lr")
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            if cfg.l1 > 0:
                leaves.proximal_l1(opt, opt.param_groups[0]["lr"] * cfg.l1)
            sched.step()
            with torch.no_grad():
                best.final_loss = float(objective) + (cfg.l1 * float(leaves.penalty()) if cfg.l1 > 0 else 0.0)
            bar.advance(1)
            if val is not None and (step % max(1, cfg.eval_every) == 0 or step == cfg.steps):
                value = obj.held_out(val)
                bar.update(description=f"fitting affine maps (held-out {value:.4f})")
                if value < best.value - 1e-7:
                    best.value, best.step, best.state, bad_evals = value, step, leaves.snapshot(), 0
                else:
                    bad_evals += 1
                    if cfg.patience and bad_evals >= cfg.patience:
                        break


def run_fit(model, names: list[str], train: Source, val: Source | None, config: AffineFitConfig,
            gen: torch.Generator, progress: bool) -> Composition:
    """Fit the maps of ``names`` jointly; the result's ``params`` carry the diagnostics and the config."""
    start_time = time.perf_counter()
    _prepare(model, names, train, val, config)
    leaves = AffineLeaves(model, names, train.stats, config.rank, gen)
    obj = _Objective(model, names, leaves, config)
    with frozen_weights(model):
        if len(names) == 1:
            _cache_sources(model, names, (train, val), config.batch_size)
        with torch.no_grad():
            w1_before = obj.w1(obj.edited(train, grad=False), train.stats)
        best = _Best(math.inf, 0, leaves.snapshot())
        val_before = None
        if val is not None:
            with torch.no_grad():
                val_before = float(obj.distance(obj.edited(val, grad=False), val.stats))
            best.value = val_before
        _descend(obj, train, val, best, gen, progress)
        if val is None:
            best.state, best.step = leaves.snapshot(), best.steps_run
        leaves.restore(best.state)
        with torch.no_grad():
            w1_after = obj.w1(obj.edited(train, grad=False), train.stats)
            w1_val_after = obj.w1(obj.edited(val, grad=False), val.stats) if val is not None else None
    params = {
        "method": "affine", "loss": config.loss, "rank": config.rank, "l1": config.l1, "lr": config.lr,
        "steps": config.steps, "steps_run": best.steps_run, "best_step": best.step, "seed": int(gen.initial_seed()),
        "sites": list(names), "n_quantiles": config.n_quantiles, "final_loss": best.final_loss,
        "val_loss_before": val_before, "val_loss": best.value if val is not None else None,
        "w1_before": w1_before, "w1_after": w1_after, "w1_val_after": w1_val_after,
        "target_scale": {s: train.stats[s].scale for s in names},
        "n_source_train": len(train.enc), "n_source_val": len(val.enc) if val is not None else 0,
        "zero_fraction": leaves.zero_fraction(), "seconds": time.perf_counter() - start_time,
        "config": config.to_dict(),
    }
    return leaves.export(config.positions, params)
