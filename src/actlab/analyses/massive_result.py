"""What ``massive_activations`` returns: the per-layer numbers, their table and their figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actlab.analyses.base import pick
from actlab.analyses.figures import drawn, integer_xaxis, new_axes, new_figure
from actlab.report.serialize import to_jsonable

__all__ = ["MassiveResult"]


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
    criterion: dict[str, Any] = field(default_factory=dict)  # MassiveCriterion.to_dict()
    rule: str = "paper"  # "paper", "corpus ratio" or "custom"
    rule_text: str = ""  # the criterion in words
    bounds: list[dict[str, Any]] = field(default_factory=list)  # per layer (sequence rule): entries passing each bound
    sequence_top: list[dict[str, Any]] = field(default_factory=list)  # per layer: largest ratio to a sequence median
    key: str = "massive"
    title: str = "Massive activations"
    explanation: str = (
        "A few entries of the residual stream can be hundreds or thousands of times larger than the "
        "typical one. For every layer we show the largest |activation| of the residual stream over "
        "the profiled text, where it occurs (channel, position, token), and its ratio to the layer's "
        "median |activation|. By default an entry is flagged as massive by the paper's criterion: its magnitude "
        "is above 100 and about 1000x the median magnitude of the same sequence at that layer (both bounds are "
        "configurable; a looser ratio to the corpus-wide median is an option). 'Massive "
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
        rule = f"{self.rule} rule: {self.rule_text}" if self.rule_text else self.rule
        if self.massive_layers:
            layer, e = max(((l, e) for l in self.massive_layers for e in self.massive_channels[l]),
                           key=lambda le: le[1]["ratio"])
            where = f"layer {layer}, ch {e['channel']}" + (f", pos {e['position']}" if "position" in e else "")
            return f"massive ({rule}): |x|={e['absmax']:.4g} = {e['ratio']:.0f}x {e['median']} median ({where})"
        seq = [t for t in self.sequence_top if t]
        if seq and self.criterion.get("median") == "sequence":
            i = max(range(len(self.sequence_top)), key=lambda j: self.sequence_top[j].get("ratio", -1))
            t = self.sequence_top[i]
            return (f"none ({rule}); max {t['ratio']:.1f}x its sequence median, |x|={abs(t['value']):.3g} "
                    f"(layer {self.layers[i]}, ch {t['channel']}, pos {t['position']})")
        i = int(np.nanargmax(self.top1_ratio))
        t = self.top[i][0] if self.top[i] else {}
        return (f"none ({rule}); max {self.top1_ratio[i]:.1f}x the corpus median, |x|={abs(t.get('value', math.nan)):.3g} "
                f"(layer {self.layers[i]}, ch {t.get('channel')}, pos {t.get('position')})")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(pick(self, "rule", "rule_text", "criterion", "bounds", "sequence_top", "threshold", "source", "layers", "sites", "median_abs", "top", "top1_ratio",
                                "massive_layers", "massive_channels", "first_appearance", "invariance", "n_prompts",
                                "ablation"))

    def table(self):
        cols = ["layer", "top |x|", "median |x|", "ratio", "channel", "position", "token", "max ratio to sequence median",
                "entries > abs / > ratio bound / both", "massive channels", "same argmax channel over prompts %"]
        rows = []
        for i, layer in enumerate(self.layers):
            t = self.top[i][0] if self.top[i] else {}
            inv = self.invariance[i] if i < len(self.invariance) else {}
            rows.append([
                layer, _round(abs(t.get("value", math.nan))), _round(self.median_abs[i]), _round(self.top1_ratio[i]),
                t.get("channel"), t.get("position"), t.get("token", ""),
                _round(self.sequence_top[i]["ratio"]) if i < len(self.sequence_top) and self.sequence_top[i] else None,
                _bounds_text(self.bounds[i] if i < len(self.bounds) else {}),
                _channels_text(self.massive_channels.get(layer, [])),
                round(100 * inv["modal_channel_frac"], 1) if inv else None,
            ])
        return cols, rows

    def figures(self) -> list:
        return drawn(self._magnitude_figure, self._invariance_figure, self._ablation_figure) if self.layers else []

    def _magnitude_figure(self):
        """The three largest |x| per layer against the median."""
        fig, ax = new_axes()
        for j, label in enumerate(("top 1", "top 2", "top 3")):
            ys = [abs(row[j]["value"]) if len(row) > j else math.nan for row in self.top]
            ax.plot(self.layers, ys, "o-", ms=3, label=label)
        ax.plot(self.layers, self.median_abs, "k--", label="median")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        integer_xaxis(ax)
        ax.set_ylabel("|activation| of the residual stream")
        ax.set_title(f"Largest residual activations (massive: {self.rule_text or self.threshold})", fontsize=9)
        ax.legend(fontsize="small")
        return fig

    def _invariance_figure(self):
        """Where the maximum of the most massive layer sits over the prompts (None without prompts)."""
        if not any(self.invariance):
            return None
        i = int(np.nanargmax(self.top1_ratio))
        inv = self.invariance[i]
        if not inv:
            return None
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
        return fig

    def _ablation_figure(self):
        """Perplexity original / mean-set / zeroed (None when the ablation did not run)."""
        ab = self.ablation
        if not ab.get("ran"):
            return None
        fig, ax = new_axes(4.8, 3.2)
        vals = [ab["base_ppl"], ab["mean_ppl"], ab["zero_ppl"]]
        ax.bar(["original", "set to mean", "set to zero"],
               [v if v is not None and math.isfinite(v) else 0 for v in vals], color=["grey", "tab:green", "tab:red"])
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title("Ablating the massive activations")
        return fig


def _bounds_text(b: dict[str, Any]) -> str:
    return f"{b['n_over_abs']} / {b['n_over_ratio']} / {b['n_massive']}" if b else ""


def _channels_text(entries: list[dict[str, Any]], limit: int = 5) -> str:
    text = ", ".join(str(e["channel"]) for e in entries[:limit])
    return text + (f" (+{len(entries) - limit})" if len(entries) > limit else "")


def _round(v, digits: int = 4):
    """``v`` to ``digits`` significant digits for the table (None when not finite)."""
    v = float(v)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None
