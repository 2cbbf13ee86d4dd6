"""The unit of data every sink receives: activations of one forward pass, flattened to tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class TokenBatch:
    """Activations of the selected (non-padding) token positions of one forward pass.

    Every tensor has the same first dimension ``n`` = number of selected tokens, in
    document order, then position order. ``acts[site]`` is ``[n, width]`` on CPU in the
    model's dtype (sinks upcast where precision matters).
    """

    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor  # [n] int64, the input token at that position
    doc_ids: torch.Tensor  # [n] int64, global index of the document in the run
    positions: torch.Tensor  # [n] int64, position of the token inside its document (0-based)
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])


class Sink(Protocol):
    """Anything that consumes TokenBatches: in-memory capture, on-disk store, streaming stats."""

    def consume(self, batch: TokenBatch) -> None: ...
