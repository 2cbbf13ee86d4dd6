"""``actlab profile``: the per-layer activation profile and its HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from actlab.cli import (
    BatchOpt, DataOpt, DeviceOpt, DtypeOpt, MaxTokensOpt, ModelArg, app, console, documents, friendly, load_model,
    names,
)

ANALYSES = ("sparsity", "dead", "ppl_sparsity", "massive", "linearity", "lenses", "redundancy", "readout")


@app.command()
@friendly
def profile(
    model: str = ModelArg,
    data: Optional[Path] = DataOpt,
    out: Path = typer.Option(Path("profile"), "--out", "-o", help="Output directory for report.html and profile.json."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out texts for the perplexity checks (default: bundled neutral passages)."),
    max_tokens: Optional[int] = MaxTokensOpt,
    analyses: str = typer.Option(",".join(ANALYSES), help="Comma-separated analyses to run."),
    reservoir: int = typer.Option(4096, help="Tokens kept in the fixed-size sample used by fits (memory bound)."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Per-layer activation profile (sparsity, dead neurons, PPL-p%, massive activations, linearity, lenses,
    redundancy, neuron readout) written as report.html + profile.json."""
    from actlab.analyses.profile import run_profile
    from actlab.io import read_documents

    m = load_model(model, device, dtype)
    docs = documents(data, m, max_tokens) if (data is not None or max_tokens is not None) else None
    eval_texts = list(read_documents(eval_data)) if eval_data is not None else None
    run = run_profile(m, docs, eval_texts=eval_texts, out_dir=out, analyses=names(analyses),
                      reservoir_size=reservoir, batch_size=batch_size, progress=True)
    console.print(run.headline_table(f"profile of {m.name} ({run.meta['n_tokens']:,} tokens, {run.seconds:.0f} s)"))
    console.print(f"[green]report:[/] {run.report_path.resolve()}")
