"""What every analysis shares: the one pass over data it reads, the way it reads it back, the loss it
checks edits with, and the result protocol the report renders."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from actlab.engine.reservoir import Reservoir
from actlab.errors import ActlabError


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
    distributed: bool = False,
) -> ProfileData:
    """One pass over ``docs``: streaming stats + a fixed-size aligned reservoir (memory does not grow).
    With ``distributed`` (inside torchrun) each rank runs its share of the batches and every rank gets
    the data of all of them, equal to one process's (``actlab.stats.distributed``)."""
    from actlab.dist.samples import all_reduce_reservoir
    from actlab.stats.collect import collect_stats

    names = list(sites) if sites is not None else default_profile_sites(model)
    samples = Reservoir(reservoir_size, seed=seed)
    stats, n_tokens = collect_stats(model, docs, names, batch_size=batch_size, distributed=distributed,
                                    extra_sinks=[samples], progress=progress)
    if distributed:
        all_reduce_reservoir(samples, stats.widths)
    return ProfileData(stats=stats, samples=samples, eval_texts=list(eval_texts or []), n_tokens=n_tokens)


def pick(obj, *names: str) -> dict[str, Any]:
    """``{name: obj.name}`` for ``names``, in order: the plain part of a result's ``to_dict``."""
    return {name: getattr(obj, name) for name in names}


# ----------------------------------------------------------------------------- reading ProfileData back
def layer_index(site: str) -> int:
    """``mlp.hidden.3`` -> 3."""
    return int(site.rsplit(".", 1)[1])


def block_input_site(model, i: int) -> str:
    """The residual stream entering block ``i``: ``embed`` for block 0, else ``resid.{i-1}``."""
    return "embed" if i == 0 else f"resid.{i - 1}"


def require_sites(data: ProfileData, sites: Sequence[str], what: str) -> None:
    missing = [s for s in sites if s not in data.samples.acts]
    if missing:
        raise ActlabError(
            f"{what} needs the sites {', '.join(missing)} in the profile reservoir; collect the profile data "
            "with collect_profile_data(model, docs) (default sites) or include them in sites="
        )


def reservoir_acts(data: ProfileData, site: str) -> torch.Tensor | None:
    """The reservoir sample of ``site`` as float32 [K, width], or None when the reservoir lacks it."""
    acts = getattr(data.samples, "acts", {}) or {}
    x = acts.get(site)
    return None if x is None or x.shape[0] == 0 else x.float()


def sites_of_kind(data: ProfileData, model, kind: str) -> list[str]:
    """Sites ``{kind}.{i}`` present in the profile (stats or reservoir), ordered by layer."""
    pattern = re.compile(rf"^{re.escape(kind)}\.(\d+)$")
    names: set[str] = set()
    for container in (getattr(data.samples, "acts", {}) or {}, _stats_names(data.stats)):
        names.update(s for s in container if pattern.match(s))
    if not names and model is not None:
        names = {s for s in model.sites if pattern.match(s)}
    return sorted(names, key=layer_index)


def _stats_names(stats) -> list[str]:
    if stats is None:
        return []
    for attr in ("sites", "stats"):
        value = getattr(stats, attr, None)
        if isinstance(value, (dict, list, tuple)):
            return list(value)
    if isinstance(stats, dict):
        return list(stats)
    try:
        return list(stats.keys())
    except Exception:
        return []


def site_stats(stats, site: str):
    """The ChannelStats of one site from a StatsSink (or a plain dict), or None when absent."""
    if stats is None:
        return None
    for attr in ("stats", "sites"):
        value = getattr(stats, attr, None)
        if isinstance(value, dict) and site in value:
            return value[site]
    try:
        return stats[site]
    except Exception:
        return None


def stats_eps(stats, site: str | None = None, default: float = 1e-3) -> float:
    """The ``|x| < eps`` threshold the stats counted "small" entries with."""
    st = site_stats(stats, site) if site is not None else None
    for source in (st, stats):
        eps = getattr(source, "eps", None)
        if isinstance(eps, (int, float)):
            return float(eps)
    return default


def decode_token(tokenizer, token_id: int, fallback: str = "") -> str:
    """The text of one token id (``fallback`` when it cannot be decoded)."""
    if tokenizer is None or token_id is None or int(token_id) < 0:
        return fallback
    try:
        if hasattr(tokenizer, "decode"):
            return str(tokenizer.decode([int(token_id)]))
        return str(tokenizer.batch_decode([[int(token_id)]])[0])
    except Exception:  # a tokenizer that cannot decode a lone id
        return fallback


# ----------------------------------------------------------------------------- the loss edits are checked with
def perplexity(model, texts: Sequence[str], batch_size: int = 8) -> float:
    """Token-weighted perplexity of ``texts`` (``actlab.evals.perplexity``; active edits apply)."""
    from actlab.evals.perplexity import perplexity as shared

    return float(shared(model, list(texts), batch_size=batch_size))


def log_perplexity(model, texts: Sequence[str], batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss (nats) on ``texts``, with any active edits applied."""
    return math.log(perplexity(model, texts, batch_size))
