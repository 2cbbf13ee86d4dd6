"""``actlab profile``: the per-layer activation profile and its HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from actlab.cli import (
    BatchOpt, DataOpt, DeviceOpt, DtypeOpt, MaxTokensOpt, ModelArg, app, at_least, console, documents, friendly,
    load_model, names,
)
from actlab.errors import ActlabError

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
    redundancy, neuron readout) written as report.html + profile.json.

    Under torchrun (`torchrun --nproc-per-node N --no-python actlab profile ...`) the ranks share the
    collection pass (on cuda:LOCAL_RANK when --device is cuda); rank 0 runs the analyses and writes the files."""
    from actlab.analyses.profile import run_profile
    from actlab.dist import init
    from actlab.dist.placement import rank_device
    from actlab.io import check_output_dir, read_documents

    chosen = names(analyses)
    unknown = [a for a in chosen if a not in ANALYSES]
    if unknown or not chosen:
        raise ActlabError(f"--analyses: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(ANALYSES)}")
    for value, option in ((reservoir, "--reservoir"), (batch_size, "--batch-size"), (max_tokens, "--max-tokens")):
        at_least(value, 1, option)
    check_output_dir(out, ("profile.json", "report.html"), what="profiles")
    with init() as rank:
        m = load_model(model, rank_device(device, rank), dtype)
        docs = documents(data, m, max_tokens) if (data is not None or max_tokens is not None) else None
        eval_texts = list(read_documents(eval_data)) if eval_data is not None else None
        run = run_profile(m, docs, eval_texts=eval_texts, out_dir=out, analyses=chosen, reservoir_size=reservoir,
                          batch_size=batch_size, progress=rank.is_main, distributed=rank.world_size > 1)
    if not rank.is_main:
        return
    console.print(run.headline_table(f"profile of {m.name} ({run.meta['n_tokens']:,} tokens, {run.seconds:.0f} s)"))
    console.print(f"[green]report:[/] {escape(str(run.report_path.resolve()))}")
