"""``actlab sparse eval``: perplexity on neutral text against sparsity, per method, and the exactness of the
sparse path against the dense model with the same zeros.

For every method and target sparsity the thresholds are calibrated on the bundled training text
(``thresholds.calibrate``), then spliced in (``mlp.sparse_edits``; the prefill of a perplexity pass takes dense
torch with the same zeros, the numbers the kernel gives), and the token-weighted perplexity of the bundled
neutral passages (the profile's PPL-p% texts) is measured with the sparsity each input ran with. The exactness
check runs the kernel on every call of a few neutral passages and compares the logits with the dense model
given exactly the zeros the sparse run chose (``mlp.mask_edits``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from actlab.errors import ActlabError
from actlab.sparse.mlp import mask_edits, measured_sparsity, splice
from actlab.sparse.thresholds import METHODS, calibrate

__all__ = ["SparseEvalResult", "SparseEvalSection", "neutral_texts", "evaluate_sparsity", "exactness", "write_evaluation"]


def neutral_texts(n: int = 24) -> list[str]:
    """The bundled neutral passages (``datasets/genres/neutral.txt``), the first ``n``."""
    from importlib import resources

    text = resources.files("actlab.datasets.genres").joinpath("neutral.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:n]


@dataclass
class SparseEvalResult:
    model: str
    dense_ppl: float
    rows: list[dict] = field(default_factory=list)  # method, target, ppl, increase, sparsity of each input kind
    exactness: dict = field(default_factory=dict)  # method -> max |logit difference|

    def table(self) -> list[str]:
        lines = ["| method | target | mlp.in | mlp.hidden | MLP reads skipped | perplexity | increase |",
                 "|---|---:|---:|---:|---:|---:|---:|", f"| dense | 0% | — | — | — | {self.dense_ppl:.3f} | — |"]
        for r in self.rows:
            lines.append(f"| {r['method']} | {r['target']:.0%} | {r['mlp_in']:.1%} | {r['mlp_hidden']:.1%} | "
                         f"{r['reads_skipped']:.1%} | {r['ppl']:.3f} | {r['increase']:+.2%} |")
        return lines


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else 0.0


def exactness(model, thresholds, texts: list[str]) -> float:
    """Max |logit difference| of the kernel path (every call) against the dense model with the same zeros."""
    worst = 0.0
    for text in texts:
        trace: dict = {}
        with splice(model, thresholds, max_rows=None, trace=trace):
            sparse = model(text).logits
        with model.edit(*mask_edits(trace)):
            dense = model(text).logits
        worst = max(worst, float((sparse - dense).abs().max()))
    return worst


def evaluate_sparsity(model, methods=METHODS, sparsities=(0.25, 0.4, 0.5), *, texts: list[str] | None = None,
                      calibration_tokens: int = 8192, exact_texts: int = 2, progress=None) -> SparseEvalResult:
    """Perplexity of ``texts`` (default: 24 neutral passages) for every method × target sparsity, with the dense
    perplexity and the kernel's exactness per method (at the largest target)."""
    from actlab.evals.perplexity import perplexity

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ActlabError(f"unknown method(s) {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    if not model.is_causal:
        raise ActlabError(f"{model.name} is not a causal LM: there is no perplexity to measure")
    texts = neutral_texts() if texts is None else list(texts)
    result = SparseEvalResult(model.name, perplexity(model, texts))
    k = 2 if model.anatomy.mlp_parts(0).gated else 1  # gate + up read mlp.in: k matrices of the MLP's k + 1
    for method in methods:
        for target in sparsities:
            thresholds = calibrate(model, method, target, tokens=calibration_tokens)
            with splice(model, thresholds) as spliced:
                ppl = perplexity(model, texts, batch_size=1)  # one text per call: the counts see no padding
            ran = measured_sparsity(spliced)
            s_in = _mean([v for name, v in ran.items() if name.startswith("mlp.in")])
            s_hidden = _mean([v for name, v in ran.items() if name.startswith("mlp.hidden")])
            result.rows.append({"method": method, "target": target, "ppl": ppl, "increase": ppl / result.dense_ppl - 1,
                                "mlp_in": s_in, "mlp_hidden": s_hidden, "reads_skipped": (k * s_in + s_hidden) / (k + 1),
                                "per_input": ran})
            if progress is not None:
                progress(result.rows[-1])
        result.exactness[method] = exactness(model, thresholds, texts[:exact_texts])
    return result


class SparseEvalSection:
    """The report section: perplexity against the sparsity each method ran with, and the table."""

    key, title = "sparse", "Activation-sparse MLPs: perplexity against sparsity"

    def __init__(self, result: SparseEvalResult):
        self.result = result
        self.explanation = (
            "Thresholds calibrated on the bundled training text to each target sparsity; perplexity of the neutral "
            "passages with the MLP inputs (mlp.in: gate/up inputs) and hidden neurons (mlp.hidden: down input) below "
            "their thresholds skipped. x axis: the share of the MLP's weight reads the zeros skip (gate and up read mlp.in, "
            "down reads mlp.hidden; CATS and CETT sparsify the hidden input only, and exact zeros count: a ReLU MLP "
            "skips its natural zeros too). Exactness (max |logit difference| of the kernel path against the dense "
            "model with the same zeros): " + ", ".join(f"{m} {v:.1e}" for m, v in result.exactness.items()))

    def headline(self) -> str:
        if not self.result.rows:
            return "no rows"
        top = max(r["target"] for r in self.result.rows)
        return f"perplexity at {top:.0%}: " + ", ".join(
            f"{r['method']} {r['increase']:+.1%} ({r['reads_skipped']:.0%} of MLP reads skipped)"
            for r in self.result.rows if r["target"] == top)

    def figures(self) -> list:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for method in dict.fromkeys(r["method"] for r in self.result.rows):
            rows = [r for r in self.result.rows if r["method"] == method]
            xs = [0.0] + [r["reads_skipped"] for r in rows]
            ax.plot([x * 100 for x in xs], [self.result.dense_ppl] + [r["ppl"] for r in rows], "o-", label=method)
        ax.set_xlabel("MLP weight reads skipped (%), from the sparsity each input ran with")
        ax.set_ylabel("perplexity (neutral passages)")
        ax.set_title(self.result.model)
        ax.legend()
        return [fig]

    def table(self):
        cols = ["method", "target", "mlp.in sparsity", "mlp.hidden sparsity", "MLP reads skipped", "perplexity",
                "increase"]
        rows = [["dense", "—", "—", "—", "—", self.result.dense_ppl, 0.0]]
        rows += [[r["method"], r["target"], r["mlp_in"], r["mlp_hidden"], r["reads_skipped"], r["ppl"], r["increase"]]
                 for r in self.result.rows]
        return cols, rows


def write_evaluation(result: SparseEvalResult, out, identity: dict):
    """``evaluation.json`` and ``report.html`` under ``out``; returns their paths."""
    from pathlib import Path

    from actlab.files import write_json
    from actlab.report.html import write_report

    out = Path(out)
    record = {"model": identity, "dense_ppl": result.dense_ppl, "rows": result.rows, "exactness": result.exactness}
    json_path = write_json(out / "evaluation.json", record)
    html_path = write_report(out / "report.html", f"Activation-sparse inference: {result.model}",
                             "perplexity of the neutral passages against MLP sparsity, per method",
                             [SparseEvalSection(result)])
    return json_path, html_path
