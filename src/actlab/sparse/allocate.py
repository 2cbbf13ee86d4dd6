"""TEAL's greedy allocation of sparsity levels within a block (Liu et al. 2024, section 4.2; our own code).

A uniform level on every input treats an input whose zeros barely move the block's output like one whose zeros
hurt. The greedy search starts block ``i`` dense and repeatedly raises the level of the one input whose next step
adds the least error to the block's output (``resid.i`` against the block run densely, the earlier blocks as
they will run: already sparse), until the block's *effective* sparsity (the levels weighted by the weights each
input's zeros let the kernel skip) reaches the target. Each step raises one input's level by
``step * total / weight``, so every step skips the same number of weight reads, as in TEAL. Candidates are scored
with thresholds from the block's dense-in-block inputs (its q/k/v input, o input, MLP input and hidden
neurons, recorded once); ``thresholds.calibrate`` then turns the chosen levels into thresholds input by input,
each on what it sees with the inputs before it sparse, so the levels hold on held-out text.
"""

from __future__ import annotations

import torch

__all__ = ["unit_weights", "effective_sparsity", "greedy_levels"]

UNITS = ("attn.in", "attn.o", "mlp.in", "mlp.hidden")


def unit_weights(model, layer: int, units=UNITS) -> dict[str, int]:
    """How many weights each input's zeros skip: q+k+v, o, gate+up (or up), down."""
    out = {}
    parts = model.anatomy.mlp_parts(layer)
    if "attn.in" in units or "attn.o" in units:
        attn = model.anatomy.attn_parts(layer)
        out["attn.in"] = sum(p.weight.numel() for p in attn.qkv)
        out["attn.o"] = attn.o.weight.numel()
    out["mlp.in"] = parts.up.numel() + (parts.gate.numel() if parts.gated else 0)
    out["mlp.hidden"] = parts.down.numel()
    return {u: out[u] for u in units}


def effective_sparsity(levels: dict[str, float], weights: dict[str, int]) -> float:
    """The share of the block's weight reads the levels skip."""
    return sum(levels[u] * w for u, w in weights.items()) / sum(weights.values())


def _block_inputs(model, docs, layer: int, done, units) -> dict[str, torch.Tensor]:
    """|score| of each input of block ``layer`` sorted ascending, the block itself dense (the earlier blocks as
    ``done`` has them)."""
    from actlab.sparse.thresholds import _inputs, attn_input

    x = {kind: attn_input(model, docs, kind, layer, done) for kind in units if kind.startswith("attn.")}
    x["mlp.in"] = _inputs(model, docs, [layer], done)[layer]
    parts = model.anatomy.mlp_parts(layer)
    with torch.no_grad():
        x["mlp.hidden"] = parts.hidden(x["mlp.in"].to(parts.up.dtype)).float()
    return {u: x[u] for u in units}


def _candidate(base, layer: int, levels: dict[str, float], inputs, norms):
    from actlab.sparse.thresholds import Thresholds, level_threshold

    tensors = dict(base.tensors)
    for u, level in levels.items():
        if level > 0:
            tensors[f"{u}.{layer}"] = level_threshold(inputs[u], level, norms[u])
    return Thresholds(base.method, base.sparsity, tensors, base.model, base.rule)


def _resid(model, docs, layer: int, thresholds) -> torch.Tensor:
    from contextlib import nullcontext

    from actlab.sparse.mlp import splice

    with splice(model, thresholds) if thresholds.tensors else nullcontext():
        return model.collect(docs, [f"resid.{layer}"], positions="all", batch_size=8).acts[f"resid.{layer}"].float()


def greedy_levels(model, method: str, docs, layer: int, target: float, done, units=UNITS, *,
                  step: float = 0.1, max_level: float = 0.95) -> dict[str, float]:
    """Levels of block ``layer``'s ``units`` whose effective sparsity is ``target``, chosen greedily: each step
    raises by ``step`` the level of the input with the least added error per weight read skipped (the mean
    ``||resid.layer - dense-block resid.layer||`` on ``docs``); the last step is cut to land on the target.
    ``done``: the earlier blocks' thresholds."""
    from actlab.sparse.thresholds import score_norms

    weights = unit_weights(model, layer, units)
    inputs = _block_inputs(model, docs, layer, done, units)
    norms = {u: score_norms(model, method, u, layer) for u in units}
    reference = _resid(model, docs, layer, done)
    levels, error = {u: 0.0 for u in units}, 0.0
    while (now := effective_sparsity(levels, weights)) < target - 1e-9:
        best, best_cost = None, (float("inf"), 0.0)
        for u in units:
            trial = {**levels, u: min(max_level, levels[u] + step)}
            gained = effective_sparsity(trial, weights) - now
            if gained <= 0:
                continue
            if now + gained > target:  # the last step lands on the target
                trial[u] = levels[u] + (target - now) * sum(weights.values()) / weights[u]
                gained = target - now
            got = _resid(model, docs, layer, _candidate(done, layer, trial, inputs, norms))
            trial_error = float((got - reference).norm(dim=-1).mean())
            cost = (trial_error - error) / gained
            if cost < best_cost[0]:
                best, best_cost = trial, (cost, trial_error)
        if best is None:  # every input at max_level
            break
        levels, error = best, best_cost[1]
    return levels
