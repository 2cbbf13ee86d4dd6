"""The probe sweep as report sections (the house HTML report: ``report.html.write_report``): a per-site table
and plot of held-out accuracy / AUC with intervals against the majority baseline and the control task, the
sparse probes' k curve, and the causal check."""

from __future__ import annotations

from dataclasses import dataclass, field

from actlab.analyses.figures import integer_xaxis, new_axes
from actlab.probes.sweep import SweepResult

__all__ = ["SweepSection", "CausalSection", "plot_sweep"]


def _fmt_ci(ci) -> str:
    lo, hi = ci
    return "–" if lo is None or lo != lo else f"{lo:.3f}–{hi:.3f}"


def plot_sweep(result: SweepResult):
    """Held-out accuracy per site (with its 95% interval), AUC, the majority baseline and the control task."""
    rows = result.chosen()
    if not rows:
        return None
    fig, ax = new_axes(7.0, 3.6)
    xs = list(range(len(rows)))
    acc = [r.score["accuracy"] for r in rows]
    lo = [r.score["accuracy"] - r.score["accuracy_ci"][0] for r in rows]
    hi = [r.score["accuracy_ci"][1] - r.score["accuracy"] for r in rows]
    ax.errorbar(xs, acc, yerr=[lo, hi], marker="o", capsize=3, label="accuracy (95% CI)")
    ax.plot(xs, [r.score["auc"] for r in rows], marker="s", label="AUC (macro, one-vs-rest)")
    ax.plot(xs, [r.score["majority"] for r in rows], ls="--", color="grey", label="majority baseline")
    if any(r.control_accuracy is not None for r in rows):
        ax.plot(xs, [r.control_accuracy for r in rows], ls=":", marker="x", color="tab:red",
                label="control task accuracy")
    ax.set_xticks(xs, [r.site for r in rows], rotation=30 if len(rows) > 6 else 0)
    ax.set_ylabel("held-out score")
    ax.set_ylim(min(0.0, *(r.score["majority"] for r in rows)) - 0.02, 1.02)
    ax.set_title(f"{result.name}: {result.config.method} probes by site")
    ax.legend(fontsize="small")
    return fig


def plot_ks(result: SweepResult):
    """Sparse probes: held-out accuracy against k, one line per site."""
    if result.config.method != "sparse":
        return None
    fig, ax = new_axes(6.4, 3.4)
    for site in result.probes:
        pts = [(r.k, r.score["accuracy"]) for r in result.rows if r.site == site]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=site)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (units)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize="small", ncol=2)
    integer_xaxis(ax)
    return fig


@dataclass
class SweepSection:
    """A report section (the interface ``report.html.render_section`` reads)."""

    result: SweepResult
    key: str = "probes"
    title: str = "Probes by site"

    @property
    def explanation(self) -> str:
        c, s = self.result.config, self.result.counts
        return (f"{self.result.level}-level labels '{self.result.name}' ({len(self.result.classes)} classes). "
                f"Documents split three ways (seed {c.seed}): fit {s['fit']['documents']}, tune "
                f"{s['tune']['documents']} (chooses λ{' and k' if c.method == 'sparse' else ''}), test "
                f"{s['test']['documents']} (every score shown; 95% bootstrap intervals over test documents). "
                "Selectivity = accuracy − accuracy of the same probe on control labels (shuffled within token type, "
                "or across texts for sequence labels).")

    def headline(self) -> str:
        best = max(self.result.chosen(), key=lambda r: r.tune_accuracy, default=None)
        if best is None:
            return "no sites"
        return (f"best site by tuning accuracy: {best.site}, held-out accuracy {best.score['accuracy']:.3f} "
                f"(majority {best.score['majority']:.3f})")

    def figures(self) -> list:
        return [f for f in (plot_sweep(self.result), plot_ks(self.result)) if f is not None]

    def table(self):
        cols = ["site", "k", "λ", "tune acc", "test acc", "95% CI", "AUC", "AUC 95% CI", "majority", "control acc",
                "selectivity", "saved"]
        rows = [[r.site, "" if r.k is None else r.k, "" if r.lam is None else r.lam, r.tune_accuracy,
                 r.score["accuracy"], _fmt_ci(r.score["accuracy_ci"]), r.score["auc"], _fmt_ci(r.score["auc_ci"]),
                 r.score["majority"], "" if r.control_accuracy is None else r.control_accuracy,
                 "" if r.selectivity is None else r.selectivity, "yes" if r.chosen else ""]
                for r in self.result.rows]
        return cols, rows


@dataclass
class CausalSection:
    causal: dict
    key: str = "causal"
    title: str = "Causal check: steering along the probe direction"
    explanation: str = ("Each edit adds scale × (the site's mean activation norm) along the probe's direction for a "
                        "class, or along a seeded random direction of exactly the same norm.")
    extra: list = field(default_factory=list)

    def headline(self) -> str:
        rows = self.causal.get("steered", [])
        if not rows:
            return "not run"
        top = max(rows, key=lambda r: r["scale"])
        value = (lambda v: v["rate"] if isinstance(v, dict) else v)  # noqa: E731
        return (f"scale {top['scale']}: probe direction {value(top['probe']):.3f} vs random "
                f"{value(top['random']):.3f} at {self.causal['site']}")

    def figures(self) -> list:
        return []

    def table(self):
        if "reader_site" in self.causal:
            cols = ["class", "scale", "unsteered P(class)", "probe direction", "random direction"]
            rows = [[self.causal["class"], r["scale"], self.causal["baseline"], r["probe"], r["random"]]
                    for r in self.causal["steered"]]
            return cols, rows
        cols = ["class", "scale", "unsteered rate", "probe direction", "± se", "random direction", "± se"]
        rows = [[r["class"], r["scale"], self.causal["baseline"][r["class"]]["rate"], r["probe"]["rate"],
                 r["probe"]["se"], r["random"]["rate"], r["random"]["se"]] for r in self.causal["steered"]]
        return cols, rows
