"""Recipient models whose correct Command-V answer is known, to check the paste against it.

Two demo models trained apart give no ground truth: if a pasted edit does less than the recipient's
own, the paste or the models may be at fault. These pairs remove the doubt:

- ``rotated_copy``: the donor itself in another orthonormal basis of the residual stream (h' = h Q).
  It computes exactly the donor's function, so a donor steering vector v must paste as v Q, and the
  pasted vector must act in it exactly as v acts in the donor.
- ``finetuned_copy``: the donor fine-tuned briefly on one genre. Its residual stream is nearly the
  donor's, so converters are nearly the identity and the paste should match the recipient's own
  intervention closely — a pair where any loss comes from the paste, not from two unrelated models.

``known_pair(name, donor)`` builds either one with the settings the tests and benchmarks use.
"""

from __future__ import annotations

import copy
import random
from typing import Sequence

import torch

from actlab.engine.likelihood import encode_lm_data, token_nll
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.models.loading import load
from actlab.models.model import Model
from actlab.models.rotation import rotate_residual

KNOWN_PAIRS = ("rotated", "finetuned")
FINETUNE_GENRE = "fortunes"
# mild on purpose: 60 steps at 3e-4 moved demo-llama's stream by 27–45% and its neutral perplexity 115 → 143, and
# its own adapters then grew to twice the donor's relative size — a different model, not a known answer
FINETUNE_STEPS, FINETUNE_LR = 30, 1e-4

__all__ = ["KNOWN_PAIRS", "FINETUNE_GENRE", "rotated_copy", "finetuned_copy", "known_pair"]


def _check_idle(model: Model) -> None:
    """A copy is made of the bare HF module: inside an open edit or capture block its hooks are installed
    (and hold thread-local state that cannot be copied), so refuse with a message rather than a TypeError."""
    if model.hooks.active:
        raise ActlabError(f"{model.name} has an edit or capture open: copy it outside model.edit(...) / "
                          "model.capture(...) blocks")
    if model.device_map is not None:  # accelerate's hooks and offloaded (meta) weights cannot be copied or trained
        raise ActlabError(f"{model.name} is split across devices (device_map): known-answer copies need the whole "
                          "model on one device; load it without device_map to make one")


def rotated_copy(model: Model, seed: int = 0) -> tuple[Model, torch.Tensor]:
    """``(recipient, Q)``: a new Model computing exactly ``model``'s function with residual stream h Q,
    for a seeded random orthonormal Q [d_model, d_model]; ``model`` is not modified.

    Only Llama-family models (``actlab.models.rotation.ROTATABLE_TYPES``) can be rotated this way; any
    other raises ActlabError."""
    _check_idle(model)
    hf, q = rotate_residual(model.hf, seed)
    out = load(hf, tokenizer=model.tokenizer, device=model.device, dtype=None)
    out.name = f"{model.name}-rotated"
    return out, q


def _batches(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """``steps`` minibatches of example indices: reshuffled epochs, so every text is seen equally often."""
    out: list[list[int]] = []
    order: list[int] = []
    while len(out) < steps:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def _check_finetune_args(steps: int, lr: float, batch_size: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ActlabError(f"steps must be a positive integer, not {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ActlabError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not lr > 0:
        raise ActlabError(f"lr must be positive, not {lr!r}")


def finetuned_copy(model: Model, texts: Sequence[str], *, steps: int = 60, lr: float = 3e-4, batch_size: int = 8,
                   max_tokens: int = 64, seed: int = 0, progress: bool = False) -> Model:
    """A deep copy of ``model`` fine-tuned briefly on ``texts`` (all weights, AdamW, the next-token loss of
    ``actlab.engine.likelihood.token_nll`` on at most ``max_tokens`` tokens per text), as a new Model named
    ``{name}-ft`` in eval mode. ``model`` is not modified.

    Seeded: the minibatch order comes from ``seed`` and the torch RNG (dropout) is seeded and restored
    afterwards, so on the CPU two calls with the same arguments give identical weights."""
    _check_finetune_args(steps, lr, batch_size)
    _check_idle(model)
    _, examples = encode_lm_data(model, list(texts), max_tokens=max_tokens)
    tuned = load(copy.deepcopy(model.hf), tokenizer=model.tokenizer, device=model.device, dtype=None)
    tuned.name = f"{model.name}-ft"
    params = [p for p in tuned.hf.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # only the data moves the weights
    batches = _batches(len(examples), batch_size, steps, random.Random(seed))
    with torch.random.fork_rng(devices=[]), progress_bar("fine-tuning", steps, unit="steps", enabled=progress) as bar:
        torch.manual_seed(seed)
        tuned.hf.train()
        try:
            for step, rows in enumerate(batches):
                batch = [examples[i] for i in rows]
                total, count = token_nll(tuned, batch, batch_size=len(batch), prompt_length_known=False, grad=True)
                loss = total / max(1, count)
                if not torch.isfinite(loss):
                    raise ActlabError(f"the fine-tuning loss became {loss.item()} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(description=f"fine-tuning (loss {loss.item():.3f})")
                bar.advance()
        finally:
            tuned.hf.eval()
            for p in params:
                p.grad = None
    return tuned


def known_pair(name: str, donor: Model) -> Model:
    """The recipient of a known-answer pair for ``donor``: ``"rotated"`` (``rotated_copy``, seed 0) or
    ``"finetuned"`` (``finetuned_copy``, ``FINETUNE_STEPS`` at ``FINETUNE_LR``, on the tuning split's ``fortunes`` passages — one
    genre, so the recipient really differs; the tuning split only, so no evaluation text is trained on)."""
    if name == "rotated":
        return rotated_copy(donor)[0]
    if name == "finetuned":
        from actlab.experiments.genre_data import split_passages

        return finetuned_copy(donor, split_passages(FINETUNE_GENRE, "tune"), steps=FINETUNE_STEPS, lr=FINETUNE_LR)
    raise ActlabError(f"unknown known-answer pair {name!r}; choose one of {', '.join(KNOWN_PAIRS)}")
