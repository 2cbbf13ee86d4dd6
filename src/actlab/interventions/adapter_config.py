"""The adapter trainer's options, validated once and saved into the trained adapter (``params["config"]``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from actlab.engine.config import Config, check_fields
from actlab.engine.edits import POSITION_MODES
from actlab.errors import ActlabError


@dataclass
class AdapterConfig(Config):
    """Options of ``train_adapter`` (see ``actlab.interventions.adapter_train``).

    ``eval_every`` defaults to ``steps // 20`` (1 to 25); ``patience`` counts evaluations without
    improvement (0 disables early stopping); ``val_fraction`` 0 trains on everything and keeps the
    last adapter; ``weight_decay`` pulls ``W`` toward ``R`` and ``b`` toward 0 ("no change").
    """

    # the adapter
    rank: int = 4
    positions: str = "all"
    subspace: int = 0  # 0: R anywhere; m > 0: R inside the top-m principal directions of the site on the data
    # the optimiser
    steps: int = 200
    lr: float = 5e-3
    batch_size: int = 8
    weight_decay: float = 0.01
    seed: int = 0
    # early stopping and the data
    eval_every: int | None = None
    patience: int = 5
    val_fraction: float = 0.2
    max_tokens: int = 128

    def validate(self) -> None:
        if isinstance(self.subspace, bool) or not isinstance(self.subspace, int) or self.subspace < 0:
            raise ActlabError(f"subspace must be 0 (anywhere) or a number of principal directions, not {self.subspace!r}")
        if 0 < self.subspace < self.rank:
            raise ActlabError(f"subspace ({self.subspace}) must be at least the rank ({self.rank}): R lives inside it")
        check_fields(self, positive_ints=("rank", "steps", "batch_size"), positive_numbers=("lr",),
                     fractions=("val_fraction",), choices={"positions": POSITION_MODES})
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ActlabError(f"weight_decay must be >= 0, not {self.weight_decay}")

    @property
    def eval_interval(self) -> int:
        """Steps between held-out evaluations."""
        return self.eval_every or max(1, min(25, self.steps // 20))
