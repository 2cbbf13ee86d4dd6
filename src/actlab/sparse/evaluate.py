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


from actlab.errors import ActlabError
from actlab.sparse.attention import same_zeros
from actlab.sparse.mlp import measured_sparsity, splice
from actlab.sparse.thresholds import METHODS, calibrate

__all__ = ["SparseEvalResult", "SparseEvalSection", "VARIANTS", "neutral_texts", "genre_prompts", "genre_fidelity",
           "reads_skipped", "evaluate_sparsity", "exactness", "write_evaluation"]


def neutral_texts(n: int = 24) -> list[str]:
    """The bundled neutral passages (``datasets/genres/neutral.txt``), the first ``n``."""
    from importlib import resources

    text = resources.files("actlab.datasets.genres").joinpath("neutral.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:n]


@dataclass
class SparseEvalResult:
    model: str
    dense_ppl: float
    dense_genre: float = float("nan")  # genre rate of the dense model's continuations
    rows: list[dict] = field(default_factory=list)  # method, target, ppl, increase, sparsity of each input kind
    exactness: dict = field(default_factory=dict)  # method -> max |logit difference|

    def table(self) -> list[str]:
        lines = ["| method | target | attn.in | attn.o | mlp.in | mlp.hidden | block reads skipped | perplexity | "
                 "increase | genre rate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                 f"| dense | 0% | — | — | — | — | — | {self.dense_ppl:.3f} | — | {self.dense_genre:.0%} |"]
        for r in self.rows:
            cells = [f"{r.get(k, float('nan')):.1%}".replace("nan%", "—") for k in ("attn_in", "attn_o", "mlp_in",
                                                                                    "mlp_hidden", "reads_skipped")]
            lines.append(f"| {r['method']} | {r['target']:.0%} | " + " | ".join(cells)
                         + f" | {r['ppl']:.3f} | {r['increase']:+.2%} | {r.get('genre_rate', float('nan')):.0%} |")
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
        with same_zeros(model, trace):
            dense = model(text).logits
        worst = max(worst, float((sparse - dense).abs().max()))
    return worst


VARIANTS = METHODS + ("teal-greedy", "wina-greedy")  # "-greedy": TEAL's per-block allocation of the levels


def genre_prompts(per_genre: int = 4, words: int = 8) -> list[tuple[str, str]]:
    """(prompt, genre): the first ``words`` words of ``per_genre`` evenly spaced held-out passages per genre."""
    import re

    from actlab.datasets.genres import GENRES, heldout

    out = []
    for genre in GENRES:
        rows = heldout(genre)
        for row in rows[:: max(1, len(rows) // per_genre)][:per_genre]:
            ends = [m.end() for m in re.finditer(r"\S+", row["text"])]
            out.append((row["text"][: ends[min(words, len(ends)) - 1]], genre))
    return out


def genre_fidelity(model, prompts: list[tuple[str, str]], new_tokens: int = 24) -> float:
    """The share of greedy continuations the bundled genre classifier puts in their prompt's genre."""
    from actlab.evals.genre import bundled

    texts = model.generate([p for p, _ in prompts], max_new_tokens=new_tokens)
    predicted = bundled().predict(texts)
    return sum(p == g for p, (_, g) in zip(predicted, prompts)) / len(prompts)


def reads_skipped(model, ran: dict[str, float]) -> float:
    """The share of the blocks' weight reads (attention and MLP) the sparsity each input ran with skips."""
    from actlab.sparse.allocate import unit_weights

    skipped = total = 0.0
    for layer in range(model.n_layers):
        for unit, weight in unit_weights(model, layer).items():
            value = ran.get(f"{unit}.{layer}", 0.0)
            skipped += weight * (0.0 if math.isnan(value) else value)
            total += weight
    return skipped / total


def _row(model, variant: str, target: float, ppl: float, ran: dict, dense) -> dict:
    kinds = {kind: _mean([v for name, v in ran.items() if name.rsplit(".", 1)[0] == kind])
             for kind in ("attn.in", "attn.o", "mlp.in", "mlp.hidden")}
    return {"method": variant, "target": target, "ppl": ppl, "increase": ppl / dense.dense_ppl - 1,
            "mlp_in": kinds["mlp.in"], "mlp_hidden": kinds["mlp.hidden"], "attn_in": kinds["attn.in"],
            "attn_o": kinds["attn.o"], "reads_skipped": reads_skipped(model, ran), "per_input": ran}


def evaluate_sparsity(model, methods=METHODS, sparsities=(0.25, 0.4, 0.5), *, texts: list[str] | None = None,
                      calibration_tokens: int = 8192, exact_texts: int = 2, genre_per_genre: int = 4,
                      progress=None) -> SparseEvalResult:
    """Perplexity of ``texts`` (default: 24 neutral passages) and the genre rate of greedy continuations of held-out
    genre prompts (``genre_per_genre`` per genre; 0: not measured) for every method × target sparsity, with the
    dense values and the kernel's exactness per method (at the largest target). Methods: ``METHODS`` and
    ``teal-greedy`` / ``wina-greedy`` (the greedy per-block allocation)."""
    from actlab.evals.perplexity import perplexity

    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        raise ActlabError(f"unknown method(s) {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    if not model.is_causal:
        raise ActlabError(f"{model.name} is not a causal LM: there is no perplexity to measure")
    texts = neutral_texts() if texts is None else list(texts)
    prompts = genre_prompts(genre_per_genre) if genre_per_genre else []
    result = SparseEvalResult(model.name, perplexity(model, texts))
    result.dense_genre = genre_fidelity(model, prompts) if prompts else float("nan")
    for variant in methods:
        method, _, allocation = variant.partition("-")
        for target in sparsities:
            thresholds = calibrate(model, method, target, tokens=calibration_tokens, allocation=allocation or "uniform")
            with splice(model, thresholds) as spliced:
                ppl = perplexity(model, texts, batch_size=1)  # one text per call: the counts see no padding
            row = _row(model, variant, target, ppl, measured_sparsity(spliced), result)
            if "levels" in thresholds.info:  # the greedy allocation's per-input levels, to set against "per_input"
                row["levels"] = thresholds.info["levels"]
            with splice(model, thresholds):
                row["genre_rate"] = genre_fidelity(model, prompts) if prompts else float("nan")
            result.rows.append(row)
            if progress is not None:
                progress(result.rows[-1])
        result.exactness[variant] = exactness(model, thresholds, texts[:exact_texts])
    return result


class SparseEvalSection:
    """The report section: perplexity and genre rate against the share of weight reads skipped, and the table."""

    key, title = "sparse", "Activation-sparse inference: perplexity and genre rate against sparsity"

    def __init__(self, result: SparseEvalResult):
        self.result = result
        self.explanation = (
            "Thresholds calibrated on the bundled training text to each target sparsity; perplexity of the neutral "
            "passages and the genre rate of greedy continuations of held-out genre prompts (the bundled genre "
            "classifier on 24 new tokens) with the inputs below their thresholds skipped: attention q/k/v input "
            "(attn.in) and output-projection input (attn.o) for TEAL and WINA, MLP gate/up input (mlp.in) and hidden "
            "neurons (mlp.hidden: down input). x axis: the share of the blocks' weight reads (attention and MLP) the "
            "zeros skip, from the sparsity each input ran with (CATS and CETT sparsify the down input only; exact "
            "zeros count: a ReLU MLP skips its natural zeros too). '-greedy': TEAL's per-block allocation of levels. "
            "Exactness (max |logit difference| of the kernel path against the dense model with the same zeros): "
            + ", ".join(f"{m} {v:.1e}" for m, v in result.exactness.items()))

    def headline(self) -> str:
        if not self.result.rows:
            return "no rows"
        top = max(r["target"] for r in self.result.rows)
        return f"perplexity at {top:.0%}: " + ", ".join(
            f"{r['method']} {r['increase']:+.1%} ({r['reads_skipped']:.0%} of weight reads skipped)"
            for r in self.result.rows if r["target"] == top)

    def figures(self) -> list:
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for method in dict.fromkeys(r["method"] for r in self.result.rows):
            rows = [r for r in self.result.rows if r["method"] == method]
            xs = [0.0] + [r["reads_skipped"] * 100 for r in rows]
            left.plot(xs, [self.result.dense_ppl] + [r["ppl"] for r in rows], "o-", label=method)
            right.plot(xs, [self.result.dense_genre * 100] + [r.get("genre_rate", math.nan) * 100 for r in rows],
                       "o-", label=method)
        for ax, label in ((left, "perplexity (neutral passages)"), (right, "genre rate of continuations (%)")):
            ax.set_xlabel("block weight reads skipped (%)")
            ax.set_ylabel(label)
            ax.legend()
        left.set_yscale("log")
        fig.suptitle(self.result.model)
        return [fig]

    def table(self):
        cols = ["method", "target", "attn.in", "attn.o", "mlp.in", "mlp.hidden", "block reads skipped", "perplexity",
                "increase", "genre rate"]
        rows = [["dense", "—", "—", "—", "—", "—", "—", self.result.dense_ppl, 0.0, self.result.dense_genre]]
        rows += [[r["method"], r["target"], r["attn_in"], r["attn_o"], r["mlp_in"], r["mlp_hidden"], r["reads_skipped"],
                  r["ppl"], r["increase"], r.get("genre_rate", math.nan)] for r in self.result.rows]
        return cols, rows


def write_evaluation(result: SparseEvalResult, out, identity: dict):
    """``evaluation.json`` and ``report.html`` under ``out``; returns their paths."""
    from pathlib import Path

    from actlab.files import write_json
    from actlab.report.html import write_report

    out = Path(out)
    record = {"model": identity, "dense_ppl": result.dense_ppl, "dense_genre_rate": result.dense_genre,
              "rows": result.rows, "exactness": result.exactness}
    json_path = write_json(out / "evaluation.json", record)
    html_path = write_report(out / "report.html", f"Activation-sparse inference: {result.model}",
                             "perplexity and genre rate against sparsity, per method",
                             [SparseEvalSection(result)])
    return json_path, html_path
