"""When is a residual-stream entry *massive*? The criterion of Sun et al. (2024) and the looser corpus rule.

Sun et al. call an activation massive when its magnitude is large in absolute terms (> 100) and
about 1,000 times the median magnitude of its hidden state (the layer's output on that input
sequence). ``MassiveCriterion`` holds both bounds and which median the ratio is taken to:

* ``median="sequence"`` (the paper's, the default): the median ``|x|`` over every token and channel
  of the same sequence at that layer;
* ``median="corpus"``: the median ``|x|`` over every entry of the layer's reservoir sample (all
  profiled tokens); ``MassiveCriterion.corpus_ratio(100)`` with ``min_abs=0`` is the rule earlier
  versions used.

An entry is massive when ``|x| > min_abs`` **and** ``|x| > min_ratio * median`` (both strict).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.engine.config import Config
from actlab.errors import ActlabError

__all__ = ["MassiveCriterion", "massive_mask", "sequence_median"]


@dataclass
class MassiveCriterion(Config):
    """Absolute and relative bounds an entry must both exceed to be massive (saved in the result)."""

    min_abs: float = 100.0
    min_ratio: float = 1000.0
    median: str = "sequence"  # "sequence" (the paper's) or "corpus"

    def validate(self) -> None:
        for name in ("min_abs", "min_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ActlabError(f"{name} must be a number >= 0, not {v!r} (the paper uses min_abs=100, "
                                  "min_ratio=1000: MassiveCriterion.paper())")
        if self.median not in ("sequence", "corpus"):
            raise ActlabError(f"median must be 'sequence' (the paper's) or 'corpus', not {self.median!r}")

    @classmethod
    def paper(cls) -> "MassiveCriterion":
        """Sun et al.'s: |x| > 100 and > 1000x the median |x| of the same sequence."""
        return cls(100.0, 1000.0, "sequence")

    @classmethod
    def corpus_ratio(cls, ratio: float = 100.0, min_abs: float = 0.0) -> "MassiveCriterion":
        """A ratio to the corpus-wide median only (no absolute bound by default): the looser, older rule."""
        return cls(float(min_abs), float(ratio), "corpus")

    @property
    def name(self) -> str:
        if self == MassiveCriterion.paper():
            return "paper"
        return "corpus ratio" if self.median == "corpus" and self.min_abs == 0 else "custom"

    def describe(self) -> str:
        bound = f"|x| > {self.min_abs:g} and " if self.min_abs > 0 else "|x| "
        return f"{bound}> {self.min_ratio:g}x the {self.median} median |x|"

    def cutoff(self, median: float) -> float:
        """The one magnitude an entry must exceed given its median."""
        return max(self.min_abs, self.min_ratio * median)


def sequence_median(x: torch.Tensor) -> float:
    """Median of ``|x|`` over every entry (the mean of the two middle values for an even count, as numpy)."""
    v = x.detach().abs().flatten().double().sort().values
    n = v.numel()
    return float((v[(n - 1) // 2] + v[n // 2]) / 2) if n else float("nan")


def massive_mask(x: torch.Tensor, criterion: MassiveCriterion, corpus_median: float | None = None):
    """For one sequence's hidden state ``x`` ``[tokens, d]``: (massive entries, |x| > min_abs, ratio test, median)."""
    if criterion.median == "corpus":
        if corpus_median is None:
            raise ActlabError("the corpus rule needs the corpus median of the layer")
        med = float(corpus_median)
    else:
        med = sequence_median(x)
    a = x.detach().abs()
    over_abs, over_ratio = a > criterion.min_abs, a > criterion.min_ratio * med
    return over_abs & over_ratio, over_abs, over_ratio, med
