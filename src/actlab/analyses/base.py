"""What every analysis shares: the one pass over data it reads, and the result protocol the report renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from actlab.engine.reservoir import Reservoir


class AnalysisResult(Protocol):
    """A small dataclass per analysis; the report renders any object with these members."""

    key: str  # short id, e.g. "massive"
    title: str  # section title
    explanation: str  # one plain paragraph: what is measured, which paper, how to read the plot

    def headline(self) -> str: ...  # the one number for the summary table, formatted

    def to_dict(self) -> dict[str, Any]: ...  # every number shown, JSON-able

    def figures(self) -> list: ...  # matplotlib Figures (may be empty)

    def table(self) -> tuple[list[str], list[list[Any]]] | None: ...  # optional (columns, rows)


@dataclass
class Skipped:
    """An analysis that does not apply to this model (e.g. lenses on an encoder without LM head)."""

    key: str
    title: str
    reason: str
    explanation: str = ""

    def headline(self) -> str:
        return "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": True, "reason": self.reason}

    def figures(self) -> list:
        return []

    def table(self):
        return None


@dataclass
class ProfileData:
    """Streaming statistics and an aligned token reservoir from one pass over the profile corpus."""

    stats: Any  # actlab.stats.StatsSink over resid.*, mlp.hidden.* (and embed/final/attn/mlp when present)
    samples: Reservoir  # aligned sample of tokens for every site in ``stats``
    eval_texts: list[str] = field(default_factory=list)  # held-out texts for perplexity checks
    n_tokens: int = 0


def default_profile_sites(model) -> list[str]:
    wanted = ["embed", "resid.*", "attn.*", "mlp.*", "mlp.hidden.*", "final"]
    names: list[str] = []
    for selector in wanted:
        try:
            names += model.resolve(selector)
        except Exception:  # a site kind this architecture lacks (e.g. no final norm in BERT)
            continue
    return [s for s in model.sites if s in set(names)]


def collect_profile_data(
    model,
    docs: Sequence[str],
    *,
    eval_texts: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    reservoir_size: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> ProfileData:
    """One pass over ``docs``: streaming stats + a fixed-size aligned reservoir (memory does not grow)."""
    from actlab.stats import StatsSink

    names = list(sites) if sites is not None else default_profile_sites(model)
    stats = StatsSink({s: model.sites[s] for s in names})
    samples = Reservoir(reservoir_size, seed=seed)
    summary = model.run(docs, names, [stats, samples], batch_size=batch_size, progress=progress,
                        description="profiling")
    return ProfileData(stats=stats, samples=samples, eval_texts=list(eval_texts or []), n_tokens=summary.n_tokens)
