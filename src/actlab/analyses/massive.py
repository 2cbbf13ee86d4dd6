"""Massive activations in the residual stream (Sun et al., "Massive Activations in Large Language
Models", COLM 2024).

A few residual-stream entries (``resid.{i}``) can be thousands of times larger than the typical
one; they sit in fixed channels, at fixed kinds of positions (the first token, delimiters), and
act like bias terms: zeroing them breaks the model while setting them to their mean value does
not. ``massive_activations`` measures all three properties:

* per layer: the largest ``|x|`` of ``resid.{i}`` over the profiled corpus (stats top-k), its
  channel, position and token, and its ratio to the layer's median ``|x|`` (median over every
  entry of the reservoir sample); an entry is *massive* when that ratio exceeds ``threshold``
  (100 by default); the top-1 ratio is reported whether or not it passes;
* input invariance over ``prompts``: for each prompt and layer the (position, channel) of the
  largest ``|x|``; how often the channel is the most common one, and where the positions lie;
* ablation (decoders only): at the layer where each massive channel first appears, set its
  massive entries (those with ``|x| > threshold * median``) to 0, or to their mean value, and
  measure the perplexity change on ``ablation_texts``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from actlab.analyses.base import ProfileData, Skipped
from actlab.analyses.sparsity import (
    _f, decode_token, integer_xaxis, layer_index, new_figure, perplexity, reservoir_acts, site_stats,
    sites_of_kind,
)
from actlab.engine.edits import SetChannels
from actlab.engine.hooks import ForwardState

__all__ = ["MassiveResult", "MassiveSet", "massive_activations"]


@dataclass
class MassiveSet:
    """At ``site``, set each channel in ``channels`` to its value in ``values`` on the tokens where
    that channel's ``|x|`` exceeds ``cutoff`` (the massive entries), leaving every other entry alone.

    A ``SetChannels`` edit restricted, entry by entry, to the massive positions. ``n_set`` counts
    the entries changed (over all forward passes).
    """

    site: str
    channels: list[int]
    values: list[float]
    cutoff: float
    n_set: int = field(default=0, repr=False)

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        channels = torch.as_tensor(self.channels, dtype=torch.long)
        hit = h[..., channels].abs() > self.cutoff
        if not bool(hit.any()):
            return h
        if h.ndim == 3 and state.batch_size == h.shape[0] and state.length == h.shape[1]:
            hit = hit & state.token_mask().to(h.device).unsqueeze(-1)
        set_all = SetChannels(self.site, channels, torch.as_tensor(self.values, dtype=torch.float32))(h, state)
        where = torch.zeros_like(h, dtype=torch.bool)
        where[..., channels] = hit
        self.n_set += int(hit.sum())
        return torch.where(where, set_all, h)


@dataclass
class MassiveResult:
    """Massive activations per layer, their input invariance and the ablation check."""

    threshold: float
    layers: list[int]
    sites: list[str]
    median_abs: list[float]  # per layer: median |x| over every reservoir entry (numpy median)
    top: list[list[dict[str, Any]]]  # per layer: the largest |x| entries (value, channel, position, token, ratio)
    top1_ratio: list[float]
    massive_layers: list[int]  # layers whose top-1 ratio > threshold
    massive_channels: dict[int, list[dict[str, Any]]]  # layer -> [{channel, absmax, ratio}] with ratio > threshold
    first_appearance: dict[int, int]  # channel -> first layer where it is massive
    invariance: list[dict[str, Any]]  # per layer, over prompts (empty dicts when no prompts)
    n_prompts: int
    ablation: dict[str, Any]
    source: str = "stats"
    key: str = "massive"
    title: str = "Massive activations"
    explanation: str = (
        "A few entries of the residual stream can be hundreds or thousands of times larger than the "
        "typical one. For every layer we show the largest |activation| of the residual stream over "
        "the profiled text, where it occurs (channel, position, token), and its ratio to the layer's "
        "median |activation|; ratios above the threshold (100x) are flagged as massive. 'Massive "
        "Activations in Large Language Models' (Sun et al., 2024) found such values in almost every "
        "LLM: they appear suddenly in an early layer, stay nearly constant through the middle layers, "
        "live in the same few channels for every input, mostly at the first token or at delimiters, "
        "and act as fixed biases: setting them to zero destroys the model, setting them to their mean "
        "value leaves it intact. The invariance numbers say how often the same channel holds each "
        "layer's maximum across prompts; the ablation compares perplexity with those entries zeroed "
        "and mean-set at the layer where they first appear."
    )

    def headline(self) -> str:
        if not self.layers:
            return "n/a"
        i = int(np.nanargmax(self.top1_ratio))
        t = self.top[i][0] if self.top[i] else {}
        where = f"layer {self.layers[i]}, ch {t.get('channel')}, pos {t.get('position')}"
        if self.massive_layers:
            return f"massive: |x|={abs(t.get('value', math.nan)):.4g} = {self.top1_ratio[i]:.0f}x median ({where})"
        return f"none > {self.threshold:g}x median (max {self.top1_ratio[i]:.1f}x, {where})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "source": self.source,
            "layers": self.layers,
            "sites": self.sites,
            "median_abs": [_f(v) for v in self.median_abs],
            "top": [[_clean(e) for e in row] for row in self.top],
            "top1_ratio": [_f(v) for v in self.top1_ratio],
            "massive_layers": self.massive_layers,
            "massive_channels": {str(k): v for k, v in self.massive_channels.items()},
            "first_appearance": {str(k): v for k, v in self.first_appearance.items()},
            "invariance": [_clean(d) for d in self.invariance],
            "n_prompts": self.n_prompts,
            "ablation": _clean(self.ablation),
        }

    def table(self):
        cols = ["layer", "top |x|", "median |x|", "ratio", "channel", "position", "token", "massive channels",
                "same argmax channel over prompts %"]
        rows = []
        for i, layer in enumerate(self.layers):
            t = self.top[i][0] if self.top[i] else {}
            inv = self.invariance[i] if i < len(self.invariance) else {}
            rows.append([
                layer, _round(abs(t.get("value", math.nan))), _round(self.median_abs[i]), _round(self.top1_ratio[i]),
                t.get("channel"), t.get("position"), t.get("token", ""),
                _channels_text(self.massive_channels.get(layer, [])),
                round(100 * inv["modal_channel_frac"], 1) if inv else None,
            ])
        return cols, rows

    def figures(self) -> list:
        if not self.layers:
            return []
        figs = []
        fig = new_figure()
        ax = fig.add_subplot()
        for j, label in enumerate(("top 1", "top 2", "top 3")):
            ys = [abs(row[j]["value"]) if len(row) > j else math.nan for row in self.top]
            ax.plot(self.layers, ys, "o-", ms=3, label=label)
        ax.plot(self.layers, self.median_abs, "k--", label="median")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        integer_xaxis(ax)
        ax.set_ylabel("|activation| of the residual stream")
        ax.set_title(f"Largest residual activations (massive: > {self.threshold:g}x median)")
        ax.legend(fontsize="small")
        figs.append(fig)

        if any(self.invariance):
            i = int(np.nanargmax(self.top1_ratio))
            inv = self.invariance[i]
            if inv:
                fig = new_figure(8, 3.2)
                ax1, ax2 = fig.subplots(1, 2)
                chans = inv["channel_counts"]
                ax1.bar([str(k) for k in chans], list(chans.values()))
                ax1.set_xlabel("channel of the maximum")
                ax1.set_ylabel("prompts")
                ax1.set_title(f"layer {self.layers[i]}: argmax channel")
                pos = inv["position_counts"]
                ax2.bar([str(k) for k in pos], list(pos.values()), color="tab:orange")
                ax2.set_xlabel("position of the maximum")
                ax2.set_title("argmax position")
                figs.append(fig)

        ab = self.ablation
        if ab.get("ran"):
            fig = new_figure(4.8, 3.2)
            ax = fig.add_subplot()
            names = ["original", "set to mean", "set to zero"]
            vals = [ab["base_ppl"], ab["mean_ppl"], ab["zero_ppl"]]
            ax.bar(names, [v if v is not None and math.isfinite(v) else 0 for v in vals],
                   color=["grey", "tab:green", "tab:red"])
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
            ax.set_title("Ablating the massive activations")
            figs.append(fig)
        return figs


def _channels_text(entries: list[dict[str, Any]], limit: int = 5) -> str:
    text = ", ".join(str(e["channel"]) for e in entries[:limit])
    return text + (f" (+{len(entries) - limit})" if len(entries) > limit else "")


def _round(v, digits: int = 4):
    v = float(v)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def _clean(obj):
    """JSON-able copy: floats made finite-or-None, dict keys made strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


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


def massive_activations(
    model,
    data: ProfileData,
    prompts: Sequence[str] | None = None,
    ablation_texts: Sequence[str] | None = None,
    *,
    threshold: float = 100.0,
    top_n: int = 5,
    max_prompts: int = 32,
    batch_size: int = 8,
) -> MassiveResult | Skipped:
    """Massive activations of ``resid.*``: where, how large, how input-invariant, how essential.

    ``prompts`` (default: ``data.eval_texts``) feed the invariance check; ``ablation_texts``
    (default: ``data.eval_texts``) the perplexity ablation, which runs on models with an LM head
    only. ``threshold`` is the ratio to the layer median above which an entry is massive.
    """
    key, title = "massive", MassiveResult.title
    sites = [s for s in sites_of_kind(data, model, "resid") if reservoir_acts(data, s) is not None]
    if not sites:
        return Skipped(key, title, reason="the profile reservoir holds no resid sites",
                       explanation=MassiveResult.explanation)
    tokenizer = getattr(model, "tokenizer", None)
    layers, medians, tops, ratio1 = [], [], [], []
    source = "stats"
    for site in sites:
        x = reservoir_acts(data, site)
        med = float(np.median(x.abs().flatten().numpy()))
        entries, src = _top_entries(data, site, top_n if top_n > 0 else 1)
        if src == "reservoir":
            source = "reservoir"
        for e in entries:
            e["ratio"] = abs(e["value"]) / med if med > 0 else math.inf
            e["token"] = decode_token(tokenizer, e.get("token_id", -1))
        layers.append(layer_index(site))
        medians.append(med)
        tops.append(entries)
        ratio1.append(entries[0]["ratio"] if entries else math.nan)

    # massive channels: per-channel max |x| over the corpus (stats absmax) above threshold x median
    massive_layers = [l for l, r in zip(layers, ratio1) if r > threshold]
    massive_channels: dict[int, list[dict[str, Any]]] = {}
    first: dict[int, int] = {}
    for layer, site, med in zip(layers, sites, medians):
        absmax = _channel_absmax(data, site)
        ratio = absmax / med if med > 0 else np.full_like(absmax, math.inf)
        hot = [int(c) for c in np.argsort(-ratio, kind="stable") if ratio[c] > threshold]
        if hot:
            massive_channels[layer] = [{"channel": c, "absmax": float(absmax[c]), "ratio": float(ratio[c])}
                                       for c in hot]
            for c in hot:
                first.setdefault(c, layer)

    # input invariance over prompts
    prompt_list = [p for p in (prompts if prompts is not None else data.eval_texts) if p][:max_prompts]
    if model is None:
        prompt_list = []  # a profile without its model: no prompts can be run
    invariance: list[dict[str, Any]] = [{} for _ in sites]
    captured: list[dict[str, torch.Tensor]] = []
    if prompt_list:
        captured, prompt_ids = _capture_prompts(model, sites, prompt_list, batch_size)
        for j, site in enumerate(sites):
            chans, poss, toks, ratios = [], [], [], []
            for acts, ids in zip(captured, prompt_ids):
                a = acts[site].abs()
                flat = int(a.argmax())
                pos, ch = divmod(flat, a.shape[1])
                chans.append(ch)
                poss.append(pos)
                toks.append(decode_token(tokenizer, ids[pos]))
                ratios.append(float(a[pos, ch]) / medians[j] if medians[j] > 0 else math.inf)
            cc = Counter(chans)
            modal, n_modal = cc.most_common(1)[0]
            pc = Counter(poss)
            invariance[j] = {
                "modal_channel": int(modal),
                "modal_channel_frac": n_modal / len(chans),
                "channel_counts": dict(sorted(cc.items(), key=lambda kv: -kv[1])),
                "position_counts": dict(sorted(pc.items())),
                "first_position_frac": pc.get(0, 0) / len(poss),
                "token_counts": dict(Counter(toks).most_common(10)),
                "median_ratio": float(np.median(ratios)),
            }

    # ablation at the first layer of each massive channel
    ablation: dict[str, Any] = {"ran": False}
    if not first:
        ablation["note"] = f"no activation above {threshold:g}x the layer median: nothing to ablate"
    elif not getattr(model, "has_lm_head", False):
        ablation["note"] = "skipped: needs perplexity, and this model has no LM head (encoder)"
    else:
        texts = [t for t in (ablation_texts if ablation_texts is not None else data.eval_texts) if t]
        if not texts:
            ablation["note"] = "skipped: no ablation texts (pass ablation_texts or profile with eval_texts)"
        else:
            ablation = _ablate(model, data, sites, layers, medians, first, captured, threshold, texts, batch_size)
    return MassiveResult(
        threshold=float(threshold), layers=layers, sites=sites, median_abs=medians, top=tops, top1_ratio=ratio1,
        massive_layers=massive_layers, massive_channels=massive_channels, first_appearance=first,
        invariance=invariance, n_prompts=len(prompt_list), ablation=ablation, source=source,
    )


def _ablate(model, data, sites, layers, medians, first, captured, threshold, texts, batch_size) -> dict:
    """Perplexity with the massive entries zeroed / set to their mean, at each channel's first layer."""
    groups: dict[int, list[int]] = {}
    for c, layer in sorted(first.items()):
        groups.setdefault(layer, []).append(c)
    entries = []
    zero_edits, mean_edits = [], []
    for layer, chans in sorted(groups.items()):
        j = layers.index(layer)
        site, cutoff = sites[j], threshold * medians[j]
        means = []
        for c in chans:
            cols = [acts[site][:, c] for acts in captured]
            vals = [float(v) for col in cols for v in col[col.abs() > cutoff].tolist()]
            how = "prompts"
            if not vals:  # fall back to the corpus top entries of that channel
                vals = [float(e["value"]) for e in _top_entries(data, site, 10**9)[0]
                        if e["channel"] == c and abs(e["value"]) > cutoff]
                how = "corpus top entries"
            if vals:
                m = float(np.mean(vals))
            else:  # massive somewhere in the corpus, but not seen again: its mean over all tokens
                st = site_stats(data.stats, site)
                m = float(st.mean[c]) if st is not None else float(reservoir_acts(data, site)[:, c].mean())
                how = "channel mean over all tokens"
            means.append(m)
            entries.append({"layer": layer, "channel": c, "mean_value": m, "n_mean_tokens": len(vals),
                            "mean_from": how, "cutoff": cutoff})
        zero_edits.append(MassiveSet(site, list(chans), [0.0] * len(chans), cutoff))
        mean_edits.append(MassiveSet(site, list(chans), means, cutoff))
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
