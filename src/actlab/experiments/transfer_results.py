"""The result of the Command-V evaluation: recipient conditions, ratios, diagnostics; its text, JSON and figure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actlab.report.serialize import save_figure, to_jsonable, write_json

CONDITIONS = ("none", "random", "pasted", "direct")
N_RANDOM = 4
TARGET_PASTED = 0.8
TARGET_RANDOM = 0.1

__all__ = ["Condition", "TransferEvaluation", "write_result", "CONDITIONS", "TARGET_PASTED", "TARGET_RANDOM"]


@dataclass
class Condition:
    """One recipient condition: genre rate of the continuations and neutral perplexity."""

    name: str
    rate: float
    rate_se: float  # binomial standard error
    perplexity: float
    n: int  # continuations scored (pooled over the random draws for "random")
    effect: float = 0.0  # rate - rate(none)
    effect_se: float = 0.0  # paired standard error of the effect (per row against "none")
    samples: list[str] = field(default_factory=list)


@dataclass
class TransferEvaluation:
    """The result of ``evaluate_transfer``; ``summary_lines()`` reads it, ``figure()`` draws it."""

    donor: str
    recipient: str
    kind: str
    target_genre: str
    coef: float
    donor_site: str
    recipient_site: str
    positions: str
    conditions: dict[str, Condition]
    donor_conditions: dict[str, Condition]  # the behaviour in the donor itself ("none", "edited")
    ratios: dict[str, Any]  # pasted/direct and random/direct with bootstrap intervals
    converters: list[dict]  # held-out R² and λ per layer pair
    converter_fit_seconds: float
    compute: dict[str, Any]  # seconds and approximate FLOPs of pasting vs fitting directly
    diagnostics: dict[str, Any]  # cosine / norms / relative change sizes
    settings: dict[str, Any]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)  # the TransferEvalConfig it ran with

    # ------------------------------------------------------------- numbers
    def effect(self, name: str) -> float:
        return self.conditions[name].effect

    @property
    def pasted_ratio(self) -> float:
        """effect(pasted) / effect(direct)."""
        return self.ratios["pasted_over_direct"]

    @property
    def random_ratio(self) -> float:
        """effect(random) / effect(direct)."""
        return self.ratios["random_over_direct"]

    def targets(self, pasted_min: float = TARGET_PASTED, random_max: float = TARGET_RANDOM) -> dict[str, bool]:
        """The issue's targets on the point estimates (see ``ratios`` for their intervals)."""
        return {"pasted_ge_%g_direct" % pasted_min: bool(self.pasted_ratio >= pasted_min),
                "random_le_%g_direct" % random_max: bool(abs(self.random_ratio) <= random_max)}

    # ------------------------------------------------------------- reading
    def summary_lines(self) -> list[str]:
        c, r, d, k = self.conditions, self.ratios, self.diagnostics, self.compute
        lines = [f"Command-V {self.kind}: {self.donor} {self.donor_site} → {self.recipient} {self.recipient_site} "
                 f"(toward {self.target_genre}, coefficient {self.coef:g}, profile positions {self.positions})"]
        if self.donor_conditions:
            dn, de = self.donor_conditions["none"], self.donor_conditions["edited"]
            lines.append(f"  in the donor: rate {dn.rate:.3f} → {de.rate:.3f} (effect {de.effect:+.3f} ± "
                         f"{de.effect_se:.3f}), perplexity {dn.perplexity:.1f} → {de.perplexity:.1f}")
        lines.append(f"  recipient ({c['none'].n} continuations per condition; random pooled over "
                     f"{self.settings.get('n_random', N_RANDOM)} draws):")
        for name in CONDITIONS:
            x = c[name]
            eff = "" if name == "none" else f"  effect {x.effect:+.3f} ± {x.effect_se:.3f}"
            lines.append(f"    {name:<7} rate {x.rate:.3f} ± {x.rate_se:.3f}{eff}  perplexity {x.perplexity:.1f} "
                         f"({x.perplexity / c['none'].perplexity:.2f}× none)")
        for key, sign, target, relation in (("pasted", "", TARGET_PASTED, "≥"), ("random", "+", TARGET_RANDOM, "≤")):
            lo, hi = r[f"{key}_over_direct_ci"]
            lines.append(f"  {key}/direct effect {r[f'{key}_over_direct']:{sign}.2f} (95% bootstrap {lo:{sign}.2f}–"
                         f"{hi:{sign}.2f}; target {relation} {target:g})")
        lines.append("  held-out R² (R→D / D→R) per pair: " + ", ".join(
            f"{p['donor_layer']}:{p['recipient_layer']} {p['r2_to_donor']:.2f}/{p['r2_to_recipient']:.2f}"
            for p in self.converters) + f" (λ of the used pair: {self._pair_lambda()})")
        if "cosine_pasted_direct" in d:
            lines.append(f"  pasted vs direct vector: cosine {d['cosine_pasted_direct']:.3f}, norm ratio "
                         f"{d['norm_ratio_pasted_direct']:.2f}")
        gains = self.settings.get("deattenuation_gains")
        lines.append(f"  de-attenuation gains (max {self.settings.get('max_gain')}): " + ", ".join(f"{g:.2f}" for g in gains)
                     if gains else "  de-attenuation: off")
        lines.append(f"  |Δ|/|h| on the profile rows: donor {d['donor_rel_change']:.3f}, pasted "
                     f"{d['pasted_rel_change']:.3f}, direct {d['direct_rel_change']:.3f}")
        lines.append(f"  compute: paste {k['paste_seconds']:.1f} s (profiles {k['profile_seconds']:.1f} s, converters "
                     f"{k['converter_fit_seconds']:.2f} s, paste {k['paste_only_seconds'] * 1e3:.1f} ms; "
                     f"≈{k['paste_gflop']:.0f} GFLOP) vs direct {k['direct_method']} {k['direct_seconds']:.1f} s "
                     f"(≈{k['direct_gflop']:.0f} GFLOP)")
        lines.append(f"  total {self.seconds:.1f} s")
        return lines

    def _pair_lambda(self) -> str:
        pair = next((p for p in self.converters if f"resid.{p['donor_layer']}" == self.donor_site), None)
        return "?" if pair is None else f"{pair['lambda_to_donor']:g} R→D, {pair['lambda_to_recipient']:g} D→R"

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "kind": "transfer_evaluation", "donor": self.donor, "recipient": self.recipient, "intervention": self.kind,
            "target_genre": self.target_genre, "coef": self.coef, "donor_site": self.donor_site,
            "recipient_site": self.recipient_site, "positions": self.positions,
            "conditions": {k: asdict(v) for k, v in self.conditions.items()},
            "donor_conditions": {k: asdict(v) for k, v in self.donor_conditions.items()},
            "ratios": self.ratios, "targets": self.targets(), "converters": self.converters,
            "converter_fit_seconds": self.converter_fit_seconds, "compute": self.compute,
            "diagnostics": self.diagnostics, "settings": self.settings, "seconds": self.seconds,
            "config": self.config,
        })

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def figure(self, path: str | Path | None = None):
        """Bars: target-genre rate of none / random-pasted / pasted / direct (± binomial SE), neutral
        perplexity written above each bar. Saved to ``path`` when given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        labels = {"none": "none", "random": "random\n(pasted)", "pasted": "pasted", "direct": "direct"}
        colors = {"none": "#999999", "random": "#c9b37e", "pasted": "#3b75af", "direct": "#519e3e"}
        x = np.arange(len(CONDITIONS))
        rates = [self.conditions[n].rate for n in CONDITIONS]
        ses = [self.conditions[n].rate_se for n in CONDITIONS]
        ax.bar(x, rates, yerr=ses, capsize=4, color=[colors[n] for n in CONDITIONS])
        for i, n in enumerate(CONDITIONS):
            ax.text(i, rates[i] + ses[i] + 0.02, f"ppl {self.conditions[n].perplexity:.0f}", ha="center", fontsize=8)
        ax.axhline(self.conditions["none"].rate, color="black", linewidth=0.6)
        ax.set(xticks=x, xticklabels=[labels[n] for n in CONDITIONS], ylim=(0, 1.12),
               ylabel=f"'{self.target_genre}' rate of continuations",
               title=f"{self.kind}: {self.donor} {self.donor_site} → {self.recipient} {self.recipient_site}\n"
                     f"pasted/direct {self.pasted_ratio:.2f}, random/direct {self.random_ratio:+.2f}")
        ax.title.set_fontsize(9)
        return save_figure(fig, path)


def write_result(result: "TransferEvaluation", out: str | Path, name: str | None = None) -> list[Path]:
    """``{name}.json`` and ``{name}.png`` under ``out``."""
    out = Path(out)
    stem = name or f"transfer_{result.kind}_{result.donor}_to_{result.recipient}"
    paths = [out / f"{stem}.json", out / f"{stem}.png"]
    result.save(paths[0])
    result.figure(paths[1])
    return paths

