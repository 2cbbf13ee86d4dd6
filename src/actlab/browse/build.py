"""``build_browser``: one pass over a corpus, the direct logit effects, the static site (what ``actlab browse`` runs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from actlab.browse.collect import BrowseConfig, UnitCollector, UnitData
from actlab.browse.logits import logit_table, output_directions
from actlab.browse.site import MARKER, write_site
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError

__all__ = ["build_browser", "collect_units", "parse_units", "LOGIT_TOKENS"]

LOGIT_TOKENS = 10


def parse_units(text: str | Sequence[int] | None, width: int) -> np.ndarray:
    """``"0-63"``, ``"3,7,10-12"``, a list of ints, or None (every unit) → sorted unique unit ids, each checked
    against the site's ``width``."""
    if text is None:
        return np.arange(width)
    if isinstance(text, str):
        ids: list[int] = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            try:
                lo, _, hi = part.partition("-")
                ids.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
            except ValueError:
                raise ActlabError(f"units: expected numbers and ranges such as '0-63' or '3,7,10-12', not {part!r}") from None
    else:
        ids = [int(x) for x in text]
    if not ids:
        raise ActlabError("units: no unit given; e.g. '0-63'")
    bad = [i for i in ids if not 0 <= i < width]
    if bad:
        raise ActlabError(f"units {bad[:5]} are out of range: the site has units 0..{width - 1}")
    return np.unique(np.asarray(ids, dtype=np.int64))


def _read_site(model, site: str, sae) -> tuple[str, int]:
    """The site the pass reads (an attached SAE's latents, or the site itself) and its width."""
    resolved = model.resolve([site])
    if len(resolved) != 1:
        raise ActlabError(f"the browser reads one site; '{site}' names {len(resolved)}")
    resolved = resolved[0]
    if sae is not None:
        from actlab.sae.splice import latent_site

        return latent_site(resolved), sae.n_latents
    return resolved, model.sites[resolved]


def collect_units(model, docs, site: str, units=None, *, sae=None, config: BrowseConfig | None = None,
                  progress: bool = False) -> UnitData:
    """The streaming pass alone: per-unit structures of ``units`` of ``site`` (or of ``sae``'s latents on it)."""
    config = config or BrowseConfig()
    read, width = _read_site(model, site, sae)
    chosen = parse_units(units, width)
    collector = UnitCollector(read, chosen, config)
    handle = None
    if sae is not None:
        from actlab.sae.splice import attach

        handle = attach(model, sae, site)
    try:
        with torch.no_grad():
            model.run(docs, [read], [collector], batch_size=config.batch_size, progress=progress,
                      description=f"browse {read}")
    finally:
        if handle is not None:
            handle.remove()
    return collector.finish()


def _vocab(tokenizer, size: int) -> list[str]:
    """Every token id decoded alone (the pages show tokens this way)."""
    return list(tokenizer.batch_decode([[i] for i in range(size)]))


def build_browser(model, out: str | Path, site: str, units=None, *, sae=None, sae_info: dict | None = None,
                  docs=None, max_tokens: int | None = None, config: BrowseConfig | None = None,
                  progress: bool = False, **overrides) -> Path:
    """Build the feature browser of ``units`` of ``site`` (MLP neurons ``mlp.hidden.i``, any site's units, or
    the latents of ``sae`` trained on ``site``) over ``docs`` (default: the bundled training text), cut to
    ``max_tokens``; writes ``out`` (see browse/site.py) and returns the path of its index.html.
    ``config`` / keyword overrides: ``BrowseConfig`` (top_k, windows, bins, intervals, samples, ...)."""
    from actlab.io import budget, check_output_dir

    config = BrowseConfig.with_overrides(config, overrides)
    check_output_dir(out, (MARKER,), what="feature browser")
    if docs is None:
        from actlab.datasets import training_text

        docs = training_text("train")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ActlabError(f"max_tokens must be a positive integer, not {max_tokens}")
        docs = budget(docs, model.tokenizer, max_tokens)
    if not docs:
        raise ActlabError("the browser needs at least one document of text")
    start = time.perf_counter()
    data = collect_units(model, docs, site, units, sae=sae, config=config, progress=progress)
    seconds_pass = time.perf_counter() - start
    directions, why = output_directions(model, site, data.units, sae)
    logits = logit_table(model, directions, LOGIT_TOKENS) if directions is not None else None
    meta = {
        "model": model.name, "site": site, "read": _read_site(model, site, sae)[0],
        "kind": "sae latents" if sae is not None else ("mlp neurons" if site.startswith("mlp.hidden.") else "units"),
        "sae": {k: v for k, v in (sae_info or {}).items() if isinstance(v, (str, int, float))} if sae is not None else None,
        "n_units": int(len(data.units)), "n_tokens": int(data.n_tokens), "n_documents": len(docs),
        "logits": why or "direct effect: the output direction through the unembedding (no final norm)",
        "has_logits": logits is not None, "config": config.to_dict(), "seconds_pass": round(seconds_pass, 2),
    }
    vocab = _vocab(model.tokenizer, model.vocab_size)
    with progress_bar("write pages", len(data.units), unit="units", enabled=progress) as bar:
        index = write_site(out, data, meta, vocab, logits, progress=bar)
    return index
