"""``actlab demo``: the guided tour."""

from __future__ import annotations

from pathlib import Path

import typer

from actlab.cli import app, console, friendly


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Where the tour writes report.html and its files."),
    quick: bool = typer.Option(False, help="Fewer prompts and coefficients (about half the time)."),
):
    """The guided tour on the bundled models: profile, steer, paste (Command-V), one HTML report."""
    from actlab.experiments.tour import run_tour
    from actlab.io import check_output_dir

    # a finished tour leaves report.html; an interrupted one, its first profile folders
    check_output_dir(out, ("report.html", "tour.json", "profile-demo-llama", "profile-demo-gpt2"), what="demo reports")
    run_tour(out, quick=quick, console=console)
