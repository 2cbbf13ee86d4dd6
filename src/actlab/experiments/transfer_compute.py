"""Compute accounting of the Command-V evaluation: seconds and approximate FLOPs of pasting vs fitting directly.

FLOPs ≈ 2·params per token forward (+2·params backward for adapter training, weights frozen) plus the
ridge algebra of the converters. Profiles are reusable across interventions, converters too, so the
paste's cost is mostly paid once per model pair.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from actlab.interventions.types import LowRankAdapter
from actlab.linalg import LAMBDA_GRID

__all__ = ["compute_accounting", "n_tokens"]


def n_tokens(model, texts: Sequence[str]) -> int:
    return int(sum(len(ids) for ids in model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]))


def _ridge_flops(n: int, d_in: int, d_out: int, grid: int, holdout: float = 0.2) -> float:
    """Gram matrices (train split and all rows), one solve per λ plus the refit, held-out predictions."""
    gram = 2 * 2.0 * n * d_in * (d_in + d_out)
    solves = (grid + 1) * (2 / 3 * d_in**3 + 2.0 * d_in**2 * d_out)
    preds = grid * 2.0 * holdout * n * d_in * d_out
    return gram + solves + preds


def _converter_flops(converters, d_prof, r_prof) -> float:
    n = d_prof.acts[0].shape[0]
    total = 0.0
    for _d, _r in converters.layer_map.items():
        total += _ridge_flops(n, r_prof.d_model, d_prof.d_model, len(LAMBDA_GRID))
        total += _ridge_flops(n, d_prof.d_model, r_prof.d_model, len(LAMBDA_GRID))
    return total


def _adapter_flops(model, data, adapter: LowRankAdapter, batch_size: int, steps: int) -> float:
    """≈ 2P FLOPs per token forward, ≈ 2P more backward (activation gradients only: weights frozen),
    for ``steps_run`` batches of ``batch_size`` examples, plus the held-out evaluations (forward)."""
    from actlab.engine.likelihood import encode_lm_data

    _, examples = encode_lm_data(model, data)
    mean_len = float(np.mean([len(p) + len(c) for p, c in examples]))
    P = model.n_params
    p = adapter.params
    steps_run = int(p.get("steps_run", steps))
    eval_every = max(1, min(25, steps // 20))
    n_evals = steps_run // eval_every + 2
    train = steps_run * batch_size * mean_len * 4.0 * P
    evals = n_evals * int(p.get("n_val", 0)) * mean_len * 2.0 * P
    return train + evals


def _direct_flops(recipient, config, data, direct) -> float:
    if config.kind == "vector":
        c = data.contrast
        prompts = c.prompts or [""] * len(c.pos)
        texts = [p + x for side in (c.pos, c.neg) for p, x in zip(prompts, side)]
        return 2.0 * recipient.n_params * n_tokens(recipient, texts)
    return _adapter_flops(recipient, data.adapter_data, direct, config.adapter_batch_size, config.steps)


def compute_accounting(donor, recipient, config, data, transfer, direct, timings: dict[str, Any]) -> dict[str, Any]:
    """Seconds and GFLOPs of the paste (profiles + converters + paste) against the direct fit: ``data`` is the
    evaluation's ``EvalData``, ``transfer`` its ``PasteResult``, ``timings`` the fit seconds and method."""
    profile_prompts = data.profile_prompts
    d_prof, r_prof, converters = transfer.donor_profile, transfer.recipient_profile, transfer.converters
    profile_flops = sum(2.0 * m.n_params * n_tokens(m, profile_prompts) for m in (donor, recipient))
    paste_flops = profile_flops + _converter_flops(converters, d_prof, r_prof)
    s = transfer.seconds
    profile_seconds = s["donor_profile"] + s["recipient_profile"]
    return {
        "profile_seconds": profile_seconds, "donor_profile_seconds": s["donor_profile"],
        "recipient_profile_seconds": s["recipient_profile"], "profile_rows": int(d_prof.acts[0].shape[0]),
        "profile_prompts": len(profile_prompts), "profile_cached": config.cache_dir is not None,
        "converter_fit_seconds": converters.fit_seconds, "paste_only_seconds": s["paste"],
        "paste_seconds": profile_seconds + converters.fit_seconds + s["paste"],
        "paste_gflop": paste_flops / 1e9, "profile_gflop": profile_flops / 1e9,
        "donor_fit_seconds": timings["donor_fit"], "direct_method": timings["direct_method"],
        "direct_seconds": timings["direct_fit"],
        "direct_gflop": _direct_flops(recipient, config, data, direct) / 1e9,
        "threads": torch.get_num_threads(),
        "note": "FLOPs ≈ 2·params per token forward (+2·params backward for adapter training, weights frozen) "
                "plus the ridge algebra; profiles are reusable across interventions, converters too",
    }
