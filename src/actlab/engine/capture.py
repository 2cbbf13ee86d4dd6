"""In-memory capture: ``with model.capture(["resid.*"]) as cap: model(texts)``."""

from __future__ import annotations

import threading
from typing import Iterable, Iterator

import torch

from actlab.engine.batch import TokenBatch
from actlab.engine.hooks import ForwardState
from actlab.errors import ActlabError


NOT_YET = ("nothing captured yet: run the model inside the `with model.capture(...)` block, in the thread "
           "that opened it (each thread captures only its own forward passes)")


class OpenCaptures(threading.local):
    """The captures open in each thread; ``Model`` stamps a call's input ids on the calling thread's only."""

    def __init__(self) -> None:
        self.here: list[Capture] = []

    def __iter__(self) -> Iterator["Capture"]:
        return iter(list(self.here))


class Capture:
    """Activations of some sites for every forward pass the entering thread runs inside the ``with`` block.

    ``cap[site]`` is ``[batch, seq, width]`` aligned with the input (padding included; use
    ``cap.mask`` or ``cap.flat(site)`` to drop it). Several forward passes are joined along the
    batch axis when their lengths agree, and along the sequence axis for cached generation steps.
    """

    def __init__(self, model, sites: str | Iterable[str]):
        self.model = model
        self.sites = model.resolve(sites)
        self._calls: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        self._masks: list[torch.Tensor] = []
        self._offsets: list[int] = []
        self._handles = []
        self._open: list[Capture] = []  # the entering thread's list of open captures
        self.input_ids: torch.Tensor | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Capture":
        first = self.sites[0]

        def reader(site: str, h: torch.Tensor, state: ForwardState) -> None:
            self._calls[site].append(h.detach().to("cpu", copy=True))
            if site == first:
                self._masks.append(state.token_mask())
                self._offsets.append(state.offset)

        self._handles = [self.model.hooks.add_reader(s, reader) for s in self.sites]
        self._open = self.model._captures.here
        self._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self in self._open:
            self._open.remove(self)

    # -------------------------------------------------------------- access
    def __contains__(self, site: str) -> bool:
        return site in self._calls

    def keys(self) -> list[str]:
        return list(self.sites)

    def items(self):
        return ((s, self[s]) for s in self.sites)

    def calls(self, site: str) -> list[torch.Tensor]:
        """One tensor per forward pass, as the model produced it."""
        self._check(site)
        return list(self._calls[site])

    def _check(self, site: str) -> None:
        if site not in self._calls:
            resolved = self.model.resolve([site])
            missing = [s for s in resolved if s not in self._calls]
            raise ActlabError(f"site '{site}' was not captured; this capture holds: {', '.join(self.sites)}"
                              if missing else f"use one site name, e.g. {resolved[0]}")
        if not self._calls[site]:
            raise ActlabError(NOT_YET)

    def _join_axis(self) -> int:
        if len(self._offsets) <= 1:
            return 0
        return 1 if all(o > 0 for o in self._offsets[1:]) else 0

    def __getitem__(self, site: str) -> torch.Tensor:
        self._check(site)
        calls = self._calls[site]
        if len(calls) == 1:
            return calls[0]
        axis = self._join_axis()
        other = 1 if axis == 0 else 0
        if len({t.shape[other] for t in calls}) != 1:
            raise ActlabError(
                f"the {len(calls)} forward passes captured for '{site}' have different shapes "
                f"({[tuple(t.shape) for t in calls]}); read them one by one with cap.calls('{site}')"
            )
        return torch.cat(calls, dim=axis)

    @property
    def mask(self) -> torch.Tensor:
        """[batch, seq] attention mask (1 = real token) of the captured passes, joined like the tensors."""
        if not self._masks:
            raise ActlabError(NOT_YET)
        if len(self._masks) == 1:
            return self._masks[0].long()
        return torch.cat(self._masks, dim=self._join_axis()).long()

    def flat(self, site: str) -> torch.Tensor:
        """[n_real_tokens, width]: padding removed, in batch-then-position order."""
        return self[site][self.mask.bool()]

    def to_batch(self) -> TokenBatch:
        """The capture as a TokenBatch (what sinks consume)."""
        mask = self.mask.bool()
        batch_size, width = mask.shape
        ids = self.input_ids if self.input_ids is not None and self.input_ids.shape == mask.shape else torch.full(mask.shape, -1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        doc_ids = torch.arange(batch_size).unsqueeze(1).expand(batch_size, width)
        return TokenBatch(
            acts={s: self.flat(s) for s in self.sites},
            token_ids=ids[mask],
            doc_ids=doc_ids[mask],
            positions=positions[mask],
        )
