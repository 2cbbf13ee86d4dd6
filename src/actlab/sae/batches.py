"""The data order of SAE training: the batch of every step, the same whatever step training (re)started from.

``batches`` may be:

- a tensor ``[N, d_in]``: shuffled once per epoch by ``(seed, epoch)``, ``N // batch_size`` batches
  an epoch (the remainder of each epoch is skipped); resumable;
- a callable ``step -> [B, d_in] tensor``: the caller owns the order (``ModelStream`` is one);
  resumable if the function is deterministic;
- a re-iterable (a list, a store's shuffled reader, or an object whose ``__iter__`` starts over):
  resuming at step s skips its first s batches; resumable if it yields the same batches each time;
- a one-shot iterator (a generator): trains, but cannot resume from a checkpoint.

Batch size is then the caller's (``batch_size`` is used for tensors only). A transcoder
(``d_out`` given) trains on pairs ``(inputs [N, d_in], targets [N, d_out])``, as tensors or per step.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from actlab.errors import ActlabError

__all__ = ["StepBatches"]


class StepBatches:
    """``get(step)``: the batch of a step, the same whatever step training (re)started from."""

    def __init__(self, batches: Any, d_in: int, batch_size: int, seed: int, d_out: int | None = None):
        self.d_in, self.d_out, self.batch_size, self.seed, self.source = d_in, d_out, batch_size, seed, batches
        self._iter, self._next, self._perm, self._cached = None, 0, (None, None), None
        if _is_pair(batches) or isinstance(batches, torch.Tensor):
            self.mode = "tensor"
            self._check(batches, "the training tensor")
            rows = batches[0].shape[0] if _is_pair(batches) else batches.shape[0]
            if rows < batch_size:
                raise ActlabError(f"the training tensor has {rows} rows, fewer than batch_size "
                                  f"({batch_size}); lower batch_size or give more activations")
        elif callable(batches):
            self.mode = "function"
        elif isinstance(batches, Iterable):
            self.mode = "iterator" if iter(batches) is batches else "iterable"
        else:
            raise ActlabError(f"batches must be a tensor, a function step -> tensor or an iterable of tensors, "
                              f"not {type(batches).__name__}")

    def start(self, step: int) -> None:
        if step and self.mode == "iterator":
            raise ActlabError("cannot resume from a checkpoint with a one-shot iterator of batches: pass a tensor, a "
                              "function step -> tensor or a re-iterable, or use a new checkpoint_dir")
        self._iter, self._next = iter(self.source) if self.mode in ("iterator", "iterable") else None, 0
        for _ in range(step if self.mode == "iterable" else 0):
            self._pull(step)

    def first_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Data for the decoder-bias and scale initialisation, as (inputs, targets): the tensor's first
        65,536 rows, else step 0's batch (kept, so that an iterator's first batch is still trained on)."""
        if self.mode == "tensor":
            if _is_pair(self.source):
                return self.source[0][:65536].float(), self.source[1][:65536].float()
            x = self.source[:65536].float()
            return x, x
        self._cached = self.get(0)
        return self._cached

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of a step; the targets are the inputs for an SAE."""
        if step == 0 and self._cached is not None:
            batch, self._cached = self._cached, None
            return batch
        if self.mode == "tensor":
            batch = self._from_tensor(step)  # rows of the tensor checked whole at the start
        else:
            batch = self.source(step) if self.mode == "function" else self._pull(step)
            self._check(batch, f"the batch of step {step}")
        if _is_pair(batch):
            return batch[0].float(), batch[1].float()
        x = batch.float()
        return x, x

    def _check(self, batch: Any, what: str) -> None:
        if self.d_out is None:
            if _is_pair(batch):
                raise ActlabError(f"{what} is a pair (inputs, targets), which only a transcoder takes; "
                                  "give the activations alone, or pass d_out= to train a transcoder")
            _check_batch(batch, self.d_in, what)
            return
        if not _is_pair(batch):
            raise ActlabError(f"{what} should be a pair (inputs [N, {self.d_in}], targets [N, {self.d_out}]) for a "
                              f"transcoder, not {type(batch).__name__}")
        _check_batch(batch[0], self.d_in, f"{what} (inputs)")
        _check_batch(batch[1], self.d_out, f"{what} (targets)")
        if batch[0].shape[0] != batch[1].shape[0]:
            raise ActlabError(f"{what}: {batch[0].shape[0]} inputs but {batch[1].shape[0]} targets")

    def _pull(self, step: int) -> torch.Tensor:
        try:
            self._next += 1
            return next(self._iter)
        except StopIteration:
            raise ActlabError(f"the batches ran out at step {step} (after {self._next - 1}); give more data "
                              "or fewer steps") from None

    def _from_tensor(self, step: int):
        n, b = (self.source[0] if _is_pair(self.source) else self.source).shape[0], self.batch_size
        per_epoch = n // b
        epoch, j = divmod(step, per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=gen))
        rows = self._perm[1][j * b:(j + 1) * b]
        if _is_pair(self.source):
            return self.source[0][rows], self.source[1][rows]
        return self.source[rows]


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)


def _check_batch(x: Any, d_in: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != d_in or not x.is_floating_point():
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ActlabError(f"{what} should be a float tensor [batch, {d_in}] (d_in {d_in}), not {got}")
    if x.shape[0] == 0:
        raise ActlabError(f"{what} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ActlabError(f"{what} has NaN or infinite values; drop those rows (or record the site again)")
