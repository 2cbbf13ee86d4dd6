"""The affine fit's options, validated once and saved into the fitted maps (``params["config"]``)."""

from __future__ import annotations

from dataclasses import dataclass

from actlab.engine.config import Config, check_fields
from actlab.engine.edits import POSITION_MODES
from actlab.errors import ActlabError
from actlab.interventions.affine_loss import LOSSES, Loss


@dataclass
class AffineFitConfig(Config):
    """Options of ``fit_affine`` / ``fit_affine_to_targets`` (see ``actlab.interventions.affine_fit``).

    ``rank`` 0 fits a diagonal scale + bias per site, ``rank > 0`` adds a rank-``rank`` term; ``l1``
    is the sparsity weight (proximal, in target-scale units per dimension); ``val_fraction`` of the
    examples is held out for early stopping (every ``eval_every`` steps, ``patience`` evaluations);
    ``positions`` is where the fitted maps act when applied.
    """

    rank: int = 0
    steps: int = 150
    lr: float = 5e-2
    l1: float = 0.0
    loss: Loss = "wasserstein"
    max_tokens_per_text: int = 64
    val_fraction: float = 0.2
    eval_every: int = 10
    patience: int = 5
    batch_size: int = 16
    n_quantiles: int = 48
    seed: int = 0
    positions: str = "all"

    def validate(self) -> None:
        check_fields(self, positive_ints=("steps", "batch_size"), positive_numbers=("lr",),
                     fractions=("val_fraction",), choices={"loss": LOSSES, "positions": POSITION_MODES})
        if isinstance(self.l1, bool) or not (isinstance(self.l1, (int, float)) and 0 <= self.l1 < float("inf")):
            raise ActlabError(f"l1 must be a number >= 0, not {self.l1!r}")
        if self.n_quantiles < 2:
            raise ActlabError(f"n_quantiles must be at least 2, not {self.n_quantiles}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ActlabError(f"rank must be an integer from 0 (diagonal only) to the site's width, not {self.rank!r}")

    def check_rank(self, model, sites: list[str]) -> None:
        """The rank must fit every site's width."""
        for s in sites:
            width = model.sites[s]
            if self.rank > width:
                raise ActlabError(f"rank must be an integer from 0 (diagonal only) to the width of '{s}' ({width}), "
                                  f"not {self.rank!r}")
