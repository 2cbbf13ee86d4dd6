"""``actlab profile``: one streaming pass over a corpus, every analysis, one JSON and one HTML report.

Memory is bounded by construction: statistics are streaming reductions and every analysis that
needs samples reads the fixed-size reservoir, so profiling 1M tokens costs the memory of 100k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from actlab.analyses.base import ProfileData, collect_profile_data
from actlab.dist.env import current
from actlab.engine.progress import progress_bar
from actlab.engine.config import positive_int
from actlab.errors import ActlabError

ANALYSES = ("sparsity", "dead", "ppl_sparsity", "massive", "linearity", "lenses", "redundancy", "readout")


@dataclass
class ProfileRun:
    """What ``run_profile`` returns: the results and where they were written."""

    results: list
    data: ProfileData
    out_dir: Path | None
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def report_path(self) -> Path | None:
        return self.out_dir / "report.html" if self.out_dir else None

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "summary": {r.key: r.headline() for r in self.results},
            "analyses": {r.key: r.to_dict() for r in self.results},
        }

    def headline_table(self, title: str):
        """The summary as a rich Table (analysis, headline), for terminals."""
        from rich.table import Table

        table = Table(title=title)
        table.add_column("analysis")
        table.add_column("headline")
        for r in self.results:
            table.add_row(r.title, r.headline())
        return table

    def __getitem__(self, key: str):
        for r in self.results:
            if r.key == key:
                return r
        raise KeyError(key)


def default_texts(model) -> tuple[list[str], list[str]]:
    """The bundled prompt set to profile on, and held-out neutral passages for perplexity checks."""
    from actlab.datasets import default_prompts

    docs = default_prompts()
    try:
        from importlib import resources

        neutral = resources.files("actlab.datasets.genres").joinpath("neutral.txt").read_text(encoding="utf-8")
        eval_texts = [line for line in neutral.splitlines() if line.strip()][:24]
    except (FileNotFoundError, ModuleNotFoundError):
        eval_texts = docs[-24:]
    return docs, eval_texts


def run_profile(
    model,
    docs: Sequence[str] | None = None,
    *,
    eval_texts: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    analyses: Sequence[str] = ANALYSES,
    reservoir_size: int = 4096,
    batch_size: int = 8,
    progress: bool = False,
    distributed: bool = False,
) -> ProfileRun:
    """Profile ``model`` on ``docs`` (default: the bundled prompt set) and write the report.

    With ``distributed`` (inside torchrun) the ranks share the collection pass, after which every rank
    holds the same data, equal to one process's; rank 0 alone runs the analyses and writes the files
    (the other ranks return a run with ``data`` and no results), so the output equals a one-process run's."""
    from actlab.analyses.dead import dead_neurons
    from actlab.analyses.lenses import lenses
    from actlab.analyses.linearity import layer_linearity
    from actlab.analyses.massive import massive_activations
    from actlab.analyses.ppl_sparsity import ppl_sparsity
    from actlab.analyses.readout import neuron_readout
    from actlab.analyses.redundancy import module_redundancy
    from actlab.analyses.sparsity import activation_sparsity

    if isinstance(analyses, str):
        raise ActlabError(f"analyses must be a list of names such as ['sparsity', 'lenses'], not the string {analyses!r}")
    positive_int(reservoir_size, "reservoir_size")
    positive_int(batch_size, "batch_size")
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ActlabError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    default_docs, default_eval = default_texts(model)
    docs = list(docs) if docs is not None else default_docs
    eval_texts = list(eval_texts) if eval_texts is not None else default_eval
    start = time.perf_counter()
    data = collect_profile_data(model, docs, eval_texts=eval_texts, reservoir_size=reservoir_size,
                                batch_size=batch_size, progress=progress, distributed=distributed)
    if distributed and not current().is_main:
        return ProfileRun(results=[], data=data, out_dir=None, seconds=time.perf_counter() - start,
                          meta={"n_tokens": data.n_tokens})
    prompts = docs[:32]
    steps = {
        "sparsity": lambda: activation_sparsity(data, model),
        "dead": lambda: dead_neurons(data, model),
        "ppl_sparsity": lambda: ppl_sparsity(model, data, eval_texts),
        "massive": lambda: massive_activations(model, data, prompts, eval_texts),
        "linearity": lambda: layer_linearity(model, data, eval_texts),
        "lenses": lambda: lenses(model, data),
        "redundancy": lambda: module_redundancy(model, data, eval_texts),
        "readout": lambda: neuron_readout(model),
    }
    results, timings = [], {"collect": round(time.perf_counter() - start, 2)}
    with progress_bar("analyses", len(analyses), unit="analyses", enabled=progress) as bar:
        for key in analyses:
            t0 = time.perf_counter()
            results.append(steps[key]())
            timings[key] = round(time.perf_counter() - t0, 2)
            bar.advance(1)
    meta = {
        "model": model.identity(),
        "n_tokens": data.n_tokens,
        "n_documents": len(docs),
        "n_eval_texts": len(eval_texts),
        "reservoir_size": len(data.samples),
        "seconds": round(time.perf_counter() - start, 2),
        "timings": timings,
    }
    run = ProfileRun(results=results, data=data, out_dir=Path(out_dir) if out_dir else None,
                     seconds=time.perf_counter() - start, meta=meta)
    if out_dir is not None:
        write_profile(run, model)
    return run


def write_profile(run: ProfileRun, model) -> None:
    """``profile.json`` (every number shown) and ``report.html`` (figures embedded) in ``run.out_dir``."""
    from actlab.report.html import write_json, write_report

    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "profile.json", run.to_dict())
    meta = run.meta
    subtitle = (f"{model.name} · {model.sitemap.model_class} · {model.n_layers} layers · d_model {model.d_model} · "
                f"d_mlp {model.d_mlp} · {meta['n_tokens']:,} tokens from {meta['n_documents']} documents · "
                f"reservoir {meta['reservoir_size']:,} tokens · {meta['seconds']:.0f} s")
    write_report(out / "report.html", f"actlab profile: {model.name}", subtitle, run.results)
