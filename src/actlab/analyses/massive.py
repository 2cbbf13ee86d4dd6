"""Massive activations in the residual stream (Sun et al., "Massive Activations in Large Language
Models", COLM 2024).

A few residual-stream entries (``resid.{i}``) can be thousands of times larger than the typical
one; they sit in fixed channels, at fixed kinds of positions (the first token, delimiters), and
act like bias terms: zeroing them breaks the model while setting them to their mean value does
not. ``massive_activations`` measures all three properties:

* per layer: the largest ``|x|`` of ``resid.{i}`` over the profiled corpus (stats top-k), its
  channel, position and token, and its ratio to the layer's median ``|x|`` (median over every
  entry of the reservoir sample), reported whether or not it is massive;
* which entries are *massive*, by a ``MassiveCriterion`` (``massive_criterion.py``): by default the
  paper's, ``|x| > 100`` and ``> 1000x`` the median ``|x|`` of the same sequence, checked on the
  prompts (whole sequences); ``MassiveCriterion.corpus_ratio(100)`` is the looser ratio to the
  corpus median, checked on the corpus statistics;
* input invariance over ``prompts``: for each prompt and layer the (position, channel) of the
  largest ``|x|``; how often the channel is the most common one, and where the positions lie;
* ablation (decoders only): at the layer where each massive channel first appears, set its
  massive entries (by the same criterion) to 0, or to their mean value, and
  measure the perplexity change on ``ablation_texts``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from actlab.analyses.base import (
    ProfileData, Skipped, decode_token, layer_index, perplexity, reservoir_acts, site_stats, sites_of_kind,
)
from actlab.analyses.massive_criterion import MassiveCriterion, massive_mask, sequence_median
from actlab.analyses.massive_result import MassiveResult
from actlab.engine.edits import SetChannels
from actlab.engine.hooks import ForwardState
from actlab.errors import ActlabError

__all__ = ["MassiveCriterion", "MassiveResult", "MassiveSet", "massive_activations"]  # MassiveResult lives in massive_result


@dataclass
class MassiveSet:
    """At ``site``, set each channel in ``channels`` to its value in ``values`` on the tokens where
    that channel's ``|x|`` exceeds ``cutoff`` and, when ``ratio > 0``, also ``ratio`` times the median
    ``|x|`` of the same sequence (every real token and channel of that row: the paper's criterion),
    leaving every other entry alone.

    A ``SetChannels`` edit restricted, entry by entry, to the massive positions. ``n_set`` counts
    the entries changed (over all forward passes).
    """

    site: str
    channels: list[int]
    values: list[float]
    cutoff: float
    ratio: float = 0.0
    n_set: int = field(default=0, repr=False)

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        channels = torch.as_tensor(self.channels, dtype=torch.long)
        hit = h[..., channels].abs() > self.cutoff
        if not bool(hit.any()):
            return h
        rows = h if h.ndim == 3 else h.unsqueeze(0)
        real = torch.ones(rows.shape[:2], dtype=torch.bool, device=h.device)
        if h.ndim == 3 and state.batch_size == h.shape[0] and state.length == h.shape[1]:
            real = state.token_mask().to(h.device)
            hit = hit & real.unsqueeze(-1)
        if self.ratio > 0:  # the bound relative to each sequence's own median |x|
            med = torch.tensor([sequence_median(r[m]) for r, m in zip(rows, real)], dtype=h.dtype, device=h.device)
            hit = hit & (h[..., channels].abs() > self.ratio * (med.view(-1, 1, 1) if h.ndim == 3 else med))
        set_all = SetChannels(self.site, channels, torch.as_tensor(self.values, dtype=torch.float32))(h, state)
        where = torch.zeros_like(h, dtype=torch.bool)
        where[..., channels] = hit
        self.n_set += int(hit.sum())
        return torch.where(where, set_all, h)


def _top_entries(data: ProfileData, site: str, n: int) -> tuple[list[dict[str, Any]], str]:
    st = site_stats(data.stats, site)
    if st is not None and getattr(st, "count", 0) > 0 and hasattr(st, "top_entries"):
        entries = st.top_entries()
        if entries:
            return [dict(e) for e in entries[:n]], "stats"
    x = reservoir_acts(data, site)
    if x is None:
        return [], "none"
    flat = x.abs().flatten()
    k = min(n, flat.numel())
    _, idx = torch.topk(flat, k)
    rows, chans = idx // x.shape[1], idx % x.shape[1]
    s = data.samples
    entries = [{"value": float(x[r, c]), "channel": int(c), "doc_id": int(s.doc_ids[r]),
                "position": int(s.positions[r]), "token_id": int(s.token_ids[r])} for r, c in zip(rows, chans)]
    return entries, "reservoir"


def _channel_absmax(data: ProfileData, site: str) -> np.ndarray:
    """Per-channel max |x| over the whole corpus (stats), or over the reservoir sample."""
    st = site_stats(data.stats, site)
    if st is not None and getattr(st, "count", 0) > 0:
        return st.absmax.double().numpy()
    return reservoir_acts(data, site).abs().amax(0).double().numpy()


def _capture_prompts(model, sites: list[str], prompts: list[str], batch_size: int):
    """Per prompt: {site: [n_tokens, d] float tensor}, and the prompt's token ids."""
    out: list[dict[str, torch.Tensor]] = []
    ids_out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, mask = model.tokenize(chunk)
        with model.capture(sites) as cap:
            model(ids, attention_mask=mask)
        for b in range(len(chunk)):
            n = int(mask[b].sum())
            out.append({s: cap[s][b, :n].float() for s in sites})
            ids_out.append(ids[b, :n].tolist())
    return out, ids_out


def _layer_tops(data: ProfileData, sites: list[str], tokenizer, top_n: int) -> dict[str, Any]:
    """Per layer: the median |x| of the reservoir and the largest entries (stats top-k, or the reservoir's)."""
    out: dict[str, Any] = {"layers": [], "medians": [], "tops": [], "ratio1": [], "source": "stats"}
    for site in sites:
        x = reservoir_acts(data, site)
        med = float(np.median(x.abs().flatten().numpy()))
        entries, src = _top_entries(data, site, top_n if top_n > 0 else 1)
        if src == "reservoir":
            out["source"] = "reservoir"
        for e in entries:
            e["ratio"] = abs(e["value"]) / med if med > 0 else math.inf
            e["token"] = decode_token(tokenizer, e.get("token_id", -1))
        out["layers"].append(layer_index(site))
        out["medians"].append(med)
        out["tops"].append(entries)
        out["ratio1"].append(entries[0]["ratio"] if entries else math.nan)
    return out


def _massive_channels(data: ProfileData, sites: list[str], layers: list[int], medians: list[float],
                      criterion: MassiveCriterion) -> tuple[dict[int, list[dict[str, Any]]], dict[int, int]]:
    """Corpus rule: channels whose corpus max |x| (stats absmax) is above ``min_abs`` and ``min_ratio`` x the
    layer's corpus median, and the first layer where each is massive."""
    massive: dict[int, list[dict[str, Any]]] = {}
    first: dict[int, int] = {}
    for layer, site, med in zip(layers, sites, medians):
        absmax = _channel_absmax(data, site)
        ratio = absmax / med if med > 0 else np.full_like(absmax, math.inf)
        hot = [int(c) for c in np.argsort(-ratio, kind="stable") if absmax[c] > criterion.cutoff(med)]
        if hot:
            massive[layer] = [{"channel": c, "absmax": float(absmax[c]), "ratio": float(ratio[c]),
                               "median": "corpus"} for c in hot]
            for c in hot:
                first.setdefault(c, layer)
    return massive, first


def _sequence_channels(captured: list[dict[str, torch.Tensor]], sites: list[str], layers: list[int],
                       criterion: MassiveCriterion):
    """Sequence rule, over the prompts: per layer the massive channels (largest |x| and ratio to its own
    sequence's median), the first layer of each channel, how many entries pass each bound, and the entry
    with the largest ratio to its sequence median (massive or not)."""
    massive: dict[int, list[dict[str, Any]]] = {}
    first: dict[int, int] = {}
    bounds, seq_top = [], []
    for layer, site in zip(layers, sites):
        hot: dict[int, dict[str, Any]] = {}
        counts = {"n_entries": 0, "n_over_abs": 0, "n_over_ratio": 0, "n_massive": 0}
        best: dict[str, Any] = {}
        for p, acts in enumerate(captured):
            x = acts[site]
            mask, over_abs, over_ratio, med = massive_mask(x, criterion)
            counts["n_entries"] += x.numel()
            for key, m in (("n_over_abs", over_abs), ("n_over_ratio", over_ratio), ("n_massive", mask)):
                counts[key] += int(m.sum())
            pos, ch = divmod(int(x.abs().argmax()), x.shape[1])
            r = float(x[pos, ch].abs()) / med if med > 0 else math.inf
            if not best or r > best["ratio"]:
                best = {"ratio": r, "value": float(x[pos, ch]), "channel": ch, "position": pos, "prompt": p,
                        "sequence_median": med}
            for t, c in mask.nonzero().tolist():
                v, rc = float(x[t, c]), float(x[t, c].abs()) / med if med > 0 else math.inf
                if c not in hot or abs(v) > hot[c]["absmax"]:
                    hot[c] = {"channel": c, "absmax": abs(v), "ratio": rc, "median": "sequence", "prompt": p,
                              "position": t}
        if hot:
            massive[layer] = sorted(hot.values(), key=lambda e: -e["ratio"])
            for c in hot:
                first.setdefault(c, layer)
        bounds.append(counts)
        seq_top.append(best)
    return massive, first, bounds, seq_top


def _invariance(captured: list[dict[str, torch.Tensor]], prompt_ids: list[list[int]], site: str, median: float,
                tokenizer) -> dict[str, Any]:
    """Over prompts: where the largest |x| of ``site`` sits (channel, position, token) and how often it repeats."""
    chans, poss, toks, ratios = [], [], [], []
    for acts, ids in zip(captured, prompt_ids):
        a = acts[site].abs()
        pos, ch = divmod(int(a.argmax()), a.shape[1])
        chans.append(ch)
        poss.append(pos)
        toks.append(decode_token(tokenizer, ids[pos]))
        ratios.append(float(a[pos, ch]) / median if median > 0 else math.inf)
    cc, pc = Counter(chans), Counter(poss)
    modal, n_modal = cc.most_common(1)[0]
    return {
        "modal_channel": int(modal),
        "modal_channel_frac": n_modal / len(chans),
        "channel_counts": dict(sorted(cc.items(), key=lambda kv: -kv[1])),
        "position_counts": dict(sorted(pc.items())),
        "first_position_frac": pc.get(0, 0) / len(poss),
        "token_counts": dict(Counter(toks).most_common(10)),
        "median_ratio": float(np.median(ratios)),
    }


def massive_activations(
    model,
    data: ProfileData,
    prompts: Sequence[str] | None = None,
    ablation_texts: Sequence[str] | None = None,
    *,
    criterion: MassiveCriterion | None = None,
    threshold: float | None = None,
    top_n: int = 5,
    max_prompts: int = 32,
    batch_size: int = 8,
) -> MassiveResult | Skipped:
    """Massive activations of ``resid.*``: where, how large, how input-invariant, how essential.

    ``prompts`` (default: ``data.eval_texts``) feed the invariance check and, with the paper's
    per-sequence criterion (the default ``MassiveCriterion.paper()``), the detection itself;
    ``ablation_texts`` (default: ``data.eval_texts``) the perplexity ablation, which runs on models
    with an LM head only. ``threshold=r`` is short for ``criterion=MassiveCriterion.corpus_ratio(r)``.
    """
    if criterion is None:
        criterion = MassiveCriterion.corpus_ratio(threshold) if threshold is not None else MassiveCriterion.paper()
    elif threshold is not None:
        raise ActlabError("pass criterion= or threshold= (short for MassiveCriterion.corpus_ratio(threshold)), not both")
    sites = [s for s in sites_of_kind(data, model, "resid") if reservoir_acts(data, s) is not None]
    if not sites:
        return Skipped("massive", MassiveResult.title, reason="the profile reservoir holds no resid sites",
                       explanation=MassiveResult.explanation)
    tokenizer = getattr(model, "tokenizer", None)
    tops = _layer_tops(data, sites, tokenizer, top_n)
    layers, medians = tops["layers"], tops["medians"]
    prompt_list = [p for p in (prompts if prompts is not None else data.eval_texts) if p][:max_prompts]
    if model is None:
        prompt_list = []  # a profile without its model: no prompts can be run
    invariance: list[dict[str, Any]] = [{} for _ in sites]
    captured: list[dict[str, torch.Tensor]] = []
    if prompt_list:
        captured, prompt_ids = _capture_prompts(model, sites, prompt_list, batch_size)
        invariance = [_invariance(captured, prompt_ids, site, medians[j], tokenizer) for j, site in enumerate(sites)]
    bounds: list[dict[str, Any]] = [{} for _ in sites]
    seq_top: list[dict[str, Any]] = [{} for _ in sites]
    if criterion.median == "corpus":
        massive_channels, first = _massive_channels(data, sites, layers, medians, criterion)
    else:
        massive_channels, first, bounds, seq_top = _sequence_channels(captured, sites, layers, criterion)
    ablation: dict[str, Any] = {"ran": False}
    texts = [t for t in (ablation_texts if ablation_texts is not None else data.eval_texts) if t]
    if criterion.median == "sequence" and not captured:
        ablation["note"] = "no prompts were run: the per-sequence criterion needs whole sequences (pass prompts)"
    elif not first:
        ablation["note"] = f"no massive activation ({criterion.describe()}): nothing to ablate"
    elif not getattr(model, "has_lm_head", False):
        ablation["note"] = "skipped: needs perplexity, and this model has no LM head (encoder)"
    elif not texts:
        ablation["note"] = "skipped: no ablation texts (pass ablation_texts or profile with eval_texts)"
    else:
        ablation = _ablate(model, data, sites, layers, medians, first, captured, criterion, texts, batch_size)
    return MassiveResult(
        threshold=float(criterion.min_ratio), layers=layers, sites=sites, median_abs=medians, top=tops["tops"],
        top1_ratio=tops["ratio1"], massive_layers=sorted(massive_channels), massive_channels=massive_channels,
        first_appearance=first, invariance=invariance, n_prompts=len(prompt_list), ablation=ablation,
        source=tops["source"], criterion=criterion.to_dict(), rule=criterion.name, rule_text=criterion.describe(),
        bounds=bounds, sequence_top=seq_top,
    )


def _mean_value(data: ProfileData, captured: list[dict[str, torch.Tensor]], site: str, channel: int,
                criterion: MassiveCriterion, median: float) -> tuple[float, int, str]:
    """The mean of a channel's massive entries (over the prompts, else the corpus top entries, else the channel
    mean over all tokens), how many entries it averages and where they came from."""
    vals = []
    for acts in captured:
        mask = massive_mask(acts[site], criterion, median)[0][:, channel]
        vals += acts[site][:, channel][mask].tolist()
    how = "prompts"
    if not vals and criterion.median == "corpus":  # fall back to the corpus top entries of that channel
        vals = [float(e["value"]) for e in _top_entries(data, site, 10**9)[0]
                if e["channel"] == channel and abs(e["value"]) > criterion.cutoff(median)]
        how = "corpus top entries"
    if vals:
        return float(np.mean(vals)), len(vals), how
    st = site_stats(data.stats, site)  # massive somewhere in the corpus, but not seen again
    m = float(st.mean[channel]) if st is not None else float(reservoir_acts(data, site)[:, channel].mean())
    return m, 0, "channel mean over all tokens"


def _ablate(model, data, sites, layers, medians, first, captured, criterion, texts, batch_size) -> dict:
    """Perplexity with the massive entries zeroed / set to their mean, at each channel's first layer."""
    groups: dict[int, list[int]] = {}
    for c, layer in sorted(first.items()):
        groups.setdefault(layer, []).append(c)
    entries = []
    zero_edits, mean_edits = [], []
    for layer, chans in sorted(groups.items()):
        j = layers.index(layer)
        site = sites[j]
        per_seq = criterion.median == "sequence"
        cutoff = criterion.min_abs if per_seq else criterion.cutoff(medians[j])
        ratio = criterion.min_ratio if per_seq else 0.0
        means = []
        for c in chans:
            m, n, how = _mean_value(data, captured, site, c, criterion, medians[j])
            means.append(m)
            entries.append({"layer": layer, "channel": c, "mean_value": m, "n_mean_tokens": n,
                            "mean_from": how, "cutoff": cutoff, "sequence_ratio": ratio})
        zero_edits.append(MassiveSet(site, list(chans), [0.0] * len(chans), cutoff, ratio))
        mean_edits.append(MassiveSet(site, list(chans), means, cutoff, ratio))
    base = perplexity(model, texts, batch_size=batch_size)
    with model.edit(*zero_edits):
        zero = perplexity(model, texts, batch_size=batch_size)
    with model.edit(*mean_edits):
        mean = perplexity(model, texts, batch_size=batch_size)

    def rise(p):
        return 100.0 * (p / base - 1.0) if math.isfinite(p) and base > 0 else math.inf

    return {
        "ran": True,
        "entries": entries,
        "n_texts": len(texts),
        "base_ppl": base,
        "zero_ppl": zero,
        "mean_ppl": mean,
        "zero_rise_pct": rise(zero),
        "mean_rise_pct": rise(mean),
        "n_set_zero": sum(e.n_set for e in zero_edits),
        "n_set_mean": sum(e.n_set for e in mean_edits),
    }
