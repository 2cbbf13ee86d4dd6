"""Gradients through a frozen model: what every trainer of edits (affine maps, adapters, SAEs) needs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def frozen_weights(model) -> Iterator[None]:
    """Turn off ``requires_grad`` on every weight of the model; restore the flags afterwards.

    Only the edit's own tensors then reach the autograd graph, and the model's ``.grad`` stay None.
    """
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def grad_mode(enabled: bool):
    """``torch.enable_grad()`` or ``torch.no_grad()``: one switch for loops that run with and without graphs."""
    return torch.enable_grad() if enabled else torch.no_grad()
