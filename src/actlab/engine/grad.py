"""Gradients through a frozen model: what every trainer of edits (affine maps, adapters, SAEs) needs."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

_LOCK = threading.Lock()
# per HF module: how many frozen_weights blocks are open, and the flags the first one saved
_OPEN: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


@contextmanager
def frozen_weights(model) -> Iterator[None]:
    """Turn off ``requires_grad`` on every weight of the model; restore the flags afterwards.

    Only the edit's own tensors then reach the autograd graph, and the model's ``.grad`` stay None.
    Blocks may nest or overlap (two threads training on one model): the first one to open saves the
    flags and the last one to close restores them, so an overlap never leaves the weights frozen.
    """
    module = model.hf
    with _LOCK:
        entry = _OPEN.get(module)
        if entry is None:
            entry = _OPEN[module] = [0, [(p, p.requires_grad) for p in module.parameters()]]
            for p, _ in entry[1]:
                p.requires_grad_(False)
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                for p, flag in entry[1]:
                    p.requires_grad_(flag)
                del _OPEN[module]


def grad_mode(enabled: bool):
    """``torch.enable_grad()`` or ``torch.no_grad()``: one switch for loops that run with and without graphs."""
    return torch.enable_grad() if enabled else torch.no_grad()
